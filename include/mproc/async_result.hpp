// mproc — AsyncResult: the pending outcome of Pool::apply_async, map_async and starmap_async.
//
//     auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { ... });
//     ar.get();        // 9; rethrows the task's exception; get(1s) throws TimeoutError if not ready
//     ar.wait(1s);     // bool
//     ar.ready(); ar.successful();
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

private:
    friend class Pool;
    explicit AsyncResult(std::shared_ptr<detail::ValueState<T>> state) : state_(std::move(state)) {}

    void require_state() const {
        if (!state_) throw Error("this AsyncResult holds no result (default-constructed or moved from)");
    }
    std::shared_ptr<detail::ValueState<T>> state_;
};

}  // namespace mproc
