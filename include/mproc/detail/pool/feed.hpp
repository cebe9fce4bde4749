// mproc — how a map's tasks reach the engine while the rest of its input is still being encoded.
//
// A map of a million numbers is a few hundred chunks. Encoded all before the first is handed out,
// the workers would sit idle while the caller copies the whole input into fresh frames (a page
// fault every 4 KiB). A TaskFeed hands the tasks over in batches as they are encoded instead, so
// the workers start on the first chunks at once.
//
// A call that waits for its result (Pool::map, Pool::starmap) is *paced*: once more than
// feed_window bytes of its frames (and more than feed_tasks_per_worker tasks per worker) are
// handed out and not yet answered, it waits for results before it encodes more — until the window
// has drained by a batch, so that one wake-up lets it encode a batch. Its frames then reuse the
// memory of answered ones, and its memory is bounded by the window instead of growing with its
// input. An async call cannot wait — its caller may drop the input as soon as it returns — so it
// encodes everything, in batches that double.
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "engine.hpp"

namespace mproc::detail {

/// A paced call waits once it has this many bytes of task frames ahead of its results...
inline constexpr std::size_t feed_window = std::size_t{1} << 20;
/// ...and this many tasks per worker (so that large chunks, and many workers, still all run).
inline constexpr std::size_t feed_tasks_per_worker = 4;
/// A paced call hands its tasks over once this many bytes of them are encoded, and waits until
/// the window has drained by as much.
inline constexpr std::size_t feed_batch = feed_window / 8;

/// Hands one call's tasks to `engine` as they are encoded. `State` is the call's ManyResult. A
/// feed destroyed before finish() abandons the call (see abandon()).
template <class State> class TaskFeed {
public:
    /// `items`: the call's items; `paced`: the caller waits for the result (see above).
    TaskFeed(PoolEngine& engine, std::shared_ptr<State> state, std::size_t items, bool paced)
        : engine_(engine), state_(std::move(state)), items_(items), paced_(paced),
          batch_tasks_(std::size_t{engine.processes()} * 4),
          min_tasks_ahead_(std::size_t{engine.processes()} * feed_tasks_per_worker) {
        tasks_.reserve(paced ? 64 : batch_tasks_);
    }
    TaskFeed(const TaskFeed&) = delete;
    TaskFeed& operator=(const TaskFeed&) = delete;
    ~TaskFeed() {
        if (!finished_) abandon();
    }

    /// The next task of the call, to be encoded (then encoded()).
    Task& next() {
        Task& task = tasks_.emplace_back();
        task.sink = state_;
        return task;
    }

    /// The task next() gave is encoded, and the call's items so far end at `end`: hands over the
    /// tasks encoded when a batch is full, and (paced) waits for results while the window is full.
    void encoded(std::size_t end) {
        const std::size_t bytes = tasks_.back().frame.size();
        if (!paced_) {
            if (tasks_.size() == batch_tasks_ && end < items_) {
                hand_over();
                batch_tasks_ *= 2;
            }
            return;
        }
        ahead_.emplace_back(end, bytes);
        ahead_bytes_ += bytes;
        pending_bytes_ += bytes;
        if (pending_bytes_ >= feed_batch) hand_over();
        if (end == items_ || !window_full(0, 0)) return;
        // Full: wait until the window has drained by a batch (the oldest tasks whose frames make
        // it up have their outcomes), so that this thread wakes once per batch, not per task.
        std::size_t drained = 0, drained_bytes = 0;
        while (drained < ahead_.size() && (window_full(drained, drained_bytes) || drained_bytes < feed_batch)) {
            drained_bytes += ahead_[drained].second;
            ++drained;
        }
        if (drained == 0) return;
        hand_over();  // never wait for results of tasks still held here
        if (!state_->wait_settled(ahead_[drained - 1].first)) {
            paced_ = false;  // on the pool's own thread, where the wait would never end (get() says so)
            return;
        }
        ahead_.erase(ahead_.begin(), ahead_.begin() + static_cast<std::ptrdiff_t>(drained));
        ahead_bytes_ -= drained_bytes;
    }

    /// Hands over the rest: the call is whole.
    void finish() {
        if (!handed_ && tasks_.empty()) {  // no items: the call completes without the engine's tasks
            finished_ = true;
            return;
        }
        if (!handed_) {  // the call in one part
            try {
                engine_.submit(tasks_);
            } catch (...) {
                finished_ = true;
                if (tasks_.empty()) state_->withdraw();  // queued, then handing them out failed
                throw;
            }
            finished_ = true;
            return;
        }
        hand_over();  // if it throws, the destructor abandons the call
        finished_ = true;
        engine_.end_call();
    }

    /// The call could not be made whole (the input threw, or the pool took no more): the part
    /// handed over stops like a cancelled call's, and no callback runs (State::withdraw).
    void abandon() noexcept {
        finished_ = true;
        if (!handed_) return;
        state_->withdraw();
        engine_.end_call();
    }

private:
    /// Whether the tasks ahead of the results, less the oldest `skip` of them (`skip_bytes` of
    /// frames), fill the window.
    bool window_full(std::size_t skip, std::size_t skip_bytes) const noexcept {
        return ahead_.size() - skip > min_tasks_ahead_ && ahead_bytes_ - skip_bytes > feed_window;
    }

    /// A part of the call. The first makes the engine take the later ones even after close(),
    /// and join() wait for them, until end_call().
    void hand_over() {
        if (tasks_.empty()) return;
        try {
            engine_.submit(tasks_, handed_ ? PoolEngine::Part::more : PoolEngine::Part::first);
        } catch (...) {
            if (tasks_.empty()) handed_ = true;  // queued, then handing them out failed
            throw;
        }
        handed_ = true;
        pending_bytes_ = 0;
    }

    PoolEngine& engine_;
    PoolEngine::FeedingScope feeding_{engine_};
    std::shared_ptr<State> state_;
    std::size_t items_;
    bool paced_;
    std::size_t batch_tasks_;      // not paced: tasks per batch
    std::size_t min_tasks_ahead_;  // paced: never fewer tasks ahead than this
    std::vector<Task> tasks_;      // encoded, not yet handed over
    bool handed_ = false;          // a first part went to the engine (end_call() is owed)
    bool finished_ = false;        // finish() or abandon() was called
    // Paced: per task handed over or held, the index just past its last item, and its frame's bytes.
    std::deque<std::pair<std::size_t, std::size_t>> ahead_;
    std::size_t ahead_bytes_ = 0;
    std::size_t pending_bytes_ = 0;  // of the tasks in tasks_
};

}  // namespace mproc::detail
