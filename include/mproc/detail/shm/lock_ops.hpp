// mproc — what Lock and RLock (LockBase), and Semaphore and BoundedSemaphore (SemaphoreBase), do
// to their state in shared memory (sync_state.hpp): acquire, release, the robust owner-died
// repair, and the futex sleeps. The public classes in mproc/sync.hpp add their names, their
// encoding as task arguments, and nothing else.
#pragma once

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <sys/types.h>
#include <unistd.h>
#include <utility>

#include "../../errors.hpp"
#include "../../time.hpp"
#include "../os/clock.hpp"
#include "futex.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"
#include "sync_state.hpp"

namespace mproc::detail {

inline pid_t this_thread_id() noexcept { return ::gettid(); }

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
        return acquire(std::chrono::duration_cast<Seconds>(t - Clock::now()));
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
};

/// The shared logic of Semaphore and BoundedSemaphore.
class SemaphoreBase {
public:
    /// Takes one unit, waiting for one up to `timeout` (forever without one). False on timeout.
    bool acquire(std::optional<Seconds> timeout = std::nullopt) { return take(deadline_after(timeout), false); }
    /// Returns `n` units and wakes as many waiters. Throws mproc::Error, changing nothing, when
    /// the value would pass the bound (BoundedSemaphore) or the largest 32-bit value.
    void release(std::uint32_t n = 1) {
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
    void create(std::uint32_t value, std::uint32_t bound, std::uint64_t type) {
        if (HandleDecodeScope::active()) return;
        ref_ = SharedRef::allocate(sizeof(SemaphoreState), alignof(SemaphoreState), "mproc-semaphore");
        auto* s = ref_.as<SemaphoreState>();
        s->header = {semaphore_magic, 0, type};
        s->value.store(value, std::memory_order_relaxed);
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

}  // namespace mproc::detail
