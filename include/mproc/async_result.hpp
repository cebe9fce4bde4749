// mproc — AsyncResult: the pending outcome of Pool::apply_async, map_async and starmap_async.
//
//     auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { ... });
//     ar.get();        // 9; rethrows the task's exception; get(1s) throws TimeoutError if not ready
//     ar.wait(1s);     // bool
//     ar.ready(); ar.successful();
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/pool/engine.hpp"
#include "detail/pool/wire.hpp"
#include "detail/serialize/remote_exception.hpp"
#include "detail/serialize/type_name.hpp"
#include "errors.hpp"

namespace mproc {

namespace detail {

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
inline void report_callback_exception(const char* which) {
    std::fprintf(stderr, "mproc: a Pool %s threw %s\n", which, describe_current_exception().c_str());
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
};

/// The callback of a result: void(const T&), or void() for a void result. (A std::conditional_t
/// would name both branches, and `const void&` is ill-formed.)
template <class T> struct result_callback {
    using type = std::function<void(const T&)>;
};
template <> struct result_callback<void> {
    using type = std::function<void()>;
};

template <class R, bool Many>
using collected_t = std::conditional_t<std::is_void_v<R>, void, std::conditional_t<Many, std::vector<R>, R>>;

/// The shared state behind an AsyncResult<T>: T is R for apply_async, std::vector<R> for
/// map_async (void stays void). It collects `items` outcomes, then runs the callback and wakes
/// the waiters.
template <class R, bool Many> class CollectState final : public ResultSink, public ValueState<collected_t<R, Many>> {
public:
    using Value = collected_t<R, Many>;
    using Callback = typename result_callback<Value>::type;
    using ErrorCallback = std::function<void(std::exception_ptr)>;

    CollectState(std::size_t items, Callback callback, ErrorCallback error_callback, std::thread::id collector)
        : remaining_(items), callback_(std::move(callback)), error_callback_(std::move(error_callback)),
          collector_(collector) {
        if constexpr (Many && !std::is_void_v<R>) values_.resize(items);
    }

    /// For a call with no items: completes it (on the collector thread, see ForkEngine::post).
    void complete_empty() {
        {
            std::lock_guard lock(mutex_);
            if (remaining_ != 0 || ready_) return;
        }
        complete();
    }

    void deliver(std::size_t first, std::span<const OutcomeRecord> outcomes,
                 std::span<const std::uint32_t> skips) override {
        std::size_t settled = 0;
        for (std::uint32_t i = 0; i < outcomes.size(); ++i) {
            if (is_skipped(skips, i)) continue;
            const OutcomeRecord& o = outcomes[i];
            const std::size_t index = first + i;
            ++settled;
            if (o.outcome == Outcome::value) [[likely]] {
                try {
                    // Straight into its place: no temporary.
                    if constexpr (Many && !std::is_void_v<R> && !std::is_same_v<R, bool>) {
                        decode_value_into(o.bytes, values_[index]);
                    } else if constexpr (!std::is_void_v<R>) {
                        R value{};
                        decode_value_into(o.bytes, value);
                        store(index, std::move(value));
                    } else if (!o.bytes.empty()) {
                        Reader::fail("a void result with a value");
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

    void fail(std::size_t index, std::exception_ptr error) override {
        record_error(index, std::move(error));  // none of it held here once settle() publishes
        settle(1);
    }

    // ---- the AsyncResult side ----
    bool wait(std::optional<Seconds> timeout) override {
        std::unique_lock lock(mutex_);
        if (ready_) return true;
        if (std::this_thread::get_id() == collector_)
            throw Error("waiting for a Pool result inside a Pool callback would deadlock");
        const auto deadline = deadline_after(timeout);
        if (!deadline) {
            done_.wait(lock, [&] { return ready_; });
            return true;
        }
        return done_.wait_until(lock, *deadline, [&] { return ready_; });
    }
    bool ready() override {
        std::lock_guard lock(mutex_);
        return ready_;
    }
    bool successful() override {
        std::lock_guard lock(mutex_);
        if (!ready_) throw Error("AsyncResult::successful() called before the result is ready");
        return !error_ && !error_taken_;
    }
    Value take(bool move_out) override {
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
    template <class V> void store(std::size_t index, V&& v) {
        if constexpr (Many) values_[index] = std::forward<V>(v);
        else single_ = std::forward<V>(v);
    }
    void record_error(std::size_t index, std::exception_ptr error) {
        std::lock_guard lock(mutex_);
        if (!error_ || index < error_index_) {
            error_ = std::move(error);
            error_index_ = index;
        }
    }
    void settle(std::size_t n) {
        {
            std::lock_guard lock(mutex_);
            remaining_ -= std::min(remaining_, n);
            if (remaining_ != 0 || ready_) return;
        }
        complete();
    }
    // Runs the callback, then publishes: a get() that returns has seen its callback run.
    void complete() {
        std::exception_ptr error;
        {
            std::lock_guard lock(mutex_);
            error = error_;
            if constexpr (!std::is_void_v<Value>) {
                if (!error) {
                    if constexpr (Many) value_.emplace(std::move(values_));
                    else value_.emplace(std::move(*single_));
                }
            }
        }
        try {
            if (!error && callback_) {
                if constexpr (std::is_void_v<Value>) callback_();
                else callback_(*value_);
            } else if (error && error_callback_) {
                error_callback_(error);
            }
        } catch (...) {
            report_callback_exception(error ? "error_callback" : "callback");
            std::lock_guard lock(mutex_);
            error_ = std::current_exception();
        }
        // This thread's reference goes before the result is published: a waiter that rethrows
        // and drops the last one is then ordered after it (an exception_ptr's count is atomic,
        // but inside uninstrumented libstdc++, so ThreadSanitizer cannot see that).
        error = nullptr;
        {
            std::lock_guard lock(mutex_);
            ready_ = true;
        }
        done_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable done_;
    std::size_t remaining_;
    bool ready_ = false;
    std::exception_ptr error_;
    bool error_taken_ = false;  // error_ was moved out by an rvalue get()
    std::size_t error_index_ = 0;
    using Stored = std::conditional_t<std::is_void_v<R>, char, R>;
    std::conditional_t<Many && !std::is_void_v<R>, std::vector<Stored>, char> values_{};
    std::optional<Stored> single_;
    std::optional<std::conditional_t<std::is_void_v<Value>, char, Value>> value_;
    Callback callback_;
    ErrorCallback error_callback_;
    std::thread::id collector_;
};

}  // namespace detail

/// The outcome of an asynchronous Pool call, available later. Movable; destroying a pending one
/// does not wait for it.
template <class T> class AsyncResult {
public:
    AsyncResult() = default;

    /// Waits (up to `timeout`) and returns the value, or rethrows the task's exception.
    /// Throws mproc::TimeoutError when the timeout passes first.
    T get(std::optional<Seconds> timeout = std::nullopt) const& {
        require_state();
        if (!state_->wait(timeout)) throw TimeoutError("AsyncResult::get: the result was not ready in time");
        return state_->take(false);
    }
    T get(std::optional<Seconds> timeout = std::nullopt) && {
        require_state();
        if (!state_->wait(timeout)) throw TimeoutError("AsyncResult::get: the result was not ready in time");
        return state_->take(true);
    }
    /// Waits until ready; with a timeout, returns false if it passes first.
    bool wait(std::optional<Seconds> timeout = std::nullopt) const {
        require_state();
        return state_->wait(timeout);
    }
    bool ready() const { return state_ && state_->ready(); }
    /// Whether the call completed without an exception. Throws mproc::Error if not ready yet.
    bool successful() const {
        require_state();
        return state_->successful();
    }
    bool valid() const noexcept { return state_ != nullptr; }

private:
    friend class Pool;
    explicit AsyncResult(std::shared_ptr<detail::ValueState<T>> state) : state_(std::move(state)) {}

    void require_state() const {
        if (!state_) throw Error("this AsyncResult holds no result (default-constructed or moved from)");
    }
    std::shared_ptr<detail::ValueState<T>> state_;
};

}  // namespace mproc
