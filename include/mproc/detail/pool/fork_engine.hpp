// mproc — the engine of Pool: seats, the backlog, dispatch, results, and worker deaths.
//
// The parent side of a Pool is one ForkEngine and one thread of its own, the *collector*:
//
//   user threads ──submit──▶ backlog ──dispatch──▶ seat i: task ring (+ socket) ──▶ worker i
//                                                                                   │
//   AsyncResult / imap ◀── deliver + callbacks ◀── collector ◀── result ring ───────┘
//                                                      ▲
//                           fork server ── spawned / exited{pid, status} reports
//
// Tasks and results travel through two shared-memory rings per worker (detail/spsc_ring.hpp);
// frames too large for a ring go on the worker's socket, announced in the ring. Any thread may
// dispatch (under the pool mutex); dispatching never blocks — what a full ring or socket does not
// take waits until the worker has made room — so the parent can always read results and no worker
// can block the pool. Each seat holds a FIFO of the tasks sent to its worker; results come back in
// that order. When the fork server reports a worker's exit, the
// collector first reads every result the worker managed to send, then fails the item the worker
// was running (its SeatStatus says which) with WorkerLost — or TimeoutError if the pool killed it
// for overstaying task_timeout — puts the rest of its tasks back at the head of the backlog, and
// asks for a replacement.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <poll.h>
#include <pthread.h>
#include <ranges>
#include <string>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include "../../errors.hpp"
#include "../../pool_options.hpp"
#include "../os/clock.hpp"
#include "../os/cpu.hpp"
#include "../os/fd_passing.hpp"
#include "../os/framing.hpp"
#include "../os/memory_use.hpp"
#include "../os/proc_files.hpp"
#include "../os/unique_fd.hpp"
#include "engine.hpp"
#include "fork_server.hpp"
#include "link.hpp"
#include "wire.hpp"
#include "worker.hpp"

namespace mproc::detail {

class ForkEngine final : public PoolEngine {
public:
    /// How long join() waits for the fork server once every task is done: the server gives the
    /// workers ForkServer::exit_grace to exit, kills those still there (stopped by SIGSTOP, or
    /// stuck in code of their own), reaps them and exits.
    static constexpr Seconds join_grace{ForkServer::exit_grace.count() + 10.0};
    /// With no live worker, how long failing to start one (fork or socketpair refused) may go on
    /// before the pool gives up and breaks.
    static constexpr Seconds respawn_give_up{10.0};

    explicit ForkEngine(PoolOptions options) : options_(std::move(options)) {
        try {
            start();
        } catch (...) {
            // Nothing may outlive a constructor that throws: no process, no descriptor, no mapping.
            abandon_start();
            throw_as_error("cannot start the Pool");
        }
    }

    ForkEngine(const ForkEngine&) = delete;
    ForkEngine& operator=(const ForkEngine&) = delete;

    ~ForkEngine() override {
        if (!owned_here()) {
            // A copy of the parent's pool in a forked child: its thread and its processes are the
            // parent's. Touch nothing; the thread object (which names no thread here) is let go.
            (void)collector_.release();
            return;
        }
        detach_link();
        if (retired_) return;  // finish_retired() did the teardown, on the collector thread
        try {
            terminate();
        } catch (...) {}
    }

    unsigned processes() const noexcept override { return options_.processes; }

    /// Pids of the live workers (for tests and active-children accounting).
    std::vector<pid_t> worker_pids() override {
        check_owner();
        std::lock_guard lock(mutex_);
        std::vector<pid_t> pids;
        for (const Seat& s : seats_)
            if (s.pid > 0 && s.state != SeatState::dead) pids.push_back(s.pid);
        return pids;
    }
    PoolStats stats() override {
        check_owner();
        std::vector<pid_t> pids;
        PoolStats st;
        {
            std::lock_guard lock(mutex_);
            const std::int64_t now = monotonic_ns();
            st.tasks_done = tasks_done_;
            st.tasks_queued = backlog_.size();
            st.retries = retried_;
            st.uptime = Seconds{static_cast<double>(now - started_ns_) / 1e9};
            for (const Seat& s : seats_) {
                WorkerStats w;
                w.seat = static_cast<unsigned>(s.index);
                const bool live = s.state != SeatState::dead && s.pid > 0;
                w.pid = live ? s.pid : 0;
                w.tasks_done = s.tasks_done;
                w.busy = Seconds{static_cast<double>(s.busy_ns) / 1e9};
                const std::int64_t alive = s.alive_ns + (live && s.worker_since ? now - s.worker_since : 0);
                w.idle = Seconds{static_cast<double>(std::max<std::int64_t>(0, alive - s.busy_ns)) / 1e9};
                if (live) {
                    const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
                    if (status.current_phase() == TaskPhase::running) {
                        w.current_task = status.task_id.load(std::memory_order_relaxed);
                        const std::int64_t since = status.started_ns.load(std::memory_order_acquire);
                        w.current_for = Seconds{since > 0 ? static_cast<double>(now - since) / 1e9 : 0.0};
                    }
                }
                w.restarts = s.restarts;
                w.last_restart = s.last_restart;
                st.tasks_in_flight += s.inflight.size();
                pids.push_back(w.pid);
                st.workers.push_back(std::move(w));
            }
        }
        for (std::size_t i = 0; i < pids.size(); ++i)  // outside the lock: it reads /proc
            if (pids[i] > 0) st.workers[i].resident_bytes = resident_bytes(pids[i]);
        return st;
    }

    pid_t fork_server_pid() {
        std::lock_guard lock(mutex_);
        return server_.pid();
    }

private:
    enum class SeatState { starting, ready, dead };

    /// The parent's record of one worker: its process, its channel, the tasks it holds.
    /// A segment sent to a seat's worker: when a task last named it, and whether this process
    /// still has it.
    struct Adopted {
        std::uint64_t id;
        std::uint64_t use;
        std::weak_ptr<Segment> segment;
    };

    /// Why the pool killed a worker, recorded when it sends the kill: worker_exited reads it to
    /// know whom the death is charged to (the worker's own status says only where it was).
    enum class KillReason : std::uint8_t {
        // Not killed by the pool: it died of the item it was on, if any.
        none,
        // `task`'s `item` overstayed task_timeout: that item fails, if the worker was still on it.
        task_timeout,
        // It left queued tasks untaken, or stopped taking a large task's bytes, past
        // task_timeout: its tasks go to other workers.
        stalled,
        // The stall_timeout watchdog ended it: its tasks failed already.
        stall_timeout,
        // It did not stop a cancelled task within cancel_grace: that task settles as cancelled.
        cancel,
        // No memory here for its result (`bytes` long): the first task it had not delivered
        // fails whole, and is not run again.
        unreceivable,
        // Its socket would not take a segment's descriptor now (ETOOMANYREFS, say): its tasks
        // go to other workers.
        channel,
    };
    struct Kill {
        KillReason reason = KillReason::none;
        std::uint64_t task = 0;
        std::uint32_t item = 0;
        std::size_t bytes = 0;
        bool sent = false;  // false until the worker's pid is known (learn_pid_locked sends it)
    };

    struct Seat {
        int index = 0;
        SeatState state = SeatState::dead;
        pid_t pid = 0;
        UniqueFd channel;
        FrameReader in;
        Buffer out;
        std::size_t out_sent = 0;
        // Descriptor frames in `out` (where each starts) and the segments whose memfds go with
        // them; and the segments the current worker was sent, with when a task last named each
        // (send_segments_locked).
        std::deque<std::pair<std::size_t, SegmentPtr>> out_fds;
        std::vector<Adopted> adopted;
        std::uint64_t segment_uses = 0;
        std::deque<Task> inflight;
        std::size_t placed = 0;  // how many of inflight are in the ring (or socket)
        std::int64_t queued_ns = 0;  // the estimated run time of inflight (see has_room_locked)
        std::uint64_t placed_total = 0;  // tasks ever placed for the current worker
        unsigned long assigned = 0;  // tasks given to the current worker
        bool saw_hello = false;
        bool eof = false;  // the worker's end is closed; its exit report is on the way
        Kill kill;  // why the pool killed the current worker, if it did (kill_locked)
        // Bytes sent on the socket to the current worker, ever, and its run time, when the stall
        // check last saw them move: a worker receiving a large task that takes them, or that runs
        // (growing its buffer for them), is not stalled (next_deadline_ms_locked).
        std::uint64_t sent_total = 0;
        std::uint64_t seen_sent = 0;
        std::int64_t seen_run_ns = 0;
        // Cancel: since when the worker has been asked to stop a cancelled task (0: not asked).
        std::int64_t cancel_sent_ns = 0;
        bool cancel_signal_owed = false;  // asked before the worker's pid was known: sent once it is
        // For stats(): what this seat's workers have done, and how the replaced ones ended.
        std::uint64_t tasks_done = 0;
        std::int64_t busy_ns = 0;
        std::int64_t alive_ns = 0;  // the lifetimes of the workers gone
        std::int64_t worker_since = 0;  // when the live worker's pid was learned (0: none)
        RestartCounts restarts;
        std::string last_restart;
        // Stall watch: the worker's `begun` count when last seen, and since when it has not moved
        // while tasks wait in its ring (0: not waiting).
        std::uint64_t seen_begun = 0;
        std::int64_t waiting_since = 0;
        // No worker: when to try again to start one, and the delay after that (backoff).
        std::int64_t respawn_at = 0;
        std::int64_t respawn_delay = 0;
        std::string respawn_error;
    };

    void start() {
        if (options_.task_timeout && !(options_.task_timeout->count() > 0))
            throw Error("PoolOptions::task_timeout must be positive (or unset for none)");
        if (options_.stall_timeout && !(options_.stall_timeout->count() > 0))
            throw Error("PoolOptions::stall_timeout must be positive (or unset for none)");
        // In nanoseconds once (a timeout longer than mproc counts down never fires: no overflow).
        if (options_.task_timeout) task_timeout_ns_ = detail::timeout_ns(*options_.task_timeout, "task_timeout");
        if (options_.stall_timeout) stall_timeout_ns_ = detail::timeout_ns(*options_.stall_timeout, "stall_timeout");
        if (options_.processes == 0) options_.processes = affinity_cpu_count();
        link_ = SharedSeats(options_.processes);
        wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake_) throw_errno("eventfd");

        WorkerConfig config{options_.initializer, options_.max_tasks_per_child, options_.max_memory_per_child,
                            options_.memory_limit, options_.task_timeout.has_value()};
        const SharedSeats* link = &link_;
        const int wake_fd = wake_.get();
        // The server is forked before the collector thread exists: this process may have other
        // threads, but the server's only thread is this one, and every worker is its fork.
        // Every segment made up to here is mapped in the server, so in every worker it forks.
        server_generation_ = segments().generation();
        server_ = ForkServer(
            [config, link, wake_fd](int seat, UniqueFd channel) {
                const auto i = static_cast<unsigned>(seat);
                return worker_main(SeatLink{link->tasks(i), link->results(i), link->status(i), link->shared(), wake_fd,
                                            std::move(channel)},
                                   config);
            },
            "PoolForkServer", {wake_fd});
        seats_.resize(options_.processes);
        for (unsigned i = 0; i < options_.processes; ++i) {
            seats_[i].index = static_cast<int>(i);
            if (!spawn_locked(seats_[i])) throw Error(seats_[i].respawn_error);
        }
        make_ready_errors();  // the server is forked: it does not carry them
        std::lock_guard lock(mutex_);  // the collector starts by taking it: it sees collector_
        collector_ = std::make_unique<std::thread>([this] { collector_main(); });
    }

    /// After start() threw: the server (and through it every worker) is killed and reaped.
    void abandon_start() noexcept {
        if (server_.pid() == 0) return;
        server_.terminate_workers();
        try {
            server_.reap(Seconds{5});
        } catch (...) {}
    }

    /// Rethrows the exception being handled as an mproc::Error (std::system_error from a thread
    /// that cannot start, std::bad_alloc, ...), prefixed with `context`.
    [[noreturn]] static void throw_as_error(const char* context) {
        try {
            throw;
        } catch (const Error&) {
            throw;
        } catch (const std::exception& e) {
            throw Error(std::string(context) + ": " + e.what());
        } catch (...) {
            throw Error(std::string(context) + ": " + describe_current_exception());
        }
    }

    /// The end of join() and terminate(), one thread at a time: the collector stops, the posted
    /// jobs and the failures of `doomed` are delivered (never beside a callback), the server is
    /// reaped (`grace` for its workers to exit).
    /// The callbacks it runs count as the pool's own: one that calls join() or terminate() gets
    /// the "from a callback" error, and one that destroys the Pool retires the engine, which is
    /// then deleted here, last. (The caller touches nothing of this engine after it returns.)
    /// With a `deadline` (a join with a timeout), returns false, having changed nothing it cannot
    /// finish later, when the collector or the server has not ended by then.
    bool tear_down(Seconds grace, std::vector<Task>* doomed = nullptr, const Deadline& deadline = std::nullopt) {
        {
            // One teardown at a time: a turn taken under mutex_ (a flag, not a timed mutex, whose
            // timed lock ThreadSanitizer cannot follow), waited for up to the deadline.
            {
                std::unique_lock lock(mutex_);
                const auto my_turn = [&] { return !tearing_down_ && (!deadline || collector_ended_ || !collector_); };
                if (!deadline) idle_.wait(lock, my_turn);
                else if (!idle_.wait_until(lock, *deadline, my_turn)) return false;
                tearing_down_ = true;
            }
            struct TurnEnd {
                ForkEngine& engine;
                ~TurnEnd() {
                    {
                        std::lock_guard lock(engine.mutex_);
                        engine.tearing_down_ = false;
                    }
                    engine.idle_.notify_all();
                }
            } turn_end{*this};
            if (collector_ && collector_->joinable()) collector_->join();
            {
                const OwnThreadScope callbacks(*this);
                run_all_posted();
                if (doomed) {
                    const std::exception_ptr error = error_or_ready_made(
                        "the pool was terminated before this task finished");
                    fail_tasks(*doomed, error);
                    fail_held_tasks(error);  // those left where they were (see take_doomed_locked)
                }
            }
            // (An engine retired by a callback above is torn down whole: nobody calls again.)
            if (deadline && !retired_ && !server_.wait_exit_until(*deadline)) return false;
            reap_server(grace);
            idle_.notify_all();
        }
        if (retired_) delete this;  // destroyed by a callback run above
        return true;
    }

    /// Reaps the fork server; its workers are gone with it, so no seat has one.
    void reap_server(Seconds grace) {
        server_.wait_exit(grace);
        std::lock_guard lock(mutex_);
        server_.forget();
        for (Seat& s : seats_) {
            s.state = SeatState::dead;
            s.pid = 0;
            s.respawn_at = 0;
        }
    }

    // ---- the engine's hooks (engine.hpp) ----

    /// submit() has queued tasks: they are the pool's now, so handing them out must not fail the
    /// call. When that throws here (no memory), the collector hands them out instead (its own
    /// failure to do so breaks the pool, which fails them: nothing waits forever).
    void backlog_grew_locked() noexcept override {
        try {
            dispatch_locked();
        } catch (...) {
            dispatch_owed_ = true;
            wake();  // on the collector's own thread too: its next poll then returns at once
        }
    }
    void stop_workers_locked() override {
        // A server that no longer reads requests (join() already closed them) dies now; its
        // workers die with it (their parent-death signal).
        if (server_.pid() != 0 && !server_.terminate_workers()) ::kill(server_.pid(), SIGKILL);
    }
    bool thread_running_locked() const noexcept override { return collector_ && !collector_closing_; }
    std::size_t placed_count_locked() const noexcept override { return inflight_count(std::span<const Seat>(seats_)); }
    /// A cancelled call's tasks that are not yet in a worker's ring are taken back; for those that
    /// are, the worker is told (the call in its SeatStatus, then cancel_signal()): it skips the
    /// ones it has not begun, and ends itself if it is running one (see worker.hpp).
    void cancel_placed_locked(const ResultSink& sink, std::vector<Task>& dropped) override {
        const std::int64_t now = monotonic_ns();
        for (Seat& s : seats_) {
            for (std::size_t i = s.placed; i < s.inflight.size();) {
                if (s.inflight[i].sink.get() != &sink) {
                    ++i;
                    continue;
                }
                s.queued_ns -= s.inflight[i].estimate_ns;
                dropped.push_back(std::move(s.inflight[i]));
                s.inflight.erase(s.inflight.begin() + static_cast<std::ptrdiff_t>(i));
                if (s.assigned) --s.assigned;
            }
            const bool in_ring = std::any_of(s.inflight.begin(),
                                             s.inflight.begin() + static_cast<std::ptrdiff_t>(s.placed),
                                             [&](const Task& t) { return t.sink.get() == &sink; });
            if (!in_ring || s.state == SeatState::dead) continue;
            // With every slot taken by calls still in the ring, its tasks run and their outcomes
            // are ignored.
            if (!mark_cancelled_locked(s, sink.call)) continue;
            // The slot is written (sequentially consistent); a worker that has not yet published
            // this call as the one it runs will see the slot when it does (run_task), and skip the
            // task. Only a worker already running it is signalled: one running another call's task
            // is left alone (a signal would interrupt its system calls).
            std::atomic_thread_fence(std::memory_order_seq_cst);
            const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
            if (status.current_phase() != TaskPhase::running ||
                status.call.load(std::memory_order_relaxed) != sink.call)
                continue;
            if (s.pid > 0) server_.kill(s.index, s.pid, cancel_signal());
            else s.cancel_signal_owed = true;  // watch_cancels_locked sends it once the pid is known
            if (s.cancel_sent_ns == 0) s.cancel_sent_ns = now;
        }
    }

    /// Writes `call` into the seat's cancel slots (a slot whose call has no task left in the seat
    /// is reused). False when every slot is in use.
    bool mark_cancelled_locked(Seat& s, std::uint64_t call) {
        SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
        for (const auto& slot : status.cancelled)
            if (slot.load(std::memory_order_relaxed) == call) return true;
        for (auto& slot : status.cancelled) {
            const std::uint64_t old = slot.load(std::memory_order_relaxed);
            const bool free = old == 0 || std::none_of(s.inflight.begin(), s.inflight.end(),
                                                       [&](const Task& t) { return t.sink->call == old; });
            if (!free) continue;
            slot.store(call, std::memory_order_seq_cst);  // before the signal: see run_task
            return true;
        }
        return false;
    }

    bool finish_join(const Deadline& deadline) override { return tear_down(join_grace, nullptr, deadline); }
    void finish_terminate(std::vector<Task>& doomed) override { tear_down(Seconds{5}, &doomed); }

    void wake() noexcept override {
        const std::uint64_t one = 1;
        [[maybe_unused]] const ssize_t n = ::write(wake_.get(), &one, sizeof one);
    }

    // ---- dispatch -------------------------------------------------------------------------

    /// How much work a worker may hold: enough to hide a round trip (about half a millisecond of
    /// it, as estimated), at least 2 tasks, at most 256. A task's estimate is its item count times
    /// the measured time per item of its code (what it calls); a task whose code has not run yet
    /// counts as a whole window — so a new kind of task is handed out two at a time per worker
    /// until its time is known, never all at once to whichever worker was first.
    static constexpr std::int64_t window_ns = 500'000;
    static constexpr std::size_t window_min = 2, window_max = 256;

    /// Whether the seat's worker may be given tasks and have them placed in its ring: it is not
    /// dead, has its channel, and is not being killed (its tasks would only come back when it is
    /// gone, or fail with what it is killed for).
    static bool serving(const Seat& s) noexcept {
        return s.state != SeatState::dead && s.channel && s.kill.reason == KillReason::none;
    }
    bool has_room_locked(const Seat& s) const noexcept {
        if (!serving(s)) return false;
        if (options_.max_tasks_per_child != 0 && s.assigned >= options_.max_tasks_per_child) return false;
        if (s.inflight.size() < window_min) return true;
        return s.inflight.size() < window_max && s.queued_ns < window_ns;
    }

    /// The measured run time per item of the tasks calling `code` (0: none has run yet).
    double item_ns_locked(std::uint64_t code) const noexcept {
        for (const auto& [c, ns] : item_ns_)
            if (c == code) return ns;
        return 0;
    }
    std::int64_t estimate_locked(Task& t) const noexcept {
        const double per_item = item_ns_locked(task_frame::code::get(body_of(t.frame)));
        if (per_item <= 0) return window_ns;
        return static_cast<std::int64_t>(std::min(per_item * t.count, 1e15));
    }
    /// Folds a finished task's time into its code's time per item.
    void learn_locked(Task& t, std::int64_t spent_ns) {
        const std::uint64_t code = task_frame::code::get(body_of(t.frame));
        const double per_item = static_cast<double>(spent_ns) / std::max<std::uint32_t>(1, t.count);
        for (auto& [c, ns] : item_ns_)
            if (c == code) {
                ns = 0.9 * ns + 0.1 * per_item;
                return;
            }
        if (item_ns_.size() >= 64) item_ns_.erase(item_ns_.begin());  // the oldest code goes
        item_ns_.emplace_back(code, per_item);
    }

    void dispatch_locked() {
        if (state_ == State::terminated || state_ == State::broken) return;
        dispatch_backlog_locked(
            std::span<Seat>(seats_), [&](const Seat& s) { return has_room_locked(s); },
            [&](Seat& s, Task& task) {
                task.estimate_ns = estimate_locked(task);
                s.inflight.push_back(std::move(task));  // all or nothing
                s.queued_ns += s.inflight.back().estimate_ns;
                ++s.assigned;
            });
        bool needs_collector = false;
        bool placed = false;
        for (Seat& s : seats_) {
            placed |= place_locked(s);
            if (flush_locked(s)) needs_collector = true;
        }
        // A collector asleep with no deadline (or a later one) must learn of the new work: it is
        // the one that enforces task_timeout (for a placed task) and stall_timeout (for any work
        // pending), and it computed its sleep before this work was there.
        std::int64_t horizon = INT64_MAX;
        if (placed && options_.task_timeout) horizon = timeout_ns();
        if (options_.stall_timeout && (placed || !backlog_.empty())) horizon = std::min(horizon, stall_ns());
        if (horizon != INT64_MAX && collector_wakes_at_ > monotonic_ns() + horizon) needs_collector = true;
        if (needs_collector && !on_own_thread()) wake();
    }

    /// Puts the seat's tasks that are not yet in its ring there (large ones on its socket,
    /// announced in the ring), as far as there is room, and wakes the worker if it sleeps.
    /// Returns whether it placed any.
    bool place_locked(Seat& s) {
        if (!serving(s)) return false;
        SpscRing ring = link_.tasks(static_cast<unsigned>(s.index));
        bool placed_any = false;
        if (!s.adopted.empty()) release_freed_locked(s, ring);
        while (s.placed < s.inflight.size()) {
            if (!send_segments_locked(s, ring, s.inflight[s.placed])) break;
            const Buffer& frame = s.inflight[s.placed].frame;
            const auto body = frame.bytes().subspan(frame_header_size);
            if (body.size() <= ring.max_payload()) {
                if (!ring.try_push(SpscRing::data, body)) break;
            } else {
                // Room first: once the record is in the ring the frame must follow it.
                s.out.reserve(s.out.size() + frame.size());
                if (!ring.try_push(SpscRing::socket, {})) break;
                s.out.append(frame.data(), frame.size());
            }
            ++s.placed;
            ++s.placed_total;
            placed_any = true;
        }
        if (placed_any) ring.notify_consumer();
        return placed_any;
    }

    /// Before a task that names shared memory made after the fork server (an object created after
    /// the Pool) goes to a seat, its worker is sent each such segment it lacks: an `adopt` record
    /// in the ring, and the memfd on the socket (a descriptor frame, in the ring's order), which
    /// the worker maps before it reads on (worker.hpp). A worker keeps at most max_adopted of them:
    /// past that, those no task has named for longest are released first (a `release` record: the
    /// tasks before it in the ring are done with them). Returns false when the ring has no room
    /// now: the task waits, as it does for its own record.
    bool send_segments_locked(Seat& s, SpscRing& ring, const Task& task) {
        if (task.segments.empty()) return true;
        const std::uint64_t use = ++s.segment_uses;
        const auto sent = [&](std::uint64_t id) {
            return std::find_if(s.adopted.begin(), s.adopted.end(), [&](const Adopted& a) { return a.id == id; });
        };
        for (const SegmentPtr& segment : task.segments)  // first, what the worker has: it stays
            if (const auto known = sent(segment->id()); known != s.adopted.end()) known->use = use;
        for (const SegmentPtr& segment : task.segments) {
            if (segment->generation() <= server_generation_) continue;  // the worker inherited it
            const std::uint64_t segment_id = segment->id();
            if (sent(segment_id) != s.adopted.end()) continue;
            while (s.adopted.size() >= max_adopted) {
                const auto oldest = std::min_element(s.adopted.begin(), s.adopted.end(),
                                                     [](const Adopted& a, const Adopted& b) { return a.use < b.use; });
                if (oldest->use == use) break;  // every one is this task's: they all stay
                if (!release_locked(s, ring, oldest)) return false;
            }
            // Room first: once the record is in the ring, its descriptor frame must follow.
            s.adopted.reserve(s.adopted.size() + 1);
            s.out.reserve(s.out.size() + frame_header_size);
            s.out_fds.emplace_back(s.out.size(), segment);
            std::byte id[sizeof segment_id];
            std::memcpy(id, &segment_id, sizeof id);
            if (!ring.try_push(SpscRing::adopt, id)) {
                s.out_fds.pop_back();
                return false;
            }
            s.out.append(&descriptor_frame, frame_header_size);
            s.adopted.push_back(Adopted{segment_id, use, segment});
        }
        return true;
    }

    /// Tells the seat's worker to let go of a segment it was sent (a `release` record, behind
    /// every task already in its ring). Returns false when the ring has no room now.
    static bool release_locked(Seat& s, SpscRing& ring, std::vector<Adopted>::iterator which) {
        std::byte id[sizeof which->id];
        std::memcpy(id, &which->id, sizeof id);
        if (!ring.try_push(SpscRing::release, id)) return false;
        s.adopted.erase(which);
        return true;
    }

    /// The segments sent to the seat's worker that this process has let go of (no handle, task or
    /// container here holds them any more) are released there too: a block freed here does not
    /// stay mapped in the workers. (A task in the ring naming one holds it, in Task::segments.)
    static void release_freed_locked(Seat& s, SpscRing& ring) {
        for (auto it = s.adopted.begin(); it != s.adopted.end();) {
            if (!it->segment.expired()) {
                ++it;
                continue;
            }
            const auto at = it - s.adopted.begin();
            if (!release_locked(s, ring, it)) return;
            it = s.adopted.begin() + at;
        }
    }

    /// Sends what the socket takes now (a descriptor frame with its memfd attached to its first
    /// byte). Returns true when bytes are left for POLLOUT.
    bool flush_locked(Seat& s) {
        while (s.out_sent < s.out.size() && s.channel) {
            const bool descriptor = !s.out_fds.empty() && s.out_fds.front().first == s.out_sent;
            const std::size_t until = descriptor || s.out_fds.empty() ? s.out.size() : s.out_fds.front().first;
            ssize_t put;
            if (descriptor) {
                put = send_some_with_fd(s.channel.get(), s.out.data() + s.out_sent, frame_header_size,
                                        s.out_fds.front().second->fd(), MSG_DONTWAIT);
                if (put > 0) s.out_fds.pop_front();  // the memfd went with the first byte
            } else {
                put = write_some(s.channel.get(), s.out.data() + s.out_sent, until - s.out_sent,
                                 /*is_socket=*/true, /*nonblocking=*/true);
            }
            if (put > 0) {
                s.out_sent += static_cast<std::size_t>(put);
                s.sent_total += static_cast<std::uint64_t>(put);
                continue;
            }
            if (put < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
            // The worker is gone, or (a descriptor refused: too many in flight, no memory) the
            // bytes its ring announces can no longer follow: it is ended, through no fault of the
            // task it runs. Either way the fork server's report settles its tasks, and they go to
            // a worker that starts afresh.
            if (put < 0 && errno != EPIPE && errno != ECONNRESET && errno != ENOTCONN)
                kill_locked(s, {.reason = KillReason::channel});
            clear_out(s);
            return false;
        }
        clear_out(s);
        return false;
    }
    static void clear_out(Seat& s) noexcept {
        s.out.clear();
        s.out_sent = 0;
        s.out_fds.clear();
    }

    /// Asks the server for a worker on seat `s`. Returns false (and schedules a retry, with
    /// backoff) when that cannot be done now: no descriptor for its channel, say. A server that is
    /// gone breaks the pool.
    bool spawn_locked(Seat& s) {
        s.state = SeatState::dead;
        s.pid = 0;
        s.channel.reset();
        int fds[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
            char text[256];
            schedule_respawn_locked(
                s, std::string("cannot start a worker: socketpair: ") + ::strerror_r(errno, text, sizeof text));
            return false;
        }
        UniqueFd ours(fds[0]);
        UniqueFd theirs(fds[1]);
        link_.reset_seat(static_cast<unsigned>(s.index));
        if (const int error = server_.spawn(s.index, theirs); error != 0) {
            if (error == EPIPE || error == ECONNRESET || error == ENOTCONN) {
                break_pool_locked("the pool's fork server (pid " + std::to_string(server_.pid()) + ") is gone");
                s.respawn_error = broken_reason_;
            } else {  // the server is there; the kernel would not pass the channel now (ETOOMANYREFS, say)
                char text[256];
                schedule_respawn_locked(s,
                                        std::string("cannot start a worker: sending its channel to the fork server: ") +
                                            ::strerror_r(error, text, sizeof text));
            }
            return false;
        }
        s.channel = std::move(ours);
        s.state = SeatState::starting;
        s.in.clear();
        clear_out(s);
        s.adopted.clear();
        s.segment_uses = 0;
        s.placed = 0;
        s.queued_ns = 0;
        s.placed_total = 0;
        s.assigned = 0;
        s.saw_hello = false;
        s.eof = false;
        s.kill = Kill{};
        s.sent_total = 0;
        s.seen_sent = 0;
        s.seen_run_ns = 0;
        s.cancel_sent_ns = 0;
        s.cancel_signal_owed = false;
        s.seen_begun = 0;
        s.waiting_since = 0;
        s.respawn_at = 0;
        return true;
    }

    /// The seat has no worker and could not get one: try again later, waiting longer each time
    /// (10 ms, doubling, at most 1 s).
    void schedule_respawn_locked(Seat& s, std::string why) {
        const std::int64_t now = monotonic_ns();
        s.respawn_delay = s.respawn_delay == 0 ? 10'000'000
                                               : std::min<std::int64_t>(s.respawn_delay * 2, 1'000'000'000);
        s.respawn_at = now + s.respawn_delay;
        s.respawn_error = std::move(why);
        if (failing_since_ == 0) failing_since_ = now;
    }

    /// Seats whose retry is due get their worker asked for again.
    void respawn_due_locked(std::int64_t now) {
        if (state_ == State::terminated || state_ == State::broken || state_ == State::draining) return;
        bool spawned = false;
        for (Seat& s : seats_)
            if (s.state == SeatState::dead && s.respawn_at != 0 && s.respawn_at <= now) {
                s.respawn_at = 0;
                spawned |= spawn_locked(s);
            }
        if (spawned) dispatch_locked();  // the tasks waiting in the backlog have a worker again
        // No worker at all, and none could be started for a while: nothing would ever run.
        const bool any_worker = std::any_of(seats_.begin(), seats_.end(),
                                            [](const Seat& s) { return s.state != SeatState::dead; });
        if (!any_worker && failing_since_ != 0 &&
            now - failing_since_ >= static_cast<std::int64_t>(respawn_give_up.count() * 1e9)) {
            std::string why;
            for (const Seat& s : seats_)
                if (!s.respawn_error.empty()) why = s.respawn_error;
            break_pool_locked("the pool has no worker left and could not start one for " +
                              std::to_string(static_cast<int>(respawn_give_up.count())) + " s: " + why);
        }
    }

    std::vector<Task> take_all_tasks_locked() override {
        std::vector<Task> all;
        all.reserve(stall_doomed_.size() + backlog_.size() + placed_count_locked());  // the moves cannot throw
        for (Task& t : stall_doomed_) all.push_back(std::move(t));  // taken by the watchdog, not yet failed
        stall_doomed_.clear();
        for (Seat& s : seats_) {
            s.assigned -= std::min<unsigned long>(s.assigned, s.inflight.size() - s.placed);  // never sent
            for (Task& t : s.inflight) all.push_back(std::move(t));
            s.inflight.clear();
            s.placed = 0;
            s.queued_ns = 0;
        }
        for (Task& t : backlog_) all.push_back(std::move(t));
        backlog_.clear();
        return all;
    }

    bool take_one_task_locked(Task& out) noexcept override {
        if (!broken_doomed_.empty()) {  // the collector's own (this runs on it, in fail_from_thread)
            out = std::move(broken_doomed_.back());
            broken_doomed_.pop_back();
            return true;
        }
        if (!stall_doomed_.empty()) {
            out = std::move(stall_doomed_.back());
            stall_doomed_.pop_back();
            return true;
        }
        for (Seat& s : seats_) {
            if (s.inflight.empty()) continue;
            if (s.placed < s.inflight.size()) {  // those never sent are no longer assigned
                s.assigned -= std::min<unsigned long>(s.assigned, s.inflight.size() - s.placed);
                s.placed = s.inflight.size();
            }
            out = std::move(s.inflight.front());
            s.inflight.pop_front();
            --s.placed;
            if (s.inflight.empty()) s.queued_ns = 0;
            return true;
        }
        if (backlog_.empty()) return false;
        out = std::move(backlog_.front());
        backlog_.pop_front();
        return true;
    }

    // ---- the collector ----------------------------------------------------------------------

    /// The collector thread. Nothing escapes it: an exception here breaks the pool (every pending
    /// and later call fails with mproc::Error saying why) and the program goes on.
    void collector_main() noexcept {
        mark_own_thread();
        try {
            collect();
            stop_taking_posts();
            run_posted();  // a job posted while the collector was ending (the server died, say)
        } catch (...) {
            // Nothing here may need memory that is not there (the exception may be bad_alloc).
            stop_taking_posts();
            {
                std::lock_guard lock(mutex_);
                if (server_.pid() != 0) server_.terminate_workers();
            }
            const std::exception_ptr& error = fail_from_thread("the pool's collector failed: ");
            // Tasks taken from their seat whose result was not delivered when it threw: each is
            // counted settled here, the delivered ones too (the count is the whole batch's).
            for (Finished& f : finished_)
                if (f.task.sink) f.task.sink->abort(f.task.first, f.task.count, error);
            finish_tasks(finished_.size());
            finished_.clear();
            run_all_posted();
        }
        {
            std::lock_guard lock(mutex_);
            collector_ended_ = true;  // what a join with a timeout waits for before joining this thread
        }
        idle_.notify_all();
        if (retired_) finish_retired();
    }

    /// From here on a cancel settles its call itself (see thread_running_locked): the posted jobs
    /// this thread still runs are those already there.
    void stop_taking_posts() noexcept {
        std::lock_guard lock(mutex_);
        collector_closing_ = true;
    }

    /// After retire_from_callback(): the teardown terminate() would have done, then this engine
    /// goes (the thread object first lets go of this thread).
    void finish_retired() noexcept {
        run_all_posted();
        const std::exception_ptr error = error_or_ready_made("the pool was destroyed before this task finished");
        fail_tasks(retired_doomed_, error);
        fail_held_tasks(error);  // those left where they were (see take_doomed_locked)
        try {
            reap_server(Seconds{5});
        } catch (...) {}
        collector_->detach();
        delete this;
    }

    /// While results keep coming, how often the collector still looks at its descriptors.
    static constexpr std::int64_t collector_look_ns = 200'000;

    void collect() {
        std::vector<pollfd> fds;
        std::vector<int> seat_of;  // fds index -> seat
        PoolShared& shared = link_.shared();
        HeldTasks stalled(*this);
        std::string stall_why;
        std::int64_t looked_at = 0;  // when poll() last returned
        for (;;) {
            int timeout_ms = -1;
            bool streaming = false;  // workers hold several tasks: results are due one after another
            {
                std::lock_guard lock(mutex_);
                if (state_ == State::terminated) return;
                if (state_ == State::draining && outstanding_ == 0) {
                    shut_down_workers_locked();
                    return;
                }
                if (std::exchange(dispatch_owed_, false)) dispatch_locked();
                const std::int64_t now = monotonic_ns();
                respawn_due_locked(now);
                if (state_ == State::broken) fail_broken_locked();
                if (!stall_doomed_.empty()) {  // the watchdog's: failed below, outside the lock
                    stall_why = stall_reason_;
                    stalled.tasks.swap(stall_doomed_);
                }
                fds.clear();
                seat_of.clear();
                fds.push_back({wake_.get(), POLLIN, 0});
                seat_of.push_back(-1);
                fds.push_back({server_.control_fd(), POLLIN, 0});
                seat_of.push_back(-2);
                for (Seat& s : seats_) {
                    if (!s.channel || s.eof) continue;
                    const short events = static_cast<short>(POLLIN | (s.out_sent < s.out.size() ? POLLOUT : 0));
                    fds.push_back({s.channel.get(), events, 0});
                    seat_of.push_back(s.index);
                }
                timeout_ms = next_deadline_ms_locked(now);
                std::size_t inflight = 0;
                for (const Seat& s : seats_) inflight += s.inflight.size();
                streaming = inflight >= 2;
            }
            if (!broken_doomed_.empty()) {
                HeldTasks doomed(*this);
                doomed.tasks.swap(broken_doomed_);
                doomed.fail(std::make_exception_ptr(Error(broken_reason_)));
            }
            if (!stalled.tasks.empty()) stalled.fail(std::make_exception_ptr(TimeoutError(stall_why)));
            run_posted();
            bool progressed = false;
            for (Seat& s : seats_) progressed |= service_seat(s);
            if (progressed) {
                // Results came: go straight back for more. The descriptors (the server's reports,
                // large results on the sockets, the eventfd) are looked at meanwhile, with no wait,
                // at most every collector_look_ns: each look is a system call, and two more turns
                // of the pool's mutex, which a caller dispatching its next task may hold.
                if (monotonic_ns() - looked_at < collector_look_ns) continue;
                timeout_ms = 0;  // look at the sockets and the server, then come straight back
            } else if (streaming && timeout_ms != 0 && spin_until([&] { return any_results_waiting(); }, ring_spin)) {
                timeout_ms = 0;  // a result came while we watched: no need to sleep for it
            } else {
                // About to sleep: say so, then look once more, so a worker that publishes a result
                // from now on writes the eventfd (see wake_collector).
                shared.collector_sleeping.store(1, std::memory_order_relaxed);
                std::atomic_thread_fence(std::memory_order_seq_cst);
                if (any_results_waiting()) timeout_ms = 0;
            }
            {
                // The deadlines again, now that results were delivered and tasks dispatched since
                // the top of the loop; and from here on a dispatcher compares its new task's
                // deadline with the one this sleep ends at (see dispatch_locked).
                std::lock_guard lock(mutex_);
                const std::int64_t now = monotonic_ns();
                if (timeout_ms != 0) timeout_ms = next_deadline_ms_locked(now);
                collector_wakes_at_ = timeout_ms < 0 ? INT64_MAX : now + std::int64_t{timeout_ms} * 1'000'000;
            }
            const int n = ::poll(fds.data(), fds.size(), timeout_ms);
            looked_at = monotonic_ns();
            shared.collector_sleeping.store(0, std::memory_order_relaxed);
            {
                std::lock_guard lock(mutex_);
                collector_wakes_at_ = 0;  // awake: it will look at every deadline before it sleeps
            }
            if (n < 0 && errno != EINTR) throw_errno("poll (pool collector)");
            if (n <= 0) continue;

            if (fds[0].revents & POLLIN) {
                // One read empties an eventfd (its count goes back to 0: a second read would only
                // fail with EAGAIN, a system call per wake-up); a write after it shows in the next poll.
                std::uint64_t drained;
                while (::read(wake_.get(), &drained, sizeof drained) < 0 && errno == EINTR) {}
            }
            for (std::size_t i = 2; i < fds.size(); ++i) {
                if (!fds[i].revents) continue;
                Seat& s = seats_[static_cast<std::size_t>(seat_of[i])];
                if (fds[i].revents & POLLOUT) {
                    std::lock_guard lock(mutex_);
                    flush_locked(s);
                }
                if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) fill_from_socket(s);
            }
            if (fds[1].revents) {
                if (!handle_server_reports()) return;
            }
        }
    }

    /// A broken pool fails everything it holds (outside the lock: sinks run callbacks).
    void fail_broken_locked() {
        // Room first: once taken, the tasks only move (take_all_tasks_locked reserves its own).
        broken_doomed_.reserve(broken_doomed_.size() + stall_doomed_.size() + backlog_.size() + placed_count_locked());
        std::vector<Task> doomed = take_all_tasks_locked();
        for (Task& t : doomed) broken_doomed_.push_back(std::move(t));
    }

    bool any_results_waiting() const noexcept {
        for (const Seat& s : seats_)
            if (s.state != SeatState::dead && !link_.results(static_cast<unsigned>(s.index)).empty()) return true;
        return false;
    }

    /// Reads what the worker's socket holds now (large results), without waiting.
    void fill_from_socket(Seat& s) {
        if (const auto lost = read_socket(s)) {
            std::lock_guard lock(mutex_);
            kill_locked(s, {.reason = KillReason::unreceivable, .bytes = *lost});
        }
    }
    void fill_from_socket_locked(Seat& s) {
        if (const auto lost = read_socket(s)) kill_locked(s, {.reason = KillReason::unreceivable, .bytes = *lost});
    }
    /// Returns the size of the result frame on its way when this process has no room for it:
    /// its worker goes, and its task fails for that (worker_exited), not the whole pool. What came
    /// before it is delivered; the reader's memory goes now.
    static std::optional<std::size_t> read_socket(Seat& s) {
        if (!s.channel || s.eof) return std::nullopt;
        for (;;) {
            ssize_t got = 0;
            try {
                got = s.in.fill(s.channel.get(), /*nonblocking=*/true);
            } catch (const std::bad_alloc&) {
                // A whole frame is here already: the room was for the bytes after it. That result
                // is delivered first (service_seat), and the reading goes on once it is taken.
                if (s.in.buffered_frame()) return std::nullopt;
                s.eof = true;
                const std::size_t lost = s.in.size() + s.in.bytes_wanted();
                s.in = FrameReader();
                return lost;
            }
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) s.eof = true;
            if (got <= 0) return std::nullopt;
        }
    }

    /// Ends the seat's worker for `why` (recorded for worker_exited), now or, when its pid is not
    /// known yet, once it is. A worker killed already keeps its first reason — except for a result
    /// that could not be received, whose task must fail whatever else the worker was killed for.
    void kill_locked(Seat& s, Kill why) {
        if (s.kill.reason != KillReason::none && why.reason != KillReason::unreceivable) return;
        const bool sent = s.kill.sent;
        s.kill = why;
        s.kill.sent = sent;
        if (s.kill.sent || s.pid <= 0) return;
        s.kill.sent = true;
        server_.kill(s.index, s.pid, SIGKILL);
    }

    /// Takes every result the seat's worker has published, delivers them (callbacks run here,
    /// outside the pool lock), and refills the worker. Returns whether anything was taken.
    bool service_seat(Seat& s) {
        if (s.state == SeatState::dead) return false;
        SpscRing ring = link_.results(static_cast<unsigned>(s.index));
        std::uint64_t position = ring.head();
        std::optional<std::span<const std::byte>> socket_frame;
        bool progressed = false;
        finished_.clear();
        {
            std::lock_guard lock(mutex_);
            while (auto record = ring.peek(position)) {
                std::span<const std::byte> body = record->payload;
                if (record->kind == SpscRing::socket) {
                    if (!finished_.empty()) break;  // a socket frame is taken on its own
                    fill_from_socket_locked(s);
                    const auto frame = s.in.buffered_frame();
                    if (!frame) break;  // not all here yet: POLLIN brings the rest
                    body = *frame;
                    socket_frame = body;
                }
                position = record->end;
                progressed = true;
                const std::uint64_t id = result_id(body);
                if (id == hello_task_id) {
                    Reader in(result_outcomes(body));
                    hello_locked(s, static_cast<pid_t>(result_frame::worker_pid::get(body)), in);
                } else if (id == not_adopted_task_id) {
                    // The worker could not map a segment: it is no longer taken for sent, so the
                    // next task that names it sends it again (those placed already fail).
                    const std::uint64_t segment = result_frame::segment_id::get(body);
                    std::erase_if(s.adopted, [&](const Adopted& a) { return a.id == segment; });
                } else if (!s.inflight.empty() && s.inflight.front().id == id) {
                    finished_.emplace_back(s.inflight.front(), body);  // moved once there is room
                    s.inflight.pop_front();
                    if (s.placed) --s.placed;
                    ++s.tasks_done;
                    ++tasks_done_;
                    const std::int64_t spent = result_frame::spent_ns::get(body);
                    s.busy_ns += spent;
                    s.queued_ns -= finished_.back().task.estimate_ns;
                    // (A cancelled call's task may have been skipped: its time says nothing.)
                    if (!finished_.back().task.sink->cancelled()) learn_locked(finished_.back().task, spent);
                }
                if (socket_frame) break;
            }
        }
        for (Finished& f : finished_) {
            deliver(f.task, f.body);
            f.task.sink.reset();  // settled (see collector_main)
        }
        if (socket_frame) s.in.consume(*socket_frame);
        if (progressed) ring.consume_to(position);
        if (!finished_.empty()) {
            const std::size_t n = finished_.size();
            finished_.clear();  // the tasks (and their sinks) go before the lock is taken
            std::lock_guard lock(mutex_);
            outstanding_ -= std::min(outstanding_, n);
            if (outstanding_ == 0) idle_.notify_all();
            dispatch_locked();
        }
        return progressed;
    }

    /// The worker's first frame. Its pid is known from here on: the fork server's report of it
    /// may still be unread, and a caller who has the worker's first result must find it in
    /// worker_pids().
    void hello_locked(Seat& s, pid_t pid, Reader& in) {
        s.saw_hello = true;
        learn_pid_locked(s, pid);
        start_failures_ = 0;
        failing_since_ = 0;
        s.respawn_delay = 0;
        if (const auto why = read_hello_outcome(in)) {
            break_pool_locked("the pool's initializer failed in a worker (pid " + std::to_string(pid) +
                              "): " + why->type_name + ": " + why->message);
        }
    }

    /// The seat's worker is `pid`: from its hello or the server's report, whichever is read first.
    void learn_pid_locked(Seat& s, pid_t pid) {
        if (s.pid != 0 || pid <= 0) return;
        s.pid = pid;
        s.worker_since = monotonic_ns();
        if (s.kill.reason != KillReason::none && !s.kill.sent) {  // owed since kill_locked
            s.kill.sent = true;
            server_.kill(s.index, pid, SIGKILL);
        }
    }

    /// Spawned / exited reports. Returns false when the server is gone.
    bool handle_server_reports() {
        for (;;) {
            std::optional<ControlMessage> m;
            try {
                m = server_.next_report();
            } catch (const Error& e) {
                HeldTasks doomed(*this);
                {
                    std::lock_guard lock(mutex_);
                    if (state_ == State::terminated || state_ == State::draining) return false;
                    break_pool_locked(e.what());
                    doomed.tasks = take_all_tasks_locked();
                }
                doomed.fail(std::make_exception_ptr(Error(e.what())));
                return false;
            }
            if (!m) return true;
            if (m->seat < 0 || static_cast<std::size_t>(m->seat) >= seats_.size()) continue;
            Seat& s = seats_[static_cast<std::size_t>(m->seat)];
            if (m->op == ControlMessage::spawned) {
                std::lock_guard lock(mutex_);
                learn_pid_locked(s, m->pid);
                if (s.state == SeatState::starting) s.state = SeatState::ready;
                s.respawn_delay = 0;
                failing_since_ = 0;  // a fork worked: the limit, if any, has lifted
                dispatch_locked();
            } else if (m->op == ControlMessage::exited) {
                worker_exited(s, m->pid, m->value);
            } else if (m->op == ControlMessage::spawn_failed) {
                spawn_failed(s, m->value);
            }
        }
    }

    /// The seat has no worker any more: every task it held goes back to the front of the
    /// backlog, in order — but those of cancelled calls, which go to `dropped`.
    void vacate_locked(Seat& s, std::vector<Task>& dropped) {
        static_assert(std::is_nothrow_move_assignable_v<Task> && std::is_nothrow_move_constructible_v<Task>);
        // Room first, in `dropped` and at the backlog's front (empty tasks, filled below), for
        // every task either way: cancel() marks a call from any thread without the engine's lock,
        // so a task is looked at once, as it moves. The moves cannot throw, so no task is ever
        // only in this function's hands.
        const std::size_t n = s.inflight.size();
        dropped.reserve(dropped.size() + n);
        std::size_t added = 0;
        try {
            for (; added < n; ++added) backlog_.emplace_front();
        } catch (...) {
            for (; added > 0; --added) backlog_.pop_front();
            throw;
        }
        // Filled from the back, in order: the slots left empty are the first ones, dropped here.
        const std::size_t dropped_before = dropped.size();
        std::size_t empty = n;
        for (Task& t : std::views::reverse(s.inflight)) {
            if (t.sink->cancelled()) dropped.push_back(std::move(t));
            else backlog_[--empty] = std::move(t);
        }
        std::reverse(dropped.begin() + static_cast<std::ptrdiff_t>(dropped_before), dropped.end());
        for (; empty > 0; --empty) backlog_.pop_front();
        s.inflight.clear();
        s.placed = 0;
        s.queued_ns = 0;
        s.channel.reset();
        s.state = SeatState::dead;
        s.pid = 0;
    }

    /// The server could not fork a worker for `s`: its tasks go back to the others, and the seat
    /// tries again later. Not a worker that died: it does not count towards max_start_failures.
    void spawn_failed(Seat& s, int error) {
        HeldTasks dropped(*this);
        {
            std::lock_guard lock(mutex_);
            vacate_locked(s, dropped.tasks);
            char text[256];
            schedule_respawn_locked(
                s, std::string("cannot start a worker: fork: ") + ::strerror_r(error, text, sizeof text));
            dispatch_locked();
        }
        dropped.fail(cancelled_error());
    }

    void worker_exited(Seat& s, pid_t pid, int wait_status) {
        fill_from_socket(s);
        while (service_seat(s)) fill_from_socket(s);  // everything it sent before it died counts
        // Every task this function takes out of the seat is held where an exception (no memory)
        // cannot lose it: a lost item is skipped in its task before its failure is delivered, so
        // its stand-in in `lost` settles the call if that never happens.
        HeldTasks failed_whole(*this);  // every item failed already: only counted settled
        HeldTasks dropped(*this);  // tasks of cancelled calls: settled, not run again
        HeldTasks lost(*this, /*counted=*/false);
        std::exception_ptr lost_error;
        // The task whose result this process had no room for: the first one the worker had not
        // delivered, whatever it was doing when the kill landed. It fails whole, not run again.
        HeldTasks unreceived(*this);
        Kill kill;
        {
            std::lock_guard lock(mutex_);
            kill = s.kill;
            if (kill.reason == KillReason::unreceivable && !s.inflight.empty()) {
                HeldTasks& to = s.inflight.front().sink->cancelled() ? dropped : unreceived;
                to.tasks.reserve(to.tasks.size() + 1);
                to.tasks.push_back(std::move(s.inflight.front()));
                s.inflight.pop_front();
                if (s.placed) --s.placed;
            }
            const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
            const TaskPhase phase = status.current_phase();
            // A worker that died reading a task's frame (one it had no memory for, say) died of
            // the first task it had not finished, before any item of it: its first item still to
            // run is blamed, so that a task that cannot reach a worker fails rather than going to
            // one fresh worker after another for ever.
            const bool receiving = phase == TaskPhase::receiving && !s.inflight.empty();
            const std::uint64_t task = status.task_id.load(std::memory_order_relaxed);
            const std::uint32_t item = receiving ? first_unskipped(s.inflight.front())
                                                 : status.item.load(std::memory_order_relaxed);
            const WorkerExit why = status.left_because();
            // The item the worker was on — its death is charged to it when the worker died of
            // its own accord, or was killed for that very item's timeout (not one that finished
            // before the kill landed, nor while the next task was being received). Killed for
            // anything else, it did nothing wrong. Not a cancelled call's (settled as cancelled),
            // nor an item that failed already (a worker that died before the first item it ran).
            const bool on_item = !s.inflight.empty() &&
                                 (receiving || (phase != TaskPhase::idle && task == s.inflight.front().id));
            const bool charged = kill.reason == KillReason::none ||
                                 (kill.reason == KillReason::task_timeout && !receiving && kill.task == task &&
                                  kill.item == item);
            const bool blame = on_item && charged && !s.inflight.front().sink->cancelled() &&
                               !std::binary_search(s.inflight.front().skips.begin(), s.inflight.front().skips.end(),
                                                   item);
            if (blame) {
                Task& t = s.inflight.front();
                if (kill.reason == KillReason::task_timeout) {
                    lost_error = std::make_exception_ptr(TimeoutError(t.describe(item) +
                                                                      " ran past the task_timeout of " +
                                                                      std::to_string(options_.task_timeout->count()) +
                                                                      "s: worker " + std::to_string(pid) + " killed"));
                } else {
                    // A lost worker: the item runs again on a fresh one while it has retries left.
                    const unsigned retries = t.sink->max_retries.value_or(options_.max_retries);
                    const unsigned attempts = ++t.sink->losses[t.first + item];
                    if (attempts <= retries) {
                        ++retried_;
                    } else {
                        std::string what = t.describe(item);
                        if (retries != 0)
                            what += " (attempt " + std::to_string(attempts) + " of " + std::to_string(retries + 1) +
                                    ")";
                        lost_error = lost_worker_error(what, pid, wait_status, why);
                    }
                }
                if (lost_error) {
                    Task& stand_in = lost.tasks.emplace_back();
                    stand_in.sink = t.sink;
                    stand_in.first = t.first + item;
                    stand_in.count = 1;
                    t.skips.insert(std::upper_bound(t.skips.begin(), t.skips.end(), item), item);
                    if (t.skips.size() >= t.count) {
                        failed_whole.tasks.push_back(std::move(t));  // nothing left to run: it is settled
                        s.inflight.pop_front();
                    } else {
                        set_task_skips(t.frame, t.skips);
                    }
                }
            }
            if (!s.saw_hello && kill.reason == KillReason::none) ++start_failures_;
            record_restart_locked(s, wait_status, why);
            vacate_locked(s, dropped.tasks);

            if (start_failures_ >= max_start_failures) {
                const int sig = WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0;
                break_pool_locked("the pool's workers die as they start: worker " + std::to_string(pid) +
                                  (sig ? " killed by " + signal_name(sig)
                                       : " exited with status " + std::to_string(WEXITSTATUS(wait_status))));
            }
            const bool wanted = state_ == State::open || state_ == State::closed ||
                                (state_ == State::draining && outstanding_ > 0);
            if (wanted) spawn_locked(s);
        }
        if (!unreceived.tasks.empty()) {
            const Task& t = unreceived.tasks.front();
            std::exception_ptr error;
            try {
                std::string what = t.describe(first_unskipped(t));
                if (t.count > 1) what += " (and every other item of its chunk of " + std::to_string(t.count) + ")";
                error = lost_worker_error(what + ": its result (a frame of " + std::to_string(kill.bytes) +
                                              " bytes) could not be received, no memory for it in the pool's "
                                              "process; it was",
                                          pid, wait_status, WorkerExit::none);
            } catch (...) {
                error = undelivered_;
            }
            unreceived.fail(error);
        }
        // Moved: this thread keeps no reference once the sink has published the failure.
        if (!lost.tasks.empty()) {
            Task& stand_in = lost.tasks.front();
            try {
                stand_in.sink->fail(stand_in.first, std::move(lost_error));
            } catch (...) {
                stand_in.sink->abort(stand_in.first, 1, undelivered_);
            }
            lost.tasks.clear();
        }
        dropped.fail(cancelled_error());
        HeldTasks doomed(*this);
        {
            std::lock_guard lock(mutex_);
            if (state_ == State::broken) doomed.tasks = take_all_tasks_locked();
            else dispatch_locked();
        }
        if (!doomed.tasks.empty()) doomed.fail(std::make_exception_ptr(Error(broken_reason_)));
        failed_whole.release();  // every item failed already (lost, above): counted done
    }

    /// Counts a worker's end in its seat's stats: why it ended, and how.
    void record_restart_locked(Seat& s, int wait_status, WorkerExit why) {
        const std::int64_t now = monotonic_ns();
        if (s.worker_since) s.alive_ns += now - s.worker_since;
        s.worker_since = 0;
        const bool wanted = state_ == State::open || state_ == State::closed;
        if (!wanted) return;  // the pool is ending: nothing is replaced
        std::string how = WIFSIGNALED(wait_status) ? "killed by " + signal_name(WTERMSIG(wait_status))
                                                   : "exited with status " + std::to_string(WEXITSTATUS(wait_status));
        const KillReason killed = s.kill.reason;
        if (killed == KillReason::task_timeout || killed == KillReason::stalled ||
            killed == KillReason::stall_timeout) {
            ++s.restarts.timeout;
            how += killed == KillReason::task_timeout    ? " (task_timeout)"
                   : killed == KillReason::stall_timeout ? " (stall_timeout)"
                                                         : " (stalled)";
        } else if (killed == KillReason::unreceivable || killed == KillReason::channel) {
            ++s.restarts.crashed;
            how += killed == KillReason::unreceivable ? " (its result could not be received)"
                                                      : " (its socket refused a descriptor)";
        } else if (why == WorkerExit::cancelled || killed == KillReason::cancel) {
            ++s.restarts.cancelled;
            how += " (cancel)";
        } else if (why == WorkerExit::memory_limit || why == WorkerExit::max_memory) {
            ++s.restarts.memory;
            how += why == WorkerExit::memory_limit ? " (memory_limit)" : " (max_memory_per_child)";
        } else if (why == WorkerExit::max_tasks) {
            ++s.restarts.recycled;
            how += " (max_tasks_per_child)";
        } else {
            ++s.restarts.crashed;
        }
        s.last_restart = std::move(how);
    }

    /// The error of an item whose worker was lost: MemoryLimitExceeded when the worker went past
    /// memory_limit, WorkerLost otherwise.
    /// The first item of `t` not skipped (its count when every one is).
    static std::uint32_t first_unskipped(const Task& t) noexcept {
        std::uint32_t item = 0;
        for (const std::uint32_t skipped : t.skips) {  // sorted
            if (skipped != item) break;
            ++item;
        }
        return item;
    }
    std::exception_ptr lost_worker_error(const std::string& what, pid_t pid, int wait_status, WorkerExit why) const {
        if (why == WorkerExit::memory_limit)
            return std::make_exception_ptr(MemoryLimitExceeded(what + " went past the memory_limit of " +
                                                               std::to_string(options_.memory_limit) +
                                                               " bytes: worker " + std::to_string(pid) + " ended"));
        const int sig = WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0;
        const int code = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 0;
        return std::make_exception_ptr(WorkerLost(what, pid, sig, code));
    }

    void break_pool_locked(std::string reason) {
        // A draining pool has no task left and takes no more: a failure reported now (a second
        // worker's initializer, say) changes nothing, and turning it back into a broken pool would
        // keep the collector from ever ending (it ends only when draining).
        if (state_ == State::terminated || state_ == State::broken || state_ == State::draining) return;
        state_ = State::broken;
        broken_reason_ = std::move(reason);
    }

    std::int64_t timeout_ns() const noexcept { return task_timeout_ns_; }

    /// The poll timeout (ms) until the collector must look again: the next item that could
    /// overstay task_timeout, the next worker that could be found stalled, the next retry of a
    /// worker that could not be started. Kills the workers whose item already has overstayed, and
    /// those that left a queued task untaken for task_timeout (stopped, say: their tasks go to
    /// other workers, none fails).
    int next_deadline_ms_locked(std::int64_t now) {
        std::int64_t next = INT64_MAX;
        for (const Seat& s : seats_)
            if (s.state == SeatState::dead && s.respawn_at != 0) next = std::min(next, s.respawn_at);
        next = std::min(next, watch_cancels_locked(now));
        if (options_.stall_timeout) next = std::min(next, watch_stall_locked(now));
        if (options_.task_timeout) {
            const std::int64_t limit = timeout_ns();
            // A worker is taken for stalled after task_timeout, and never sooner than 1 s: a
            // loaded machine may leave a healthy worker unscheduled for a few milliseconds.
            const std::int64_t stall_limit = std::max<std::int64_t>(limit, 1'000'000'000);
            for (Seat& s : seats_) {
                if (s.state == SeatState::dead || s.inflight.empty() || s.pid <= 0 || s.kill.reason != KillReason::none)
                    continue;
                const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
                const TaskPhase phase = status.current_phase();
                // Whatever the worker does next (start a task, say), look again within the limit:
                // it does not wake the collector for that.
                next = std::min(next, now + limit);
                if (phase == TaskPhase::running) {
                    s.waiting_since = 0;
                    // The item and its start time as one pair: the worker writes the time first.
                    const std::uint32_t item = status.item.load(std::memory_order_acquire);
                    const std::int64_t started = status.started_ns.load(std::memory_order_acquire);
                    if (status.item.load(std::memory_order_acquire) != item) continue;  // moving on
                    if (now - started >= limit) {
                        kill_locked(s, {.reason = KillReason::task_timeout,
                                        .task = status.task_id.load(std::memory_order_relaxed),
                                        .item = item});
                        continue;
                    }
                    next = std::min(next, started + limit);
                    continue;
                }
                // A result on its way is not the worker's delay (the collector may be the slow one).
                if (phase == TaskPhase::delivering) {
                    s.waiting_since = 0;
                    continue;
                }
                // Receiving a large task: stalled only when it neither takes more of the bytes
                // sent nor runs (a huge argument may take longer than task_timeout to arrive, and
                // the worker grows its buffer for it; a stopped worker does neither). Its run
                // time is read only when no byte moved: /proc, under the pool's lock.
                if (phase == TaskPhase::receiving) {
                    // (The run time seen last may be older than the last byte: a worker stopped
                    // after a run of bytes is then killed within twice the limit, not once.)
                    bool moved = s.sent_total != s.seen_sent || s.waiting_since == 0;
                    if (!moved) {
                        const std::int64_t ran = run_time_ns(s.pid);
                        moved = ran != s.seen_run_ns;
                        s.seen_run_ns = ran;
                    }
                    if (moved) {
                        s.seen_sent = s.sent_total;
                        s.waiting_since = now;
                    } else if (now - s.waiting_since >= stall_limit) {
                        kill_locked(s, {.reason = KillReason::stalled});
                        continue;
                    }
                    next = std::min(next, s.waiting_since + stall_limit);
                    continue;
                }
                // Idle: does a task wait in its ring that it has not taken?
                const std::uint64_t begun = status.begun.load(std::memory_order_acquire);
                if (!s.saw_hello || begun >= s.placed_total || begun != s.seen_begun) {
                    s.seen_begun = begun;
                    s.waiting_since = begun < s.placed_total && s.saw_hello ? now : 0;
                } else if (s.waiting_since == 0) {
                    s.waiting_since = now;
                }
                if (s.waiting_since == 0) continue;
                if (now - s.waiting_since >= stall_limit) {
                    kill_locked(s, {.reason = KillReason::stalled});
                    continue;
                }
                next = std::min(next, s.waiting_since + stall_limit);
            }
        }
        if (next == INT64_MAX) return -1;
        if (next <= now) return 0;
        return static_cast<int>(std::min<std::int64_t>((next - now) / 1'000'000 + 1, 60'000));
    }

    /// A worker asked to stop a cancelled task that is still running it after cancel_grace (it
    /// blocks the signal, or is stopped) is killed. Returns when to look again.
    std::int64_t watch_cancels_locked(std::int64_t now) {
        std::int64_t next = INT64_MAX;
        for (Seat& s : seats_) {
            if (s.cancel_sent_ns == 0) continue;
            const bool waiting = s.state != SeatState::dead &&
                                 std::any_of(s.inflight.begin(),
                                             s.inflight.begin() + static_cast<std::ptrdiff_t>(s.placed),
                                             [](const Task& t) { return t.sink->cancelled(); });
            if (!waiting) {
                s.cancel_sent_ns = 0;
                s.cancel_signal_owed = false;
                continue;
            }
            const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
            const bool on_cancelled = status.current_phase() == TaskPhase::running &&
                                      status.is_cancelled(status.call.load(std::memory_order_relaxed));
            if (!on_cancelled) {
                // It ended that task or never began it; the queued ones it will skip itself.
                s.cancel_sent_ns = 0;
                s.cancel_signal_owed = false;
                continue;
            }
            if (s.pid <= 0) continue;  // its hello, or the server's report, wakes the collector
            if (std::exchange(s.cancel_signal_owed, false)) server_.kill(s.index, s.pid, cancel_signal());
            if (now - s.cancel_sent_ns >= cancel_grace_ns) {
                s.cancel_sent_ns = 0;
                kill_locked(s, {.reason = KillReason::cancel});
                continue;
            }
            next = std::min(next, s.cancel_sent_ns + cancel_grace_ns);
        }
        return next;
    }

    /// The stall_timeout watchdog. Progress is a result delivered or a worker moving to another
    /// task or item; when work is pending and none is seen for stall_timeout, every pending task
    /// fails with a TimeoutError that names the workers stuck in theirs, and those are killed
    /// (and replaced). Returns when to look again.
    std::int64_t watch_stall_locked(std::int64_t now) {
        std::uint64_t mark = tasks_done_;
        for (const Seat& s : seats_) {
            if (s.state == SeatState::dead) continue;
            const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
            mark += (status.begun.load(std::memory_order_relaxed) << 32) + status.item.load(std::memory_order_relaxed);
        }
        const bool pending = outstanding_ > posted_.size();
        if (!pending) {
            // Nothing to watch: the clock starts again at the first look with work pending (an
            // idle stretch is not a stall).
            progress_ns_ = 0;
            return INT64_MAX;
        }
        if (mark != progress_mark_ || progress_ns_ == 0) {
            progress_mark_ = mark;
            progress_ns_ = now;
            return now + stall_ns();
        }
        if (now - progress_ns_ < stall_ns()) return progress_ns_ + stall_ns();
        // Every worker holding a task is ended — the stuck ones, and any with tasks in its ring
        // that it has not taken (it made no progress either), so none runs later as an orphan.
        std::string stuck;
        for (Seat& s : seats_) {
            if (s.state == SeatState::dead || s.pid <= 0 || s.inflight.empty()) continue;
            const SeatStatus& status = link_.status(static_cast<unsigned>(s.index));
            const TaskPhase phase = status.current_phase();
            if (phase == TaskPhase::running || phase == TaskPhase::receiving) {
                stuck += (stuck.empty() ? "worker " : ", worker ") + std::to_string(s.pid);
                if (phase == TaskPhase::receiving) {
                    stuck += " receiving " + s.inflight.front().describe(first_unskipped(s.inflight.front()));
                } else {
                    const std::uint64_t id = status.task_id.load(std::memory_order_relaxed);
                    const auto task = std::find_if(s.inflight.begin(), s.inflight.end(),
                                                   [id](const Task& t) { return t.id == id; });
                    if (task != s.inflight.end())
                        stuck += " on " + task->describe(status.item.load(std::memory_order_relaxed));
                }
            }
            kill_locked(s, {.reason = KillReason::stall_timeout});
        }
        char seconds[32];
        std::snprintf(seconds, sizeof seconds, "%g", options_.stall_timeout->count());
        stall_reason_ = std::string("the pool made no progress for ") + seconds +
                        " s (stall_timeout): " + (stuck.empty() ? "no worker is running a task" : stuck);
        // Room first: once taken, the tasks only move (take_all_tasks_locked reserves its own).
        stall_doomed_.reserve(stall_doomed_.size() + backlog_.size() + placed_count_locked());
        for (Task& t : take_all_tasks_locked()) stall_doomed_.push_back(std::move(t));
        progress_ns_ = now;
        return now;  // the collector fails them straight away
    }
    std::int64_t stall_ns() const noexcept { return stall_timeout_ns_; }

    void shut_down_workers_locked() {
        for (Seat& s : seats_) {
            if (s.state == SeatState::dead) continue;
            link_.tasks(static_cast<unsigned>(s.index)).close();
            if (s.channel) ::shutdown(s.channel.get(), SHUT_RDWR);
        }
        server_.finish();
    }

    static constexpr int max_start_failures = 5;
    static constexpr std::size_t max_adopted = 64;  // segments sent to one worker and kept there

    PoolOptions options_;
    std::int64_t task_timeout_ns_ = 0;  // options_.task_timeout, when set (start())
    std::int64_t stall_timeout_ns_ = 0;  // options_.stall_timeout, when set
    SharedSeats link_;
    UniqueFd wake_;
    ForkServer server_;
    std::uint64_t server_generation_ = 0;  // the registry's generation when the server was forked

    std::vector<Seat> seats_;
    std::int64_t started_ns_ = monotonic_ns();
    std::uint64_t tasks_done_ = 0;  // (mutex_)
    std::uint64_t retried_ = 0;  // items run again after a lost worker (mutex_)
    std::vector<std::pair<std::uint64_t, double>> item_ns_;  // per task code: run time per item (mutex_)
    int start_failures_ = 0;
    std::int64_t failing_since_ = 0;  // since when no worker could be started (0: none failing)
    std::int64_t collector_wakes_at_ = INT64_MAX;  // when the sleeping collector looks again (0: awake)
    bool dispatch_owed_ = false;  // a dispatch on another thread threw: the collector does it (mutex_)

    struct Finished {
        Finished(Task& t, std::span<const std::byte> b) noexcept : task(std::move(t)), body(b) {}
        Task task;
        std::span<const std::byte> body;
    };
    std::vector<Finished> finished_;  // the collector's scratch list
    std::vector<Task> broken_doomed_;  // taken from a broken pool, failed by the collector
    std::vector<Task> stall_doomed_;  // taken by the watchdog, failed by the collector (mutex_)
    std::string stall_reason_;  // (mutex_)
    std::uint64_t progress_mark_ = 0;  // the watchdog's view of progress, and when it last moved
    std::int64_t progress_ns_ = 0;
    static constexpr std::int64_t cancel_grace_ns = 1'000'000'000;

    bool tearing_down_ = false;  // a join()/terminate() teardown is under way (mutex_)
    bool collector_ended_ = false;  // the collector thread has returned (mutex_)
    bool collector_closing_ = false;  // the collector runs no posted job but those already there (mutex_)
    std::unique_ptr<std::thread> collector_;
};

}  // namespace mproc::detail
