// mproc — waiting for one child to end, with or without a deadline.
#pragma once

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

/// Waits for `pid` to end until the deadline and reaps it; returns its wait status, or nullopt
/// if it still runs at the deadline. `serial`: as for ChildRegistry::reap.
inline std::optional<int> wait_child(pid_t pid, const Deadline& deadline, std::uint64_t serial = 0) {
    if (!deadline) return children().reap(pid, true, serial);
    if (auto status = children().reap(pid, false, serial)) return status;
    if (UniqueFd pidfd = open_pidfd(pid)) {
        wait_for(pidfd.get(), POLLIN, deadline);
        return children().reap(pid, false, serial);
    }
    // Kernels before 5.3: poll the status with a growing nap.
    auto nap = std::chrono::microseconds(200);
    while (!expired(deadline)) {
        if (auto status = children().reap(pid, false, serial)) return status;
        std::this_thread::sleep_for(nap);
        if (nap < std::chrono::milliseconds(20)) nap *= 2;
    }
    return children().reap(pid, false, serial);
}

}  // namespace mproc::detail
