// mproc — waiting for one child to end, with or without a deadline.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <poll.h>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>

#include "child_registry.hpp"
#include "clock.hpp"
#include "io.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

/// A pidfd for `pid` (readable once it ends), or an empty handle where the kernel has none.
inline UniqueFd open_pidfd(pid_t pid) noexcept {
#ifdef SYS_pidfd_open
    return UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
#else
    (void)pid;
    return UniqueFd();
#endif
}

/// For kernels before 5.3, which have no pidfd to wait on: asks `done()` with a growing nap
/// (200 µs, doubling to 20 ms) between asks until it says true or `deadline` passes, then asks
/// once more.
template <class Done> bool nap_until(Done&& done, const Deadline& deadline) {
    for (auto nap = std::chrono::microseconds(200); !expired(deadline);) {
        if (done()) return true;
        std::this_thread::sleep_for(nap);
        if (nap < std::chrono::milliseconds(20)) nap *= 2;
    }
    return done();
}

/// Waits for `pid` to end until the deadline and reaps it; returns its wait status, or nullopt
/// if it still runs at the deadline. `serial`: as for ChildRegistry::reap.
inline std::optional<int> wait_child(pid_t pid, const Deadline& deadline, std::uint64_t serial = 0) {
    if (!deadline) return children().reap(pid, true, serial);
    if (auto status = children().reap(pid, false, serial)) return status;
    if (UniqueFd pidfd = open_pidfd(pid)) {
        wait_for(pidfd.get(), POLLIN, deadline);
        return children().reap(pid, false, serial);
    }
    std::optional<int> status;
    nap_until([&] { return (status = children().reap(pid, false, serial)).has_value(); }, deadline);
    return status;
}

}  // namespace mproc::detail
