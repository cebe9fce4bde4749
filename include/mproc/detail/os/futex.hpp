// mproc — sleeping on a 32-bit word in shared memory, and waking the sleepers.
//
// These are the shared (not _PRIVATE) futex operations: the kernel keys the wait queue by the
// page behind the address, so processes that map the same memfd at different addresses still
// meet on the same word. Every wait takes an absolute CLOCK_MONOTONIC deadline (the clock behind
// std::chrono::steady_clock), so a wait interrupted by a signal resumes with the time that is
// left rather than starting over.
//
// A futex wake is a message that can be lost when the process that should send it is killed
// between publishing a change and waking the sleepers. mproc never lets that become a hang:
// every blocking wait sleeps at most `recheck_interval` before it re-checks its condition.
// Idle waiters thus wake about once a second, which costs microseconds of CPU per second.
//
// The _private pair is for a word in one process's own memory, waited on and woken by its
// threads only (a Pool result's, detail/pool/results.hpp; a Pipe end's turns, end_turns.hpp): the
// kernel keys it by the address alone, and with no other process taking part no wake-up can be
// lost to a death, so its waits sleep until their deadline or for good.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "clock.hpp"

namespace mproc::detail {

using FutexWord = std::atomic<std::uint32_t>;
static_assert(sizeof(FutexWord) == sizeof(std::uint32_t) && FutexWord::is_always_lock_free,
              "a futex word must be a plain lock-free 32-bit integer");

/// The longest a blocked waiter sleeps before it re-checks its condition on its own: 1 s. A test
/// may lengthen it (set_recheck_interval) to turn a lost wake-up, which the re-check would only
/// delay, into a hang it can see.
inline std::atomic<std::int64_t>& recheck_interval_ms() noexcept {
    static std::atomic<std::int64_t> ms{1000};
    return ms;
}
inline std::chrono::milliseconds recheck_interval() noexcept {
    return std::chrono::milliseconds(recheck_interval_ms().load(std::memory_order_relaxed));
}
inline void set_recheck_interval(std::chrono::milliseconds interval) noexcept {
    recheck_interval_ms().store(interval.count(), std::memory_order_relaxed);
}

/// The end of the next sleep for a wait that must be over by `deadline`.
inline Clock::time_point sleep_until_for(const Deadline& deadline) noexcept {
    const Clock::time_point cap = Clock::now() + recheck_interval();
    return deadline && *deadline < cap ? *deadline : cap;
}

/// The one futex wait loop: `op` is FUTEX_WAIT_BITSET, with FUTEX_PRIVATE_FLAG or without; `abs`
/// an absolute CLOCK_MONOTONIC deadline, or null for none; `bitset` the wakes it answers (see
/// futex_wake_private: any, by default).
inline bool futex_wait_op(FutexWord& word, std::uint32_t expected, const timespec* abs, int op,
                          std::uint32_t bitset = FUTEX_BITSET_MATCH_ANY) noexcept {
    for (;;) {
        const long rc = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), op, expected, abs, nullptr,
                                  bitset);
        if (rc == 0) return true;
        if (errno == ETIMEDOUT) return false;
        if (errno == EINTR) {
            if (word.load(std::memory_order_acquire) != expected) return true;
            continue;  // same absolute deadline: the signal does not extend the wait
        }
        return true;  // EAGAIN (value changed) or anything unexpected: let the caller look
    }
}

/// Sleeps while `word` holds `expected`, until woken or `until` passes (absolute, steady clock).
/// Returns false when the time ran out and true otherwise — woken, the value had already
/// changed, or a spurious return. Callers re-check their condition either way.
inline bool futex_wait(FutexWord& word, std::uint32_t expected, Clock::time_point until) noexcept {
    const timespec abs = to_timespec(until);
    return futex_wait_op(word, expected, &abs, FUTEX_WAIT_BITSET);
}

/// Wakes up to `count` processes sleeping on `word`.
inline void futex_wake(FutexWord& word, int count) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}
inline void futex_wake_all(FutexWord& word) noexcept { futex_wake(word, INT_MAX); }

/// Sleeps while `word`, in this process's own memory, holds `expected`, until a thread of this
/// process wakes it or `deadline` passes (none: no limit). Returns as futex_wait does. With a
/// `bitset`, only a wake whose bitset shares a bit with it wakes this sleeper (threads waiting on
/// one word for different things: futex_wake_private).
inline bool futex_wait_private(FutexWord& word, std::uint32_t expected, const Deadline& deadline,
                               std::uint32_t bitset = FUTEX_BITSET_MATCH_ANY) noexcept {
    timespec abs{};
    if (deadline) abs = to_timespec(*deadline);
    return futex_wait_op(word, expected, deadline ? &abs : nullptr, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, bitset);
}
/// Wakes every thread of this process sleeping on `word` (futex_wait_private) whose bitset shares
/// a bit with `bitset`.
inline void futex_wake_private(FutexWord& word, std::uint32_t bitset) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_BITSET | FUTEX_PRIVATE_FLAG, INT_MAX,
              nullptr, nullptr, bitset);
}
/// Wakes every thread of this process sleeping on `word` (futex_wait_private).
inline void futex_wake_all_private(FutexWord& word) noexcept { futex_wake_private(word, FUTEX_BITSET_MATCH_ANY); }

}  // namespace mproc::detail
