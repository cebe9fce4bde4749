// mproc — which process this is, without a system call each time.
#pragma once

#include <atomic>
#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

namespace mproc::detail {

/// getpid(), without a system call on every use (a Pool submit, a Connection's call): cached, and
/// forgotten in every child forked through fork(3) (all of mproc's forks are). A child made by a
/// raw clone/fork system call keeps the parent's cached pid, and so is not told apart from it.
inline pid_t this_process_id() noexcept {
    static std::atomic<pid_t> cached{0};
    [[maybe_unused]] static const int hooked = ::pthread_atfork(nullptr, nullptr, [] { cached.store(0); });
    pid_t pid = cached.load(std::memory_order_relaxed);
    if (pid == 0) {
        pid = ::getpid();
        cached.store(pid, std::memory_order_relaxed);
    }
    return pid;
}

}  // namespace mproc::detail
