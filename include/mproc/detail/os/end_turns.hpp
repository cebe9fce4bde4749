// mproc — what lets the threads of a process share one end of a Pipe.
//
// A Connection's sends take the end's send turn and its receives its receive turn, so threads that
// share an end take turns a whole message at a time. A duplex send that finds the socket full
// waits for room holding no turn, and reads what the peer sends into the end's buffer meanwhile
// (so two ends that both send large messages do not deadlock) only in the receive turn, taken at
// once and held for that read alone: a send never keeps a receive waiting.
//
// close() from another thread ends the end at once for every later call, and releases its
// descriptors when no call is inside any more (mproc::wait counts as one): the last call to leave
// releases them. A call waiting for its turn is woken and fails; a call inside a system call is
// not woken (no descriptor or system call per message is spent on that): a receive waiting for the
// next message returns it, or the end of the stream.
//
// Everything is one 32-bit word: the calls inside, the two turns, whether a thread sleeps for
// either, closed and released. A call that finds its turn free enters and takes it with one
// compare-and-swap, and leaves with another: no mutex, whose lock and unlock would be two more
// locked instructions on every message (the pinned round trip is a few microseconds). A call that
// finds its turn taken sleeps on the word (a private futex, with its turn as the wait's bitset, so
// that a hand-over of the other turn does not wake it) until the holder gives it back. Turns are
// not handed out in the order they were asked for, as a mutex's are not: after a hand-over, the
// first call to look takes the turn.
//
// A child forked while a parent thread was inside a call (a receive asleep, say) has a copy of
// the word that counts calls and turns none of its own threads will end: each process makes it
// afresh on its first call (fresh()). Moving or destroying an end needs no thread inside its
// calls, as for any object.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <sys/types.h>

#include "clock.hpp"
#include "fork_locks.hpp"
#include "futex.hpp"
#include "process_id.hpp"

namespace mproc::detail {

class EndTurns {
public:
    /// Which of an end's two kinds of call a turn is for.
    enum class Side : std::uint32_t { send = 4, receive = 8 };
    /// What a call that asked to come in got.
    enum class Entry {
        in,          // inside, holding the turn it asked for (if any)
        closed,      // the end is closed: nothing counted
        closed_last, // the end was closed while it waited, and it was the last call inside: the
                     // caller releases the descriptors
        timed_out,   // its turn did not come by the deadline: nothing counted
    };

    /// The turns of an end whose descriptor is `descriptor` (-1: an end that holds none).
    explicit EndTurns(int descriptor = -1) noexcept
        : descriptor_(descriptor), state_(descriptor < 0 ? closed_bit | released_bit : 0), pid_(this_process_id()) {
        if (descriptor >= 0) (void)renewal();  // registered now: see renewal()
    }
    /// An end moves with no thread inside either end's calls: the word stays where it is (each
    /// object has its own), and what it describes moves. The moved-from end is closed.
    EndTurns(EndTurns&& other) noexcept : EndTurns(-1) { take(other); }
    EndTurns& operator=(EndTurns&& other) noexcept {
        if (this != &other) take(other);
        return *this;
    }
    EndTurns(const EndTurns&) = delete;
    EndTurns& operator=(const EndTurns&) = delete;

    /// The end's descriptor, or -1 once closed (readable without a lock, from any thread).
    int descriptor() const noexcept { return descriptor_.load(std::memory_order_acquire); }
    bool closed() const noexcept { return descriptor() < 0; }

    /// A call comes in, taking no turn (mproc::wait, poll before its turn): false (and nothing
    /// counted) once the end is closed.
    [[nodiscard]] bool enter() noexcept {
        fresh();
        std::uint32_t now = state_.load(std::memory_order_relaxed);
        do
            if (now & closed_bit) return false;
        while (
            !state_.compare_exchange_weak(now, now + one_call, std::memory_order_acquire, std::memory_order_relaxed));
        return true;
    }
    /// A call comes in and takes the turn of its `side`, waiting for it while another call holds it, until
    /// `deadline` (none: for as long as it takes). A free turn is taken in the same step as the
    /// call is counted.
    [[nodiscard]] Entry enter(Side side, const Deadline& deadline = std::nullopt) noexcept {
        fresh();
        const auto bit = static_cast<std::uint32_t>(side);
        std::uint32_t now = state_.load(std::memory_order_relaxed);
        do
            if (now & closed_bit) return Entry::closed;
        while (!state_.compare_exchange_weak(now, now + one_call + (now & bit ? 0 : bit), std::memory_order_acquire,
                                             std::memory_order_relaxed));
        if (!(now & bit)) return Entry::in;
        // Counted inside, the turn held by another call: wait for it.
        const std::uint32_t sleeper = sleeper_bit(side);
        for (;;) {
            now = state_.load(std::memory_order_relaxed);
            if (now & closed_bit) return leave() ? Entry::closed_last : Entry::closed;
            if (!(now & bit)) {
                if (state_.compare_exchange_weak(now, now | bit, std::memory_order_acquire, std::memory_order_relaxed))
                    return Entry::in;
                continue;
            }
            // Looked at on every round: a wait that finds the word changed (any call entering or
            // leaving changes it) returns at once, without looking at the time.
            if (expired(deadline)) return leave() ? Entry::closed_last : Entry::timed_out;
            if (!(now & sleeper) && !state_.compare_exchange_weak(now, now | sleeper, std::memory_order_relaxed))
                continue;
            // Woken only by a hand-over of this turn (or close()), not of the other one.
            (void)futex_wait_private(state_, now | sleeper, deadline, sleeper);
        }
    }
    /// A call that entered without a turn leaves: true if it was the last one inside a closed end,
    /// and must then release the descriptors.
    [[nodiscard]] bool leave() noexcept {
        return last_inside_closed(state_.fetch_sub(one_call, std::memory_order_acq_rel) - one_call);
    }
    /// A call that holds its `side`'s turn gives it back and leaves (one step): true as leave() says.
    [[nodiscard]] bool leave(Side side) noexcept { return last_inside_closed(give(side, one_call)); }

    /// For a call inside: takes `side`'s turn if no call holds it, without waiting.
    [[nodiscard]] bool try_take(Side side) noexcept {
        const auto bit = static_cast<std::uint32_t>(side);
        std::uint32_t now = state_.load(std::memory_order_relaxed);
        do
            if (now & bit) return false;
        while (!state_.compare_exchange_weak(now, now | bit, std::memory_order_acquire, std::memory_order_relaxed));
        return true;
    }
    /// Gives back `side`'s turn, taken with try_take (the call stays inside).
    void give_back(Side side) noexcept { (void)give(side, 0); }

    /// Marks the end closed, and wakes the calls waiting for a turn (they fail): true if no call
    /// is inside and the descriptors are not released yet, and the caller must release them now
    /// (otherwise the last call to leave does).
    [[nodiscard]] bool close() noexcept {
        fresh();
        descriptor_.store(-1, std::memory_order_release);
        if (state_.fetch_or(closed_bit, std::memory_order_acq_rel) & sleepers) futex_wake_all_private(state_);
        return claim();
    }

private:
    static constexpr std::uint32_t closed_bit = 1;
    static constexpr std::uint32_t released_bit = 2;  // the descriptors are let go (or owed to nobody)
    // 4 and 8: the turns (Side). 16 and 32: a thread sleeps for the send or the receive turn.
    static constexpr std::uint32_t sleepers = 16 | 32;
    static constexpr std::uint32_t one_call = 64;
    static constexpr std::uint32_t sleeper_bit(Side side) noexcept { return static_cast<std::uint32_t>(side) << 2; }

    /// Clears `side`'s turn (held by the caller) and its sleeper bit, less `calls`; wakes the sleepers
    /// if there were any (each tries for the turn again). Returns the word after.
    std::uint32_t give(Side side, std::uint32_t calls) noexcept {
        const std::uint32_t clear = static_cast<std::uint32_t>(side) | sleeper_bit(side);
        std::uint32_t now = state_.load(std::memory_order_relaxed);
        while (!state_.compare_exchange_weak(now, (now - calls) & ~clear, std::memory_order_acq_rel,
                                             std::memory_order_relaxed)) {}
        if (now & sleeper_bit(side)) futex_wake_private(state_, sleeper_bit(side));
        return (now - calls) & ~clear;
    }

    /// Given the word just after a call left: whether that call must release the descriptors.
    bool last_inside_closed(std::uint32_t after) noexcept { return (after & ~sleepers) == closed_bit && claim(); }

    /// Whether this caller releases the descriptors: the end is closed, no call is inside, and
    /// nobody has released them (a sleeper bit left by a call that timed out does not count).
    /// One caller wins.
    bool claim() noexcept {
        std::uint32_t now = state_.load(std::memory_order_acquire);
        do
            if ((now & ~sleepers) != closed_bit) return false;
        while (!state_.compare_exchange_weak(now, closed_bit | released_bit, std::memory_order_acq_rel,
                                             std::memory_order_acquire));
        return true;
    }

    void take(EndTurns& other) noexcept {
        descriptor_.store(other.descriptor_.exchange(-1, std::memory_order_acq_rel), std::memory_order_release);
        state_.store(
            other.state_.exchange(closed_bit | released_bit, std::memory_order_acq_rel) & (closed_bit | released_bit),
            std::memory_order_release);
    }

    /// In a process other than the one that last made it, the word is made afresh, keeping only
    /// closed and released: its copy counts calls and turns of threads of another process. (An
    /// end the parent closed while a thread was inside is closed here too, its descriptors owed:
    /// the child's close() releases them.) Under a mutex no fork copies held, so two threads of
    /// the child do not both make it.
    void fresh() noexcept {
        const pid_t me = this_process_id();
        if (pid_.load(std::memory_order_acquire) == me) [[likely]]
            return;
        const std::lock_guard lock(renewal());
        if (pid_.load(std::memory_order_relaxed) == me) return;
        state_.store(state_.load(std::memory_order_relaxed) & (closed_bit | released_bit), std::memory_order_relaxed);
        pid_.store(me, std::memory_order_release);
    }
    /// The mutex fresh() holds, registered with ForkLocks by the first end made (before any
    /// fork copies it: registered lazily, a fork on another thread could copy it held).
    static std::mutex& renewal() noexcept {
        static std::mutex mutex;
        [[maybe_unused]] static const bool registered = (ForkLocks::add(ForkLockRank::connection_turns, mutex), true);
        return mutex;
    }

    std::atomic<int> descriptor_;
    // calls inside (one_call each) | sleeper bits | turns | released_bit | closed_bit; a futex word
    FutexWord state_;
    std::atomic<pid_t> pid_;  // the process that made the word
};

}  // namespace mproc::detail
