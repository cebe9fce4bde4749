// mproc — waiting for one child to end, with or without a deadline.
#pragma once

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <optional>
#include <poll.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "child_registry.hpp"
#include "clock.hpp"
#include "io.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

/// pidfd_of, owned: an empty handle where the kernel has none.
inline UniqueFd open_pidfd(pid_t pid) noexcept { return UniqueFd(pidfd_of(pid)); }

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

/// Waits until `pid` has ended or the deadline passes, without reaping it (the caller reaps, and
/// may keep the status for others): on `pidfd` (readable once it has ended) when there is one;
/// otherwise with waitid(WNOWAIT) when there is no deadline, or by asking `ended()` between naps
/// (nap_until), which may reap.
template <class Ended> void wait_ended(pid_t pid, int pidfd, const Deadline& deadline, Ended&& ended) {
    if (pidfd >= 0) {
        wait_for(pidfd, POLLIN, deadline);
    } else if (!deadline) {
        siginfo_t info{};
        while (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR) {}
    } else {
        nap_until(ended, deadline);
    }
}

/// Waits for `pid` to end until the deadline and reaps it; returns its wait status, or nullopt
/// if it still runs at the deadline. `serial`: as for ChildRegistry::reap.
inline std::optional<int> wait_child(pid_t pid, const Deadline& deadline, std::uint64_t serial = 0) {
    if (!deadline) return children().reap(pid, true, serial);
    std::optional<int> status = children().reap(pid, false, serial);
    if (status) return status;
    const UniqueFd pidfd = open_pidfd(pid);
    wait_ended(pid, pidfd.get(), deadline, [&] { return (status = children().reap(pid, false, serial)).has_value(); });
    return status ? status : children().reap(pid, false, serial);
}

}  // namespace mproc::detail
