// mproc — synchronisation primitives and shared values, as Python's multiprocessing has them.
//
//     mproc::Lock lock;          std::lock_guard g(lock);   lock.acquire(1s) -> bool;   lock.release();
//     mproc::RLock rlock;        mproc::Semaphore sem(3);
//     mproc::Event ev;           ev.set(); ev.wait(1s) -> bool;
//     mproc::Condition cond;     std::unique_lock g(cond);  cond.wait_for([&] { return ready; });  cond.notify_all();
//     mproc::Barrier barrier(4, action, 10s);   barrier.wait() -> arrival index;   barrier.abort(); barrier.reset();
//     mproc::Value<long> counter(0);   counter += 1;   counter.load();   counter.get_lock();
//     mproc::Array<double> arr(1000);  arr[3] = 1.5;   arr.size();
//     mproc::RawValue<long> raw(0);    mproc::RawArray<int> raw_arr(8);   // no lock: synchronise yourself
//
// Each is a handle: copies (and the copies a fork makes) refer to one object in shared memory,
// which lives while any handle in any process does (or a SharedDict holds a copy of one). They
// work in every process forked after they were made, and travel as Pool task arguments (see
// detail/shm/registry.hpp). What each keeps in shared memory is detail/shm/sync_state.hpp.
//
// Locks are robust: when a holder dies, even by SIGKILL, the next acquire() succeeds and
// owner_died() is true until that new holder releases, so the program can check the data the
// lock guards. Semaphore and Event keep their state in single atomic words, so a process dying in
// the middle of one of their operations cannot leave them half-updated; a wake-up lost to such a
// death costs a waiter at most detail::recheck_interval. Condition and Barrier know which threads
// wait on them: a notify skips a waiter that died, and a party that dies at a Barrier breaks it.
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
#include <variant>

#include "detail/os/clock.hpp"
#include "detail/os/futex.hpp"
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
    /// mproc::Error for a value below 0 or above 4,294,967,295.
    explicit Semaphore(std::int64_t value = 1) { create(value, 0, detail::type_hash<Semaphore>(), "mproc::Semaphore"); }
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
    explicit BoundedSemaphore(std::int64_t value = 1) {
        if (value == 0) throw Error("mproc::BoundedSemaphore: the bound must be at least 1");
        create(value, static_cast<std::uint32_t>(value), detail::type_hash<BoundedSemaphore>(),
               "mproc::BoundedSemaphore");
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

/// A condition variable shared between processes, over a Lock or an RLock (its own RLock by
/// default), as Python's multiprocessing.Condition. wait, wait_for, notify and notify_all must be
/// called holding the lock; wait gives it up while it sleeps (an RLock's every hold) and takes it
/// back before it returns. A waiter that dies while it waits swallows no notify: notify(n) wakes
/// n waiters that live. At most 255 threads wait on one Condition at a time.
class Condition {
public:
    Condition() : lock_(std::in_place_type<RLock>) { create(); }
    /// Over an existing lock: acquiring the Condition acquires that lock.
    explicit Condition(const Lock& lock) : lock_(std::in_place_type<Lock>, lock) { create(); }
    explicit Condition(const RLock& lock) : lock_(std::in_place_type<RLock>, lock) { create(); }

    // The lock's calls, for std::lock_guard, std::unique_lock and std::scoped_lock too.
    bool acquire(std::optional<Seconds> timeout = std::nullopt) { return base().acquire(timeout); }
    void release() { base().release(); }
    void lock() { base().lock(); }
    void unlock() { base().unlock(); }
    bool try_lock() { return base().try_lock(); }
    /// The lock's owner_died(): its holder got it from one that died holding it.
    bool owner_died() const { return base().owner_died(); }

    /// Gives up the lock, sleeps until notified or `timeout` passes, and takes the lock back.
    /// True if notified, false on timeout. Throws mproc::Error if this thread does not hold the lock.
    bool wait(std::optional<Seconds> timeout = std::nullopt) {
        return detail::ConditionOps::wait(state(), base(), detail::deadline_after(timeout));
    }
    /// Waits until `predicate()` is true (checked under the lock, first before any wait), or the
    /// timeout passes; returns the predicate's last result.
    template <class Predicate> bool wait_for(Predicate predicate, std::optional<Seconds> timeout = std::nullopt) {
        detail::ConditionOps::require_held(base(), "wait_for");
        const detail::Deadline deadline = detail::deadline_after(timeout);
        bool result = static_cast<bool>(predicate());
        while (!result && !detail::expired(deadline)) {
            detail::ConditionOps::wait(state(), base(), deadline);
            result = static_cast<bool>(predicate());
        }
        return result;
    }
    /// Wakes up to `n` waiters, longest waiting first. Throws mproc::Error if this thread does not
    /// hold the lock.
    void notify(std::size_t n = 1) { detail::ConditionOps::notify(state(), base(), n, "notify"); }
    /// Wakes every waiter.
    void notify_all() { detail::ConditionOps::notify(state(), base(), SIZE_MAX, "notify_all"); }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            const std::uint8_t recursive = std::holds_alternative<RLock>(lock_) ? 1 : 0;
            ar(recursive);
            std::visit([&ar](auto& l) { ar(l); }, lock_);
            ref_.encode(ar);
        } else {
            std::uint8_t recursive = 0;
            ar(recursive);
            detail::HandleDecodeScope decoding;  // the lock's handle is read, not made
            if (recursive == 0) {
                Lock l;
                ar(l);
                lock_ = std::move(l);
            } else if (recursive == 1) {
                RLock l;
                ar(l);
                lock_ = std::move(l);
            } else {
                throw SerializationError("mproc: corrupt Condition handle: unknown kind of lock");
            }
            ref_.decode(ar, detail::condition_magic, detail::type_hash<Condition>(), sizeof(detail::ConditionState),
                        "Condition");
        }
    }

private:
    void create() {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::SharedRef::allocate(sizeof(detail::ConditionState), alignof(detail::ConditionState),
                                           "mproc-condition");
        detail::ConditionOps::init(state(), detail::type_hash<Condition>());
    }
    detail::LockBase& base() {
        return std::visit([](auto& l) -> detail::LockBase& { return l; }, lock_);
    }
    const detail::LockBase& base() const {
        return std::visit([](const auto& l) -> const detail::LockBase& { return l; }, lock_);
    }
    detail::ConditionState* state() const { return ref_.as<detail::ConditionState>(); }

    std::variant<Lock, RLock> lock_;
    detail::SharedRef ref_;
};

namespace detail {
/// A Barrier's action is a function pointer or a stateless callable, as a Pool task is: it runs
/// in whichever process arrives last, which cannot see what another process captured.
template <class F>
inline constexpr bool is_barrier_action_v = std::is_pointer_v<F> ? std::is_function_v<std::remove_pointer_t<F>>
                                                                 : (std::is_class_v<F> && std::is_empty_v<F> &&
                                                                    std::is_default_constructible_v<F>);
template <class F> void run_barrier_action(std::uintptr_t target) {
    if constexpr (std::is_pointer_v<F>) {
        // NOLINTNEXTLINE(performance-no-int-to-ptr): the function's address, valid in every fork
        const F f = reinterpret_cast<F>(target);
        static_cast<void>(f());
    } else {
        F f{};
        static_cast<void>(f());
    }
}
}  // namespace detail

/// Holds processes until `parties` of them wait, then lets them all go, round after round, as
/// Python's Barrier: the last to arrive runs `action` first (a function pointer or a stateless
/// callable); `timeout` is the default of wait(). A wait that times out, an action that throws, a
/// party that dies while it waits, or abort() break the barrier: every waiter, and every later
/// wait until reset(), gets mproc::BrokenBarrierError.
class Barrier : public detail::BarrierBase {
public:
    explicit Barrier(std::uint32_t parties) : Barrier(parties, nullptr) {}
    /// No action; `Barrier(4, {}, 10s)`.
    Barrier(std::uint32_t parties, std::nullptr_t, std::optional<Seconds> timeout = std::nullopt) {
        create(parties, nullptr, 0, timeout, detail::type_hash<Barrier>());
    }
    template <class F> Barrier(std::uint32_t parties, F action, std::optional<Seconds> timeout = std::nullopt) {
        static_assert(detail::is_barrier_action_v<F>,
                      "mproc::Barrier: the action must be a function pointer or a stateless callable (a lambda "
                      "without captures). It runs in whichever process arrives last, which cannot see variables "
                      "captured in another process: share them through a Value, an Array or a SharedDict.");
        if constexpr (detail::is_barrier_action_v<F>) {
            static_assert(std::is_invocable_v<F&>, "mproc::Barrier: the action must be callable with no arguments");
            if constexpr (std::is_pointer_v<F>) {
                if (action == nullptr) {
                    create(parties, nullptr, 0, timeout, detail::type_hash<Barrier>());
                    return;
                }
                create(parties, &detail::run_barrier_action<F>, reinterpret_cast<std::uintptr_t>(action), timeout,
                       detail::type_hash<Barrier>());
            } else {
                static_cast<void>(action);
                create(parties, &detail::run_barrier_action<F>, 0, timeout, detail::type_hash<Barrier>());
            }
        }
    }
    Barrier() : Barrier(1) {}

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::barrier_magic, detail::type_hash<Barrier>(), detail::barrier_slots_offset,
                        "Barrier");
            check_decoded();
        }
    }
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

    /// Atomic; returns the new value. Integers wrap past their range, as the atomic's fetch_add
    /// does (and as a ctypes value in Python's Value does).
    T operator+=(T n) requires std::is_arithmetic_v<T> { return add(n); }
    T operator-=(T n) requires std::is_arithmetic_v<T> { return add(negated(n)); }
    T operator++() requires std::is_integral_v<T> { return add(1); }
    T operator--() requires std::is_integral_v<T> { return add(static_cast<T>(-1)); }
    T operator++(int) requires std::is_integral_v<T> { return sum(add(1), static_cast<T>(-1)); }
    T operator--(int) requires std::is_integral_v<T> { return sum(add(static_cast<T>(-1)), 1); }

    /// The Lock that goes with this value, for updates of more than one step:
    /// `std::lock_guard g(v.get_lock());` (Python's `with v.get_lock():`).
    Lock& get_lock() const {
        if (!lock_)
            throw Error(
                "mproc: use of an empty shared-object handle (moved from, left empty by a failed decode, or left out by its type's serialize)");
        return *lock_;
    }

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
            return sum(std::atomic_ref<T>(s->value).fetch_add(n, std::memory_order_seq_cst), n);
        } else {
            Access guard(s);
            s->value = sum(s->value, n);
            return s->value;
        }
    }
    /// a + b, wrapping for integers as the atomic's fetch_add does (in T, a signed sum that
    /// overflows is undefined); and -n, wrapping likewise (the lowest signed value is its own).
    static T sum(T a, T b) noexcept {
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
            using U = std::make_unsigned_t<T>;
            return static_cast<T>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
        } else {
            return static_cast<T>(a + b);
        }
    }
    static T negated(T n) noexcept {
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
            using U = std::make_unsigned_t<T>;
            return static_cast<T>(static_cast<U>(U{0} - static_cast<U>(n)));
        } else {
            return static_cast<T>(-n);
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
    Lock& get_lock() const {
        if (!lock_)
            throw Error(
                "mproc: use of an empty shared-object handle (moved from, left empty by a failed decode, or left out by its type's serialize)");
        return *lock_;
    }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::array_magic, detail::type_hash<Array<T>>(), sizeof(Header), "Array");
            const Header* h = header();
            const std::size_t room = ref_.segment()->size() - ref_.offset();
            if (h->data_offset != data_offset || room < data_offset || h->size > (room - data_offset) / sizeof(T))
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

/// Python's RawValue: one T in shared memory, like Value, without a lock. Reads and writes are
/// plain memory accesses: the processes synchronise themselves (a Lock, a Barrier, or
/// std::atomic_ref on get()).
template <class T> class RawValue {
    static_assert(std::is_trivially_copyable_v<T>, "mproc::RawValue<T>: T must be trivially copyable");
    using State = detail::RawValueState<T>;

public:
    explicit RawValue(T initial = T{}) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::SharedRef::allocate(sizeof(State), alignof(State), "mproc-value");
        State* s = state();
        s->header = {detail::raw_value_magic, 0, detail::type_hash<RawValue<T>>()};
        std::memcpy(static_cast<void*>(&s->value), &initial, sizeof(T));
    }

    T load() const { return state()->value; }
    void store(T v) { state()->value = v; }
    /// Python's `.value`.
    T value() const { return load(); }
    operator T() const { return load(); }
    RawValue& operator=(T v) {
        store(v);
        return *this;
    }
    /// The T itself, in shared memory.
    T& get() const { return state()->value; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) ref_.encode(ar);
        else ref_.decode(ar, detail::raw_value_magic, detail::type_hash<RawValue<T>>(), sizeof(State), "RawValue");
    }

private:
    State* state() const { return ref_.as<State>(); }
    detail::SharedRef ref_;
};

/// Python's RawArray: n values of T in shared memory, zero-initialised, like Array without a lock.
template <class T> class RawArray {
    static_assert(std::is_trivially_copyable_v<T>, "mproc::RawArray<T>: T must be trivially copyable");
    using Header = detail::RawArrayHeader;
    static constexpr std::size_t data_offset = detail::round_up(sizeof(Header), std::max<std::size_t>(alignof(T), 64));

public:
    explicit RawArray(std::size_t n = 0) {
        if (detail::HandleDecodeScope::active()) return;
        if (n > (std::size_t{1} << 40) / sizeof(T))
            throw Error("mproc::RawArray: " + std::to_string(n) + " elements is too many");
        ref_ = detail::SharedRef::allocate(data_offset + n * sizeof(T), 64, "mproc-array");
        Header* h = header();
        h->header = {detail::raw_array_magic, 0, detail::type_hash<RawArray<T>>()};
        h->size = n;
        h->data_offset = data_offset;
        bind();
    }
    RawArray(std::initializer_list<T> values) : RawArray(std::span<const T>(values.begin(), values.size())) {}
    explicit RawArray(std::span<const T> values) : RawArray(values.size()) {
        if (data_ && !values.empty()) std::memcpy(static_cast<void*>(data_), values.data(), values.size_bytes());
    }

    std::size_t size() const { return static_cast<std::size_t>(header()->size); }
    T& operator[](std::size_t i) const noexcept { return data_[i]; }
    /// Bounds-checked; throws mproc::Error past the end.
    T& at(std::size_t i) const {
        if (i >= size())
            throw Error("mproc::RawArray::at: index " + std::to_string(i) + " out of range (size " +
                        std::to_string(size()) + ")");
        return data_[i];
    }
    T* data() const noexcept { return data_; }
    T* begin() const noexcept { return data_; }
    T* end() const { return data_ + size(); }
    std::span<T> span() const { return {data_, size()}; }

    RawArray(const RawArray&) = default;
    RawArray& operator=(const RawArray&) = default;
    RawArray(RawArray&& other) noexcept : ref_(std::move(other.ref_)), data_(std::exchange(other.data_, nullptr)) {}
    RawArray& operator=(RawArray&& other) noexcept {
        ref_ = std::move(other.ref_);
        data_ = std::exchange(other.data_, nullptr);
        return *this;
    }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::raw_array_magic, detail::type_hash<RawArray<T>>(), sizeof(Header), "RawArray");
            const Header* h = header();
            const std::size_t room = ref_.segment()->size() - ref_.offset();
            if (h->data_offset != data_offset || room < data_offset || h->size > (room - data_offset) / sizeof(T))
                throw SerializationError("mproc: corrupt RawArray handle: its size does not fit its memory");
            bind();
        }
    }

private:
    Header* header() const { return ref_.as<Header>(); }
    void bind() { data_ = reinterpret_cast<T*>(ref_.address() + data_offset); }
    detail::SharedRef ref_;
    T* data_ = nullptr;
};

}  // namespace mproc
