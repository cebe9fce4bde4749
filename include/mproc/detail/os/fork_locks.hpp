// mproc — no process-local lock of mproc's is ever copied held into a child.
//
// fork() copies only the calling thread. A mutex that another thread of the parent held at that
// instant stays locked in the child forever, and so does the data it was guarding, half-updated.
// mproc's process-local mutexes are used by children too: the shared-object registry's two (one
// for every handle decoded, created or dropped; one held while it lets go of segments, so that a
// child never copies a segment half let go), the small-object allocator's, the one a
// Connection's turns are made afresh under in a child (end_turns.hpp), and the one a ChildGuard
// changes its handlers under (guard_state.hpp: a child must not copy them half-changed). A Pool forks its fork
// server from the constructing thread, and a Process from the caller's, while other threads of the
// program may be creating or decoding handles.
//
// So every such mutex is registered here, with a fixed rank, and pthread_atfork handlers
// (installed once, on the first registration) make every fork — mproc's own and any other — take
// all of them in the forking thread, in rank order, just before the fork, and release them in the
// parent and in the child just after. The child's copy of each is then unlocked, and the data it
// guards is whole. The ranks are the order in which mproc's code nests them (the allocator calls
// into the registry while holding its own mutex), so taking them cannot deadlock against a thread
// that holds one and wants the next. No mproc code forks while holding one of them (that would
// wait for itself here).
#pragma once

#include <atomic>
#include <cstddef>
#include <mutex>
#include <pthread.h>

namespace mproc::detail {

/// The order in which the locks are taken around a fork: lower first.
enum class ForkLockRank : std::size_t {
    small_objects = 0,     // SharedRef's small-object allocator; calls into the registry when locked
    registry_release = 1,  // the registry's, held while it lets go of segments; takes the registry's inside
    registry = 2,          // segments(), the shared-object registry
    connection_turns = 3,  // EndTurns::renewal(), held alone while a Connection's turns are made afresh
    guard = 4,             // guard_transition(), held alone while a ChildGuard installs or puts back its handlers
    count = 5,
};

class ForkLocks {
public:
    /// Registers a process-local mutex that must never be copied held into a child. Each rank
    /// holds one mutex, registered once, for the life of the process (its children inherit it).
    static void add(ForkLockRank rank, std::mutex& mutex) noexcept {
        install();
        slot(rank).store(&mutex, std::memory_order_release);
    }

    /// Runs `hook(context)` in this thread's next fork, in mproc's prepare handler once every lock
    /// is held: the last thing before the kernel copies the process (mproc's handler, installed
    /// first, runs after every other library's). Async-signal-safe, as the hook must be.
    static void on_locked(void (*hook)(void*) noexcept, void* context) noexcept {
        install();
        pending() = {hook, context};
    }

private:
    static constexpr std::size_t ranks = static_cast<std::size_t>(ForkLockRank::count);

    static void install() noexcept {
        [[maybe_unused]] static const int installed = ::pthread_atfork(&prepare, &release, &release);
    }

    static std::atomic<std::mutex*>& slot(ForkLockRank rank) noexcept {
        static std::atomic<std::mutex*> slots[ranks] = {};
        return slots[static_cast<std::size_t>(rank)];
    }
    /// What this thread locked in prepare(), so that a mutex registered by another thread while
    /// this one forks is not unlocked without having been locked. A child is a copy of the forking
    /// thread, so it sees the same record.
    static std::mutex** taken() noexcept {
        thread_local std::mutex* locked[ranks] = {};
        return locked;
    }
    struct Hook {
        void (*run)(void*) noexcept = nullptr;
        void* context = nullptr;
    };
    static Hook& pending() noexcept {
        thread_local Hook hook;
        return hook;
    }

    static void prepare() noexcept {
        std::mutex** locked = taken();
        for (std::size_t r = 0; r < ranks; ++r) {
            std::mutex* m = slot(static_cast<ForkLockRank>(r)).load(std::memory_order_acquire);
            if (m) m->lock();
            locked[r] = m;
        }
        const Hook hook = pending();
        pending() = {};
        if (hook.run) hook.run(hook.context);
    }
    /// In the parent and in the child, after the fork.
    static void release() noexcept {
        std::mutex** locked = taken();
        for (std::size_t r = ranks; r-- > 0;) {
            if (locked[r]) locked[r]->unlock();
            locked[r] = nullptr;
        }
    }
};

}  // namespace mproc::detail
