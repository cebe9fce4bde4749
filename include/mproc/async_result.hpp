// mproc — AsyncResult: the pending outcome of Pool::apply_async, map_async and starmap_async.
//
//     auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { ... });
//     ar.get();        // 9; rethrows the task's exception; get(1s) throws TimeoutError if not ready
//     ar.wait(1s);     // bool
//     ar.ready(); ar.successful();
//     ar.cancel();     // true: get() throws CancelledError; a running task's worker is replaced
//     int v = co_await ar;             // in any coroutine: resumes on the pool's thread once ready
//     int w = co_await ar.resume_on(ex);  // ... or through ex(handle), an executor of the caller's
#pragma once

#include <concepts>
#include <coroutine>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include "detail/pool/results.hpp"
#include "errors.hpp"
#include "time.hpp"

namespace mproc {

namespace detail {

/// Resumes an awaiting coroutine where its result completes: on the pool's thread.
struct ResumeInline {
    void operator()(std::coroutine_handle<> h) const { h.resume(); }
};

/// What `co_await` on an AsyncResult<T> makes: it suspends only while the result is pending, has
/// `executor(handle)` called once the result is ready (after its callback, on the pool's thread),
/// and gives the value (a copy, or moved out when `move_out`) or rethrows the task's exception.
/// It holds a reference to the result, which lives while the coroutine waits.
template <class T, class Executor> class ResultAwaiter final : private Continuation {
public:
    ResultAwaiter(std::shared_ptr<ValueState<T>> state, bool move_out, Executor executor)
        : state_(std::move(state)), executor_(std::move(executor)), move_out_(move_out) {}
    ResultAwaiter(const ResultAwaiter&) = delete;
    ResultAwaiter& operator=(const ResultAwaiter&) = delete;
    ~ResultAwaiter() = default;

    bool await_ready() { return state_->ready(); }
    /// False (resume at once) when the result became ready meanwhile. Once registered, the
    /// coroutine may be resumed, and this awaiter gone, before add_continuation() returns.
    bool await_suspend(std::coroutine_handle<> handle) {
        handle_ = handle;
        return state_->add_continuation(*this);
    }
    T await_resume() { return state_->take(move_out_); }

private:
    /// The executor may resume the coroutine on another thread before it returns, and with it
    /// destroy this awaiter: it is called from a copy on this stack, touching nothing after.
    void run() override {
        Executor executor = std::move(executor_);
        const std::coroutine_handle<> handle = handle_;
        executor(handle);
    }

    std::shared_ptr<ValueState<T>> state_;
    [[no_unique_address]] Executor executor_;
    std::coroutine_handle<> handle_;
    bool move_out_;
};

}  // namespace detail

/// The outcome of an asynchronous Pool call, available later. Movable (and copyable: copies share the
/// result); destroying a pending one does not wait for it.
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

    /// Cancels the call (the whole of a map_async): it completes at once with a
    /// mproc::CancelledError, which get() throws and the error_callback (if any) receives on the
    /// pool's thread. Its tasks still queued are dropped and never run; a task a worker is running
    /// is stopped by ending that worker, which the pool replaces (the other tasks it held run
    /// elsewhere, once). Returns false, changing nothing, when the call had already finished; true
    /// when it is cancelled (by this call or an earlier one).
    bool cancel() {
        require_state();
        return state_->cancel();
    }
    /// Whether cancel() succeeded on this call.
    bool cancelled() const noexcept { return state_ && state_->was_cancelled(); }

    /// `co_await ar` in any coroutine: the value, or the task's exception rethrown (as get()). A
    /// pending result suspends the coroutine, which is resumed once the result is ready — after its
    /// callback, on the pool's thread (see resume_on); a ready one does not suspend it. Awaiting
    /// an lvalue copies the value (get() const&), an rvalue moves it out (get() &&). Any number
    /// of coroutines may await one result. Throws mproc::Error if this holds no result. A pool
    /// terminated or destroyed meanwhile fails the result, and resumes the coroutine (then its
    /// co_await throws mproc::Error) in terminate() or ~Pool, before it returns. A coroutine must
    /// not be destroyed while it waits here.
    auto operator co_await() const& { return awaiter(false, detail::ResumeInline{}); }
    auto operator co_await() && { return awaiter(true, detail::ResumeInline{}); }

    /// `co_await ar.resume_on(ex)`: as `co_await ar`, but a suspended coroutine is handed to
    /// `ex(std::coroutine_handle<>)` — called once, where it would have been resumed — to resume
    /// it where the caller wants it (push the handle into an event loop, say). `ex` must not throw:
    /// if it does, the exception is printed on stderr and the coroutine stays suspended.
    template <class Executor> requires std::invocable<Executor&, std::coroutine_handle<>>
    auto resume_on(Executor ex) const& {
        return awaiter(false, std::move(ex));
    }
    template <class Executor> requires std::invocable<Executor&, std::coroutine_handle<>>
    auto resume_on(Executor ex) && {
        return awaiter(true, std::move(ex));
    }

private:
    friend class Pool;
    explicit AsyncResult(std::shared_ptr<detail::ValueState<T>> state) : state_(std::move(state)) {}

    template <class Executor> detail::ResultAwaiter<T, Executor> awaiter(bool move_out, Executor ex) const {
        require_state();
        return detail::ResultAwaiter<T, Executor>(state_, move_out, std::move(ex));
    }
    void require_state() const {
        if (!state_) throw Error("this AsyncResult holds no result (default-constructed or moved from)");
    }
    std::shared_ptr<detail::ValueState<T>> state_;
};

}  // namespace mproc
