// mproc — what Lock and RLock (LockBase), Semaphore and BoundedSemaphore (SemaphoreBase),
// Condition (ConditionOps) and Barrier (BarrierBase) do to their state in shared memory
// (sync_state.hpp): acquire, release, wait and notify, the robust owner-died repairs, the checks
// for waiters that died, and the futex sleeps. The public classes in mproc/sync.hpp add their
// names, their construction, their encoding as task arguments, and little else.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <sys/types.h>
#include <unistd.h>
#include <utility>

#include "../../errors.hpp"
#include "../../time.hpp"
#include "../os/clock.hpp"
#include "../os/futex.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"
#include "sync_state.hpp"

namespace mproc::detail {

inline pid_t this_thread_id() noexcept { return ::gettid(); }

class ConditionOps;

/// The holds of a lock that Condition::wait gives up while it sleeps, and takes back after.
struct LockHolds {
    std::uint32_t depth;  // an RLock's recursion depth; 1 for a Lock
    bool owner_died;
};

/// The shared logic of Lock and RLock.
class LockBase {
public:
    /// Blocks until the lock is held (timeout: gives up and returns false). True also when the
    /// previous holder died holding it; owner_died() then says so.
    bool acquire(std::optional<Seconds> timeout = std::nullopt) {
        return acquire_until(deadline_after(timeout), false);
    }
    /// Releases a hold of the calling thread; throws mproc::Error if it holds none.
    void release() {
        LockState* s = ref_.as<LockState>();
        const pid_t me = this_thread_id();
        if (s->holder.load(std::memory_order_relaxed) != me || s->depth == 0)
            throw Error(std::string("mproc::") + kind() + "::release: the lock is not held by this thread");
        if (--s->depth == 0) {
            s->owner_died.store(0, std::memory_order_relaxed);
            s->holder.store(0, std::memory_order_relaxed);
        }
        if (!s->mutex.unlock())
            throw Error(std::string("mproc::") + kind() + "::release: the lock is not held by this thread");
    }

    // BasicLockable / Lockable / TimedLockable, for std::lock_guard, std::unique_lock, std::scoped_lock.
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return acquire_until(std::nullopt, true); }
    template <class Rep, class Period> bool try_lock_for(const std::chrono::duration<Rep, Period>& d) {
        return acquire(std::chrono::duration_cast<Seconds>(d));
    }
    template <class Clock, class Duration> bool try_lock_until(const std::chrono::time_point<Clock, Duration>& t) {
        // In seconds of double before the subtraction: in the clock's own integer ticks, a time
        // point near either end of its range (time_point::min(), a max() in coarse units) overflows.
        return acquire(Seconds(t.time_since_epoch()) - Seconds(Clock::now().time_since_epoch()));
    }

    /// True while the current holder got the lock from a holder that died holding it.
    bool owner_died() const { return ref_.as<LockState>()->owner_died.load(std::memory_order_relaxed) != 0; }

    /// True if both handles refer to the same lock.
    bool operator==(const LockBase& other) const noexcept { return ref_.same_object(other.ref_); }

protected:
    LockBase() = default;
    explicit LockBase(SharedRef ref) noexcept : ref_(std::move(ref)) {}

    static void init(LockState* s, std::uint64_t type, bool recursive) {
        s->header = {lock_magic, 0, type};
        s->mutex.init(recursive ? RobustMutex::Kind::recursive : RobustMutex::Kind::errorcheck);
        s->owner_died.store(0, std::memory_order_relaxed);
        s->holder.store(0, std::memory_order_relaxed);
        s->depth = 0;
    }
    void create(std::uint64_t type, bool recursive) {
        if (HandleDecodeScope::active()) return;
        ref_ = SharedRef::allocate(sizeof(LockState), alignof(LockState), "mproc-lock");
        init(ref_.as<LockState>(), type, recursive);
    }

    virtual const char* kind() const noexcept = 0;
    virtual ~LockBase() = default;
    LockBase(const LockBase&) = default;
    LockBase& operator=(const LockBase&) = default;
    LockBase(LockBase&&) noexcept = default;
    LockBase& operator=(LockBase&&) noexcept = default;

    bool acquire_until(const Deadline& deadline, bool try_only) {
        LockState* s = ref_.as<LockState>();
        const LockResult r = try_only ? s->mutex.try_lock() : s->mutex.lock_until(deadline);
        switch (r) {
            case LockResult::timed_out: return false;
            case LockResult::would_deadlock:
                if (try_only || deadline) return false;  // only this thread could release it
                throw Error(std::string("mproc::") + kind() +
                            "::acquire: this thread already holds the lock; acquiring it again would "
                            "deadlock (an RLock can be acquired recursively)");
            case LockResult::owner_died:
                s->mutex.mark_consistent();
                s->owner_died.store(1, std::memory_order_relaxed);
                s->depth = 0;
                break;
            case LockResult::acquired: break;
        }
        s->holder.store(this_thread_id(), std::memory_order_relaxed);
        ++s->depth;
        return true;
    }

    SharedRef ref_;

private:
    friend class ConditionOps;

    /// True if the calling thread holds the lock.
    bool held_by_caller() const {
        const LockState* s = ref_.as<LockState>();
        return s->holder.load(std::memory_order_relaxed) == this_thread_id() && s->depth != 0;
    }
    /// Releases every hold of the calling thread (which holds the lock) at once.
    LockHolds release_all() {
        LockState* s = ref_.as<LockState>();
        const LockHolds holds{s->depth, s->owner_died.load(std::memory_order_relaxed) != 0};
        s->depth = 0;
        s->owner_died.store(0, std::memory_order_relaxed);
        s->holder.store(0, std::memory_order_relaxed);
        for (std::uint32_t i = 0; i < holds.depth; ++i) (void)s->mutex.unlock();
        return holds;
    }
    /// Takes back what release_all() gave up, waiting as long as it takes. owner_died() is true
    /// afterwards if it was before, or if a holder died meanwhile.
    void reacquire(const LockHolds& holds) {
        acquire_until(std::nullopt, false);
        LockState* s = ref_.as<LockState>();
        for (std::uint32_t i = 1; i < holds.depth; ++i) {
            (void)s->mutex.lock();  // recursive, and held by this thread: returns at once
            ++s->depth;
        }
        if (holds.owner_died) s->owner_died.store(1, std::memory_order_relaxed);
    }
};

/// What a try_lock of a WaiterSlot's mutex says of the thread that waits there. Under the lock of
/// the slot's object, a slot whose thread is gone (or that nobody holds) is freed on the way.
enum class SlotHolder { alive, gone };
inline SlotHolder probe_slot(WaiterSlot& slot) {
    const LockResult r = slot.alive.try_lock();
    if (r == LockResult::timed_out || r == LockResult::would_deadlock) return SlotHolder::alive;  // held
    if (r == LockResult::owner_died) slot.alive.mark_consistent();
    (void)slot.alive.unlock();
    slot.state.store(slot_free, std::memory_order_relaxed);
    return SlotHolder::gone;
}
/// Makes `slot` (free) the calling thread's: holds its mutex until leave_slot().
inline bool take_slot(WaiterSlot& slot, std::uint32_t state) {
    const LockResult r = slot.alive.try_lock();
    if (r == LockResult::owner_died) slot.alive.mark_consistent();  // its last waiter died after leaving
    else if (r != LockResult::acquired) return false;
    slot.pid = static_cast<std::int32_t>(::getpid());
    slot.state.store(state, std::memory_order_seq_cst);
    return true;
}
inline void leave_slot(WaiterSlot& slot) {
    slot.state.store(slot_free, std::memory_order_relaxed);
    (void)slot.alive.unlock();
}

/// Condition's wait and notify. Every step runs under the condition's lock (which the caller
/// must hold), but the sleep itself: a waiter takes a WaiterSlot, gives up the lock, sleeps on its
/// slot's word until a notify marks it, and takes the lock back. notify(n) marks the n oldest
/// waiters that still live: one that died waiting is freed and skipped, so it swallows nothing.
class ConditionOps {
public:
    static void init(ConditionState* s, std::uint64_t type) {
        s->header = {condition_magic, 0, type};
        s->ticket = 0;
        for (WaiterSlot& slot : s->slots) {
            slot.alive.init();
            slot.state.store(slot_free, std::memory_order_relaxed);
            slot.pid = 0;
            slot.seq = 0;
        }
    }

    /// True if notified, false if the deadline passed first. Returns holding the lock as before.
    static bool wait(ConditionState* s, LockBase& lock, const Deadline& deadline) {
        require_held(lock, "wait");
        WaiterSlot& slot = free_slot(s);
        slot.seq = ++s->ticket;
        const LockHolds holds = lock.release_all();
        // A notify stores `notified` before it wakes: a waiter that missed the wake (the notifier
        // died between the two) still sees it at its next look, at most recheck_interval later.
        while (slot.state.load(std::memory_order_seq_cst) == slot_waiting && !expired(deadline))
            futex_wait(slot.state, slot_waiting, sleep_until_for(deadline));
        lock.reacquire(holds);
        const bool notified = slot.state.load(std::memory_order_relaxed) == slot_notified;
        leave_slot(slot);
        return notified;
    }

    /// Wakes up to `n` waiters, oldest first.
    static void notify(ConditionState* s, LockBase& lock, std::size_t n, const char* what) {
        require_held(lock, what);
        std::array<std::uint16_t, condition_capacity> order{};
        std::size_t waiting = 0;
        for (std::size_t i = 0; i < condition_capacity; ++i)
            if (s->slots[i].state.load(std::memory_order_relaxed) == slot_waiting)
                order[waiting++] = static_cast<std::uint16_t>(i);
        std::sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(waiting),
                  [s](std::uint16_t a, std::uint16_t b) { return s->slots[a].seq < s->slots[b].seq; });
        std::size_t woken = 0;
        for (std::size_t k = 0; k < waiting && woken < n; ++k) {
            WaiterSlot& slot = s->slots[order[k]];
            if (probe_slot(slot) == SlotHolder::gone) continue;  // died waiting: the next one gets it
            slot.state.store(slot_notified, std::memory_order_seq_cst);
            futex_wake(slot.state, 1);
            ++woken;
        }
    }

    /// Throws mproc::Error unless the calling thread holds `lock`.
    static void require_held(const LockBase& lock, const char* what) {
        if (!lock.held_by_caller())
            throw Error(std::string("mproc::Condition::") + what +
                        ": the calling thread does not hold the condition's lock");
    }

private:
    static WaiterSlot& free_slot(ConditionState* s) {
        for (WaiterSlot& slot : s->slots)
            if (slot.state.load(std::memory_order_relaxed) == slot_free && take_slot(slot, slot_waiting)) return slot;
        // All taken: some may belong to waiters that died.
        for (WaiterSlot& slot : s->slots)
            if (probe_slot(slot) == SlotHolder::gone && take_slot(slot, slot_waiting)) return slot;
        throw Error("mproc::Condition::wait: " + std::to_string(condition_capacity) +
                    " threads already wait on this condition, the most one holds");
    }
};

/// The shared logic of Semaphore and BoundedSemaphore.
class SemaphoreBase {
public:
    /// Takes one unit, waiting for one up to `timeout` (forever without one). False on timeout.
    bool acquire(std::optional<Seconds> timeout = std::nullopt) { return take(deadline_after(timeout), false); }
    /// Returns `n` units and wakes as many waiters. Throws mproc::Error, changing nothing, when
    /// `n` is less than 1 (as Python's release(n) raises ValueError) or the value would pass the
    /// bound (BoundedSemaphore) or the largest 32-bit value. (A signed `n`: a negative one given
    /// as an unsigned 32-bit number would have been a huge release.)
    void release(std::int64_t units = 1) {
        if (units < 1 || units > std::int64_t{UINT32_MAX})
            throw Error("mproc::Semaphore::release: the units released must be from 1 to " +
                        std::to_string(UINT32_MAX) + ", not " + std::to_string(units));
        const auto n = static_cast<std::uint32_t>(units);
        SemaphoreState* s = ref_.as<SemaphoreState>();
        // The sum in 64 bits: in 32 it wraps around and a huge release would lower the value.
        const std::uint64_t limit = s->bound == 0 ? std::uint64_t{UINT32_MAX} : s->bound;
        std::uint32_t v = s->value.load(std::memory_order_relaxed);
        do {
            if (std::uint64_t{v} + n > limit) {
                if (s->bound != 0) throw Error("mproc::BoundedSemaphore::release: released too many times");
                throw Error("mproc::Semaphore::release: releasing " + std::to_string(n) + " units to a value of " +
                            std::to_string(v) + " would pass the largest value a Semaphore holds (" +
                            std::to_string(UINT32_MAX) + ")");
            }
        } while (!s->value.compare_exchange_weak(v, v + n, std::memory_order_seq_cst));
        if (n != 0 && s->waiters.load(std::memory_order_seq_cst) != 0)
            futex_wake(s->value, n > static_cast<std::uint32_t>(INT_MAX) ? INT_MAX : static_cast<int>(n));
    }
    void lock() { acquire(); }
    void unlock() { release(); }
    bool try_lock() { return take(std::nullopt, true); }
    template <class Rep, class Period> bool try_lock_for(const std::chrono::duration<Rep, Period>& d) {
        return acquire(std::chrono::duration_cast<Seconds>(d));
    }
    /// The units available now (others may change it at once).
    std::uint32_t get_value() const { return ref_.as<SemaphoreState>()->value.load(std::memory_order_relaxed); }

protected:
    SemaphoreBase() = default;
    /// `value` is signed so that a negative one is refused (mproc::Error), as Python refuses it
    /// (ValueError), rather than wrapped to a huge count.
    void create(std::int64_t value, std::uint32_t bound, std::uint64_t type, const char* who) {
        if (value < 0 || value > std::int64_t{UINT32_MAX})
            throw Error(std::string(who) + ": the initial value must be from 0 to " + std::to_string(UINT32_MAX) +
                        ", not " + std::to_string(value));
        if (HandleDecodeScope::active()) return;
        ref_ = SharedRef::allocate(sizeof(SemaphoreState), alignof(SemaphoreState), "mproc-semaphore");
        auto* s = ref_.as<SemaphoreState>();
        s->header = {semaphore_magic, 0, type};
        s->value.store(static_cast<std::uint32_t>(value), std::memory_order_relaxed);
        s->bound = bound;
    }
    bool take(const Deadline& deadline, bool try_only) {
        SemaphoreState* s = ref_.as<SemaphoreState>();
        for (;;) {
            std::uint32_t v = s->value.load(std::memory_order_relaxed);
            while (v > 0)
                if (s->value.compare_exchange_weak(v, v - 1, std::memory_order_acquire)) return true;
            if (try_only || expired(deadline)) return false;
            // waiters before the re-check, release's add before its look at waiters (both
            // seq_cst): one of the two always sees the other, so no wake-up is missed.
            s->waiters.fetch_add(1, std::memory_order_seq_cst);
            if (s->value.load(std::memory_order_seq_cst) == 0) futex_wait(s->value, 0, sleep_until_for(deadline));
            s->waiters.fetch_sub(1, std::memory_order_relaxed);
        }
    }
    SharedRef ref_;
};

/// Barrier: Python's threading.Barrier, across processes. Its state is changed under its robust
/// mutex, which nobody holds while they sleep or run the action; waiters sleep on `seq`, bumped at
/// every change of phase. Each waiter holds the WaiterSlot of its arrival index, so every waiter
/// that wakes (at least every recheck_interval) can see that another died: one that died in a
/// round still filling, or while running the action, breaks the barrier; one that died on its way
/// out of a finished round is counted out.
class BarrierBase {
public:
    /// Waits for the round to fill and returns this caller's arrival index (0 .. parties-1). The
    /// last to arrive runs the action first. Throws BrokenBarrierError if the barrier is or
    /// becomes broken; a timeout (`timeout`, or the barrier's default) breaks it for everyone.
    std::size_t wait(std::optional<Seconds> timeout = std::nullopt) {
        BarrierState* s = state();
        if (!timeout && s->default_timeout >= 0) timeout = Seconds{s->default_timeout};
        const Deadline deadline = deadline_after(timeout);
        Guard guard(s->mutex, Repair{s});
        // The previous round leaves first (Python's wait does the same, without a deadline).
        for (;;) {
            check_slots(s, false);
            const BarrierPhase phase = s->phase.load(std::memory_order_relaxed);
            if (phase == BarrierPhase::broken) throw broken_error(s);
            if (phase == BarrierPhase::filling) break;
            sleep(guard, s, std::nullopt);
        }
        const std::uint32_t index = s->count.load(std::memory_order_relaxed);
        if (!take_slot(slot(s, index), slot_in_use)) {
            // Only a repair that went wrong could leave the next slot held: never wait on it.
            break_barrier(s, BarrierBreak::party_died, 0);
            throw broken_error(s);
        }
        s->count.store(index + 1, std::memory_order_relaxed);
        if (index + 1 == s->parties) return release(guard, s, index);
        for (;;) {
            const BarrierPhase phase = s->phase.load(std::memory_order_relaxed);
            switch (phase) {
                case BarrierPhase::draining: leave(s, index); return index;
                case BarrierPhase::broken:
                case BarrierPhase::resetting: leave(s, index); throw broken_error(s);
                case BarrierPhase::filling:
                    if (expired(deadline)) {
                        const std::uint32_t waiting = s->count.load(std::memory_order_relaxed);
                        break_barrier(s, BarrierBreak::timed_out, 0);
                        leave(s, index);
                        throw BrokenBarrierError("mproc::Barrier::wait: timed out with " + std::to_string(waiting) +
                                                 " of " + std::to_string(s->parties) +
                                                 " parties waiting, which breaks the barrier");
                    }
                    break;
                case BarrierPhase::running: break;  // the action runs: no timeout meanwhile, as in Python
            }
            sleep(guard, s, phase == BarrierPhase::filling ? deadline : std::nullopt);
            check_slots(s, false);
        }
    }

    /// Puts the barrier back to empty: waiters inside it get BrokenBarrierError, and later waits
    /// work again (a broken barrier too).
    void reset() {
        BarrierState* s = state();
        Guard guard(s->mutex, Repair{s});
        check_slots(s, false);
        const BarrierPhase phase = s->phase.load(std::memory_order_relaxed);
        if (s->count.load(std::memory_order_relaxed) == 0) {
            set_phase(s, BarrierPhase::filling);
        } else if (phase == BarrierPhase::filling || phase == BarrierPhase::broken) {
            if (phase == BarrierPhase::filling) s->why = BarrierBreak::reset;
            set_phase(s, BarrierPhase::resetting);  // filling again once the waiters inside have left
        }
        // running or draining: the round is complete; the next one starts empty anyway.
    }

    /// Breaks the barrier: every waiter, and every later wait until reset(), gets BrokenBarrierError.
    void abort() {
        BarrierState* s = state();
        Guard guard(s->mutex, Repair{s});
        break_barrier(s, BarrierBreak::aborted, 0);
    }

    bool broken() const { return state()->phase.load(std::memory_order_relaxed) == BarrierPhase::broken; }
    std::size_t parties() const { return state()->parties; }
    /// How many wait in the round filling now.
    std::size_t n_waiting() const {
        const BarrierState* s = state();
        return s->phase.load(std::memory_order_relaxed) == BarrierPhase::filling
                   ? s->count.load(std::memory_order_relaxed)
                   : 0;
    }

private:
    /// What the next holder of the barrier's mutex does when the last one died holding it.
    struct Repair {
        BarrierState* s;
        void operator()() const { check_slots(s, true); }
    };
    using Guard = RobustGuard<Repair>;

protected:
    /// Runs a barrier's action: `target` is the function pointer, if the action is one.
    using ActionRunner = void (*)(std::uintptr_t target);

    BarrierBase() = default;
    void create(std::uint32_t parties, ActionRunner action, std::uintptr_t target, std::optional<Seconds> timeout,
                std::uint64_t type) {
        if (parties == 0 || parties > barrier_max_parties)
            throw Error("mproc::Barrier: parties must be between 1 and " + std::to_string(barrier_max_parties) +
                        ", not " + std::to_string(parties));
        if (HandleDecodeScope::active()) return;
        const double default_timeout = timeout ? timeout_seconds(*timeout, "Barrier timeout") : -1.0;  // NaN: Error
        ref_ = SharedRef::allocate(bytes_for(parties), 64, "mproc-barrier");
        BarrierState* s = state();
        s->header = {barrier_magic, 0, type};
        s->mutex.init();
        s->parties = parties;
        s->phase.store(BarrierPhase::filling, std::memory_order_relaxed);
        s->count.store(0, std::memory_order_relaxed);
        s->seq.store(0, std::memory_order_relaxed);
        s->why = BarrierBreak::none;
        s->dead_pid = 0;
        s->action = reinterpret_cast<std::uintptr_t>(action);
        s->action_target = target;
        s->default_timeout = default_timeout;
        for (std::uint32_t i = 0; i < parties; ++i) {
            WaiterSlot& w = slot(s, i);
            w.alive.init();
            w.state.store(slot_free, std::memory_order_relaxed);
        }
    }
    static std::size_t bytes_for(std::uint32_t parties) {
        return barrier_slots_offset + std::size_t{parties} * sizeof(WaiterSlot);
    }
    /// After a decode: the barrier's slots fit in its memory.
    void check_decoded() const {
        const BarrierState* s = state();
        const std::size_t room = ref_.segment()->size() - ref_.offset();
        if (s->parties == 0 || s->parties > barrier_max_parties || bytes_for(s->parties) > room)
            throw SerializationError("mproc: corrupt Barrier handle: its parties do not fit its memory");
    }

    BarrierState* state() const { return ref_.as<BarrierState>(); }
    SharedRef ref_;

private:
    static WaiterSlot& slot(BarrierState* s, std::uint32_t i) {
        return reinterpret_cast<WaiterSlot*>(reinterpret_cast<std::byte*>(s) + barrier_slots_offset)[i];
    }
    static void sleep(Guard& guard, BarrierState* s, const Deadline& deadline) {
        const std::uint32_t seen = s->seq.load(std::memory_order_seq_cst);
        guard.unlock();
        futex_wait(s->seq, seen, sleep_until_for(deadline));
        guard.lock();
    }
    static void set_phase(BarrierState* s, BarrierPhase phase) {
        s->phase.store(phase, std::memory_order_relaxed);
        s->seq.fetch_add(1, std::memory_order_seq_cst);
        futex_wake_all(s->seq);
    }
    static void break_barrier(BarrierState* s, BarrierBreak why, std::int32_t pid) {
        s->why = why;
        s->dead_pid = pid;
        set_phase(s, BarrierPhase::broken);
    }
    /// Leaves the slot of arrival `index`; the last to leave a finished or reset round opens the next.
    static void leave(BarrierState* s, std::uint32_t index) {
        leave_slot(slot(s, index));
        const std::uint32_t left = s->count.load(std::memory_order_relaxed) - 1;
        s->count.store(left, std::memory_order_relaxed);
        const BarrierPhase phase = s->phase.load(std::memory_order_relaxed);
        if (left == 0 && (phase == BarrierPhase::draining || phase == BarrierPhase::resetting))
            set_phase(s, BarrierPhase::filling);
    }
    /// The last to arrive: runs the action (if any), then lets the round go.
    static std::size_t release(Guard& guard, BarrierState* s, std::uint32_t index) {
        if (s->action != 0) {
            set_phase(s, BarrierPhase::running);
            guard.unlock();
            try {
                // NOLINTNEXTLINE(performance-no-int-to-ptr): a function of this program (see BarrierState)
                reinterpret_cast<ActionRunner>(s->action)(static_cast<std::uintptr_t>(s->action_target));
            } catch (...) {
                guard.lock();
                if (s->phase.load(std::memory_order_relaxed) == BarrierPhase::running)
                    break_barrier(s, BarrierBreak::action_threw, 0);
                leave(s, index);
                throw;
            }
            guard.lock();
            if (s->phase.load(std::memory_order_relaxed) != BarrierPhase::running) {  // aborted meanwhile
                leave(s, index);
                throw broken_error(s);
            }
        }
        set_phase(s, BarrierPhase::draining);
        leave(s, index);
        return index;
    }
    /// Under the mutex: frees the slots of waiters that died. One that died in the round filling,
    /// or while running the action, breaks the barrier. `repairing`: the last holder of the mutex
    /// died in the middle of a change, so `count` is recounted from the slots, and a round filling
    /// or running that lost anyone is broken.
    static void check_slots(BarrierState* s, bool repairing) {
        const BarrierPhase phase = s->phase.load(std::memory_order_relaxed);
        std::uint32_t live = 0;
        std::int32_t lost_pid = -1;
        for (std::uint32_t i = 0; i < s->parties; ++i) {
            WaiterSlot& w = slot(s, i);
            const bool in_use = w.state.load(std::memory_order_relaxed) != slot_free;
            if (!in_use && !repairing) continue;
            const std::int32_t pid = w.pid;
            if (probe_slot(w) == SlotHolder::alive) {
                if (in_use) ++live;
                continue;
            }
            if (in_use && (phase == BarrierPhase::filling || (phase == BarrierPhase::running && i + 1 == s->parties)))
                lost_pid = pid;
        }
        const bool miscounted = repairing && live != s->count.load(std::memory_order_relaxed) &&
                                (phase == BarrierPhase::filling || phase == BarrierPhase::running);
        const bool changed = live != s->count.load(std::memory_order_relaxed);
        s->count.store(live, std::memory_order_relaxed);
        if (lost_pid >= 0 || miscounted) {
            break_barrier(s, BarrierBreak::party_died, lost_pid >= 0 ? lost_pid : 0);
        } else if (live == 0 && (phase == BarrierPhase::draining || phase == BarrierPhase::resetting)) {
            set_phase(s, BarrierPhase::filling);
        } else if (changed || repairing) {
            s->seq.fetch_add(1, std::memory_order_seq_cst);  // let the sleepers look again
            futex_wake_all(s->seq);
        }
    }
    static BrokenBarrierError broken_error(const BarrierState* s) {
        std::string why;
        switch (s->why) {
            case BarrierBreak::aborted: why = "it was aborted"; break;
            case BarrierBreak::timed_out: why = "a wait timed out"; break;
            case BarrierBreak::party_died:
                why = s->dead_pid > 0 ? "process " + std::to_string(s->dead_pid) + " died waiting at it"
                                      : "a party died waiting at it";
                break;
            case BarrierBreak::action_threw: why = "its action threw"; break;
            case BarrierBreak::reset: why = "it was reset"; break;
            case BarrierBreak::none: why = "it was broken"; break;
        }
        if (s->phase.load(std::memory_order_relaxed) == BarrierPhase::resetting)
            return BrokenBarrierError("mproc::Barrier::wait: the barrier was reset while this process waited");
        return BrokenBarrierError("mproc::Barrier::wait: the barrier is broken (" + why + "); reset() mends it");
    }
};

}  // namespace mproc::detail
