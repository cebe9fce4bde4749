// mproc — the one place that forks.
//
// Before fork: flush every stdio buffer, so output the parent wrote is not written again by the
// child. In the child: forget the parent's children, arm the parent-death signal (and re-check the
// parent, which may have died before the signal was armed), run the body, flush, and leave with
// _exit so the parent's atexit handlers and static destructors never run twice.
#pragma once

#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <sys/prctl.h>
#include <sys/types.h>
#include <unistd.h>
#include <utility>

#include "../errors.hpp"
#include "child_registry.hpp"

namespace mproc::detail {

/// Who this process is, as current_process() reports it.
struct Identity {
    std::string name = "MainProcess";
    pid_t pid = 0;
    /// The number of Process objects created here, for "Process-N" names.
    int process_counter = 0;
    /// Nonzero in every process mproc forked.
    bool is_child = false;
};

inline Identity& identity() {
    static Identity self;
    return self;
}

inline void flush_stdio() noexcept {
    try {
        std::cout.flush();
        std::cerr.flush();
        std::clog.flush();
    } catch (...) {
    }
    std::fflush(nullptr);
}

/// In a fresh child: die with the parent, even if the parent is already gone.
inline void die_with_parent(pid_t expected_parent) noexcept {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != expected_parent) ::_exit(128 + SIGKILL);
}

/// Forks; the child runs `body()` (which returns the exit status) and leaves with _exit.
/// Returns the child's pid in the parent, registered in children().
template <class Body>
pid_t fork_child(Body&& body, std::string child_name) {
    flush_stdio();
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) throw_errno("fork");
    if (pid == 0) {
        children().clear_after_fork();
        die_with_parent(parent);
        Identity& self = identity();
        self.name = std::move(child_name);
        self.pid = ::getpid();
        self.process_counter = 0;
        self.is_child = true;
        int status = 1;
        try {
            status = std::forward<Body>(body)();
        } catch (...) {
            // A body reports its own errors; this only keeps an escapee from running the parent's code.
        }
        flush_stdio();
        ::_exit(status);
    }
    children().add(pid);
    return pid;
}

}  // namespace mproc::detail
