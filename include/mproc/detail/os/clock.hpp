// mproc — durations and deadlines.
#pragma once

#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <optional>
#include <string>

#include "../../errors.hpp"
#include "../../time.hpp"

namespace mproc::detail {

using Clock = std::chrono::steady_clock;
/// No value means "wait forever".
using Deadline = std::optional<Clock::time_point>;

/// The longest time mproc counts down, in seconds (about 31 years): a longer timeout waits as
/// long as it takes, rather than overflow the clock.
inline constexpr double longest_timeout_s = 1e9;

/// A timeout a caller gave (`what` names it in the error), in seconds as mproc counts them down:
/// a negative one is 0 (the wait only tries), one past longest_timeout_s is that, and NaN is
/// refused with mproc::Error, as Python refuses it (ValueError) — converted to a clock's
/// integer ticks it would be undefined behaviour.
inline double timeout_seconds(Seconds timeout, const char* what = "timeout") {
    const double s = timeout.count();
    if (std::isnan(s)) throw Error(std::string("mproc: a ") + what + " of NaN seconds (not a number)");
    return s < 0 ? 0.0 : s > longest_timeout_s ? longest_timeout_s : s;
}
/// The same in nanoseconds: at most 1e18, which leaves room to add it to a clock reading.
inline std::int64_t timeout_ns(Seconds timeout, const char* what) {
    return static_cast<std::int64_t>(timeout_seconds(timeout, what) * 1e9);
}

/// Refuses a NaN timeout (mproc::Error), for a call that may return before it reads the clock (a
/// result already there, a frame already buffered): the refusal does not hang on timing.
inline void check_timeout(const std::optional<Seconds>& timeout) {
    if (timeout) (void)timeout_seconds(*timeout);
}

/// When a wait of `timeout` ends (none: it waits as long as it takes, as does a timeout of
/// longest_timeout_s or more). NaN: mproc::Error (timeout_seconds).
inline Deadline deadline_after(std::optional<Seconds> timeout) {
    if (!timeout) return std::nullopt;
    const double s = timeout_seconds(*timeout);
    if (s >= longest_timeout_s) return std::nullopt;
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(Seconds{s});
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
