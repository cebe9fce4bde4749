// mproc — what a Pool asks of the engine that runs its tasks, and everything the engines share.
//
// The Pool front end (pool.hpp) encodes tasks and hands them to a PoolEngine: the fork engine
// (fork_engine.hpp: forked workers, fed through shared memory) or the MPI engine
// (mpi/detail/engine.hpp: MPI ranks). Each engine has one thread of its own, where results are
// delivered and callbacks run. What does not depend on where the workers are is written here
// once: the pool's state and mutex, the backlog, least-loaded dispatch, the count of unsettled
// tasks that join() waits for, posted jobs, and the lifecycle — submit, post, close, join,
// terminate, and a pool destroyed inside its own callback. An engine supplies the hooks: how to
// prepare tasks, wake its thread, hand out the backlog, stop its workers, and finish its teardown.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <span>
#include <string>
#include <sys/types.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "../../errors.hpp"
#include "../../pool_stats.hpp"
#include "../../serialize.hpp"
#include "../os/clock.hpp"
#include "../os/process_id.hpp"
#include "../serialize/type_name.hpp"
#include "../shm/registry.hpp"
#include "wire.hpp"

namespace mproc::detail {

class EngineLink;

/// Where a task's outcomes go: an AsyncResult, a map's vector, an imap's queue. One sink is one
/// Pool call, which can be cancelled as a whole.
class ResultSink : public std::enable_shared_from_this<ResultSink> {
public:
    virtual ~ResultSink() = default;
    ResultSink() : owner_(this_process_id()) {}
    ResultSink(const ResultSink&) = delete;
    ResultSink& operator=(const ResultSink&) = delete;
    /// Takes the outcomes of items first, first+1, ... — but those whose relative index is in
    /// `skips` (already failed). Runs on the collector thread; never throws: an outcome that does
    /// not decode fails its own item.
    virtual void deliver(std::size_t first, std::span<const OutcomeRecord> outcomes,
                         std::span<const std::uint32_t> skips) = 0;
    /// Takes the values of items first, first+1, ... of a packed task (wire.hpp): `count` values
    /// of equal size, back to back. By default, as one value outcome each; a sink that can take
    /// them as one block (a map's vector of numbers) does.
    virtual void deliver_packed(std::size_t first, std::span<const std::byte> values, std::uint32_t count) {
        std::vector<OutcomeRecord> outcomes;
        outcomes.reserve(count);
        split_packed(values, count, outcomes);
        deliver(first, outcomes, {});
    }
    /// Item `index` ended without an outcome (worker lost, timeout, pool terminated).
    virtual void fail(std::size_t index, std::exception_ptr error) = 0;
    /// The engine's last resort, when it cannot settle items one by one any more (its thread
    /// failed; memory may have run out): every item of the call that has no outcome yet fails
    /// with `error`, whatever task carried it, and the call completes. Allocates nothing it needs
    /// and never throws. `first`..`first + count - 1` are the items of the task the engine held.
    /// By default, those items fail one by one as far as memory allows.
    virtual void abort(std::size_t first, std::uint32_t count, const std::exception_ptr& error) noexcept {
        for (std::uint32_t i = 0; i < count; ++i) {
            try {
                fail(first + i, error);
            } catch (...) {
                return;
            }
        }
    }
    /// The call was cancelled: whatever it does at once (an AsyncResult completes with its
    /// CancelledError). On the engine's thread.
    virtual void settle_cancelled() {}
    /// How an error names item `item` (counted in its task) of the task `id` that carries the
    /// call's items first..first+count-1: "task 12 (item 3)", the item counted in the call. A
    /// sink whose tasks are known by other names (a rank's relay: rank 0's, and where it ran)
    /// says them here, so every message the engine builds names the task the caller knows. Called
    /// on the engine's thread with its lock held: it must not lock, nor call back into the engine.
    virtual std::string task_name(std::uint64_t id, std::size_t first, std::uint32_t count, std::uint32_t item) const {
        return plain_task_name(id, first, count, item);
    }
    static std::string plain_task_name(std::uint64_t id, std::size_t first, std::uint32_t count, std::uint32_t item) {
        std::string s = "task " + std::to_string(id);
        if (count > 1 || first > 0) s += " (item " + std::to_string(first + item) + ")";
        return s;
    }

    /// The call's id, which its task frames carry (see wire.hpp): the id of its first task.
    std::uint64_t call = 0;
    /// The engine that runs the call's tasks, for cancel (set by the Pool when the call is made).
    std::shared_ptr<EngineLink> engine;
    /// The call's CallOptions::max_retries (else the pool's).
    std::optional<unsigned> max_retries;
    /// Per item (by index in the call): the workers lost running it. The engine's thread only.
    std::map<std::size_t, unsigned> losses;

    /// Whether the call was cancelled: its tasks are no longer run, and whatever they still
    /// deliver is ignored.
    bool cancelled() const noexcept { return cancelled_.load(std::memory_order_acquire); }

    /// mproc::Error in any process but the one that made the call, where its outcomes arrive: a
    /// forked child's copy of a call not yet complete would wait for ever. First thing in a wait,
    /// before any lock (a copy may have been forked held).
    void require_owner(const char* what) const {
        if (!made_here()) throw_not_owner(what);
    }
    bool made_here() const noexcept { return this_process_id() == owner_; }

protected:
    /// Marks the call cancelled (the sink has settled what that means for its outcomes) and asks
    /// the engine to stop its tasks. Any thread.
    void stop_tasks();
    /// Only marks the call cancelled: for sinks that share one call, all marked before the engine
    /// is asked to stop any of them (so a worker ended for one is not blamed for another's task).
    void mark_cancelled() noexcept { cancelled_.store(true, std::memory_order_release); }

private:
    [[noreturn, gnu::cold]] void throw_not_owner(const char* what) const;
    std::atomic<bool> cancelled_{false};
    pid_t owner_;  // the process that made the call
};

/// One chunk of items bound for one worker.
struct Task {
    std::uint64_t id = 0;
    Buffer frame;
    std::uint32_t count = 0;
    std::size_t first = 0;
    std::shared_ptr<ResultSink> sink;
    std::vector<std::uint32_t> skips;  // sorted; items already failed
    // The shared memory its arguments name (their handles' segments, recorded as they were
    // encoded): a worker forked before one of them was made is sent it (fork_engine.hpp).
    std::vector<SegmentPtr> segments;
    std::int64_t estimate_ns = 0;      // its expected run time, while a worker holds it (the engine's)

    /// Its item `item` (counted in the task) as errors name it (ResultSink::task_name).
    std::string describe(std::uint32_t item) const {
        return sink ? sink->task_name(id, first, count, item) : ResultSink::plain_task_name(id, first, count, item);
    }
};

/// The seat with the fewest tasks in flight among those `has_room` accepts (the first such on a
/// tie), or nullptr when none has room. A Seat has `inflight`, a container of its tasks.
template <class Seat, class HasRoom> Seat* least_loaded(std::span<Seat> seats, HasRoom&& has_room) {
    Seat* best = nullptr;
    for (Seat& s : seats)
        if (has_room(s) && (!best || s.inflight.size() < best->inflight.size())) best = &s;
    return best;
}

/// What the Pool front end asks of an engine, and the bookkeeping every engine shares. Every
/// public call is safe from any thread of the process that made the pool; from another process
/// (a forked child holding a copy) it is an mproc::Error that touches nothing.
class PoolEngine {
public:
    PoolEngine();
    virtual ~PoolEngine();
    PoolEngine(const PoolEngine&) = delete;
    PoolEngine& operator=(const PoolEngine&) = delete;

    virtual unsigned processes() const noexcept = 0;
    std::uint64_t next_task_id() noexcept { return next_id_.fetch_add(1, std::memory_order_relaxed); }
    /// What a call keeps to reach this engine (see EngineLink).
    const std::shared_ptr<EngineLink>& link() const noexcept { return link_; }

    /// Which part of a call a submit() carries (a map hands its tasks over in parts: feed.hpp).
    enum class Part {
        whole,  // all of it
        first,  // the first part: until end_call(), join() waits for the call's later parts, and
                // those are taken even after close()
        more,   // a later part
    };

    /// Queues tasks (already encoded) and hands out what the workers have room for. Throws
    /// mproc::Error, with `tasks` untouched, if the pool takes no more (for a later part: once
    /// terminated or broken) or the engine cannot carry one of them, and std::bad_alloc, with
    /// `tasks` untouched, if there is no memory to queue them. Once they are queued it returns:
    /// handing them out is the engine's (backlog_grew_locked).
    void submit(std::vector<Task>& tasks, Part part = Part::whole) {
        check_owner();
        prepare(tasks, part);
        std::lock_guard lock(mutex_);
        check_taking_locked(part);
        std::size_t queued = 0;
        try {
            for (Task& t : tasks) {
                backlog_.push_back(std::move(t));
                ++queued;
            }
        } catch (...) {  // no memory: all or none
            while (queued > 0) {
                tasks[--queued] = std::move(backlog_.back());
                backlog_.pop_back();
            }
            throw;
        }
        outstanding_ += tasks.size();
        if (part == Part::first) ++open_calls_;
        tasks.clear();
        backlog_grew_locked();
    }
    /// Sets one of the calling thread's marks (own_thread_mark, feeding_mark) to an engine for a
    /// scope, and puts back what it was.
    class MarkScope {
    public:
        MarkScope(const PoolEngine*& mark, const PoolEngine& engine) noexcept : mark_(mark), saved_(mark) {
            mark_ = &engine;
        }
        ~MarkScope() { mark_ = saved_; }
        MarkScope(const MarkScope&) = delete;
        MarkScope& operator=(const MarkScope&) = delete;

    private:
        const PoolEngine*& mark_;
        const PoolEngine* saved_;
    };
    /// Marks the calling thread, for its lifetime, as the one feeding a call of `engine` in parts
    /// (TaskFeed): a join() from it — from the call's own input — would wait for that call.
    class FeedingScope : MarkScope {
    public:
        explicit FeedingScope(const PoolEngine& engine) noexcept : MarkScope(feeding_mark(), engine) {}
    };

    /// The call whose first part was submitted is whole, or given up: join() waits for its tasks
    /// alone again.
    void end_call() noexcept {
        std::lock_guard lock(mutex_);
        if (open_calls_ > 0) --open_calls_;
        if (open_calls_ == 0 && outstanding_ == 0) idle_.notify_all();
    }
    /// One task (apply_async, imap).
    void submit(Task task) {
        check_owner();
        prepare(std::span<Task>(&task, 1), Part::whole);
        std::lock_guard lock(mutex_);
        check_accepting_locked();
        backlog_.push_back(std::move(task));  // first: no memory for it leaves the count as it was
        ++outstanding_;
        backlog_grew_locked();
    }

    /// Runs `job` on the engine's thread, where callbacks run, as if it were a task's result: for
    /// results that need no worker (a map over an empty input), whose callbacks must still never
    /// run beside another callback. join() waits for it.
    void post(std::function<void()> job) {
        check_owner();
        {
            std::lock_guard lock(mutex_);
            check_accepting_locked();
            posted_.push_back(std::move(job));  // first: no memory for it leaves the count as it was
            ++outstanding_;
        }
        wake();
    }

    /// What a cancel leaves to its caller when the engine's thread no longer runs posted jobs
    /// (the pool is ending): the call, and the tasks dropped from it, to settle on the calling
    /// thread once it holds no lock of the pool's (see EngineLink::cancel).
    struct CancelRest {
        std::shared_ptr<ResultSink> sink;  // none: the engine's thread settles the call
        std::vector<Task> dropped;
        std::exception_ptr error;
    };

    /// Stops the tasks of a cancelled call: those not yet given to a worker are dropped, and an
    /// engine that can stop a running one does (the fork engine: see cancel_placed_locked). The
    /// call is settled on the engine's thread, where callbacks run — or, once that thread takes
    /// no more posted jobs (the pool is ending), by the caller, with what this leaves in `rest`
    /// (EngineLink::cancel): the dropped tasks count as pending until it has failed them. Any thread.
    void cancel(ResultSink& sink, CancelRest& rest) {
        check_owner();
        std::shared_ptr<ResultSink> keep = sink.shared_from_this();
        auto dropped = std::make_shared<std::vector<Task>>();
        std::exception_ptr error = cancelled_error();
        std::function<void()> job = [this, keep, dropped, error] {
            fail_tasks(*dropped, error);  // first: it never throws
            keep->settle_cancelled();
        };
        {
            std::lock_guard lock(mutex_);
            if (state_ == State::terminated) return;  // terminate() settles every task
            // What can throw (no memory) comes first, before any task moves: room in `dropped`
            // for every task the pool holds, and the job in posted_ (counted at once).
            dropped->reserve(backlog_.size() + placed_count_locked());
            const bool posted = thread_running_locked();
            if (posted) {
                posted_.push_back(job);
                ++outstanding_;
            }
            // The backlog is compacted in place: moves only, which cannot throw (never a task onto
            // itself: a vector moved onto itself comes out empty, and a task's skips are one).
            auto kept = backlog_.begin();
            for (auto it = backlog_.begin(); it != backlog_.end(); ++it) {
                if (it->sink.get() == &sink) {
                    dropped->push_back(std::move(*it));
                } else {
                    if (kept != it) *kept = std::move(*it);
                    ++kept;
                }
            }
            backlog_.erase(kept, backlog_.end());
            cancel_placed_locked(sink, *dropped);
            if (!posted) {  // no engine thread any more: the caller settles the call
                rest.sink = std::move(keep);
                rest.dropped.swap(*dropped);
                rest.error = std::move(error);
                return;
            }
        }
        wake();
    }

    /// No more tasks. Any number of times.
    void close() {
        check_owner();
        std::lock_guard lock(mutex_);
        if (state_ == State::open) state_ = State::closed;
    }

    /// After close(): waits for every task (and its callback), then for the engine's thread and
    /// workers to finish. Any number of times, from any thread, beside terminate(). With a
    /// timeout: false when that has not happened by then, and the pool stays joinable (a later
    /// join() goes on from where this one stopped).
    bool join(std::optional<Seconds> timeout = std::nullopt) {
        check_owner();
        if (on_own_thread()) throw Error("Pool::join() called from a callback: it would wait for itself");
        if (feeding_mark() == this)
            throw Error("Pool::join() called while this thread reads a map's input: it would wait for that map");
        const Deadline deadline = deadline_after(timeout);
        {
            std::unique_lock lock(mutex_);
            if (state_ == State::open) throw Error("Pool::join() before close(): call close() or terminate() first");
            const auto settled = [&] { return (outstanding_ == 0 && open_calls_ == 0) || state_ == State::terminated; };
            if (!deadline) idle_.wait(lock, settled);
            else if (!idle_.wait_until(lock, *deadline, settled)) return false;
            if (state_ != State::terminated) state_ = State::draining;
        }
        wake();
        return finish_join(deadline);
    }

    /// Stops the workers now; every pending task fails with mproc::Error. Any number of times,
    /// from any thread, beside join().
    void terminate() {
        check_owner();
        if (on_own_thread()) throw Error("Pool::terminate() called from a callback: it would wait for itself");
        std::vector<Task> doomed;
        {
            std::lock_guard lock(mutex_);
            if (state_ != State::terminated) {
                take_doomed_locked(doomed);
                state_ = State::terminated;
                stop_workers_locked();
            }
        }
        wake();
        finish_terminate(doomed);
    }

    /// The front end is being destroyed inside one of this engine's callbacks: the pool is
    /// terminated as terminate() does, but the engine's thread finishes the teardown once the
    /// callback has returned, and then deletes the engine. Returns false (and does nothing) when
    /// not called on the engine's thread.
    bool retire_from_callback() {
        if (!on_own_thread()) return false;
        std::lock_guard lock(mutex_);
        if (state_ != State::terminated) {
            take_doomed_locked(retired_doomed_);
            state_ = State::terminated;
            stop_workers_locked();
        }
        retired_ = true;
        return true;
    }

    /// Whether this is the process that made the engine (not a forked child's copy of it).
    bool owned_here() const noexcept { return this_process_id() == owner_; }

    /// Whether the calling thread is one on which `engine`'s outcomes are delivered — its own
    /// thread, or one running its callbacks at teardown (OwnThreadScope) — where waiting for an
    /// outcome of that pool would wait for ever. Compares the address only: `engine` may be gone.
    static bool delivers_here(const PoolEngine* engine) noexcept { return own_thread_mark() == engine; }
    /// Whether the calling thread is this engine's own thread (callbacks run there). A thread id
    /// can be reused once its thread is joined; this mark cannot: it lives on that thread only.
    bool on_own_thread() const noexcept { return own_thread_mark() == this; }
    virtual std::vector<pid_t> worker_pids() = 0;
    /// What the workers are doing (see PoolStats); an engine that cannot tell throws mproc::Error.
    virtual PoolStats stats() { throw Error("stats() is not available for this kind of pool"); }

protected:
    enum class State { open, closed, draining, broken, terminated };

    // ---- what each engine supplies ----

    /// Checks and rewrites tasks before they are queued (no lock held); throws to refuse them all.
    virtual void prepare(std::span<Task> tasks, Part part) {
        (void)tasks;
        (void)part;
    }
    /// The backlog grew (pool lock held): hand it out, or wake the thread that does. The tasks
    /// are queued, so the call they came from has succeeded: this cannot fail it.
    virtual void backlog_grew_locked() noexcept = 0;
    /// Wakes the engine's thread (any thread, no lock held).
    virtual void wake() noexcept = 0;
    /// Every task not yet settled, taken out of the backlog and the seats (pool lock held).
    virtual std::vector<Task> take_all_tasks_locked() = 0;
    /// One task not yet settled, moved into `out` and taken out of the seats or the backlog
    /// (pool lock held), with no allocation: false when there is none left.
    virtual bool take_one_task_locked(Task& out) noexcept = 0;
    /// The pool was terminated: stop the workers as fast as the engine can (pool lock held).
    virtual void stop_workers_locked() {}
    /// Whether the engine's thread still runs posted jobs (pool lock held). When it has ended, a
    /// cancel settles its call on the calling thread.
    virtual bool thread_running_locked() const noexcept { return true; }
    /// The tasks the engine's seats hold (pool lock held): cancel reserves room for them.
    virtual std::size_t placed_count_locked() const noexcept { return 0; }
    /// placed_count_locked for an engine whose seats keep their tasks in `inflight`.
    template <class Seat> static std::size_t inflight_count(std::span<const Seat> seats) noexcept {
        std::size_t n = 0;
        for (const Seat& s : seats) n += s.inflight.size();
        return n;
    }
    /// `sink`'s call was cancelled (pool lock held): move its tasks that no worker has begun into
    /// `dropped`, and stop those being run where the engine can. An engine that cannot lets them
    /// run; their outcomes are then ignored.
    virtual void cancel_placed_locked(const ResultSink& sink, std::vector<Task>& dropped) {
        (void)sink;
        (void)dropped;
    }
    /// join()'s end, once every task is settled: stop the thread, let the workers go. With a
    /// deadline: false, and nothing lost, when that is not done by then (join() calls it again).
    virtual bool finish_join(const Deadline& deadline) = 0;
    /// terminate()'s end: stop the thread, then fail `doomed` (callbacks never overlap).
    virtual void finish_terminate(std::vector<Task>& doomed) = 0;

    // ---- shared by the engines ----

    void check_owner() const {
        if (this_process_id() != owner_)
            throw Error("a Pool can only be used by the process that created it (pid " + std::to_string(owner_) + ")");
    }
    /// First thing in an engine's destructor: a cancel from now on finds no engine.
    void detach_link() noexcept;
    /// Makes the errors the engine settles tasks with when memory may have run out. An engine
    /// calls it in its constructor, after forking what it forks (a child has no use for them,
    /// and would leave them behind as it exits), before its thread starts.
    void make_ready_errors();

    /// Moves tasks from the backlog to the seat with the fewest tasks among those `has_room`
    /// accepts, one at a time, calling assign(seat, task) for each, until the backlog is empty or
    /// no seat has room. assign takes the task (moves from it) only once nothing it does can throw
    /// any more: a task leaves the backlog only when a seat holds it, so an exception (no memory)
    /// loses nothing, and the next dispatch hands it out.
    template <class Seat, class HasRoom, class Assign>
    void dispatch_backlog_locked(std::span<Seat> seats, HasRoom&& has_room, Assign&& assign) {
        static_assert(std::is_nothrow_move_constructible_v<Task> && std::is_nothrow_move_assignable_v<Task>,
                      "moving a task must not throw: the engines' exception safety rests on it");
        while (!backlog_.empty()) {
            Seat* best = least_loaded(seats, has_room);
            if (!best) return;
            assign(*best, backlog_.front());
            backlog_.pop_front();
        }
    }

    /// Throws unless the pool takes `part` of a call now: any part while it is open, and a later
    /// part of a call begun before close() while it is closed (see Part).
    void check_taking_locked(Part part) const {
        if (part == Part::more && state_ == State::closed) return;
        check_accepting_locked();
    }
    void check_accepting_locked() const {
        switch (state_) {
            case State::open: return;
            case State::broken:
                if (broken_error_) std::rethrow_exception(broken_error_);
                throw Error(broken_reason_);
            case State::terminated: throw Error("the pool was terminated: it takes no more tasks");
            default: throw Error("the pool is closed: it takes no more tasks");
        }
    }

    /// The engine whose thread the calling thread is (set once, first thing on that thread).
    static const PoolEngine*& own_thread_mark() noexcept {
        thread_local const PoolEngine* engine = nullptr;
        return engine;
    }
    void mark_own_thread() const noexcept { own_thread_mark() = this; }
    /// The engine a call of which the calling thread is feeding (FeedingScope), if any.
    static const PoolEngine*& feeding_mark() noexcept {
        thread_local const PoolEngine* engine = nullptr;
        return engine;
    }
    /// Callbacks run on another thread (at teardown) count as run on the pool's own thread.
    class OwnThreadScope : MarkScope {
    public:
        explicit OwnThreadScope(const PoolEngine& engine) noexcept : MarkScope(own_thread_mark(), engine) {}
    };

    /// Hands a finished task's result frame body to its sink: one outcome record per item. A frame
    /// whose records do not add up fails every item it was for; a record that does not decode
    /// fails only its own item (in the sink). Never throws: when memory runs out on the way, the
    /// call fails with the ready-made error that says so (ResultSink::abort), and the pool goes on.
    void deliver(Task& task, std::span<const std::byte> body) noexcept {
        try {
            deliver_outcomes(task, body);
        } catch (...) {
            task.sink->abort(task.first, task.count, undelivered_);
        }
    }
    void deliver_outcomes(Task& task, std::span<const std::byte> body) {
        outcomes_.clear();
        try {
            if (const auto values = packed_values(body, task.count)) {
                task.sink->deliver_packed(task.first, *values, task.count);
                return;
            }
            read_outcomes(body, task.count, outcomes_);
        } catch (const std::bad_alloc&) {
            throw;  // not the frame's fault (see deliver)
        } catch (...) {
            fail_items(task, std::current_exception());
            return;
        }
        task.sink->deliver(task.first, outcomes_, task.skips);
    }
    /// Fails every item of `task` not already failed.
    static void fail_items(Task& task, const std::exception_ptr& error) {
        for (std::uint32_t i = 0; i < task.count; ++i)
            if (!std::binary_search(task.skips.begin(), task.skips.end(), i)) task.sink->fail(task.first + i, error);
    }

    /// An mproc::Error saying `what`; with no memory to make one, the ready-made one.
    std::exception_ptr error_or_ready_made(const char* what) const noexcept {
        try {
            return std::make_exception_ptr(Error(what));
        } catch (...) {
            return thread_failed_;
        }
    }
    /// The error of a cancelled call's tasks; with no memory to make one, the ready-made one.
    std::exception_ptr cancelled_error() const noexcept {
        try {
            return std::make_exception_ptr(CancelledError("the call was cancelled"));
        } catch (...) {
            return thread_failed_;
        }
    }

    /// Fails every unskipped item of `tasks` (outside the pool lock: sinks run callbacks) and
    /// counts them settled. A task whose sink cannot take the failure (no memory) has its call
    /// aborted instead (ResultSink::abort): every task is settled, and this never throws.
    void fail_tasks(std::vector<Task>& tasks, const std::exception_ptr& error) noexcept {
        settle_failed(tasks, error);
        finish_tasks(tasks.size());
        tasks.clear();
    }
    static void settle_failed(std::span<Task> tasks, const std::exception_ptr& error) noexcept {
        for (Task& t : tasks) {
            try {
                fail_items(t, error);
            } catch (...) {
                if (t.sink) t.sink->abort(t.first, t.count, error);
            }
        }
    }

    void finish_tasks(std::size_t n) noexcept {
        if (n == 0) return;
        std::lock_guard lock(mutex_);
        outstanding_ -= std::min(outstanding_, n);
        if (outstanding_ == 0) idle_.notify_all();
    }

    /// Tasks the engine's thread has taken out of the pool's queues, to settle outside its lock.
    /// Whatever is still held when they go — an exception on the way, memory having run out — is
    /// settled with the engine's ready-made error (ResultSink::abort, which allocates nothing), so
    /// that no call waits for a task nobody holds. `counted`: the tasks count in the tasks join()
    /// waits for (a stand-in for one lost item, which its task still carries, does not).
    class HeldTasks {
    public:
        explicit HeldTasks(PoolEngine& engine, bool counted = true) noexcept : engine_(engine), counted_(counted) {}
        HeldTasks(const HeldTasks&) = delete;
        HeldTasks& operator=(const HeldTasks&) = delete;
        ~HeldTasks() {
            for (Task& t : tasks)
                if (t.sink) t.sink->abort(t.first, t.count, engine_.thread_failed_);
            if (counted_) engine_.finish_tasks(tasks.size());
        }
        /// Fails every item they carry that has not failed already, and lets them go.
        void fail(const std::exception_ptr& error) noexcept {
            settle_failed(tasks, error);
            release();
        }
        /// Lets them go, settled already: only counted.
        void release() noexcept {
            if (counted_) engine_.finish_tasks(tasks.size());
            tasks.clear();
        }
        std::vector<Task> tasks;

    private:
        PoolEngine& engine_;
        bool counted_;
    };

    /// The engine's thread is ending on an exception it could not handle (called in the handler):
    /// the pool breaks, unless it is ending anyway, and every task it holds fails — with an
    /// mproc::Error saying `context` and the exception, or the ready-made error when there is no
    /// memory left to say it — one task at a time, allocating nothing it needs. Returns that error,
    /// which the engine keeps: the last reference to it goes with the engine, never on this thread
    /// after a caller has seen it (see ResultCore::take).
    const std::exception_ptr& fail_from_thread(const char* context) noexcept {
        const std::exception_ptr& error = thread_error_;
        std::string why;
        try {
            why = context + describe_current_exception();
            thread_error_ = std::make_exception_ptr(Error(why));
        } catch (...) {
            thread_error_ = thread_failed_;
        }
        {
            std::lock_guard lock(mutex_);
            if (state_ == State::open || state_ == State::closed) {
                state_ = State::broken;
                broken_reason_.swap(why);
                broken_error_ = error;
            }
        }
        fail_held_tasks(error);
        return error;
    }

    /// Fails every task the engine still holds with `error`, one at a time, allocating nothing:
    /// once its thread has stopped (or from that thread, as it fails), nothing else takes them.
    void fail_held_tasks(const std::exception_ptr& error) noexcept {
        for (;;) {
            Task t;
            {
                std::lock_guard lock(mutex_);
                if (!take_one_task_locked(t)) break;
            }
            if (t.sink) t.sink->abort(t.first, t.count, error);
            finish_tasks(1);
        }
    }

    /// As a pool is terminated (the lock held, the state not yet changed): its tasks are taken
    /// into `doomed`, so each fails as terminated whatever its worker does meanwhile. With no
    /// memory for that list they stay where they are, and the teardown fails them one at a time
    /// once the engine's thread has stopped (fail_held_tasks): terminating never fails, and a
    /// Pool's destructor never leaves its thread running.
    void take_doomed_locked(std::vector<Task>& doomed) noexcept {
        try {
            doomed = take_all_tasks_locked();
        } catch (...) {}  // NOLINT(bugprone-empty-catch): nothing was taken (it reserves first)
    }

    /// run_posted() until none is left, as the engine's thread ends: a job that throws is
    /// counted settled and dropped, and the others still run.
    void run_all_posted() noexcept {
        for (;;) {
            try {
                run_posted();
                return;
            } catch (...) {}
        }
    }

    /// Runs the posted jobs (on the collector, or after it stopped), one at a time, each counted
    /// settled once it has run or thrown. Returns whether there were any.
    bool run_posted() {
        bool any = false;
        for (;;) {
            std::function<void()> job;
            {
                std::lock_guard lock(mutex_);
                if (posted_.empty()) return any;
                job = std::move(posted_.front());
                posted_.pop_front();
            }
            any = true;
            struct Settled {
                PoolEngine& engine;
                ~Settled() { engine.finish_tasks(1); }
            } settled{*this};
            job();
        }
    }

    std::mutex mutex_;
    std::condition_variable idle_;
    State state_ = State::open;
    std::string broken_reason_;                 // why the pool is broken (State::broken)
    std::exception_ptr broken_error_;           // the error it broke with, when not an Error(reason)
    std::deque<Task> backlog_;                  // submitted, not yet given to a seat
    std::size_t outstanding_ = 0;               // tasks (and posted jobs) submitted and not yet settled
    std::size_t open_calls_ = 0;                // calls handed over in parts, not yet whole (Part::first)
    std::deque<std::function<void()>> posted_;  // jobs for the engine's thread (see post)
    bool retired_ = false;                      // destroyed inside a callback: the thread finishes the job
    std::vector<Task> retired_doomed_;          // the tasks that teardown fails
    // The error of tasks settled when there may be no memory left to make one (HeldTasks,
    // fail_from_thread), and of a call whose outcome could not be delivered (deliver): made by
    // make_ready_errors(), once the engine's processes are forked (they need neither).
    std::exception_ptr thread_failed_;
    std::exception_ptr undelivered_;
    std::exception_ptr thread_error_;       // what the engine's thread failed with (fail_from_thread)

private:
    friend class EngineLink;  // counts the tasks of a cancel it settled (finish_tasks)
    pid_t owner_;
    std::shared_ptr<EngineLink> link_;
    std::atomic<std::uint64_t> next_id_{1};
    std::vector<OutcomeRecord> outcomes_;  // deliver's scratch list (one delivering thread per engine)
};

/// How a call reaches the engine that runs it, for cancel: the engine lets go of it (under its
/// mutex) before it is destroyed, so a cancel that comes later finds no engine and does nothing —
/// the engine's teardown settled the call's tasks already.
class EngineLink {
public:
    explicit EngineLink(PoolEngine& engine) : engine_(&engine) {}
    /// PoolEngine::cancel. A call the engine's thread no longer settles (the pool is ending) is
    /// settled here, with the link's lock released: its callbacks run now, and one may cancel
    /// another call of this pool, read one of its imaps or destroy it, all of which take that
    /// lock. The engine's destruction waits for such a settle on another thread (see detach).
    void cancel(ResultSink& sink) {
        PoolEngine::CancelRest rest;
        {
            std::lock_guard lock(mutex_);
            if (!engine_) return;
            engine_->cancel(sink, rest);
            if (!rest.sink) return;
            ++settling_;
        }
        const Settling settling(*this);  // ends before `rest`, which keeps this link alive
        PoolEngine::settle_failed(rest.dropped, rest.error);
        {
            std::lock_guard lock(mutex_);
            if (engine_) engine_->finish_tasks(rest.dropped.size());  // before the call's callback, which may join
        }
        rest.sink->settle_cancelled();
    }
    /// The engine is going: later calls find none. Waits first for the cancels that are settling
    /// their call (see cancel) on other threads: their callbacks run before the Pool is gone, as
    /// a callback run on the engine's thread does. (One on this thread is the caller.)
    void detach() noexcept {
        std::unique_lock lock(mutex_);
        engine_ = nullptr;
        std::size_t here = 0;
        for (const Settling* s = Settling::innermost(); s; s = s->outer)
            if (&s->link == this) ++here;
        settled_.wait(lock, [&] { return settling_ == here; });
    }
    /// A new task id of the pool; none once the pool is gone.
    std::optional<std::uint64_t> next_task_id() {
        std::lock_guard lock(mutex_);
        if (!engine_) return std::nullopt;
        return engine_->next_task_id();
    }
    /// PoolEngine::submit; mproc::Error, taking nothing, once the pool is gone.
    void submit(Task&& task) {
        std::lock_guard lock(mutex_);
        if (!engine_) throw Error("mproc::Pool: the pool was destroyed");
        engine_->submit(std::move(task));
    }

private:
    /// A cancel settling its call on this thread (see cancel): the innermost one, and the one it
    /// runs inside (a callback of that call cancelling another).
    struct Settling {
        explicit Settling(EngineLink& l) noexcept : link(l), outer(std::exchange(innermost(), this)) {}
        Settling(const Settling&) = delete;
        Settling& operator=(const Settling&) = delete;
        ~Settling() {
            innermost() = outer;
            {
                std::lock_guard lock(link.mutex_);
                --link.settling_;
            }
            link.settled_.notify_all();
        }
        static const Settling*& innermost() noexcept {
            thread_local const Settling* top = nullptr;
            return top;
        }
        EngineLink& link;
        const Settling* outer;
    };

    std::mutex mutex_;
    std::condition_variable settled_;
    PoolEngine* engine_;
    std::size_t settling_ = 0;  // cancels settling their call outside the lock (see cancel)
};

inline PoolEngine::PoolEngine() : owner_(this_process_id()), link_(std::make_shared<EngineLink>(*this)) {}
inline void PoolEngine::make_ready_errors() {
    thread_failed_ = std::make_exception_ptr(
        Error("the pool's thread failed with no memory left to say why: the pool is broken"));
    undelivered_ = std::make_exception_ptr(
        Error("the pool's thread ran out of memory delivering this call's outcome: the call failed"));
}
inline PoolEngine::~PoolEngine() { detach_link(); }
inline void PoolEngine::detach_link() noexcept {
    // In a forked child the link is the parent's copy, and the threads it counts are not here.
    if (link_ && owned_here()) link_->detach();
}

inline void ResultSink::throw_not_owner(const char* what) const {
    throw Error(std::string(what) + " in process " + std::to_string(this_process_id()) +
                ": the outcomes of a Pool call reach only the process that made it (pid " + std::to_string(owner_) +
                ")");
}

inline void ResultSink::stop_tasks() {
    mark_cancelled();
    if (engine) engine->cancel(*this);
}

}  // namespace mproc::detail
