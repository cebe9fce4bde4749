// mproc — durations and deadlines.
#pragma once

#include <chrono>
#include <climits>
#include <cstdint>
#include <optional>

namespace mproc {

/// Every timeout in mproc: 100ms, 2s and Seconds{0.5} all convert to it.
using Seconds = std::chrono::duration<double>;

namespace detail {

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

/// The steady clock as a plain count of nanoseconds, for times kept in shared memory (a
/// time_point is not a type to put there).
inline std::int64_t steady_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

}  // namespace detail
}  // namespace mproc
