// mproc — a process-shared robust mutex, for locks that live in shared memory.
//
// A glibc pthread mutex with PTHREAD_PROCESS_SHARED and PTHREAD_MUTEX_ROBUST. glibc puts every
// robust mutex a thread holds on that thread's kernel robust list; when the thread dies — even
// by SIGKILL, even halfway through locking or unlocking — the kernel marks the mutex
// FUTEX_OWNER_DIED and wakes one waiter. The next locker gets EOWNERDEAD: it owns the mutex, must
// repair what the dead holder left and call mark_consistent() before unlocking (unlocking
// without it makes the mutex unusable for everyone: ENOTRECOVERABLE).
//
// The mutex is error-checking: relocking from the holding thread reports a deadlock instead of
// hanging, and unlocking from a thread that does not hold it fails. A recursive kind exists for
// RLock.
//
// A wake-up can be lost: the unlocker wakes one sleeper, and when that one is killed before it
// retakes the mutex the wake dies with it (the futex word reads "free", the other sleepers sleep
// on). No waiter sleeps unbounded for that reason: a blocked lock() sleeps at most
// recheck_interval() (os/futex.hpp) at a time, then looks again.
//
// ThreadSanitizer does not intercept pthread_mutex_clocklock, so the timed lock tells it about
// the acquisition through its annotation interface (compiled in only under TSan).
#pragma once

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <pthread.h>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "../os/futex.hpp"
#include "../os/sanitizer.hpp"

#ifdef MPROC_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace mproc::detail {

/// What an attempt to lock produced.
enum class LockResult {
    acquired,     // the caller holds the mutex
    owner_died,   // the caller holds it; the previous holder died: repair, then mark_consistent()
    timed_out,    // the deadline passed (or try_lock found it held)
    would_deadlock,  // the calling thread already holds this (non-recursive) mutex
};

inline bool holds(LockResult r) noexcept { return r == LockResult::acquired || r == LockResult::owner_died; }

/// Lives in shared memory: construct nothing, call init() once in the creating process before
/// any other process can see it. Not copyable or movable (its address is its identity).
class RobustMutex {
public:
    enum class Kind { errorcheck, recursive };

    RobustMutex() = default;
    RobustMutex(const RobustMutex&) = delete;
    RobustMutex& operator=(const RobustMutex&) = delete;

    void init(Kind kind = Kind::errorcheck) {
        pthread_mutexattr_t attr;
        if (int rc = pthread_mutexattr_init(&attr); rc != 0) throw_errno("pthread_mutexattr_init", rc);
        int rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
        if (rc == 0) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
        if (rc == 0)
            rc = pthread_mutexattr_settype(
                &attr, kind == Kind::recursive ? PTHREAD_MUTEX_RECURSIVE : PTHREAD_MUTEX_ERRORCHECK);
        if (rc == 0) rc = pthread_mutex_init(&mutex_, &attr);
        pthread_mutexattr_destroy(&attr);
        if (rc != 0) throw_errno("pthread_mutex_init (process-shared, robust)", rc);
    }

    /// Blocks until the caller holds the mutex.
    LockResult lock() {
        const int rc = pthread_mutex_trylock(&mutex_);
        if (rc != EBUSY) return interpret(rc, "lock");
        for (;;)
            if (const LockResult r = lock_by(Clock::now() + recheck_interval()); r != LockResult::timed_out) return r;
    }

    /// Blocks until the caller holds the mutex or `deadline` passes (nullopt: forever).
    LockResult lock_until(const Deadline& deadline) {
        if (!deadline) return lock();
        for (;;) {
            const Clock::time_point now = Clock::now();
            const Clock::time_point slice = now + recheck_interval();
            const LockResult r = lock_by(std::min(*deadline, slice));
            if (r != LockResult::timed_out || *deadline <= slice) return r;
        }
    }

    /// Takes the mutex only if no one holds it (a dead holder counts as no one).
    LockResult try_lock() {
        const int rc = pthread_mutex_trylock(&mutex_);
        return interpret(rc == EBUSY ? ETIMEDOUT : rc, "try_lock");
    }

    /// After LockResult::owner_died: the state it guards is repaired.
    void mark_consistent() noexcept { pthread_mutex_consistent(&mutex_); }

    /// Returns false, changing nothing, if the calling thread does not hold the mutex.
    bool unlock() noexcept { return pthread_mutex_unlock(&mutex_) == 0; }

private:
    /// One timed attempt: until `until` passes.
    LockResult lock_by(Clock::time_point until) {
        const timespec abs = to_timespec(until);
#ifdef MPROC_TSAN
        __tsan_mutex_pre_lock(&mutex_, 0);
#endif
        int rc;
        do rc = pthread_mutex_clocklock(&mutex_, CLOCK_MONOTONIC, &abs);
        while (rc == EINTR);
#ifdef MPROC_TSAN
        if (rc == 0 || rc == EOWNERDEAD) __tsan_mutex_post_lock(&mutex_, 0, 0);
        else __tsan_mutex_post_lock(&mutex_, __tsan_mutex_try_lock_failed, 0);
#endif
        return interpret(rc, "timed lock");
    }

    static LockResult interpret(int rc, const char* what) {
        switch (rc) {
            case 0: return LockResult::acquired;
            case EOWNERDEAD: return LockResult::owner_died;
            case ETIMEDOUT: return LockResult::timed_out;
            case EDEADLK: return LockResult::would_deadlock;
            case ENOTRECOVERABLE:
                throw Error(std::string("mproc: shared lock unusable (") + what +
                            "): a process died holding it and its state could not be repaired");
            default: throw_errno(std::string("mproc: shared lock ") + what, rc);
        }
    }

    pthread_mutex_t mutex_;
};

/// Holds a RobustMutex for a scope, for mproc's own shared structures. On EOWNERDEAD it runs
/// `repair()` while holding the mutex and only then marks it consistent; a repair that throws
/// leaves it unmarked, so the next locker fails loudly rather than reading a broken structure.
template <class Repair> class RobustGuard {
public:
    RobustGuard(RobustMutex& mutex, Repair repair) : mutex_(&mutex), repair_(std::move(repair)) { lock(); }
    /// Holds nothing yet: lock() takes it.
    struct Deferred {};
    RobustGuard(RobustMutex& mutex, Repair repair, Deferred) : mutex_(&mutex), repair_(std::move(repair)) {}
    ~RobustGuard() {
        if (held_) mutex_->unlock();
    }
    RobustGuard(const RobustGuard&) = delete;
    RobustGuard& operator=(const RobustGuard&) = delete;

    void lock() {
        const LockResult r = mutex_->lock();
        if (r == LockResult::would_deadlock)
            throw Error("mproc: internal lock taken twice by one thread (a callback re-entered the object?)");
        held_ = true;
        if (r == LockResult::owner_died) {
            repair_();
            mutex_->mark_consistent();
        }
    }
    void unlock() noexcept {
        if (held_) mutex_->unlock();
        held_ = false;
    }
    bool held() const noexcept { return held_; }

private:
    RobustMutex* mutex_;
    Repair repair_;
    bool held_ = false;
};

}  // namespace mproc::detail
