// mproc — what a worker rank does: serve the pools of rank 0 until the program ends.
//
// A worker keeps the task batches rank 0 sent it and hands their tasks, as they are, to a local
// Pool engine of its own — forked worker processes on this host (LocalPoolSpec, comm.hpp), made
// when rank 0 opens a pool, after the pool's initializer ran in the rank, so they inherit what it
// set up. A task that crashes its process fails alone, with WorkerLost, and the local pool's
// max_tasks_per_child, task_timeout, memory limits and retries apply. Each result frame comes back
// through a RelaySink on the local pool's thread, under the task's own id, to a queue the rank
// drains. With `in_rank`, the rank runs the tasks itself, one after another, through the local
// Pool's run_task (the same invokers, the same result frames). Either way the results go back in
// batches: when nothing else is queued, or every 100 µs of work, so rank 0 can refill its window
// while the rank works. Between two looks it reads new messages without waiting; with nothing to
// do it waits with a Backoff (comm.hpp), never in a blocking MPI call.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/clock.hpp"
#include "../../detail/os/cpu.hpp"
#include "../../detail/os/framing.hpp"
#include "../../detail/os/io.hpp"
#include "../../detail/pool/engine.hpp"
#include "../../detail/pool/fork_engine.hpp"
#include "../../detail/pool/wire.hpp"
#include "../../detail/pool/worker.hpp"
#include "../../detail/serialize/remote_exception.hpp"
#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "address.hpp"
#include "comm.hpp"

namespace mproc::mpi::detail {

using mproc::detail::Outcome;
using mproc::detail::RemoteException;

/// Result frames the local pool has finished, for the rank's thread to send (any thread).
struct RelayQueue {
    std::mutex mutex;
    std::condition_variable arrived;  // the rank's thread waits here while local tasks run
    std::deque<Buffer> frames;
    std::atomic<std::int64_t> last_done_ns{0};
    std::atomic<std::int64_t> task_ns{0};  // a task's run time, smoothed (the local pool's thread writes)
    std::atomic<std::uint64_t> aborts{0};  // RelaySink::abort calls: the rank's thread answers for them
    unsigned processes = 1;

    void push(Buffer frame) {
        {
            std::lock_guard lock(mutex);
            frames.push_back(std::move(frame));
        }
        arrived.notify_one();
    }
    /// Waits up to `most` for a frame (the rank's thread, with tasks in the local pool: rank 0's
    /// messages are still looked for at least that often).
    void wait(std::chrono::microseconds most) {
        std::unique_lock lock(mutex);
        arrived.wait_for(lock, most, [&] { return !frames.empty() || aborts.load() != aborts_seen; });
    }
    std::uint64_t aborts_seen = 0;  // the rank's thread's
};

/// The sink of one task relayed to the local pool: it gathers the task's item outcomes as they
/// come (in one piece, usually) and queues the result frame rank 0 expects, under the task's id
/// from rank 0. Runs on the local pool's thread.
class RelaySink final : public mproc::detail::ResultSink {
public:
    /// `skips`: items rank 0 failed before (a skipped outcome goes back for each).
    /// `first`: the index of the task's first item in its call on rank 0 (for messages).
    RelaySink(std::uint64_t id, std::uint64_t first, std::uint32_t count, std::span<const std::uint32_t> skips,
              const std::string& where, RelayQueue& queue)
        : id_(id), first_(first), count_(count), where_(where), queue_(queue), slots_(count),
          submitted_ns_(mproc::detail::monotonic_ns()) {
        for (std::uint32_t i : skips)
            if (i < count) fill(i, Outcome::skipped, {});
    }

    void deliver(std::size_t first, std::span<const mproc::detail::OutcomeRecord> outcomes,
                 std::span<const std::uint32_t> skips) override {
        if (aborted_.load(std::memory_order_relaxed)) return;  // the rank's thread answers for it
        if (first == 0 && filled_ == 0 && outcomes.size() == count_ && skips.empty()) {
            send_whole(outcomes);  // the usual case: the whole task at once, straight into the frame
            return;
        }
        // One outcome per item; those in `skips` failed before (fail()) and are already filled.
        for (std::size_t i = 0; i < outcomes.size() && first + i < slots_.size(); ++i)
            if (!std::binary_search(skips.begin(), skips.end(), static_cast<std::uint32_t>(i)))
                fill(first + i, outcomes[i].outcome, outcomes[i].bytes);
        finish_if_done();
    }
    void deliver_packed(std::size_t first, std::span<const std::byte> values, std::uint32_t count) override {
        if (aborted_.load(std::memory_order_relaxed)) return;
        if (first == 0 && count == count_ && filled_ == 0) {
            fill_all_packed(values);
            return;
        }
        ResultSink::deliver_packed(first, values, count);
    }
    /// Rank 0 cancelled the task's call (see WorkerRank::cancel_call): first every task of the
    /// call is marked, then the local pool is asked to stop each.
    void mark() noexcept { mark_cancelled(); }
    /// The task's id on rank 0.
    std::uint64_t id() const noexcept { return id_; }
    void cancel() { stop_tasks(); }

    /// The local pool names the task by its own id, which means nothing on rank 0: every message
    /// it builds (worker lost, task_timeout, memory_limit, stall_timeout) names the task as rank 0
    /// knows it, and where it ran.
    std::string task_name(std::uint64_t, std::size_t first, std::uint32_t, std::uint32_t item) const override {
        return plain_task_name(id_, first_ + first, count_, item) + " on " + where_;
    }

    /// The local pool can no longer answer for this task (its thread failed; memory ran out): it
    /// is left to the rank's thread, which answers for it (answer_aborted) — an answer needs
    /// memory, and this must need none. From here on the local pool's deliveries are ignored: the
    /// thread that aborts is the one that delivers, so that is decided without a race.
    void abort(std::size_t, std::uint32_t, const std::exception_ptr& error) noexcept override {
        if (aborted_.load(std::memory_order_relaxed) || queued_) return;
        abort_error_ = error;
        aborted_.store(true, std::memory_order_release);
        queue_.aborts.fetch_add(1);
        { std::lock_guard lock(queue_.mutex); }  // a waiting rank thread is in wait() or sees it
        queue_.arrived.notify_one();
    }
    /// On the rank's thread, after abort(): every item without an outcome fails with the abort's
    /// error, and the task's result frame goes to rank 0 as any other. True when it was aborted.
    bool answer_aborted() {
        if (!aborted_.load(std::memory_order_acquire) || queued_) return false;
        for (std::size_t i = 0; i < slots_.size(); ++i)
            if (!slots_[i].set) fail_slot(i, abort_error_);
        finish_if_done();
        return true;
    }

    void fail(std::size_t index, std::exception_ptr error) override {
        if (aborted_.load(std::memory_order_relaxed)) return;
        fail_slot(index, std::move(error));
        finish_if_done();
    }

private:
    struct Slot {
        bool set = false;
        Outcome outcome = Outcome::skipped;
        std::vector<std::byte> bytes;
    };

    void fail_slot(std::size_t index, std::exception_ptr error) {
        if (index >= slots_.size()) return;
        RemoteException why;
        try {
            std::rethrow_exception(error);
        } catch (...) {
            why = RemoteException::capture();
        }
        Buffer bytes;
        Writer w(bytes);
        w(why);
        fill(index, Outcome::exception, bytes.bytes());
    }
    /// A slot is filled only once its bytes are: a throw (no memory) leaves it to be filled again.
    void fill(std::size_t i, Outcome outcome, std::span<const std::byte> bytes) {
        Slot& s = slots_[i];
        if (s.set) return;
        s.bytes.assign(bytes.begin(), bytes.end());
        s.outcome = outcome;
        s.set = true;
        ++filled_;
    }
    // The whole task at once (filled_ stays 0: a send that fails leaves every slot to answer_aborted).
    void fill_all_packed(std::span<const std::byte> values) {
        Buffer frame;
        Writer out = mproc::detail::begin_result_frame(frame, id_);
        mproc::detail::write_outcome_record(out, Outcome::packed, values);
        send(std::move(frame));
    }
    void send_whole(std::span<const mproc::detail::OutcomeRecord> outcomes) {
        Buffer frame;
        Writer out = mproc::detail::begin_result_frame(frame, id_);
        for (const auto& o : outcomes) mproc::detail::write_outcome_record(out, o.outcome, o.bytes);
        send(std::move(frame));
    }
    void finish_if_done() {
        if (filled_ != count_ || queued_) return;
        Buffer frame;
        Writer out = mproc::detail::begin_result_frame(frame, id_);
        for (const Slot& s : slots_) mproc::detail::write_outcome_record(out, s.outcome, s.bytes);
        send(std::move(frame));
    }
    /// Queues the frame, with an estimate of the task's own run time: from its submission, or,
    /// while the local workers are all busy, from the last task done before it times their number.
    void send(Buffer frame) {
        try {
            check_result_fits(frame.size());
        } catch (...) {  // more than one MPI message carries: the task's items fail, as in_rank
            mproc::detail::fail_every_item(frame, count_, RemoteException::capture());
        }
        const std::int64_t now = mproc::detail::monotonic_ns();
        const std::int64_t last = queue_.last_done_ns.exchange(now, std::memory_order_relaxed);
        std::int64_t spent = now - submitted_ns_;
        if (last > submitted_ns_) spent = std::min(spent, (now - last) * static_cast<std::int64_t>(queue_.processes));
        const std::int64_t smoothed = queue_.task_ns.load(std::memory_order_relaxed);
        queue_.task_ns.store(smoothed == 0 ? spent : smoothed - smoothed / 8 + spent / 8, std::memory_order_relaxed);
        mproc::detail::finish_result_frame(frame, spent);
        queue_.push(std::move(frame));
        queued_ = true;  // only now: a frame that did not reach the queue is answered again
    }

    std::uint64_t id_;  // rank 0's
    std::uint64_t first_;
    std::uint32_t count_;
    const std::string& where_;  // the WorkerRank's: it outlives its local pool and the sinks
    RelayQueue& queue_;
    std::vector<Slot> slots_;
    std::uint32_t filled_ = 0;
    bool queued_ = false;  // the task's result frame is in the queue
    std::atomic<bool> aborted_{false};  // abort(): the rank's thread answers (abort_error_ set before)
    std::exception_ptr abort_error_;
    std::int64_t submitted_ns_;
};

class WorkerRank {
public:
    WorkerRank(MPI_Comm comm, int rank, std::string host)
        : comm_(comm), rank_(rank), where_(fmt::format("rank {} (host {})", rank, host)), resolver_(rank) {}
    ~WorkerRank() { end_local_pool(/*terminate=*/true); }
    WorkerRank(const WorkerRank&) = delete;
    WorkerRank& operator=(const WorkerRank&) = delete;

    /// Serves until rank 0 says the program is over.
    void serve() {
        Backoff::tighten_timer_slack();
        Backoff backoff;
        for (;;) {
            bool busy = false;
            while (auto m = try_receive(comm_, 0, to_worker)) {
                busy = true;
                if (!handle(std::move(*m))) {
                    end_local_pool(/*terminate=*/false);
                    flush();
                    return;
                }
            }
            if (local_) {
                busy |= relay_tasks();
                busy |= collect_relayed();
            } else if (auto task = next_task()) {
                run(task->body);
                busy = true;
            }
            if (!results_.empty() && (batches_.empty() || mproc::detail::Clock::now() - first_result_ > flush_every ||
                                      results_.size() > flush_bytes))
                flush();
            if (busy) {
                backoff.reset();
            } else if (!relayed_tasks_.empty()) {
                // Local tasks are running: a result wakes this thread at once; rank 0's messages
                // are looked for at the backoff's pace, as when idle, or less often while the
                // local pool holds plenty of work (relay_slack).
                auto most = backoff.next();
                most = std::max(most, relay_slack());
                if (most.count() == 0) ::sched_yield();
                else relay_.wait(most);
            } else {
                backoff.pause();
            }
        }
    }

private:
    static constexpr std::chrono::microseconds flush_every{100};
    static constexpr std::size_t flush_bytes = 1 << 20;

    struct Batch {
        Message message;
        TaskCursor cursor;
    };

    /// Returns false on `exit`.
    bool handle(Message m) {
        switch (m.kind) {
            case Kind::modules: {
                Reader in(m.payload());
                std::uint32_t first = 0;
                std::vector<ModuleName> names;
                in(first, names);
                resolver_.add_modules(first, std::move(names));
                return true;
            }
            case Kind::open: {
                end_local_pool(/*terminate=*/true);  // the last pool's (its tasks are done or cancelled)
                batches_.clear();
                results_.clear();
                for (auto& slot : status_.cancelled) slot.store(0, std::memory_order_relaxed);  // call ids are per pool
                pool_ = m.pool;
                Reader in(m.payload());
                std::uint64_t initializer = 0;
                LocalPoolSpec spec;
                in(initializer, spec);
                Buffer hello;
                begin_message(hello, Kind::hello, pool_);
                Writer w(hello);
                std::uint32_t capacity = 1;
                try {
                    // In the rank itself, before the local workers are forked: they inherit
                    // what it set up (globals, libraries it loaded), and the rank can name code
                    // in the libraries it loaded.
                    if (initializer != 0)
                        reinterpret_cast<void (*)()>(resolver_.resolve(initializer, CodeResolver::Use::code))();
                    if (!spec.in_rank) {
                        try {
                            capacity = start_local_pool(spec);
                        } catch (const std::exception& e) {
                            throw Error(fmt::format("rank {}'s local pool could not start: {}", rank_, e.what()));
                        }
                    }
                    mproc::detail::write_void_outcome(w);
                    refused_ = false;
                } catch (...) {
                    mproc::detail::write_exception_outcome(w, RemoteException::capture());
                    refused_ = true;  // rank 0 breaks the pool; what it sent meanwhile is dropped
                }
                w(capacity);
                send(comm_, 0, to_master, hello);
                return true;
            }
            case Kind::tasks: {
                const auto payload = m.payload();
                if (payload.size() < tasks_stamp_bytes)
                    throw SerializationError("mproc::mpi: a tasks message too short");
                // The newest batch's stamp goes back with the next results (see comm.hpp).
                echo_ns_ = stamp_at(payload, 0);
                echo_arrived_ns_ = mproc::detail::monotonic_ns();
                if (m.pool == pool_ && !refused_)
                    batches_.push_back(Batch{std::move(m), TaskCursor(payload.subspan(tasks_stamp_bytes))});
                return true;
            }
            case Kind::cancel: {
                if (m.pool == pool_) {
                    batches_.clear();
                    results_.clear();
                    // Its running tasks end now (their processes are killed), and what they
                    // delivered is dropped.
                    end_local_pool(/*terminate=*/true);
                }
                Buffer answer;
                begin_message(answer, Kind::cancelled, m.pool);
                send(comm_, 0, to_master, answer);
                return true;
            }
            case Kind::cancel_call: {
                if (m.pool != pool_ || refused_) return true;
                Reader in(m.payload());
                std::uint64_t call = 0;
                in(call);
                cancel_call(call);
                return true;
            }
            case Kind::exit: return false;
            default: throw SerializationError(fmt::format("mproc::mpi: rank {} got a message of unknown kind", rank_));
        }
    }

    struct NextTask {
        TaskNote note;
        std::span<std::byte> body;
    };
    std::optional<NextTask> next_task() {
        while (!batches_.empty()) {
            if (auto e = batches_.front().cursor.next()) {
                // The bytes are this rank's own (the message's buffer): make_local rewrites them.
                return NextTask{e->note, std::span<std::byte>(const_cast<std::byte*>(e->body.data()), e->body.size())};
            }
            batches_.pop_front();
        }
        return std::nullopt;
    }

    void run(std::span<std::byte> body) {
        try {
            resolver_.make_local(body);
            mproc::detail::run_task(mproc::detail::parse_task(body), status_, /*timed=*/false, out_);
            check_result_fits(out_.size());
        } catch (...) {
            mproc::detail::failed_task_frame(out_, body, RemoteException::capture());
        }
        append_result(out_);
    }

    /// How long the rank may leave MPI unread while its local pool holds work queued beyond what
    /// its workers run (look_away_for): a quarter of that queued work. Its next tasks are not
    /// needed sooner.
    std::chrono::microseconds relay_slack() const noexcept {
        const std::size_t workers = relay_.processes;
        if (relayed_tasks_.size() <= workers) return std::chrono::microseconds{0};
        const auto task_ns = static_cast<double>(relay_.task_ns.load(std::memory_order_relaxed));
        const double queued_ns = static_cast<double>(relayed_tasks_.size() - workers) * task_ns / workers;
        return look_away_for(task_ns, queued_ns, 1.0 / 4);
    }

    /// Forks the local workers: `spec.processes`, or one per CPU of this rank's affinity. Returns
    /// how many tasks the rank runs at once.
    std::uint32_t start_local_pool(const LocalPoolSpec& spec) {
        mproc::PoolOptions o;
        o.processes = spec.processes ? spec.processes : mproc::detail::affinity_cpu_count();
        const unsigned online = static_cast<unsigned>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
        if (spec.processes == 0 && o.processes == 1 && online > 1 && !warned_binding_) {
            // Most likely mpirun's binding (a rank per core by default for up to two ranks):
            // the local pool then has one worker, and the other CPUs of the host stay idle.
            warned_binding_ = true;
            mproc::detail::report(
                "mproc::mpi: %s may run on 1 of this host's %u CPUs (its affinity), so its local pool "
                "has 1 worker; for one rank per host, start with mpirun --bind-to none, or set "
                "PoolOptions::processes_per_rank\n",
                where_.c_str(), online);
        }
        o.max_tasks_per_child = static_cast<unsigned long>(spec.max_tasks_per_child);
        if (spec.task_timeout_s > 0) o.task_timeout = mproc::Seconds(spec.task_timeout_s);
        o.max_memory_per_child = static_cast<std::size_t>(spec.max_memory_per_child);
        o.memory_limit = static_cast<std::size_t>(spec.memory_limit);
        o.max_retries = spec.max_retries;
        if (spec.stall_timeout_s > 0) o.stall_timeout = mproc::Seconds(spec.stall_timeout_s);
        const unsigned processes = o.processes;
        local_ = std::make_unique<mproc::detail::ForkEngine>(std::move(o));
        relay_.processes = processes;
        relay_.last_done_ns.store(0, std::memory_order_relaxed);
        relay_.task_ns.store(0, std::memory_order_relaxed);
        return processes;
    }

    /// Ends the local pool: joined once its tasks are done, or terminated (pending tasks fail, and
    /// their results are dropped).
    void end_local_pool(bool terminate) noexcept {
        if (!local_) return;
        try {
            if (terminate) {
                local_->terminate();
            } else {
                local_->close();
                local_->join();
            }
        } catch (...) {}
        local_.reset();
        relayed_tasks_.clear();
        calls_.clear();
        std::lock_guard lock(relay_.mutex);
        relay_.frames.clear();
    }

    /// Rank 0 cancelled `call` (its id on rank 0): its tasks still here are not run, and a local
    /// worker running one is ended (the local pool's own cancel). Each still answers — with
    /// CancelledError or skipped outcomes, which rank 0 ignores — so rank 0's window stays right.
    void cancel_call(std::uint64_t call) {
        if (!local_) {
            // In the rank: run_task skips a task of a call in the status's cancel slots (the
            // oldest of them is reused: rank 0 ignores what a task of an older one answers).
            status_.cancelled[next_cancel_slot_].store(call, std::memory_order_relaxed);
            next_cancel_slot_ = (next_cancel_slot_ + 1) % mproc::detail::SeatStatus::cancel_slots;
            return;
        }
        relay_tasks();  // tasks of the call that came with the cancel, not yet handed over
        if (!calls_.contains(call)) return;
        std::vector<std::shared_ptr<RelaySink>> live;
        for (const auto& [id, t] : relayed_tasks_)
            if (t.call == call) live.push_back(t.sink);
        for (const auto& sink : live) sink->mark();
        for (const auto& sink : live) sink->cancel();
    }

    /// The local call id of rank 0's `call`, for its task `id` (rank 0's), relayed under the local
    /// id `local_id` with `sink`: the tasks of a call share one, so the local pool's cancel (which
    /// marks a call in its workers' cancel slots) stops them all. The task is remembered, for
    /// cancel_call, until its result frame comes back (forget_relayed).
    std::uint64_t local_call(std::uint64_t call, std::uint64_t id, std::uint64_t local_id,
                             const std::shared_ptr<RelaySink>& sink) {
        auto [it, fresh] = calls_.try_emplace(call);
        if (fresh) it->second.local = local_id;
        ++it->second.tasks;
        relayed_tasks_[id] = RelayedTask{call, sink};
        return it->second.local;
    }
    /// Task `id` (rank 0's) has answered, or was never handed over.
    void forget_relayed(std::uint64_t id) {
        const auto t = relayed_tasks_.find(id);
        if (t == relayed_tasks_.end()) return;
        const auto c = calls_.find(t->second.call);
        if (c != calls_.end() && --c->second.tasks == 0) calls_.erase(c);
        relayed_tasks_.erase(t);
    }

    /// Hands the local pool what it has room for: the tasks of the batches rank 0 sent, as they
    /// are, under new ids (its own), each with a RelaySink that answers under rank 0's id.
    bool relay_tasks() {
        // Everything rank 0 sent goes to the local pool at once, in one submit (it queues what its
        // workers have no room for, and refills them from its own thread): rank 0's window bounds it.
        relaying_.clear();
        bool any = false;
        for (;;) {
            auto next = next_task();
            if (!next) break;
            const auto body = &next->body;
            any = true;
            mproc::detail::Task task;
            std::uint64_t id = 0;
            try {
                if (body->size() < mproc::detail::task_frame::smallest)
                    throw SerializationError("mproc::mpi: task frame too short");
                id = mproc::detail::task_frame::id::get(*body);
                const std::uint64_t call = mproc::detail::task_frame::call::get(*body);
                resolver_.make_local(*body);
                const auto view = mproc::detail::parse_task(*body);
                task.id = local_->next_task_id();
                task.count = view.count;
                task.skips = view.skips;
                std::sort(task.skips.begin(), task.skips.end());
                task.frame.reserve(body->size() + mproc::detail::frame_header_size);
                mproc::detail::begin_frame(task.frame);
                task.frame.append(body->data(), body->size());
                mproc::detail::finish_frame(task.frame);
                auto frame_body = mproc::detail::body_of(task.frame);
                auto sink = std::make_shared<RelaySink>(id, next->note.first, view.count, task.skips, where_, relay_);
                sink->call = local_call(call, id, task.id, sink);
                sink->engine = local_->link();
                if (next->note.max_retries != TaskNote::pool_retries) sink->max_retries = next->note.max_retries;
                mproc::detail::task_frame::id::set(frame_body, task.id);
                mproc::detail::task_frame::call::set(frame_body, sink->call);
                task.sink = std::move(sink);
                relaying_.push_back(std::move(task));
            } catch (...) {
                // It does not resolve here (or is torn): the task fails as a whole, as a rank
                // running it itself would fail it.
                forget_relayed(id);
                out_.clear();
                mproc::detail::failed_task_frame(out_, *body, RemoteException::capture());
                append_result(out_);
            }
        }
        if (relaying_.empty()) return any;
        const std::size_t n = relaying_.size();
        try {
            local_->submit(relaying_);  // all or none
        } catch (...) {
            // The local pool broke: each task fails as a whole, under rank 0's id.
            const RemoteException why = RemoteException::capture();
            for (std::size_t i = 0; i < n; ++i) {
                // One the local pool took before it failed (its frame moved there) answers there.
                if (!relaying_[i].sink ||
                    relaying_[i].frame.size() < mproc::detail::frame_header_size + mproc::detail::task_frame::smallest)
                    continue;
                const std::uint64_t id = static_cast<const RelaySink&>(*relaying_[i].sink).id();
                forget_relayed(id);
                auto frame_body = mproc::detail::body_of(relaying_[i].frame);
                mproc::detail::task_frame::id::set(frame_body, id);
                out_.clear();
                mproc::detail::failed_task_frame(out_, frame_body, why);
                append_result(out_);
            }
        }
        relaying_.clear();
        return any;
    }

    /// Moves the finished result frames of the local pool into the next results message.
    bool collect_relayed() {
        if (const std::uint64_t aborts = relay_.aborts.load(); aborts != relay_.aborts_seen) {
            // Tasks the local pool could not answer for: answered here, as failures.
            relay_.aborts_seen = aborts;
            for (auto& [id, t] : relayed_tasks_) t.sink->answer_aborted();
        }
        std::deque<Buffer> frames;
        {
            std::lock_guard lock(relay_.mutex);
            if (relay_.frames.empty()) return false;
            frames.swap(relay_.frames);
        }
        for (Buffer& f : frames) {
            forget_relayed(mproc::detail::result_id(mproc::detail::body_of(f)));
            append_result(f);
        }
        return true;
    }

    void append_result(const Buffer& frame) {
        if (!results_.empty() && results_.size() + frame.size() > max_message) flush();
        if (results_.empty()) {
            begin_message(results_, Kind::results, pool_);
            results_.extend(results_stamp_bytes);  // echo_ns, held_ns: filled in by flush()
            first_result_ = mproc::detail::Clock::now();
        }
        results_.append(frame.data(), frame.size());
    }

    void flush() {
        if (results_.empty()) return;
        const std::int64_t stamps[2] = {echo_ns_, echo_ns_ ? mproc::detail::monotonic_ns() - echo_arrived_ns_ : 0};
        std::memcpy(results_.data() + message_header, stamps, sizeof stamps);
        echo_ns_ = 0;  // each tasks message is answered once
        send(comm_, 0, to_master, results_);
        results_.clear();
    }

    MPI_Comm comm_;
    int rank_;
    std::string where_;  // "rank N (host H)", for WorkerLost messages
    CodeResolver resolver_;
    RelayQueue relay_;  // before local_: it outlives the engine
    std::unique_ptr<mproc::detail::PoolEngine> local_;  // the local pool (none: tasks run here)
    std::vector<mproc::detail::Task> relaying_;  // relay_tasks' batch for the local pool
    struct RelayedTask {
        std::uint64_t call = 0;  // rank 0's
        std::shared_ptr<RelaySink> sink;  // for cancel_call, and to answer for it if aborted
    };
    std::unordered_map<std::uint64_t, RelayedTask> relayed_tasks_;  // by rank 0's id: in the local pool
    struct RelayedCall {
        std::uint64_t local = 0;  // its id in the local pool
        std::size_t tasks = 0;  // of them in relayed_tasks_
    };
    std::unordered_map<std::uint64_t, RelayedCall> calls_;  // rank 0's calls with tasks relayed
    unsigned next_cancel_slot_ = 0;  // in_rank: status_'s next cancel slot
    bool warned_binding_ = false;  // said once that its affinity is one CPU
    std::uint64_t pool_ = 0;
    bool refused_ = false;
    std::int64_t echo_ns_ = 0;  // the sent_ns of the newest tasks message not yet answered
    std::int64_t echo_arrived_ns_ = 0;  // when it arrived (this rank's clock)
    std::deque<Batch> batches_;
    Buffer results_;
    Buffer out_;
    mproc::detail::Clock::time_point first_result_{};
    mproc::detail::SeatStatus status_;
};

}  // namespace mproc::mpi::detail
