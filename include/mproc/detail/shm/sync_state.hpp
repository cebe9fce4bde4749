// mproc — what the synchronisation primitives and shared values keep in shared memory.
//
// One struct per object of sync.hpp, each starting with the ObjectHeader every shared object has
// (its magic below and its type hash, checked when a handle is decoded). Semaphore, Event and
// Barrier keep their whole state in single atomic words, so a process dying in the middle of one
// of their operations cannot leave them half-updated (docs/shared-memory.md, "Locks, semaphores,
// events, barriers, values and arrays").
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <sys/types.h>

#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

inline constexpr std::uint32_t lock_magic = 0x6d4c434bu;       // "mLCK"
inline constexpr std::uint32_t semaphore_magic = 0x6d53454du;  // "mSEM"
inline constexpr std::uint32_t event_magic = 0x6d45564eu;      // "mEVN"
inline constexpr std::uint32_t barrier_magic = 0x6d424152u;    // "mBAR"
inline constexpr std::uint32_t value_magic = 0x6d56414cu;      // "mVAL"
inline constexpr std::uint32_t array_magic = 0x6d415252u;      // "mARR"

/// A Lock or RLock in shared memory.
struct LockState {
    ObjectHeader header;
    RobustMutex mutex;
    std::atomic<std::uint32_t> owner_died;  // set by an acquirer that found the holder dead
    std::atomic<pid_t> holder;              // thread id of the holder, 0 when free
    std::uint32_t depth;                    // acquisitions by the holder (RLock recursion)
};

struct SemaphoreState {
    ObjectHeader header;
    std::atomic<std::uint32_t> value;    // also the futex word acquirers sleep on
    std::atomic<std::uint32_t> waiters;  // a hint: nonzero means a release must wake someone
    std::uint32_t bound;                 // BoundedSemaphore's initial value; 0 = unbounded
};

struct EventState {
    ObjectHeader header;
    // (generation << 1) | flag. set() bumps the generation, so a waiter that slept through a
    // set() and a clear() still knows it was set. It is also the futex word.
    std::atomic<std::uint32_t> word;
    std::atomic<std::uint32_t> waiters;
};

struct BarrierState {
    ObjectHeader header;
    std::atomic<std::uint64_t> state;       // (generation << 32) | arrived in this generation
    std::atomic<std::uint32_t> generation;  // futex word: bumped when a generation completes
    std::uint32_t parties;
};

template <class T>
inline constexpr std::size_t atomic_alignment = std::max(alignof(T), std::atomic_ref<T>::required_alignment);

template <class T> struct SharedValueState {
    ObjectHeader header;
    LockState lock;       // get_lock()
    RobustMutex access;   // guards `value` when T has no lock-free atomics
    alignas(atomic_alignment<T>) T value;
};

struct ArrayHeader {
    ObjectHeader header;
    LockState lock;
    std::uint64_t size;
    std::uint64_t data_offset;  // from the header's start
};

}  // namespace mproc::detail
