// mproc — rank 0's side of mproc::mpi::Pool: the engine behind the Pool front end.
//
//   user threads ──submit──▶ backlog ──dispatch──▶ seat r: window of tasks ══MPI══▶ worker rank r
//                                                                                    │
//   AsyncResult / imap ◀── deliver + callbacks ◀── MPI thread ◀══ result batches ════┘
//
// MpiEngine is to MPI ranks what ForkEngine is to forked workers, behind the same PoolEngine
// interface, so mpi::Pool *is* mproc::Pool with another engine: same calls, same AsyncResult,
// same callbacks, same exception transport, same ordering. Each pool has one thread of its own,
// the *MPI thread*: it alone calls MPI (so MPI_THREAD_SERIALIZED is enough), sends each seat a
// bounded window of tasks — as many as about 2 ms of work plus two round trips to that rank (so a
// worker on a slow link never waits for its next task), at least 2, at most 1024, and no more
// than 64 MiB — so a fast rank comes back for more sooner and takes more of the work, receives
// result batches, and runs callbacks, one at a time. Sends never block (MPI_Isend): the MPI thread
// is always ready to receive, so a worker sending a large result can never deadlock against it.
//
// Master holds what outlives one pool: the communicator, the object names workers know, sends
// still in flight, and the `cancelled` answers owed after a terminate. Worker ranks serve one pool
// at a time, so rank 0 runs one live mpi::Pool at a time.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/clock.hpp"
#include "../../detail/pool/engine.hpp"
#include "../../detail/pool/wire.hpp"
#include "../../detail/serialize/remote_exception.hpp"
#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "../errors.hpp"
#include "address.hpp"
#include "comm.hpp"
#include "heartbeat.hpp"

namespace mproc::mpi::detail {

using mproc::detail::Outcome;
using mproc::detail::Task;

class MpiEngine;

/// Where a rank runs.
struct RankPlace {
    pid_t pid = 0;
    std::string host;
    unsigned cpus = 1;  // in its affinity
};

/// Rank 0's state for the whole run.
class Master {
public:
    Master(MPI_Comm comm, int size)
        : comm_(comm), size_(size), places_(static_cast<std::size_t>(size)),
          modules_sent_(static_cast<std::size_t>(size), 0), owed_(static_cast<std::size_t>(size), 0),
          lost_(static_cast<std::size_t>(size)), inbox_(comm, to_master, size) {}
    Master(const Master&) = delete;
    Master& operator=(const Master&) = delete;
    ~Master() { heartbeat_.reset(); }  // its thread reports to this object: it stops first

    /// Starts the heartbeat's listener and thread (Init, before the setup goes to the workers).
    const HeartbeatHub& start_heartbeat(std::chrono::milliseconds timeout) {
        heartbeat_ = std::make_unique<HeartbeatHub>(
            timeout, size_, [this](int rank, std::string why) { mark_lost(rank, std::move(why)); });
        return *heartbeat_;
    }
    /// Why the heartbeat could not start, if it could not.
    std::string heartbeat_why_not() const { return heartbeat_ ? heartbeat_->why_not() : std::string(); }
    /// Where each rank runs, and which ranks have a heartbeat (Init, once every rank has said):
    /// the heartbeat stops accepting, and times each rank's silence from now.
    void set_places(std::vector<RankPlace> places, const std::vector<bool>& beating) {
        {
            std::lock_guard lock(active_mutex_);
            places_ = std::move(places);
        }
        if (heartbeat_) heartbeat_->settle(beating);
    }

    MPI_Comm comm() const noexcept { return comm_; }
    unsigned workers() const noexcept { return static_cast<unsigned>(size_ - 1); }
    RankPlace place_of(int rank) {
        std::lock_guard lock(active_mutex_);
        return places_.at(static_cast<std::size_t>(rank));
    }

    /// The heartbeat lost `rank` (on its thread): the live pool fails, no new one starts, and the
    /// program's end ends the job with MPI_Abort.
    void mark_lost(int rank, std::string why);
    /// How many ranks are lost (any thread, without a lock: the live pool looks at every turn).
    unsigned lost_count() const noexcept { return lost_count_.load(std::memory_order_acquire); }
    /// The first loss as a RankLost (`more` added to what the heartbeat saw), or null.
    std::exception_ptr first_lost(std::string_view more = {}) {
        std::lock_guard lock(active_mutex_);
        return first_lost_locked(more);
    }
    bool is_lost(int rank) {
        if (lost_count() == 0) return false;
        std::lock_guard lock(active_mutex_);
        return lost_.at(static_cast<std::size_t>(rank)).has_value();
    }

    /// Rewrites a task frame's addresses as portable ones (any thread).
    void make_portable(Buffer& frame) {
        std::lock_guard lock(names_mutex_);
        names_.make_portable(frame);
    }
    std::uint64_t portable(std::uintptr_t address) {
        std::lock_guard lock(names_mutex_);
        return names_.portable(address);
    }

    // ---- the MPI thread of the live pool (or finish()) only ----

    /// Sends `message` to `rank` without waiting; it is kept until MPI is done with it.
    void post_send(int rank, Buffer message) {
        if (message.size() > max_message)
            throw Error(fmt::format("mproc::mpi: a message of {} bytes exceeds MPI's limit", message.size()));
        if (is_lost(rank)) return;  // nothing reaches it any more (and nothing waits for it)
        send_modules(rank);
        Pending& p = pending_.emplace_back();
        p.rank = rank;
        p.bytes = std::move(message);
        check(MPI_Isend(p.bytes.data(), static_cast<int>(p.bytes.size()), MPI_BYTE, rank, to_worker, comm_, &p.request),
              "MPI_Isend");
    }
    /// Frees the sends MPI has finished. Returns whether any had.
    bool test_sends() {
        bool any = false;
        for (auto it = pending_.begin(); it != pending_.end();) {
            int done = 0;
            check(MPI_Test(&it->request, &done, MPI_STATUS_IGNORE), "MPI_Test");
            if (!done) {
                ++it;
                continue;
            }
            it = pending_.erase(it);
            any = true;
        }
        return any;
    }
    /// Tells `rank` to drop what it holds of `pool`; it answers `cancelled`.
    void cancel(int rank, std::uint64_t pool) {
        if (is_lost(rank)) return;
        Buffer m;
        begin_message(m, Kind::cancel, pool);
        post_send(rank, std::move(m));
        ++owed_[static_cast<std::size_t>(rank)];
    }
    /// Receives what the workers sent: messages of `pool` go to `handle`, the rest are settled
    /// here (late results of a cancelled pool are dropped). Returns whether anything came.
    template <class Handle> bool receive(std::uint64_t pool, Handle&& handle) {
        bool any = false;
        for (int n = 0; n < 64; ++n) {
            auto m = inbox_.next();
            if (!m) break;
            any = true;
            if (m->kind == Kind::cancelled) {
                auto& owed = owed_[static_cast<std::size_t>(m->source)];
                if (owed) --owed;
            } else if (m->pool == pool) {
                handle(*m);
            }
        }
        return any;
    }
    /// Whether a send or a receive is still under way: MPI moves a large message on only while it
    /// is called, so the MPI thread must not look away.
    bool moving() const noexcept { return !pending_.empty() || inbox_.receiving(); }
    /// Nothing is owed by, or in flight to, any rank not lost.
    bool settled() {
        for (const Pending& p : pending_)
            if (!is_lost(p.rank)) return false;
        for (int rank = 1; rank < size_; ++rank)
            if (owed_[static_cast<std::size_t>(rank)] != 0 && !is_lost(rank)) return false;
        return true;
    }

    /// Ends the run: the live pool (if any) is terminated, every answer still owed is awaited,
    /// then every worker is told to exit. Called once, on rank 0, before MPI_Finalize.
    void finish();

    // ---- the pool in use ----
    MpiEngine* acquire(MpiEngine* engine) {
        std::lock_guard lock(active_mutex_);
        if (finished_) throw Error("mproc::mpi: the program is ending (MPI is finalised): no new Pool");
        if (first_lost_ != 0)
            std::rethrow_exception(first_lost_locked("; MPI cannot go on without it, so no new pool starts"));
        if (active_)
            throw Error(
                "mproc::mpi: another mproc::mpi::Pool is running; close() and join() it, or terminate() it, "
                "first (the worker ranks serve one pool at a time)");
        active_ = engine;
        return engine;
    }
    void release(MpiEngine* engine) {
        std::lock_guard lock(active_mutex_);
        if (active_ == engine) active_ = nullptr;
    }
    std::uint64_t next_pool() noexcept { return next_pool_++; }

private:
    struct Pending {
        int rank = 0;
        MPI_Request request = MPI_REQUEST_NULL;
        Buffer bytes;
    };

    /// Sends `rank` the object names it has not had yet: before any task that may name them.
    void send_modules(int rank) {
        std::size_t& sent = modules_sent_[static_cast<std::size_t>(rank)];
        Buffer m;
        {
            std::lock_guard lock(names_mutex_);
            const auto& names = names_.modules();
            if (sent == names.size()) return;
            begin_message(m, Kind::modules, 0);
            Writer w(m);
            w(static_cast<std::uint32_t>(sent),
              std::vector<ModuleName>(names.begin() + static_cast<std::ptrdiff_t>(sent), names.end()));
            sent = names.size();
        }
        Pending& p = pending_.emplace_back();
        p.rank = rank;
        p.bytes = std::move(m);
        check(MPI_Isend(p.bytes.data(), static_cast<int>(p.bytes.size()), MPI_BYTE, rank, to_worker, comm_, &p.request),
              "MPI_Isend");
    }

    std::exception_ptr first_lost_locked(std::string_view more) const {
        if (first_lost_ == 0) return nullptr;
        const RankPlace& p = places_.at(static_cast<std::size_t>(first_lost_));
        return std::make_exception_ptr(RankLost(first_lost_, p.host.empty() ? "?" : p.host, p.pid,
                                                *lost_.at(static_cast<std::size_t>(first_lost_)) + std::string(more)));
    }

    MPI_Comm comm_;
    int size_;
    std::vector<RankPlace> places_;  // by rank (active_mutex_)
    std::mutex names_mutex_;
    CodeNames names_;
    std::vector<std::size_t> modules_sent_;
    std::vector<unsigned> owed_;
    std::list<Pending> pending_;
    std::mutex active_mutex_;  // also guards places_ and the losses
    MpiEngine* active_ = nullptr;
    std::vector<std::optional<std::string>> lost_;  // by rank: what the heartbeat saw
    int first_lost_ = 0;  // 0: none
    std::atomic<unsigned> lost_count_{0};
    Inbox inbox_;
    std::unique_ptr<HeartbeatHub> heartbeat_;
    bool finished_ = false;
    std::uint64_t next_pool_ = 1;
};

class MpiEngine final : public mproc::detail::PoolEngine {
public:
    MpiEngine(Master& master, unsigned processes, std::uint64_t initializer, LocalPoolSpec spec)
        : master_(master), pool_(master.next_pool()), initializer_(initializer), spec_(spec) {
        seats_ = std::vector<Seat>(processes);  // built in place: a Seat does not move
        for (unsigned i = 0; i < processes; ++i) {
            Seat& seat = seats_[i];
            seat.rank = static_cast<int>(i) + 1;
            // What the rank will say in its hello: its local workers, or 1 with in_rank.
            seat.capacity = spec_.in_rank ? 1 : spec_.processes ? spec_.processes : master_.place_of(seat.rank).cpus;
            capacity_ += seat.capacity;
        }
        make_ready_errors();
        master_.acquire(this);
        std::lock_guard lock(mutex_);  // the thread starts by taking it: it sees thread_
        try {
            thread_ = std::thread([this] {
                mark_own_thread();
                run();
                if (retired_) finish_retired();
            });
        } catch (...) {
            master_.release(this);  // no destructor runs: the Master must not point here
            throw;
        }
    }
    MpiEngine(const MpiEngine&) = delete;
    MpiEngine& operator=(const MpiEngine&) = delete;
    ~MpiEngine() override {
        detach_link();
        if (retired_) return;  // finish_retired() did the teardown, on the pool's thread
        try {
            terminate();
        } catch (...) {}
    }

    /// The processes that run tasks: every rank's local workers (what chunking sizes itself by).
    unsigned processes() const noexcept override { return capacity_; }
    /// The ranks serving the pool.
    unsigned ranks() const noexcept { return static_cast<unsigned>(seats_.size()); }
    // ---- the engine's hooks (mproc/detail/pool/engine.hpp) ----

    /// Everything that can fail is checked before any task is taken: a submit takes all of its
    /// tasks or none (a call handed over in parts is withdrawn if a later part fails, feed.hpp).
    void prepare(std::span<Task> tasks, Part part) override {
        for (Task& t : tasks) {
            if (t.frame.size() + message_header + tasks_stamp_bytes + task_note_bytes > max_message)
                throw Error(
                    fmt::format("mproc::mpi: a task of {} bytes is larger than one MPI message carries ({} "
                                "bytes)",
                                t.frame.size(), max_message));
        }
        {
            std::lock_guard lock(mutex_);
            check_taking_locked(part);
        }
        for (Task& t : tasks) master_.make_portable(t.frame);
    }
    void backlog_grew_locked() noexcept override {
        submitted_ = true;
        wake_.notify_one();
    }
    void wake() noexcept override { wake_.notify_all(); }
    // The thread ends as soon as it is told (the ranks stay: they serve the next pool), so a
    // deadline is not needed here.
    bool finish_join(const mproc::detail::Deadline&) override {
        stop_thread();
        return true;
    }
    void finish_terminate(std::vector<Task>& doomed) override {
        stop_thread();  // the thread stops before the failures are delivered: callbacks never overlap
        {
            const OwnThreadScope callbacks(*this);  // a callback here that waits for a result fails, as on the thread
            run_all_posted();
            const std::exception_ptr error = error_or_ready_made("the pool was terminated before this task finished");
            fail_tasks(doomed, error);
            fail_held_tasks(error);  // those left where they were (see take_doomed_locked)
        }
        idle_.notify_all();
        if (retired_) delete this;  // destroyed by a callback run above (its thread is stopped)
    }

    std::size_t placed_count_locked() const noexcept override { return inflight_count(std::span<const Seat>(seats_)); }
    /// A cancelled call's tasks are all on the ranks (the backlog's are dropped already): each rank
    /// holding some is told, by the MPI thread, to stop them — those queued there are not run, and
    /// a running one's local worker is ended. Every task still answers, so the windows stay right;
    /// the call being cancelled, what they answer is ignored.
    void cancel_placed_locked(const mproc::detail::ResultSink& sink, std::vector<Task>&) override {
        call_cancels_.reserve(call_cancels_.size() + seats_.size());
        for (const Seat& s : seats_)
            if (std::any_of(s.inflight.begin(), s.inflight.end(), [&](const Task& t) { return t.sink.get() == &sink; }))
                call_cancels_.push_back(CallCancel{s.rank, sink.call});
        if (!call_cancels_.empty()) wake_.notify_all();
    }

    std::vector<pid_t> worker_pids() override {
        check_owner();
        std::vector<pid_t> pids;
        for (const Seat& s : seats_) pids.push_back(master_.place_of(s.rank).pid);
        return pids;
    }

private:
    struct Seat {
        int rank = 0;
        unsigned capacity = 1;  // tasks the rank runs at once (its local workers; its hello says)
        double rtt_ns = 0;  // the round trip to this rank, smoothed (0: not measured yet)
        std::deque<Task> inflight;
        std::deque<std::size_t> sizes;  // of each task in flight (its frame is gone once sent)
        std::size_t bytes = 0;  // their sum
    };
    struct Outgoing {
        int rank;
        Buffer message;
        bool tasks = false;  // a tasks message: stamped with its send time as it goes out
    };
    struct CallCancel {
        int rank;
        std::uint64_t call;
    };

    static constexpr std::size_t max_window = 1024;
    static constexpr std::size_t max_window_bytes = std::size_t{64} << 20;
    static constexpr std::size_t batch_bytes = std::size_t{4} << 20;
    static constexpr std::size_t no_batch = SIZE_MAX;

    /// Tasks a seat may hold: for each task the rank runs at once, about 2 ms of work plus two of
    /// its round trips (a result's way back and the next tasks' way there), from the measured
    /// task time; 2 per task at once to 1024; 4 per task at once at first.
    std::size_t window_locked(const Seat& seat) const noexcept {
        const double at_once = seat.capacity;
        const double most = max_window;
        if (avg_task_ns_ <= 0) return static_cast<std::size_t>(std::min(4.0 * at_once, most));
        const double cover_ns = 2'000'000.0 + 2.0 * seat.rtt_ns;
        return static_cast<std::size_t>(
            std::clamp(cover_ns / avg_task_ns_ * at_once, std::min(2.0 * at_once, most), most));
    }

    /// How long the MPI thread may look away while every rank has work (look_away_for): an eighth
    /// of what the least-loaded rank holds (its tasks in flight over its workers, at the measured
    /// task time), so a result that waits that long is covered eight times over; never while a
    /// send or receive is under way. With 200 µs tasks over TCP: rank 0's MPI thread 40 % → 4 %
    /// of a core, and on shared cores the workers' busy share 0.84 → 0.89–0.95.
    std::chrono::microseconds slack_locked() const noexcept {
        if (master_.moving()) return std::chrono::microseconds{0};
        double least = -1;
        for (const Seat& s : seats_) {
            if (s.inflight.empty()) continue;
            const double held = static_cast<double>(s.inflight.size()) * avg_task_ns_ / s.capacity;
            if (least < 0 || held < least) least = held;
        }
        return look_away_for(avg_task_ns_, least, 1.0 / 8);
    }

    /// Gives each seat what its window has room for, as batches to send.
    void dispatch_locked(std::vector<Outgoing>& out) {
        submitted_ = false;
        if (state_ == State::terminated || state_ == State::broken) return;
        std::vector<std::size_t> batch(seats_.size(), no_batch);  // each seat's open batch in `out`
        const auto has_room = [&](const Seat& s) {
            return s.inflight.empty() || (s.inflight.size() < window_locked(s) && s.bytes < max_window_bytes);
        };
        // What can throw (no memory) comes first; the task moves to its seat last, so a throw
        // leaves it in the backlog (dispatch_backlog_locked) and its batch as it was. The throw
        // ends the MPI thread's loop before anything in `out` is sent, and breaks the pool.
        dispatch_backlog_locked(std::span<Seat>(seats_), has_room, [&](Seat& seat, Task& task) {
            const auto best = static_cast<std::size_t>(&seat - seats_.data());
            const std::size_t size = task.frame.size();
            if (batch[best] != no_batch && out[batch[best]].message.size() + task_note_bytes + size > batch_bytes)
                batch[best] = no_batch;
            if (batch[best] == no_batch) {
                Buffer message;
                begin_message(message, Kind::tasks, pool_);
                message.extend(tasks_stamp_bytes);  // sent_ns, stamped as it goes out
                out.push_back(Outgoing{seat.rank, std::move(message), true});
                batch[best] = out.size() - 1;
            }
            Buffer& message = out[batch[best]].message;
            const std::size_t before = message.size();
            TaskNote note;
            note.first = task.first;
            if (task.sink && task.sink->max_retries) note.max_retries = *task.sink->max_retries;
            try {
                append_task_note(message, note);
                message.append(task.frame.data(), size);
                seat.sizes.push_back(size);
                try {
                    seat.inflight.push_back(std::move(task));
                } catch (...) {
                    seat.sizes.pop_back();
                    throw;
                }
            } catch (...) {
                message.resize(before);
                throw;
            }
            seat.bytes += size;
            seat.inflight.back().frame = Buffer{};  // sent: a task is never sent twice
        });
    }

    // ---- the MPI thread ----

    void run() {
        { std::lock_guard lock(mutex_); }
        Backoff::tighten_timer_slack();
        try {
            open_pool();
            loop();
        } catch (...) {
            // MPI itself failed, or memory ran out: every task fails, and the workers are told to
            // drop this pool's tasks if MPI still reaches them.
            fail_from_thread("mproc::mpi: the pool's MPI thread failed: ");
            bool cancel = false;
            {
                std::lock_guard lock(mutex_);
                cancel = !std::exchange(cancelled_, true);
            }
            if (cancel) {
                for (const Seat& s : seats_) {
                    try {
                        master_.cancel(s.rank, pool_);
                    } catch (...) {}
                }
            }
        }
        // From here on a cancel settles its call itself; the jobs posted before run here.
        {
            std::lock_guard lock(mutex_);
            thread_closing_ = true;
        }
        run_all_posted();
    }
    bool thread_running_locked() const noexcept override { return !thread_closing_; }

    void open_pool() {
        for (const Seat& s : seats_) {
            Buffer m;
            begin_message(m, Kind::open, pool_);
            Writer w(m);
            w(initializer_, spec_);
            master_.post_send(s.rank, std::move(m));
        }
    }

    void loop() {
        Backoff backoff;
        std::vector<Outgoing> out;
        unsigned lost_seen = 0;
        for (;;) {
            bool progressed = false;
            if (const unsigned lost = master_.lost_count(); lost != lost_seen) {
                // A rank is lost: MPI cannot go on without it, so nothing of this pool can finish.
                lost_seen = lost;
                break_pool(master_.first_lost(), "");
            }
            {
                std::lock_guard lock(mutex_);
                if (state_ == State::terminated) break;
                if (state_ == State::draining && outstanding_ == 0) break;
                // A cancel goes after the tasks it is about (MPI keeps a pair's messages in order).
                for (const CallCancel& c : call_cancels_) {
                    out.push_back(Outgoing{c.rank, Buffer{}});
                    begin_message(out.back().message, Kind::cancel_call, pool_);
                    out.back().message.append(&c.call, sizeof c.call);
                }
                call_cancels_.clear();
                dispatch_locked(out);
            }
            for (Outgoing& o : out) {
                if (o.tasks) {
                    const std::int64_t now = mproc::detail::monotonic_ns();
                    std::memcpy(o.message.data() + message_header, &now, sizeof now);
                }
                master_.post_send(o.rank, std::move(o.message));
            }
            progressed |= !out.empty();
            out.clear();
            progressed |= run_posted();
            progressed |= master_.receive(pool_, [&](Message& m) { handle(m); });
            progressed |= master_.test_sends();
            if (progressed) {
                backoff.reset();
                continue;
            }
            std::unique_lock lock(mutex_);
            const auto woken = [&] {
                return state_ == State::terminated || (state_ == State::draining && outstanding_ == 0) ||
                       !posted_.empty() || !call_cancels_.empty() || (submitted_ && state_ != State::broken) ||
                       master_.lost_count() != lost_seen;
            };
            // Nothing can arrive: sleep (a lost rank's wake-up comes without this mutex, so the
            // predicate is looked at again each second).
            if (outstanding_ == 0 && master_.settled()) wake_.wait_for(lock, std::chrono::seconds(1), woken);
            else wake_.wait_for(lock, std::max(backoff.next(), slack_locked()), woken);
        }
        // Terminated or broken: the workers drop what they still hold of this pool.
        std::vector<int> to_cancel;
        {
            std::lock_guard lock(mutex_);
            if (state_ == State::terminated && !cancelled_)
                for (const Seat& s : seats_) to_cancel.push_back(s.rank);
            cancelled_ = true;
        }
        for (int rank : to_cancel) master_.cancel(rank, pool_);
    }

    /// A message of this pool from a worker (on the MPI thread).
    void handle(Message& m) {
        Seat* seat = nullptr;
        for (Seat& s : seats_)
            if (s.rank == m.source) seat = &s;
        if (!seat) return;
        if (m.kind == Kind::hello) {
            Reader in(m.payload());
            const auto why = mproc::detail::read_hello_outcome(in);
            std::uint32_t capacity = 1;
            in(capacity);
            {
                std::lock_guard lock(mutex_);
                seat->capacity = std::max<std::uint32_t>(capacity, 1);
            }
            if (why) {
                const bool local_pool = why->message.find("local pool could not start") != std::string::npos;
                break_pool(nullptr,
                           fmt::format("{} on rank {}: {}: {}",
                                       local_pool ? "the pool could not start" : "the pool's initializer failed",
                                       m.source, why->type_name, why->message));
            }
            return;
        }
        if (m.kind != Kind::results) return;
        const std::span<const std::byte> payload = m.payload();
        if (payload.size() < results_stamp_bytes) throw SerializationError("mproc::mpi: a results message too short");
        struct Finished {
            Finished(Task& t, std::span<const std::byte> b) noexcept : task(std::move(t)), body(b) {}
            Task task;
            std::span<const std::byte> body;
        };
        std::vector<Finished> finished;
        {
            // What can throw comes first — a torn frame, no memory for the list — so that a task
            // leaves its seat only for a list with room for it: nothing is lost on the way.
            std::size_t frames_in_message = 0;
            for (FrameCursor frames(payload.subspan(results_stamp_bytes)); auto body = frames.next();) {
                (void)mproc::detail::result_id(*body);
                ++frames_in_message;
            }
            finished.reserve(frames_in_message);
        }
        {
            std::lock_guard lock(mutex_);
            if (const std::int64_t echo = stamp_at(payload, 0); echo != 0) {
                // The round trip: from sending a tasks message to this answer, less the time the
                // worker held that message (its tasks waiting their turn, and running).
                const auto sample = static_cast<double>(mproc::detail::monotonic_ns() - echo -
                                                        stamp_at(payload, sizeof echo));
                if (sample > 0) seat->rtt_ns = seat->rtt_ns <= 0 ? sample : 0.875 * seat->rtt_ns + 0.125 * sample;
            }
            FrameCursor frames(payload.subspan(results_stamp_bytes));
            while (auto body = frames.next()) {
                const std::uint64_t id = mproc::detail::result_id(*body);
                // In any order (a rank's local workers finish tasks out of order); after a break
                // the seat holds nothing: late results are dropped here.
                const auto it = std::find_if(seat->inflight.begin(), seat->inflight.end(),
                                             [id](const Task& t) { return t.id == id; });
                if (it == seat->inflight.end()) continue;
                const auto at = it - seat->inflight.begin();
                finished.emplace_back(*it, *body);  // room reserved: nothing here throws any more
                seat->bytes -= seat->sizes[static_cast<std::size_t>(at)];
                seat->sizes.erase(seat->sizes.begin() + at);
                seat->inflight.erase(it);
                const auto per_task = static_cast<double>(mproc::detail::result_frame::spent_ns::get(*body));
                avg_task_ns_ = avg_task_ns_ <= 0 ? per_task : 0.9 * avg_task_ns_ + 0.1 * per_task;
            }
        }
        for (Finished& f : finished) deliver(f.task, f.body);
        const std::size_t n = finished.size();
        finished.clear();  // the tasks (and their sinks) go before the lock is taken
        finish_tasks(n);
    }

    /// The pool cannot go on: every pending task fails with `error` (null: an mproc::Error saying
    /// `reason`), and every later call with an mproc::Error saying `reason`.
    void break_pool(std::exception_ptr error, std::string reason) {
        if (error && reason.empty()) {
            try {
                std::rethrow_exception(error);
            } catch (const std::exception& e) {
                reason = e.what();
            }
        }
        HeldTasks doomed(*this);
        std::vector<int> to_cancel;
        {
            std::lock_guard lock(mutex_);
            // Only a pool still taking or running tasks breaks: a second rank's failed initializer
            // after join() began must not turn `draining` back into `broken` (the thread would
            // then wait for a join that already waits for it).
            // A lost rank (`error` set) fails the tasks of a draining pool too: join() waits for
            // them, and they can never finish; the state stays draining, so join() then returns.
            if (state_ == State::draining && error) {
                doomed.tasks = take_all_tasks_locked();
            } else {
                if (state_ != State::open && state_ != State::closed) return;
                state_ = State::broken;
                broken_reason_ = std::move(reason);
                broken_error_ = error;  // later calls throw what the pending tasks failed with
                doomed.tasks = take_all_tasks_locked();
            }
            if (!cancelled_)
                for (const Seat& s : seats_) to_cancel.push_back(s.rank);
            cancelled_ = true;
        }
        try {
            for (int rank : to_cancel) master_.cancel(rank, pool_);
        } catch (...) {}
        doomed.fail(error ? error : std::make_exception_ptr(Error(broken_reason_)));
    }

    std::vector<Task> take_all_tasks_locked() override {
        std::vector<Task> all;
        all.reserve(backlog_.size() + placed_count_locked());  // the moves below cannot throw
        for (Seat& s : seats_) {
            for (Task& t : s.inflight) all.push_back(std::move(t));
            s.inflight.clear();
            s.sizes.clear();
            s.bytes = 0;
        }
        for (Task& t : backlog_) all.push_back(std::move(t));
        backlog_.clear();
        return all;
    }

    bool take_one_task_locked(Task& out) noexcept override {
        for (Seat& s : seats_) {
            if (s.inflight.empty()) continue;
            out = std::move(s.inflight.front());
            s.inflight.pop_front();
            s.bytes -= std::min(s.bytes, s.sizes.front());
            s.sizes.pop_front();
            return true;
        }
        if (backlog_.empty()) return false;
        out = std::move(backlog_.front());
        backlog_.pop_front();
        return true;
    }

    /// One thread at a time (join() and terminate() may race from two threads).
    void stop_thread() {
        std::lock_guard lock(stop_mutex_);
        if (thread_.joinable()) thread_.join();
        master_.release(this);
    }

    void finish_retired() noexcept {
        run_all_posted();
        const std::exception_ptr error = error_or_ready_made("the pool was destroyed before this task finished");
        fail_tasks(retired_doomed_, error);
        fail_held_tasks(error);  // those left where they were (see take_doomed_locked)
        master_.release(this);
        thread_.detach();
        delete this;
    }

    bool thread_closing_ = false;  // the thread takes no more posted jobs (mutex_)
    Master& master_;
    std::uint64_t pool_;
    std::uint64_t initializer_;
    LocalPoolSpec spec_;
    std::vector<Seat> seats_;
    unsigned capacity_ = 0;  // the seats' capacities, as expected at the start

    std::condition_variable wake_;  // the MPI thread waits here
    std::vector<CallCancel> call_cancels_;  // to send, after the tasks already sent (mutex_)
    // Tasks came since the thread last dispatched (mutex_). Not "the backlog is not empty": with
    // every window full the backlog waits for results, and the thread must sleep meanwhile.
    bool submitted_ = false;
    bool cancelled_ = false;
    double avg_task_ns_ = 0;

    std::mutex stop_mutex_;
    std::thread thread_;
};

inline void Master::mark_lost(int rank, std::string why) {
    std::lock_guard lock(active_mutex_);
    auto& slot = lost_.at(static_cast<std::size_t>(rank));
    if (slot) return;
    slot = std::move(why);
    if (first_lost_ == 0) first_lost_ = rank;
    lost_count_.fetch_add(1, std::memory_order_release);
    if (active_) active_->wake();
}

inline void Master::finish() {
    MpiEngine* live = nullptr;
    {
        std::lock_guard lock(active_mutex_);
        if (finished_) return;
        finished_ = true;
        live = active_;
    }
    if (live) live->terminate();
    // MPI cannot end normally with a rank gone (MPI_Finalize would wait for it): the caller aborts,
    // at once — not after the tasks still running on the other ranks.
    const char* const cannot_end = "; MPI cannot end the job normally without it";
    Backoff backoff;
    while (!settled()) {
        if (const auto lost = first_lost(cannot_end)) std::rethrow_exception(lost);
        const bool got = receive(0, [](Message&) {});
        if (test_sends() || got) backoff.reset();
        else backoff.pause();
    }
    if (heartbeat_) heartbeat_->stop();  // no loss is reported after the look below
    if (const auto lost = first_lost(cannot_end)) std::rethrow_exception(lost);
    if (heartbeat_) heartbeat_->goodbye();  // the workers stop watching before they are let go
    for (int rank = 1; rank < size_; ++rank) {
        Buffer m;
        begin_message(m, Kind::exit, 0);
        send(comm_, rank, to_worker, m);
    }
}

}  // namespace mproc::mpi::detail
