// mproc — what the synchronisation primitives and shared values keep in shared memory.
//
// One struct per object of sync.hpp (and SharedMemory's header), each starting with the
// ObjectHeader every shared object has (its magic below and its type hash, checked when a handle
// is decoded). Semaphore and Event keep
// their whole state in single atomic words, so a process dying in the middle of one of their
// operations cannot leave them half-updated. Condition and Barrier give each waiting thread a
// WaiterSlot whose robust mutex it holds while it waits, so the others can tell when it died
// (docs/shared-memory.md, "Locks, semaphores, events, barriers, values and arrays").
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <sys/types.h>

#include "memory.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

inline constexpr std::uint32_t lock_magic = 0x6d4c434bu;       // "mLCK"
inline constexpr std::uint32_t semaphore_magic = 0x6d53454du;  // "mSEM"
inline constexpr std::uint32_t event_magic = 0x6d45564eu;      // "mEVN"
inline constexpr std::uint32_t barrier_magic = 0x6d424152u;    // "mBAR"
inline constexpr std::uint32_t value_magic = 0x6d56414cu;      // "mVAL"
inline constexpr std::uint32_t array_magic = 0x6d415252u;      // "mARR"
inline constexpr std::uint32_t condition_magic = 0x6d434e44u;  // "mCND"
inline constexpr std::uint32_t raw_value_magic = 0x6d52564cu;  // "mRVL"
inline constexpr std::uint32_t raw_array_magic = 0x6d524152u;  // "mRAR"
inline constexpr std::uint32_t shared_memory_magic = 0x6d53484du;  // "mSHM"

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

/// One waiting thread's place at a Condition or a Barrier. The waiting thread holds `alive` (a
/// robust mutex) from the moment it takes the slot until it leaves, so a try_lock by anyone else
/// says whether it still lives: busy, it does; EOWNERDEAD, it died there (the kernel released the
/// mutex of the dead thread); free, nobody waits there. Taken, left and inspected only under the
/// object's lock.
struct alignas(64) WaiterSlot {
    RobustMutex alive;
    std::atomic<std::uint32_t> state;  // slot_free, or what the object makes of it (a futex word)
    std::int32_t pid;                  // the waiting process (for debugging)
    std::uint64_t seq;                 // Condition: the order of arrival, for FIFO notify
};
inline constexpr std::uint32_t slot_free = 0;

/// A Condition's waiters; the lock is the Lock or RLock it was made with (a shared object of its
/// own). Every field is read and written under that lock.
inline constexpr std::uint32_t slot_waiting = 1;   // asleep in wait()
inline constexpr std::uint32_t slot_notified = 2;  // chosen by notify(); wakes and takes the lock back
inline constexpr std::size_t condition_capacity = 255;
struct ConditionState {
    ObjectHeader header;
    std::uint64_t ticket;  // the last `seq` given to a waiter
    WaiterSlot slots[condition_capacity];
};
static_assert(sizeof(ConditionState) <= small_object_limit, "a Condition is a small object");

/// What a Barrier is doing. A round fills; the last to arrive runs the action (running), then
/// the round's waiters leave (draining) before the next round may fill. Broken: every wait
/// throws BrokenBarrierError until reset(); resetting: broken for those still inside, and filling
/// again once they have left.
enum class BarrierPhase : std::uint32_t { filling, running, draining, resetting, broken };
/// Why a Barrier broke (for the message of BrokenBarrierError).
enum class BarrierBreak : std::uint32_t { none, aborted, timed_out, party_died, action_threw, reset };

/// A Barrier: this header, then `parties` WaiterSlots from barrier_slots_offset (slot i is the
/// waiter that arrived i-th in the round filling). Every field but the immutable ones is changed
/// under `mutex`, which nobody holds while they sleep or run the action.
struct BarrierState {
    ObjectHeader header;
    RobustMutex mutex;
    std::uint32_t parties;
    std::atomic<BarrierPhase> phase;
    std::atomic<std::uint32_t> count;  // filling: arrived; otherwise: still inside wait()
    std::atomic<std::uint32_t> seq;    // futex word: bumped at every change of phase
    BarrierBreak why;                  // why it last broke
    std::int32_t dead_pid;             // BarrierBreak::party_died: who
    // The action: the address of a function of this program that runs it (0: none), and the
    // function pointer it calls. Code addresses, not offsets: every process that can reach this
    // memory is a fork of the one that wrote them, so they mean the same function there.
    std::uint64_t action;
    std::uint64_t action_target;
    double default_timeout;  // seconds, for wait() without a timeout; negative: none
};
inline constexpr std::size_t barrier_slots_offset = round_up(sizeof(BarrierState), 64);
inline constexpr std::uint32_t barrier_max_parties = 1u << 16;
inline constexpr std::uint32_t slot_in_use = 1;

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

/// RawValue and RawArray: Value and Array without their lock.
template <class T> struct RawValueState {
    ObjectHeader header;
    alignas(atomic_alignment<T>) T value;
};
struct RawArrayHeader {
    ObjectHeader header;
    std::uint64_t size;
    std::uint64_t data_offset;  // from the header's start
};

/// A SharedMemory block: its bytes start data_offset past this header's start (64, or a page for a
/// block with a segment of its own).
struct SharedMemoryHeader {
    ObjectHeader header;
    std::uint64_t size;
    std::uint64_t data_offset;
};

}  // namespace mproc::detail
