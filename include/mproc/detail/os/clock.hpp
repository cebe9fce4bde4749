// mproc — durations and deadlines.
#pragma once

#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <optional>

#include "../../time.hpp"

namespace mproc::detail {

using Clock = std::chrono::steady_clock;
/// No value means "wait forever".
using Deadline = std::optional<Clock::time_point>;

inline Deadline deadline_after(std::optional<Seconds> timeout) {
    if (!timeout) return std::nullopt;
    const Seconds clamped = timeout->count() < 0 ? Seconds{0} : *timeout;
    // Far-future timeouts saturate rather than overflow the clock.
    if (clamped > Seconds{1e9}) return std::nullopt;
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(clamped);
}

/// Milliseconds left for poll(2): -1 forever, 0 when past, rounded up so a wait never ends early.
inline int poll_timeout_ms(const Deadline& deadline) {
    if (!deadline) return -1;
    const auto left = *deadline - Clock::now();
    if (left <= Clock::duration::zero()) return 0;
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
    return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

inline bool expired(const Deadline& deadline) { return deadline && Clock::now() >= *deadline; }

/// Now on the steady clock, in nanoseconds: a time that fits in an atomic in shared memory.
inline std::int64_t monotonic_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

/// `t` as the absolute timespec CLOCK_MONOTONIC waits take (futex, pthread_mutex_clocklock); a
/// time before the clock's epoch is its epoch.
inline timespec to_timespec(Clock::time_point t) noexcept {
    const auto since_epoch = t.time_since_epoch();
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
    timespec abs{};
    if (secs.count() < 0) return abs;
    abs.tv_sec = static_cast<time_t>(secs.count());
    abs.tv_nsec = static_cast<long>(std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - secs).count());
    return abs;
}

}  // namespace mproc::detail
