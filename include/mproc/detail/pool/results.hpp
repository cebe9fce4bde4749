// mproc — the shared state behind an AsyncResult: where a task's outcomes land, on the pool's
// thread, and where get() waits for them.
//
// One call's state collects its items' outcomes (ResultSink), then runs the callback and only then
// marks itself ready, so a get() that returns has seen its callback run. What every call shares —
// the lock, the count of items left, the first error by item order, the callback, the waiting —
// is ResultCore. What differs is where a decoded value goes: SingleResult<R> (apply_async) holds
// one value, ManyResult<R> (map_async, starmap_async) a vector with one place per item. Each says
// so in two members, store() and finish(), which the core calls without a virtual call (CRTP).
// A coroutine that co_awaits a result is a Continuation in its list, run once it is ready.
// imap's state (ImapState) keeps each item's value or error until the loop takes it.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "../os/futex.hpp"
#include "../os/io.hpp"
#include "../serialize/remote_exception.hpp"
#include "engine.hpp"
#include "wire.hpp"

namespace mproc::detail {

/// The error of an item whose outcome is not a value: its task's exception, rebuilt.
[[gnu::noinline]] inline std::exception_ptr outcome_error(const OutcomeRecord& o) {
    if (o.outcome == Outcome::exception) return rebuild_exception(o.bytes);
    return std::make_exception_ptr(Error("a worker skipped an item the pool had not failed"));
}

/// Whether relative item `i` is one of `skips` (sorted).
inline bool is_skipped(std::span<const std::uint32_t> skips, std::uint32_t i) noexcept {
    return !skips.empty() && std::binary_search(skips.begin(), skips.end(), i);
}

/// Prints a callback's escaped exception: callbacks run on the pool's thread, where nobody
/// could catch it. The AsyncResult's get() rethrows it too.
inline void report_callback_exception(const char* which) noexcept {
    try {
        report("mproc: a Pool %s threw %s\n", which, describe_current_exception().c_str());
    } catch (...) {
        report("mproc: a Pool %s threw (no memory left to say what)\n", which);
    }
}

/// What waits for a result without blocking a thread (a coroutine's co_await): a node its owner
/// keeps alive until run() is called, linked into the result's list until then. run() is called
/// once, on the thread that completes the result (the pool's), after the callback and after the
/// result is ready; it may destroy the node and drop the last reference to the result.
class Continuation {
public:
    Continuation(const Continuation&) = delete;
    Continuation& operator=(const Continuation&) = delete;
    virtual void run() = 0;
    Continuation* next = nullptr;  // the result's list (under its lock)

protected:
    Continuation() = default;
    ~Continuation() = default;
};

/// Runs a list of continuations taken from a result, in the order they were added. One that throws
/// is reported and the others still run: they run on the pool's thread, where nobody could catch it.
inline void run_continuations(Continuation* list) {
    Continuation* in_order = nullptr;  // the list is newest first: reverse it
    while (list) {
        Continuation* rest = list->next;
        list->next = in_order;
        in_order = list;
        list = rest;
    }
    while (in_order) {
        Continuation* c = std::exchange(in_order, in_order->next);  // c may be gone once it has run
        try {
            c->run();
        } catch (...) {
            report_callback_exception("co_await resumption");
        }
    }
}

/// What an AsyncResult<T> asks of its shared state.
template <class T> class ValueState {
public:
    virtual ~ValueState() = default;
    virtual bool wait(std::optional<Seconds> timeout) = 0;
    virtual bool ready() = 0;
    virtual bool successful() = 0;
    /// After wait() returned true: the value (moved out when `move_out`), or the exception.
    virtual T take(bool move_out) = 0;
    /// Cancels the call unless it has finished (see AsyncResult::cancel).
    virtual bool cancel() = 0;
    virtual bool was_cancelled() const noexcept = 0;
    /// Has `c` run once the result is ready; false, and nothing kept, when it is ready already.
    virtual bool add_continuation(Continuation& c) = 0;
};

/// The callback of a result: void(const T&), or void() for a void result. (A std::conditional_t
/// would name both branches, and `const void&` is ill-formed.)
template <class T> struct result_callback {
    using type = std::function<void(const T&)>;
};
template <> struct result_callback<void> {
    using type = std::function<void()>;
};

/// The value an AsyncResult stores: nothing (void stays void) or the value itself.
template <class Value> using stored_t = std::conditional_t<std::is_void_v<Value>, char, Value>;

/// What SingleResult and ManyResult share. `Derived` supplies
///   void store(std::size_t index, std::span<const std::byte> value_bytes);  // decode into place; may throw
///   void finish(std::optional<stored_t<Value>>& value);                      // the whole value, once, on success
template <class Derived, class Value> class ResultCore : public ResultSink, public ValueState<Value> {
public:
    using Callback = typename result_callback<Value>::type;
    using ErrorCallback = std::function<void(std::exception_ptr)>;

    /// `pool`: the engine of the call (compared, never dereferenced: see PoolEngine::delivers_here).
    ResultCore(std::size_t items, Callback callback, ErrorCallback error_callback, const PoolEngine* pool)
        : items_(items), remaining_(items), callback_(std::move(callback)), error_callback_(std::move(error_callback)),
          pool_(pool) {}

    /// For a call with no items: completes it (on the pool's thread, see PoolEngine::post).
    void complete_empty() {
        {
            std::lock_guard lock(mutex_);
            if (remaining_ != 0 || ready_locked() || completing_) return;
            completing_ = true;
        }
        complete();
    }

    /// Waits until `items` of the call's items have their outcome, or the call is complete (a
    /// paced map, see detail/pool/feed.hpp). False at once on the pool's own thread, where the
    /// outcomes would never come.
    bool wait_settled(std::size_t items) {
        if (PoolEngine::delivers_here(pool_)) return false;
        this->require_owner("feeding a Pool's map");
        std::unique_lock lock(mutex_);
        // One waiter at a time (the thread feeding the call); settle() wakes it at its target only.
        settled_target_ = items;
        done_.wait(lock, [&] { return items_ - remaining_ >= items || ready_locked() || completing_; });
        settled_target_ = 0;
        return true;
    }

    /// The call could not be made whole after part of it went to the engine (its input threw, or
    /// the pool refused a later part): that part stops like a cancelled call's, and no callback
    /// runs, as the caller has the exception instead.
    void withdraw() noexcept {
        Callback callback;
        ErrorCallback error_callback;
        {
            std::lock_guard lock(mutex_);
            callback.swap(callback_);  // destroyed below, with the lock released
            error_callback.swap(error_callback_);
        }
        try {
            cancel();
        } catch (...) {
            // No memory to post the cancel: the tasks handed over run, and nothing reads their outcome.
        }
    }

    /// The call was cancelled: it completes now, with its CancelledError (on the pool's thread).
    void settle_cancelled() override {
        {
            std::lock_guard lock(mutex_);
            if (ready_locked() || completing_) return;
            completing_ = true;
        }
        complete();
    }

    void deliver(std::size_t first, std::span<const OutcomeRecord> outcomes,
                 std::span<const std::uint32_t> skips) override {
        std::size_t settled = 0;
        const bool cancelled = this->cancelled();
        for (std::uint32_t i = 0; i < outcomes.size(); ++i) {
            if (is_skipped(skips, i)) continue;
            const OutcomeRecord& o = outcomes[i];
            const std::size_t index = first + i;
            ++settled;
            if (cancelled) continue;  // the call's outcome is its CancelledError
            if (o.outcome == Outcome::value) [[likely]] {
                try {
                    if constexpr (std::is_void_v<Value>) {
                        if (!o.bytes.empty()) Reader::fail("a void result with a value");
                    } else {
                        static_cast<Derived*>(this)->store(index, o.bytes);
                    }
                } catch (...) {
                    record_error(index, std::current_exception());
                }
                continue;
            }
            record_error(index, outcome_error(o));
        }
        settle(settled);
    }

    void deliver_packed(std::size_t first, std::span<const std::byte> values, std::uint32_t count) override {
        if constexpr (requires(Derived& d) { d.store_packed(first, values, count); }) {
            if (!this->cancelled()) {  // else the call's outcome is its CancelledError
                try {
                    static_cast<Derived*>(this)->store_packed(first, values, count);
                } catch (...) {
                    for (std::uint32_t i = 0; i < count; ++i) record_error(first + i, std::current_exception());
                }
            }
            settle(count);
        } else {
            ResultSink::deliver_packed(first, values, count);
        }
    }

    void fail(std::size_t index, std::exception_ptr error) override {
        record_error(index, std::move(error));  // none of it held here once settle() publishes
        settle(1);
    }
    /// Completes the call now, with `error` unless it already has an error or was cancelled
    /// (ResultSink::abort): only a copied exception_ptr, no allocation. Callbacks still run.
    void abort(std::size_t first, std::uint32_t, const std::exception_ptr& error) noexcept override {
        {
            std::lock_guard lock(mutex_);
            if (ready_locked() || completing_) return;
            if (!error_) {  // a cancelled call's is its CancelledError
                error_ = error;
                error_index_ = first;
            }
            remaining_ = 0;
            completing_ = true;
        }
        done_.notify_all();  // a paced map's feeder waits for settled items (wait_settled)
        complete();
    }

    // ---- the AsyncResult side ----
    /// Cancels the call unless every item has its outcome: it completes with a CancelledError (on
    /// the pool's thread, promptly), whatever its tasks still deliver, and the engine stops them.
    /// True when the call is (now or already) cancelled, false when it had finished.
    bool cancel() override {
        this->require_owner("AsyncResult::cancel");
        const auto settled = [&] { return remaining_ == 0 || ready_locked() || completing_; };
        {
            std::lock_guard lock(mutex_);
            if (cancelled_) return true;
            if (settled()) return false;
        }
        // Made before the call is marked: a call marked cancelled always has its error.
        std::exception_ptr cancelled = std::make_exception_ptr(CancelledError("the call was cancelled"));
        {
            std::lock_guard lock(mutex_);
            if (cancelled_) return true;
            if (settled()) return false;
            cancelled_ = true;
            error_ = std::move(cancelled);
            error_index_ = 0;
            // Before any outcome can complete the call with that error: whoever sees it sees
            // cancelled() too.
            this->mark_cancelled();
        }
        this->stop_tasks();
        return true;
    }
    bool was_cancelled() const noexcept override { return this->cancelled(); }

    /// Sleeps on the result's own futex word, not on a condition variable: a waiter woken from
    /// one takes its mutex back as contended, and its unlock then wakes nobody with a system call
    /// (one of the six a pinned apply() made; docs/performance.md).
    bool wait(std::optional<Seconds> timeout) override {
        this->require_owner("waiting for a Pool result");
        check_timeout(timeout);
        if (ready_word_.load(std::memory_order_acquire) == published) return true;
        if (PoolEngine::delivers_here(pool_))
            throw Error("waiting for a Pool result inside a Pool callback would deadlock");
        const Deadline deadline = deadline_after(timeout);
        for (;;) {
            std::uint32_t word = ready_word_.load(std::memory_order_acquire);
            if (word == published) return true;
            if (expired(deadline)) return false;
            if (word == unwatched && !ready_word_.compare_exchange_strong(word, watched, std::memory_order_acq_rel))
                continue;  // published meanwhile (or another waiter said so first)
            futex_wait_private(ready_word_, watched, deadline);
        }
    }
    bool ready() override {
        this->require_owner("AsyncResult::ready");
        return ready_word_.load(std::memory_order_acquire) == published;
    }
    bool successful() override {
        this->require_owner("AsyncResult::successful");
        std::lock_guard lock(mutex_);
        if (!ready_locked()) throw Error("AsyncResult::successful() called before the result is ready");
        return !error_ && !error_taken_;
    }
    bool add_continuation(Continuation& c) override {
        this->require_owner("co_await of a Pool result");
        std::lock_guard lock(mutex_);
        if (ready_locked()) return false;
        c.next = continuations_;
        continuations_ = &c;
        return true;
    }
    Value take(bool move_out) override {
        this->require_owner("AsyncResult::get");
        std::exception_ptr error;
        {
            std::lock_guard lock(mutex_);
            if (error_) {
                // Moved out with the value it replaces: the exception then belongs to the thread
                // that rethrows it, not to whichever thread drops the last reference to this state
                // (an exception_ptr's count lives in uninstrumented libstdc++, which would make
                // that a ThreadSanitizer report).
                error_taken_ = error_taken_ || move_out;
                error = move_out ? std::exchange(error_, nullptr) : error_;
            } else if (error_taken_) {
                throw Error("AsyncResult::get: the exception was already taken by another get() of this result");
            } else if constexpr (!std::is_void_v<Value>) {
                if (move_out) return std::move(*value_);
                return *value_;
            } else {
                return;
            }
        }
        std::rethrow_exception(error);
    }

private:
    void record_error(std::size_t index, std::exception_ptr error) {
        std::lock_guard lock(mutex_);
        if (cancelled_) return;  // the CancelledError stays
        if (ready_locked() || completing_) return;  // aborted (ResultSink::abort): its outcome is settled
        if (!error_ || index < error_index_) {
            error_ = std::move(error);
            error_index_ = index;
        }
    }
    void settle(std::size_t n) {
        {
            std::lock_guard lock(mutex_);
            remaining_ -= std::min(remaining_, n);
            if (settled_target_ != 0 && items_ - remaining_ >= settled_target_) done_.notify_all();
            if (remaining_ != 0 || ready_locked() || completing_) return;
            completing_ = true;
        }
        complete();
    }
    // Runs the callback, then publishes: a get() that returns has seen its callback run.
    void complete() {
        std::exception_ptr error;
        Callback callback;  // taken under the lock: withdraw() may have dropped them
        ErrorCallback error_callback;
        {
            std::lock_guard lock(mutex_);
            error = error_;
            if constexpr (!std::is_void_v<Value>) {
                // The value moves into place (the result type's move may throw, or allocate: a
                // type with no move constructor is copied). Then the call fails with that error,
                // rather than never being published.
                if (!error) {
                    try {
                        static_cast<Derived*>(this)->finish(value_);
                    } catch (...) {
                        value_.reset();
                        error = error_ = std::current_exception();
                    }
                }
            }
            callback.swap(callback_);
            error_callback.swap(error_callback_);
        }
        try {
            if (!error && callback) {
                if constexpr (std::is_void_v<Value>) callback();
                else callback(*value_);
            } else if (error && error_callback) {
                error_callback(error);
            }
        } catch (...) {
            report_callback_exception(error ? "error_callback" : "callback");
            std::lock_guard lock(mutex_);
            error_ = std::current_exception();
        }
        callback = nullptr;  // before the result is published (see below)
        error_callback = nullptr;
        // This thread's reference goes before the result is published: a waiter that rethrows
        // and drops the last one is then ordered after it (an exception_ptr's count is atomic,
        // but inside uninstrumented libstdc++, so ThreadSanitizer cannot see that).
        error = nullptr;
        Continuation* waiting = nullptr;
        bool watched_word = false;
        {
            std::lock_guard lock(mutex_);
            watched_word = ready_word_.exchange(published, std::memory_order_acq_rel) == watched;
            waiting = std::exchange(continuations_, nullptr);
        }
        if (watched_word) futex_wake_all_private(ready_word_);
        done_.notify_all();  // a paced map's feeder (wait_settled)
        // Last: a coroutine resumed here may drop the last reference to this state.
        run_continuations(waiting);
    }

    // ready_word_: whether the result is published (set under the mutex, read with or without it),
    // and whether a wait() sleeps on it.
    static constexpr std::uint32_t unwatched = 0, watched = 1, published = 2;
    bool ready_locked() const noexcept { return ready_word_.load(std::memory_order_relaxed) == published; }
    FutexWord ready_word_{unwatched};
    std::mutex mutex_;
    std::condition_variable done_;  // wait_settled
    std::size_t items_;      // the call's items
    std::size_t remaining_;  // of them, those without an outcome yet
    std::size_t settled_target_ = 0;  // the items a wait_settled() waits for (0: none waits)
    std::exception_ptr error_;
    bool error_taken_ = false;  // error_ was moved out by an rvalue get()
    bool cancelled_ = false;    // cancel() won: error_ is the CancelledError
    bool completing_ = false;   // complete() was called (once: by the last item, or a cancel)
    std::size_t error_index_ = 0;
    std::optional<stored_t<Value>> value_;
    Callback callback_;
    ErrorCallback error_callback_;
    const PoolEngine* pool_;  // identifies the call's pool (PoolEngine::delivers_here); never dereferenced
    Continuation* continuations_ = nullptr;  // added while not ready; run by complete()
};

/// apply_async's state: one item, one value (void stays void).
template <class R> class SingleResult final : public ResultCore<SingleResult<R>, R> {
    using Core = ResultCore<SingleResult<R>, R>;

public:
    using Core::Core;

    void store(std::size_t, std::span<const std::byte> bytes) {
        R value{};
        decode_value_into(bytes, value);
        single_ = std::move(value);
    }
    void finish(std::optional<stored_t<R>>& value) { value.emplace(std::move(*single_)); }

private:
    std::optional<stored_t<R>> single_;
};

/// map_async's and starmap_async's state: one place per item, in input order (void stays void).
template <class R>
class ManyResult final : public ResultCore<ManyResult<R>, std::conditional_t<std::is_void_v<R>, void, std::vector<R>>> {
    using Value = std::conditional_t<std::is_void_v<R>, void, std::vector<R>>;
    using Core = ResultCore<ManyResult<R>, Value>;

public:
    /// The vector's room is reserved here, on the caller's thread, and its elements made as the
    /// results come, on the pool's: the caller does not touch memory the size of the whole result
    /// (page faults and all) before the first task goes out.
    ManyResult(std::size_t items, typename Core::Callback callback, typename Core::ErrorCallback error_callback,
               const PoolEngine* pool)
        : Core(items, std::move(callback), std::move(error_callback), pool), items_(items) {
        if constexpr (!std::is_void_v<R>) values_.reserve(items);
    }

    void store(std::size_t index, std::span<const std::byte> bytes) {
        if (index >= items_)
            throw SerializationError("a result for item " + std::to_string(index) + " of " + std::to_string(items_));
        grow_to(index + 1);
        if constexpr (std::is_same_v<R, bool>) {  // std::vector<bool> has no element to decode into
            bool value{};
            decode_value_into(bytes, value);
            values_[index] = value;
        } else {
            decode_value_into(bytes, values_[index]);  // straight into its place: no temporary
        }
    }
    /// A packed task's values (numbers): copied into their places as one block.
    void store_packed(std::size_t first, std::span<const std::byte> values, std::uint32_t count)
        requires is_bulk_copyable_v<R> {
        if (values.size() != std::size_t{count} * sizeof(R) || first > items_ || count > items_ - first)
            throw SerializationError("cannot decode the results of type " + type_name<R>() + ": a packed outcome of " +
                                     std::to_string(values.size()) + " bytes for " + std::to_string(count) + " items");
        grow_to(first + count);
        std::memcpy(values_.data() + first, values.data(), values.size());
    }
    void finish(std::optional<stored_t<Value>>& value) {
        grow_to(items_);  // (every item has its value by now: a call with an error never gets here)
        value.emplace(std::move(values_));
    }

private:
    /// Makes the elements up to `size` (within the room reserved: no reallocation).
    void grow_to(std::size_t size) {
        if constexpr (!std::is_void_v<R>) {
            if (values_.size() < size) values_.resize(size);
        }
    }

    std::size_t items_;
    std::conditional_t<std::is_void_v<R>, char, std::vector<stored_t<R>>> values_{};
};

/// Outcomes of an imap, kept until the loop asks for them.
template <class R, bool Ordered> class ImapState final : public ResultSink {
public:
    struct Item {
        std::optional<R> value;
        std::exception_ptr error;
    };

    explicit ImapState(const PoolEngine* pool) : pool_(pool) {}

    void deliver(std::size_t first, std::span<const OutcomeRecord> outcomes,
                 std::span<const std::uint32_t> skips) override {
        std::vector<std::pair<std::size_t, Item>> got;
        got.reserve(outcomes.size());
        for (std::uint32_t i = 0; i < outcomes.size(); ++i) {
            if (is_skipped(skips, i)) continue;
            const OutcomeRecord& o = outcomes[i];
            Item item;
            if (o.outcome == Outcome::value) {
                try {
                    decode_value_into(o.bytes, item.value.emplace());
                } catch (...) {
                    item.value.reset();
                    item.error = std::current_exception();
                }
            } else {
                item.error = outcome_error(o);
            }
            got.emplace_back(first + i, std::move(item));
        }
        {
            std::lock_guard lock(mutex_);
            if (abandoned_ || aborted_) return;
            for (auto& [index, item] : got) put_locked(index, std::move(item));
        }
        arrived_.notify_all();
    }
    void fail(std::size_t index, std::exception_ptr error) override {
        {
            std::lock_guard lock(mutex_);
            if (abandoned_ || aborted_) return;
            put_locked(index, Item{std::nullopt, std::move(error)});
        }
        arrived_.notify_all();
    }
    /// The call has failed (ResultSink::abort): the items that have arrived are still taken in
    /// turn, every other one is `error`, what arrives from now on is dropped, and the loop starts
    /// no more tasks (aborted()).
    void abort(std::size_t, std::uint32_t, const std::exception_ptr& error) noexcept override {
        {
            std::lock_guard lock(mutex_);
            if (!aborted_) aborted_ = error;
            stopped_.store(true, std::memory_order_relaxed);
        }
        arrived_.notify_all();
    }
    bool aborted() const noexcept { return stopped_.load(std::memory_order_relaxed); }

    /// Waits for the next item in the iteration's order (index `next` when ordered).
    Item take(std::size_t next) {
        require_owner("iterating a Pool's imap");
        std::unique_lock lock(mutex_);
        if (PoolEngine::delivers_here(pool_) && !has_locked(next))
            throw Error("iterating a Pool's imap inside a Pool callback would deadlock");
        arrived_.wait(lock, [&] { return has_locked(next) || aborted_; });
        if (!has_locked(next)) return Item{std::nullopt, aborted_};
        if constexpr (Ordered) {
            auto node = ordered_.extract(next);
            return std::move(node.mapped());
        } else {
            Item item = std::move(unordered_.front());
            unordered_.pop_front();
            return item;
        }
    }
    /// The loop is over: what is still in flight is cancelled, and what arrives is dropped.
    void abandon() {
        if (!made_here()) return;  // a forked child's copy: the call is the parent's
        {
            std::lock_guard lock(mutex_);
            abandoned_ = true;
            ordered_.clear();
            unordered_.clear();
        }
        stop_tasks();
    }

private:
    void put_locked(std::size_t index, Item&& item) {
        if constexpr (Ordered) ordered_.emplace(index, std::move(item));
        else unordered_.push_back(std::move(item));
    }
    bool has_locked(std::size_t next) const {
        if constexpr (Ordered) return ordered_.count(next) != 0;
        else return !unordered_.empty();
    }
    std::mutex mutex_;
    std::condition_variable arrived_;
    bool abandoned_ = false;
    std::exception_ptr aborted_;  // the error of every item still to come (abort)
    std::atomic<bool> stopped_{false};  // aborted_ is set (read without the lock by the loop)
    std::map<std::size_t, Item> ordered_;
    std::deque<Item> unordered_;
    const PoolEngine* pool_;  // identifies the call's pool (PoolEngine::delivers_here); never dereferenced
};

/// The state behind apply_async (Many = false) or map_async (Many = true) of a task returning R.
template <class R, bool Many> using result_state_t = std::conditional_t<Many, ManyResult<R>, SingleResult<R>>;
/// What such a call's AsyncResult holds: R, std::vector<R>, or void.
template <class R, bool Many>
using collected_t = std::conditional_t<std::is_void_v<R>, void, std::conditional_t<Many, std::vector<R>, R>>;

}  // namespace mproc::detail
