// mproc — AsyncResult: the pending outcome of Pool::apply_async, map_async and starmap_async.
//
//     auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { ... });
//     ar.get();        // 9; rethrows the task's exception; get(1s) throws TimeoutError if not ready
//     ar.wait(1s);     // bool
//     ar.ready(); ar.successful();
//     ar.cancel();     // true: get() throws CancelledError; a running task's worker is replaced
#pragma once

#include <memory>
#include <optional>
#include <utility>

#include "detail/pool/results.hpp"
#include "errors.hpp"
#include "time.hpp"

namespace mproc {

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

private:
    friend class Pool;
    explicit AsyncResult(std::shared_ptr<detail::ValueState<T>> state) : state_(std::move(state)) {}

    void require_state() const {
        if (!state_) throw Error("this AsyncResult holds no result (default-constructed or moved from)");
    }
    std::shared_ptr<detail::ValueState<T>> state_;
};

}  // namespace mproc
