// mproc — what lets the threads of a process share one end of a Pipe.
//
// A Connection's sends take its send lock and its receives its receive lock, so threads that
// share an end take turns a whole message at a time. A duplex send that finds the socket full
// waits for room holding no lock, and reads what the peer sends into the end's buffer meanwhile
// (so two ends that both send large messages do not deadlock) only under the receive lock, taken
// at once and held for that read alone: a send never keeps a receive waiting.
//
// close() from another thread ends the end at once for every later call, and releases its
// descriptors when no call is inside any more (mproc::wait counts as one): the last call to leave
// releases them. A call inside is not woken (no descriptor or system call per message is spent on
// that): a receive waiting for the next message returns it, or the end of the stream.
//
// A child forked while a parent thread was inside a call (a receive asleep, say) has copies of
// these locks that no thread of its own will release, and a count of calls inside that none of
// its threads will end: each process makes them afresh on its first call (fresh()). Moving or
// destroying an end needs no thread inside its calls, as for any object.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <new>
#include <sys/types.h>

#include "fork_locks.hpp"
#include "process_id.hpp"

namespace mproc::detail {

class EndLocks {
public:
    /// The locks of an end whose descriptor is `descriptor` (-1: an end that holds none).
    explicit EndLocks(int descriptor = -1) noexcept
        : descriptor_(descriptor), state_(descriptor < 0 ? closed_bit | released_bit : 0), pid_(this_process_id()) {
        if (descriptor >= 0) (void)renewal();  // registered now: see renewal()
    }
    /// An end moves with no thread inside either end's calls: the locks stay where they are (each
    /// object has its own), and what they describe moves. The moved-from end is closed.
    EndLocks(EndLocks&& other) noexcept : EndLocks(-1) { take(other); }
    EndLocks& operator=(EndLocks&& other) noexcept {
        if (this != &other) take(other);
        return *this;
    }
    EndLocks(const EndLocks&) = delete;
    EndLocks& operator=(const EndLocks&) = delete;

    /// The end's descriptor, or -1 once closed (readable without a lock, from any thread).
    int descriptor() const noexcept { return descriptor_.load(std::memory_order_acquire); }
    bool closed() const noexcept { return descriptor() < 0; }

    /// A call comes in: false (and nothing counted) once the end is closed.
    [[nodiscard]] bool enter() noexcept {
        fresh();
        std::uint64_t now = state_.load(std::memory_order_relaxed);
        do
            if (now & closed_bit) return false;
        while (
            !state_.compare_exchange_weak(now, now + one_call, std::memory_order_acquire, std::memory_order_relaxed));
        return true;
    }
    /// A call that entered leaves: true if it was the last one inside a closed end, and must then
    /// release the descriptors.
    [[nodiscard]] bool leave() noexcept {
        return state_.fetch_sub(one_call, std::memory_order_acq_rel) - one_call == closed_bit && claim();
    }
    /// Marks the end closed: true if no call is inside and the descriptors are not released yet,
    /// and the caller must release them now (otherwise the last call to leave does).
    [[nodiscard]] bool close() noexcept {
        fresh();
        descriptor_.store(-1, std::memory_order_release);
        state_.fetch_or(closed_bit, std::memory_order_acq_rel);
        return claim();
    }

    std::mutex& send() noexcept { return send_; }
    std::timed_mutex& receive() noexcept { return receive_; }

private:
    static constexpr std::uint64_t closed_bit = 1;
    static constexpr std::uint64_t released_bit = 2;  // the descriptors are let go (or owed to nobody)
    static constexpr std::uint64_t one_call = 4;

    /// Whether this caller releases the descriptors: the end is closed, no call is inside, and
    /// nobody has released them. One caller wins.
    bool claim() noexcept {
        std::uint64_t expected = closed_bit;
        return state_.compare_exchange_strong(expected, closed_bit | released_bit, std::memory_order_acq_rel);
    }

    void take(EndLocks& other) noexcept {
        descriptor_.store(other.descriptor_.exchange(-1, std::memory_order_acq_rel), std::memory_order_release);
        state_.store(
            other.state_.exchange(closed_bit | released_bit, std::memory_order_acq_rel) & (closed_bit | released_bit),
            std::memory_order_release);
    }

    /// In a process other than the one that last made them, the locks and the count of calls
    /// inside are made afresh: their copies describe threads of another process. (An end the
    /// parent closed while a thread was inside is closed here too, its descriptors owed: the
    /// child's close() releases them.) Under a mutex no fork copies held, so two threads of the
    /// child do not both make them.
    void fresh() noexcept {
        const pid_t me = this_process_id();
        if (pid_.load(std::memory_order_acquire) == me) return;
        const std::lock_guard lock(renewal());
        if (pid_.load(std::memory_order_relaxed) == me) return;
        new (&send_) std::mutex;  // over a copy no thread of this process holds or waits for
        new (&receive_) std::timed_mutex;
        state_.store(state_.load(std::memory_order_relaxed) & (closed_bit | released_bit), std::memory_order_relaxed);
        pid_.store(me, std::memory_order_release);
    }
    /// The mutex fresh() holds, registered with ForkLocks by the first end made (before any
    /// fork copies it: registered lazily, a fork on another thread could copy it held).
    static std::mutex& renewal() noexcept {
        static std::mutex mutex;
        [[maybe_unused]] static const bool registered = (ForkLocks::add(ForkLockRank::connection_locks, mutex), true);
        return mutex;
    }

    std::mutex send_;
    std::timed_mutex receive_;
    std::atomic<int> descriptor_;
    std::atomic<std::uint64_t> state_;  // calls inside (one_call each) | released_bit | closed_bit
    std::atomic<pid_t> pid_;            // the process that made send_, receive_ and the count
};

}  // namespace mproc::detail
