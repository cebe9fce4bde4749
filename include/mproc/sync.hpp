// mproc — synchronisation primitives and shared values, as Python's multiprocessing has them.
//
//     mproc::Lock lock;          std::lock_guard g(lock);   lock.acquire(1s) -> bool;   lock.release();
//     mproc::RLock rlock;        mproc::Semaphore sem(3);
//     mproc::Event ev;           ev.set(); ev.wait(1s) -> bool;
//     mproc::Barrier barrier(4); barrier.wait();
//     mproc::Value<long> counter(0);   counter += 1;   counter.load();   counter.get_lock();
//     mproc::Array<double> arr(1000);  arr[3] = 1.5;   arr.size();
//
// Each is a handle: copies (and the copies a fork makes) refer to one object in shared memory,
// which lives while any handle in any process does (or a SharedDict holds a copy of one). They
// work in every process forked after they were made, and travel as Pool task arguments (see
// detail/shm/registry.hpp). What each keeps in shared memory is detail/shm/sync_state.hpp.
//
// Locks are robust: when a holder dies, even by SIGKILL, the next acquire() succeeds and
// owner_died() is true until that new holder releases, so the program can check the data the
// lock guards. Semaphore, Event and Barrier keep their state in single atomic words, so a process
// dying in the middle of one of their operations cannot leave them half-updated; a wake-up lost
// to such a death costs a waiter at most detail::recheck_interval.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <utility>

#include "detail/os/clock.hpp"
#include "detail/shm/futex.hpp"
#include "detail/shm/lock_ops.hpp"
#include "detail/shm/robust_mutex.hpp"
#include "detail/shm/shared_object.hpp"
#include "detail/shm/sync_state.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

/// A lock shared between processes, robust against a holder's death. Released by the thread that
/// acquired it (robustness needs an owner; Python's Lock lets any process release).
class Lock : public detail::LockBase {
public:
    Lock() { create(detail::type_hash<Lock>(), false); }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else ref_.decode(ar, detail::lock_magic, detail::type_hash<Lock>(), sizeof(detail::LockState), "Lock");
    }

private:
    template <class> friend class Value;
    template <class> friend class Array;
    explicit Lock(detail::SharedRef ref) noexcept : LockBase(std::move(ref)) {}
    static void init_at(detail::LockState* s) { init(s, detail::type_hash<Lock>(), false); }
    const char* kind() const noexcept override { return "Lock"; }
};

/// A recursive lock: the holding thread may acquire it again, and must release it as often.
class RLock : public detail::LockBase {
public:
    RLock() { create(detail::type_hash<RLock>(), true); }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else ref_.decode(ar, detail::lock_magic, detail::type_hash<RLock>(), sizeof(detail::LockState), "RLock");
    }

private:
    const char* kind() const noexcept override { return "RLock"; }
};

/// A counter of units shared between processes. Units a process took are not returned if it
/// dies (as in Python); the semaphore itself is never left half-updated.
class Semaphore : public detail::SemaphoreBase {
public:
    explicit Semaphore(std::uint32_t value = 1) { create(value, 0, detail::type_hash<Semaphore>()); }
    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else
            ref_.decode(ar, detail::semaphore_magic, detail::type_hash<Semaphore>(), sizeof(detail::SemaphoreState),
                        "Semaphore");
    }
};

/// A Semaphore that refuses (mproc::Error) to be released above its initial value.
class BoundedSemaphore : public detail::SemaphoreBase {
public:
    explicit BoundedSemaphore(std::uint32_t value = 1) {
        if (value == 0) throw Error("mproc::BoundedSemaphore: the bound must be at least 1");
        create(value, value, detail::type_hash<BoundedSemaphore>());
    }
    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else
            ref_.decode(ar, detail::semaphore_magic, detail::type_hash<BoundedSemaphore>(),
                        sizeof(detail::SemaphoreState), "BoundedSemaphore");
    }
};

/// A flag processes can wait for.
class Event {
public:
    Event() {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::SharedRef::allocate(sizeof(detail::EventState), alignof(detail::EventState), "mproc-event");
        ref_.as<detail::EventState>()->header = {detail::event_magic, 0, detail::type_hash<Event>()};
    }

    bool is_set() const { return (state()->word.load(std::memory_order_acquire) & 1u) != 0; }
    /// Sets the flag and wakes every waiter.
    void set() {
        detail::EventState* s = state();
        std::uint32_t w = s->word.load(std::memory_order_relaxed);
        do {
            if (w & 1u) return;
        } while (!s->word.compare_exchange_weak(w, (((w >> 1) + 1) << 1) | 1u, std::memory_order_seq_cst));
        if (s->waiters.load(std::memory_order_seq_cst) != 0) detail::futex_wake_all(s->word);
    }
    void clear() { state()->word.fetch_and(~1u, std::memory_order_release); }
    /// Waits until the flag is set (true), or the timeout passes with it unset (false).
    bool wait(std::optional<Seconds> timeout = std::nullopt) {
        detail::EventState* s = state();
        const detail::Deadline deadline = detail::deadline_after(timeout);
        const std::uint32_t first = s->word.load(std::memory_order_acquire);
        if (first & 1u) return true;
        s->waiters.fetch_add(1, std::memory_order_seq_cst);
        bool set = false;
        for (;;) {
            const std::uint32_t w = s->word.load(std::memory_order_seq_cst);
            if ((w & 1u) || (w >> 1) != (first >> 1)) {
                set = true;
                break;
            }
            if (detail::expired(deadline)) break;
            detail::futex_wait(s->word, w, detail::sleep_until_for(deadline));
        }
        s->waiters.fetch_sub(1, std::memory_order_relaxed);
        return set;
    }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else ref_.decode(ar, detail::event_magic, detail::type_hash<Event>(), sizeof(detail::EventState), "Event");
    }

private:
    detail::EventState* state() const { return ref_.as<detail::EventState>(); }
    detail::SharedRef ref_;
};

/// Holds processes until `parties` of them wait, then lets them all go. Reusable.
class Barrier {
public:
    explicit Barrier(std::uint32_t parties) {
        if (parties == 0) throw Error("mproc::Barrier: parties must be at least 1");
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::SharedRef::allocate(sizeof(detail::BarrierState), alignof(detail::BarrierState),
                                           "mproc-barrier");
        auto* s = state();
        s->header = {detail::barrier_magic, 0, detail::type_hash<Barrier>()};
        s->parties = parties;
    }
    Barrier() : Barrier(1) {}

    /// Waits for the others; returns this process's arrival index (0 .. parties-1), as Python's
    /// does. On timeout it withdraws (the barrier still expects `parties`) and throws
    /// mproc::TimeoutError.
    std::size_t wait(std::optional<Seconds> timeout = std::nullopt) {
        detail::BarrierState* s = state();
        const detail::Deadline deadline = detail::deadline_after(timeout);
        const std::uint32_t wake_word = s->generation.load(std::memory_order_acquire);
        std::uint64_t cur = s->state.load(std::memory_order_acquire);
        std::uint64_t next;
        do {
            const std::uint64_t count = cur & 0xffffffffu;
            next = count + 1 == s->parties ? ((cur >> 32) + 1) << 32 : cur + 1;
        } while (!s->state.compare_exchange_weak(cur, next, std::memory_order_acq_rel));
        const auto index = static_cast<std::size_t>(cur & 0xffffffffu);
        const std::uint64_t my_generation = cur >> 32;
        if ((next & 0xffffffffu) == 0) {  // the last to arrive opens the barrier
            s->generation.fetch_add(1, std::memory_order_release);
            detail::futex_wake_all(s->generation);
            return index;
        }
        std::uint32_t seen = wake_word;
        for (;;) {
            cur = s->state.load(std::memory_order_acquire);
            if ((cur >> 32) != my_generation) return index;
            if (detail::expired(deadline)) {
                // Withdraw, unless the barrier opened meanwhile.
                while ((cur >> 32) == my_generation) {
                    if (s->state.compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel))
                        throw TimeoutError("mproc::Barrier::wait: timed out with " + std::to_string(cur & 0xffffffffu) +
                                           " of " + std::to_string(s->parties) + " parties waiting");
                }
                return index;
            }
            detail::futex_wait(s->generation, seen, detail::sleep_until_for(deadline));
            seen = s->generation.load(std::memory_order_acquire);
        }
    }

    std::size_t parties() const { return state()->parties; }
    /// How many are waiting now.
    std::size_t n_waiting() const { return state()->state.load(std::memory_order_relaxed) & 0xffffffffu; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else
            ref_.decode(ar, detail::barrier_magic, detail::type_hash<Barrier>(), sizeof(detail::BarrierState),
                        "Barrier");
    }

private:
    detail::BarrierState* state() const { return ref_.as<detail::BarrierState>(); }
    detail::SharedRef ref_;
};

/// One T in shared memory (T trivially copyable). Arithmetic T gets atomic +=, -=, ++ and --;
/// get_lock() gives a Lock for compound updates.
template <class T> class Value {
    static_assert(std::is_trivially_copyable_v<T>, "mproc::Value<T>: T must be trivially copyable");
    static constexpr bool lock_free = std::atomic_ref<T>::is_always_lock_free;
    using State = detail::SharedValueState<T>;

public:
    explicit Value(T initial = T{}) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::SharedRef::allocate(sizeof(State), alignof(State), "mproc-value");
        State* s = state();
        s->header = {detail::value_magic, 0, detail::type_hash<Value<T>>()};
        Lock::init_at(&s->lock);
        if constexpr (!lock_free) s->access.init();
        std::memcpy(&s->value, &initial, sizeof(T));
        bind_lock();
    }

    T load() const {
        State* s = state();
        if constexpr (lock_free) {
            return std::atomic_ref<T>(s->value).load(std::memory_order_seq_cst);
        } else {
            Access guard(s);
            return s->value;
        }
    }
    void store(T v) {
        State* s = state();
        if constexpr (lock_free) {
            std::atomic_ref<T>(s->value).store(v, std::memory_order_seq_cst);
        } else {
            Access guard(s);
            s->value = v;
        }
    }
    T exchange(T v) {
        State* s = state();
        if constexpr (lock_free) {
            return std::atomic_ref<T>(s->value).exchange(v);
        } else {
            Access guard(s);
            T old = s->value;
            s->value = v;
            return old;
        }
    }
    bool compare_exchange(T& expected, T desired) requires lock_free {
        return std::atomic_ref<T>(state()->value).compare_exchange_strong(expected, desired);
    }
    /// Python's `.value`.
    T value() const { return load(); }
    operator T() const { return load(); }
    Value& operator=(T v) {
        store(v);
        return *this;
    }

    /// Atomic; returns the new value.
    T operator+=(T n) requires std::is_arithmetic_v<T> { return add(n); }
    T operator-=(T n) requires std::is_arithmetic_v<T> { return add(static_cast<T>(-n)); }
    T operator++() requires std::is_integral_v<T> { return add(1); }
    T operator--() requires std::is_integral_v<T> { return add(static_cast<T>(-1)); }
    T operator++(int) requires std::is_integral_v<T> { return add(1) - 1; }
    T operator--(int) requires std::is_integral_v<T> { return add(static_cast<T>(-1)) + 1; }

    /// The Lock that goes with this value, for updates of more than one step:
    /// `std::lock_guard g(v.get_lock());` (Python's `with v.get_lock():`).
    Lock& get_lock() const { return *lock_; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::value_magic, detail::type_hash<Value<T>>(), sizeof(State), "Value");
            bind_lock();
        }
    }

private:
    struct Access {
        explicit Access(State* s) : s_(s) {
            if (s_->access.lock() == detail::LockResult::owner_died) s_->access.mark_consistent();
        }
        ~Access() { s_->access.unlock(); }
        State* s_;
    };
    T add(T n) {
        State* s = state();
        if constexpr (lock_free) {
            return static_cast<T>(std::atomic_ref<T>(s->value).fetch_add(n, std::memory_order_seq_cst) + n);
        } else {
            Access guard(s);
            s->value = static_cast<T>(s->value + n);
            return s->value;
        }
    }
    State* state() const { return ref_.as<State>(); }
    void bind_lock() { lock_.emplace(Lock(ref_.at(ref_.offset() + offsetof(State, lock)))); }
    detail::SharedRef ref_;
    mutable std::optional<Lock> lock_;  // a handle to State::lock, so get_lock() can return a reference
};

/// n values of T in shared memory, zero-initialised. Element access is plain memory access:
/// use get_lock() (or atomics) when processes update the same elements.
template <class T> class Array {
    static_assert(std::is_trivially_copyable_v<T>, "mproc::Array<T>: T must be trivially copyable");
    using Header = detail::ArrayHeader;
    static constexpr std::size_t data_offset = detail::round_up(sizeof(Header), std::max<std::size_t>(alignof(T), 64));

public:
    explicit Array(std::size_t n = 0) {
        if (detail::HandleDecodeScope::active()) return;
        if (n > (std::size_t{1} << 40) / sizeof(T))
            throw Error("mproc::Array: " + std::to_string(n) + " elements is too many");
        const std::size_t bytes = data_offset + n * sizeof(T);
        ref_ = detail::SharedRef::allocate(bytes, 64, "mproc-array");
        Header* h = header();
        h->header = {detail::array_magic, 0, detail::type_hash<Array<T>>()};
        Lock::init_at(&h->lock);
        h->size = n;
        h->data_offset = data_offset;
        bind();
    }
    Array(std::initializer_list<T> values) : Array(std::span<const T>(values.begin(), values.size())) {}
    explicit Array(std::span<const T> values) : Array(values.size()) {
        if (data_ && !values.empty()) std::memcpy(static_cast<void*>(data_), values.data(), values.size_bytes());
    }

    std::size_t size() const { return static_cast<std::size_t>(header()->size); }
    T& operator[](std::size_t i) const noexcept { return data_[i]; }
    /// Bounds-checked; throws mproc::Error past the end.
    T& at(std::size_t i) const {
        if (i >= size())
            throw Error("mproc::Array::at: index " + std::to_string(i) + " out of range (size " +
                        std::to_string(size()) + ")");
        return data_[i];
    }
    T* data() const noexcept { return data_; }
    T* begin() const noexcept { return data_; }
    T* end() const { return data_ + size(); }
    std::span<T> span() const { return {data_, size()}; }

    Array(const Array&) = default;
    Array& operator=(const Array&) = default;
    Array(Array&& other) noexcept
        : ref_(std::move(other.ref_)), data_(std::exchange(other.data_, nullptr)), lock_(std::move(other.lock_)) {}
    Array& operator=(Array&& other) noexcept {
        ref_ = std::move(other.ref_);
        data_ = std::exchange(other.data_, nullptr);
        lock_ = std::move(other.lock_);
        return *this;
    }

    /// The Lock that goes with this array: `std::lock_guard g(arr.get_lock());`.
    Lock& get_lock() const { return *lock_; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::array_magic, detail::type_hash<Array<T>>(), sizeof(Header), "Array");
            const Header* h = header();
            const std::size_t room = ref_.segment()->size() - ref_.offset();
            if (h->data_offset != data_offset || h->size > (room - data_offset) / sizeof(T))
                throw SerializationError("mproc: corrupt Array handle: its size does not fit its memory");
            bind();
        }
    }

private:
    Header* header() const { return ref_.as<Header>(); }
    void bind() {
        data_ = reinterpret_cast<T*>(ref_.address() + data_offset);
        lock_.emplace(Lock(ref_.at(ref_.offset() + offsetof(Header, lock))));
    }
    detail::SharedRef ref_;
    T* data_ = nullptr;
    mutable std::optional<Lock> lock_;  // a handle to Header::lock, so get_lock() can return a reference
};

}  // namespace mproc
