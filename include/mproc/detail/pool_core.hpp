// mproc — the engine of Pool: seats, the backlog, dispatch, results, and worker deaths.
//
// The parent side of a Pool is one PoolCore and one thread of its own, the *collector*:
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
// was running (its WorkerSlot says which) with WorkerLost — or TimeoutError if the pool killed it
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
#include <string>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "../errors.hpp"
#include "clock.hpp"
#include "cpu.hpp"
#include "fork_server.hpp"
#include "framing.hpp"
#include "pool_link.hpp"
#include "pool_task.hpp"
#include "pool_worker.hpp"
#include "unique_fd.hpp"

namespace mproc {

/// How a Pool is built. Every field has a sensible default.
struct PoolOptions {
    /// Worker processes; 0 means cpu_count().
    unsigned processes = 0;
    /// Runs once in every worker when it starts, replacements included.
    std::function<void()> initializer = {};
    /// A worker that has run this many tasks (chunks, as in Python) exits and is replaced; 0: never.
    unsigned long max_tasks_per_child = 0;
    /// An item still running after this long is killed with its worker and fails with TimeoutError.
    std::optional<Seconds> task_timeout = std::nullopt;
};

namespace detail {

/// Where a task's outcomes go: an AsyncResult, a map's vector, an imap's queue.
class ResultSink {
public:
    virtual ~ResultSink() = default;
    /// Decodes `count` outcomes, for items first..first+count-1, skipping `skips` (relative).
    /// Runs on the collector thread.
    virtual void deliver(std::size_t first, std::uint32_t count, std::span<const std::uint32_t> skips,
                         Reader& in) = 0;
    /// Item `index` ended without an outcome (worker lost, timeout, pool terminated).
    virtual void fail(std::size_t index, std::exception_ptr error) = 0;
};

/// One chunk of items bound for one worker.
struct Task {
    std::uint64_t id = 0;
    Buffer frame;
    std::uint32_t count = 0;
    std::size_t first = 0;
    std::shared_ptr<ResultSink> sink;
    std::vector<std::uint32_t> skips;  // sorted; items already failed

    std::string describe(std::uint32_t item) const {
        std::string s = "task " + std::to_string(id);
        if (count > 1 || first > 0) s += " (item " + std::to_string(first + item) + ")";
        return s;
    }
};

/// What the Pool front end (pool.hpp) asks of the engine that runs its tasks — PoolCore here, with
/// forked workers; mpi::detail::MpiEngine (mpi.hpp) with MPI ranks — and the bookkeeping both share:
/// the pool mutex, the pool's state, the count of unsettled tasks that join() waits on, and the
/// posted jobs.
class PoolEngine {
public:
    virtual ~PoolEngine() = default;
    virtual unsigned processes() const noexcept = 0;
    virtual std::uint64_t next_task_id() noexcept = 0;
    /// Queues tasks (already encoded); throws mproc::Error if the pool takes no more.
    virtual void submit(std::vector<Task>& tasks) = 0;
    /// One task (apply_async, imap): an engine may take it without the vector.
    virtual void submit(Task task) {
        std::vector<Task> one;
        one.push_back(std::move(task));
        submit(one);
    }
    /// Runs `job` where callbacks run, as if it were a task's result (see PoolCore::post).
    virtual void post(std::function<void()> job) = 0;
    /// No more tasks. Safe to call twice.
    virtual void close() {
        std::lock_guard lock(mutex_);
        if (state_ == State::open) state_ = State::closed;
    }
    virtual void join() = 0;
    virtual void terminate() = 0;
    /// The thread callbacks run on.
    virtual std::thread::id collector_id() const noexcept = 0;
    virtual std::vector<pid_t> worker_pids() = 0;

protected:
    /// Hands a finished task's result frame body to its sink.
    static void deliver(Task& task, std::span<const std::byte> body) {
        Reader in(body.subspan(16));  // past the task id and the time spent
        try {
            task.sink->deliver(task.first, task.count, task.skips, in);
        } catch (...) {
            // A result that does not decode fails the items it was for.
            fail_items(task, std::current_exception());
        }
    }
    /// Fails every item of `task` not already failed.
    static void fail_items(Task& task, const std::exception_ptr& error) {
        for (std::uint32_t i = 0; i < task.count; ++i)
            if (!std::binary_search(task.skips.begin(), task.skips.end(), i)) task.sink->fail(task.first + i, error);
    }

    /// Fails every unskipped item of `tasks` (outside the pool lock: sinks run callbacks).
    void fail_tasks(std::vector<Task>& tasks, const std::exception_ptr& error) {
        for (Task& t : tasks) fail_items(t, error);
        finish_tasks(tasks.size());
        tasks.clear();
    }

    void finish_tasks(std::size_t n) {
        if (n == 0) return;
        std::lock_guard lock(mutex_);
        outstanding_ -= std::min(outstanding_, n);
        if (outstanding_ == 0) idle_.notify_all();
    }

    /// Runs the posted jobs (on the collector, or after it stopped). Returns whether there were any.
    bool run_posted() {
        std::deque<std::function<void()>> jobs;
        {
            std::lock_guard lock(mutex_);
            jobs.swap(posted_);
        }
        for (auto& job : jobs) job();
        finish_tasks(jobs.size());
        return !jobs.empty();
    }

    enum class State { open, closed, draining, broken, terminated };
    void check_accepting_locked() const {
        switch (state_) {
            case State::open: return;
            case State::broken: throw Error(broken_reason_);
            case State::terminated: throw Error("the pool was terminated: it takes no more tasks");
            default: throw Error("the pool is closed: it takes no more tasks");
        }
    }

    std::mutex mutex_;
    std::condition_variable idle_;
    State state_ = State::open;
    std::string broken_reason_;    // why the pool is broken (State::broken)
    std::size_t outstanding_ = 0;               // tasks (and posted jobs) submitted and not yet settled
    std::deque<std::function<void()>> posted_;  // jobs for the collector (see post)
};

/// getpid(), without a system call on every Pool submit: cached, and forgotten in every child
/// forked through fork(3) (all of mproc's forks are).
inline pid_t this_process_id() noexcept {
    static std::atomic<pid_t> cached{0};
    [[maybe_unused]] static const int hooked = ::pthread_atfork(nullptr, nullptr, [] { cached.store(0); });
    pid_t pid = cached.load(std::memory_order_relaxed);
    if (pid == 0) {
        pid = ::getpid();
        cached.store(pid, std::memory_order_relaxed);
    }
    return pid;
}

class PoolCore final : public PoolEngine {
public:
    explicit PoolCore(PoolOptions options)
        : options_(std::move(options)), owner_(this_process_id()) {
        if (options_.processes == 0) options_.processes = affinity_cpu_count();
        link_ = PoolLink(options_.processes);
        wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake_) throw_errno("eventfd");

        WorkerConfig config{options_.initializer, options_.max_tasks_per_child, options_.task_timeout.has_value()};
        const PoolLink* link = &link_;
        const int wake_fd = wake_.get();
        // The server is forked before the collector thread exists: this process may have other
        // threads, but the server's only thread is this one, and every worker is its fork.
        server_ = ForkServer(
            [config, link, wake_fd](int seat, UniqueFd channel) {
                const auto i = static_cast<unsigned>(seat);
                return worker_main(WorkerLink{link->tasks(i), link->results(i), link->slot(i), link->shared(), wake_fd,
                                              std::move(channel)},
                                   config);
            },
            "PoolForkServer");
        seats_.resize(options_.processes);
        for (unsigned i = 0; i < options_.processes; ++i) {
            seats_[i].index = static_cast<int>(i);
            spawn_locked(seats_[i]);
        }
        std::lock_guard lock(mutex_);  // the collector starts by taking it: it sees collector_id_
        collector_ = std::thread([this] { collect(); });
        collector_id_ = collector_.get_id();
    }

    PoolCore(const PoolCore&) = delete;
    PoolCore& operator=(const PoolCore&) = delete;

    ~PoolCore() override {
        try {
            terminate();
        } catch (...) {
        }
    }

    unsigned processes() const noexcept override { return options_.processes; }
    std::uint64_t next_task_id() noexcept override { return next_id_.fetch_add(1, std::memory_order_relaxed); }

    /// Queues tasks (already encoded) and sends what the workers have room for.
    void submit(std::vector<Task>& tasks) override {
        check_owner();
        std::unique_lock lock(mutex_);
        check_accepting_locked();
        outstanding_ += tasks.size();
        for (Task& t : tasks) backlog_.push_back(std::move(t));
        tasks.clear();
        dispatch_locked();
    }
    void submit(Task task) override {
        check_owner();
        std::unique_lock lock(mutex_);
        check_accepting_locked();
        ++outstanding_;
        backlog_.push_back(std::move(task));
        dispatch_locked();
    }

    /// Runs `job` on the collector thread, where callbacks run, as if it were a task's result:
    /// for results that need no worker (a map over an empty input), whose callbacks must still
    /// never run beside another callback. join() waits for it.
    void post(std::function<void()> job) override {
        check_owner();
        {
            std::lock_guard lock(mutex_);
            check_accepting_locked();
            ++outstanding_;
            posted_.push_back(std::move(job));
        }
        wake();
    }

    /// After close(): waits for every task (and its callback), then for the workers to exit.
    void join() override {
        check_owner();
        if (std::this_thread::get_id() == collector_id_)
            throw Error("Pool::join() called from a callback: it would wait for itself");
        {
            std::unique_lock lock(mutex_);
            if (state_ == State::open) throw Error("Pool::join() before close(): call close() or terminate() first");
            idle_.wait(lock, [&] { return outstanding_ == 0 || state_ == State::terminated; });
            if (state_ != State::terminated) state_ = State::draining;
        }
        wake();
        if (collector_.joinable()) collector_.join();
        server_.reap(Seconds{30});
        forget_workers();
    }

    /// Kills the workers now; every pending task fails with mproc::Error.
    void terminate() override {
        if (std::this_thread::get_id() == collector_id_)
            throw Error("Pool::terminate() called from a callback: it would wait for itself");
        std::vector<Task> doomed;
        {
            std::lock_guard lock(mutex_);
            if (state_ != State::terminated) {
                state_ = State::terminated;
                doomed = take_all_tasks_locked();
            }
        }
        if (server_.pid() != 0) server_.terminate_workers();
        wake();
        // The collector stops before the failures are delivered: callbacks never run on two
        // threads at once.
        if (collector_.joinable()) collector_.join();
        run_posted();
        fail_tasks(doomed, std::make_exception_ptr(Error("the pool was terminated before this task finished")));
        if (server_.pid() != 0) server_.reap(Seconds{5});
        forget_workers();
        idle_.notify_all();
    }

    /// After the fork server is reaped its workers are gone too (they die with it): no seat has one.
    void forget_workers() {
        std::lock_guard lock(mutex_);
        for (Seat& s : seats_) {
            s.state = SeatState::dead;
            s.pid = 0;
        }
    }

    /// The collector thread's id (callbacks run there).
    std::thread::id collector_id() const noexcept override { return collector_id_; }

    /// Pids of the live workers (for tests and active-children accounting).
    std::vector<pid_t> worker_pids() override {
        std::lock_guard lock(mutex_);
        std::vector<pid_t> pids;
        for (const Seat& s : seats_)
            if (s.pid > 0 && s.state != SeatState::dead) pids.push_back(s.pid);
        return pids;
    }
    pid_t fork_server_pid() const noexcept { return server_.pid(); }

private:
    enum class SeatState { starting, ready, dead };

    struct Seat {
        int index = 0;
        SeatState state = SeatState::dead;
        pid_t pid = 0;
        UniqueFd channel;
        FrameReader in;
        Buffer out;
        std::size_t out_sent = 0;
        std::deque<Task> inflight;
        std::size_t placed = 0;          // how many of inflight are in the ring (or socket)
        unsigned long assigned = 0;      // tasks given to the current worker
        bool saw_hello = false;
        bool eof = false;  // the worker's end is closed; its exit report is on the way
        std::optional<std::pair<std::uint64_t, std::uint32_t>> timed_out;  // (task, item) we killed it for
    };

    void check_owner() const {
        if (this_process_id() != owner_)
            throw Error("a Pool can only be used by the process that created it (pid " + std::to_string(owner_) + ")");
    }

    void wake() noexcept {
        const std::uint64_t one = 1;
        [[maybe_unused]] const ssize_t n = ::write(wake_.get(), &one, sizeof one);
    }

    // ---- dispatch -------------------------------------------------------------------------

    /// How many tasks a worker may hold: enough queued work to hide a round trip (about half a
    /// millisecond of it, from the measured task time), at least 2, at most 256.
    std::size_t window_locked() const noexcept {
        if (avg_task_ns_ <= 0) return 2;
        const double w = 500'000.0 / avg_task_ns_;
        return static_cast<std::size_t>(std::clamp(w, 2.0, 256.0));
    }
    bool has_room_locked(const Seat& s, std::size_t window) const noexcept {
        if (s.state == SeatState::dead || !s.channel) return false;
        if (options_.max_tasks_per_child != 0 && s.assigned >= options_.max_tasks_per_child) return false;
        return s.inflight.size() < window;
    }

    void dispatch_locked() {
        if (state_ == State::terminated || state_ == State::broken) return;
        const std::size_t window = window_locked();
        while (!backlog_.empty()) {
            Seat* best = nullptr;
            for (Seat& s : seats_)
                if (has_room_locked(s, window) && (!best || s.inflight.size() < best->inflight.size())) best = &s;
            if (!best) break;
            best->inflight.push_back(std::move(backlog_.front()));
            backlog_.pop_front();
            ++best->assigned;
        }
        bool needs_collector = false;
        for (Seat& s : seats_) {
            place_locked(s);
            if (flush_locked(s)) needs_collector = true;
        }
        if (needs_collector && std::this_thread::get_id() != collector_id_) wake();
    }

    /// Puts the seat's tasks that are not yet in its ring there (large ones on its socket,
    /// announced in the ring), as far as there is room, and wakes the worker if it sleeps.
    void place_locked(Seat& s) {
        if (s.state == SeatState::dead || !s.channel) return;
        SpscRing ring = link_.tasks(static_cast<unsigned>(s.index));
        bool placed_any = false;
        while (s.placed < s.inflight.size()) {
            const Buffer& frame = s.inflight[s.placed].frame;
            const auto body = frame.bytes().subspan(frame_header_size);
            if (body.size() <= ring.max_payload()) {
                if (!ring.try_push(SpscRing::data, body)) break;
            } else {
                if (!ring.try_push(SpscRing::socket, {})) break;
                s.out.append(frame.data(), frame.size());
            }
            ++s.placed;
            placed_any = true;
        }
        if (placed_any) ring.notify_consumer();
    }

    /// Sends what the socket takes now. Returns true when bytes are left for POLLOUT.
    bool flush_locked(Seat& s) {
        while (s.out_sent < s.out.size() && s.channel) {
            const ssize_t put = write_some(s.channel.get(), s.out.data() + s.out_sent, s.out.size() - s.out_sent,
                                           /*is_socket=*/true, /*nonblocking=*/true);
            if (put > 0) {
                s.out_sent += static_cast<std::size_t>(put);
                continue;
            }
            if (put < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
            // The worker is gone; the fork server's report will settle its tasks.
            s.out.clear();
            s.out_sent = 0;
            return false;
        }
        s.out.clear();
        s.out_sent = 0;
        return false;
    }

    void spawn_locked(Seat& s) {
        int fds[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) throw_errno("socketpair");
        UniqueFd ours(fds[0]);
        UniqueFd theirs(fds[1]);
        link_.reset_seat(static_cast<unsigned>(s.index));
        if (!server_.spawn(s.index, theirs)) throw Error("the pool's fork server is gone");
        s.channel = std::move(ours);
        s.state = SeatState::starting;
        s.pid = 0;
        s.in.clear();
        s.out.clear();
        s.out_sent = 0;
        s.placed = 0;
        s.assigned = 0;
        s.saw_hello = false;
        s.eof = false;
        s.timed_out.reset();
    }

    std::vector<Task> take_all_tasks_locked() {
        std::vector<Task> all;
        for (Seat& s : seats_) {
            for (Task& t : s.inflight) all.push_back(std::move(t));
            s.inflight.clear();
        }
        for (Task& t : backlog_) all.push_back(std::move(t));
        backlog_.clear();
        return all;
    }

    // ---- the collector ----------------------------------------------------------------------

    void collect() {
        std::vector<pollfd> fds;
        std::vector<int> seat_of;  // fds index -> seat
        PoolShared& shared = link_.shared();
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
                timeout_ms = check_timeouts_locked();
                std::size_t inflight = 0;
                for (const Seat& s : seats_) inflight += s.inflight.size();
                streaming = inflight >= 2;
            }
            run_posted();
            bool progressed = false;
            for (Seat& s : seats_) progressed |= service_seat(s);
            if (progressed) {
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
            const int n = ::poll(fds.data(), fds.size(), timeout_ms);
            shared.collector_sleeping.store(0, std::memory_order_relaxed);
            if (n < 0 && errno != EINTR) return;
            if (n <= 0) continue;

            if (fds[0].revents & POLLIN) {
                std::uint64_t drained;
                while (::read(wake_.get(), &drained, sizeof drained) > 0) {}
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

    bool any_results_waiting() const noexcept {
        for (const Seat& s : seats_)
            if (s.state != SeatState::dead && !link_.results(static_cast<unsigned>(s.index)).empty()) return true;
        return false;
    }

    /// Reads what the worker's socket holds now (large results), without waiting.
    void fill_from_socket(Seat& s) {
        if (!s.channel || s.eof) return;
        for (;;) {
            const ssize_t got = s.in.fill(s.channel.get(), /*nonblocking=*/true);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) s.eof = true;
            if (got <= 0) return;
        }
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
                    fill_from_socket(s);
                    const auto frame = s.in.buffered_frame();
                    if (!frame) break;  // not all here yet: POLLIN brings the rest
                    body = *frame;
                    socket_frame = body;
                }
                position = record->end;
                progressed = true;
                Reader in(body);
                std::uint64_t id = 0;
                std::int64_t spent = 0;
                in(id, spent);
                if (id == hello_task_id) {
                    hello_locked(s, in);
                } else if (!s.inflight.empty() && s.inflight.front().id == id) {
                    finished_.push_back({std::move(s.inflight.front()), body});
                    s.inflight.pop_front();
                    if (s.placed) --s.placed;
                    const auto per_task = static_cast<double>(spent);
                    avg_task_ns_ = avg_task_ns_ <= 0 ? per_task : 0.9 * avg_task_ns_ + 0.1 * per_task;
                }
                if (socket_frame) break;
            }
        }
        for (Finished& f : finished_) deliver(f.task, f.body);
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

    void hello_locked(Seat& s, Reader& in) {
        Outcome outcome{};
        in.read(outcome);
        s.saw_hello = true;
        start_failures_ = 0;
        if (outcome == Outcome::exception) {
            RemoteException why;
            in.read(why);
            // The fork server's report of the worker's pid may still be on its way.
            const std::string worker = s.pid != 0 ? " (pid " + std::to_string(s.pid) + ")" : "";
            break_pool_locked("the pool's initializer failed in a worker" + worker + ": " + why.type_name + ": " +
                              why.message);
        }
    }

    /// Spawned / exited reports. Returns false when the server is gone.
    bool handle_server_reports() {
        for (;;) {
            std::optional<ControlMessage> m;
            try {
                m = server_.next_report();
            } catch (const Error& e) {
                std::vector<Task> doomed;
                {
                    std::lock_guard lock(mutex_);
                    if (state_ == State::terminated || state_ == State::draining) return false;
                    break_pool_locked(e.what());
                    doomed = take_all_tasks_locked();
                }
                fail_tasks(doomed, std::make_exception_ptr(Error(e.what())));
                return false;
            }
            if (!m) return true;
            if (m->seat < 0 || static_cast<std::size_t>(m->seat) >= seats_.size()) continue;
            Seat& s = seats_[static_cast<std::size_t>(m->seat)];
            if (m->op == ControlMessage::spawned) {
                std::lock_guard lock(mutex_);
                s.pid = m->pid;
                if (s.state == SeatState::starting) s.state = SeatState::ready;
            } else if (m->op == ControlMessage::exited) {
                worker_exited(s, m->pid, m->value);
            }
        }
    }

    void worker_exited(Seat& s, pid_t pid, int status) {
        fill_from_socket(s);
        while (service_seat(s)) fill_from_socket(s);  // everything it sent before it died counts
        std::vector<Task> failed_whole;
        std::exception_ptr lost_error;
        Task lost_task;
        bool have_lost = false;
        {
            std::lock_guard lock(mutex_);
            const WorkerSlot& slot = link_.slot(static_cast<unsigned>(s.index));
            if (!s.inflight.empty() && slot.running.load(std::memory_order_acquire) &&
                slot.task_id.load(std::memory_order_relaxed) == s.inflight.front().id) {
                Task& t = s.inflight.front();
                const std::uint32_t item = slot.item.load(std::memory_order_relaxed);
                if (s.timed_out && s.timed_out->first == t.id && s.timed_out->second == item) {
                    lost_error = std::make_exception_ptr(TimeoutError(
                        t.describe(item) + " ran past the task_timeout of " +
                        std::to_string(options_.task_timeout->count()) + "s: worker " + std::to_string(pid) + " killed"));
                } else {
                    const int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
                    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
                    lost_error = std::make_exception_ptr(WorkerLost(t.describe(item), pid, sig, code));
                }
                lost_task.sink = t.sink;
                lost_task.first = t.first + item;
                have_lost = true;
                t.skips.insert(std::upper_bound(t.skips.begin(), t.skips.end(), item), item);
                if (t.skips.size() >= t.count) {
                    failed_whole.push_back(std::move(t));  // nothing left to run: it is settled
                    s.inflight.pop_front();
                } else {
                    set_task_skips(t.frame, t.skips);
                }
            }
            if (!s.saw_hello && !s.timed_out) ++start_failures_;
            // Everything else it held goes back to the front of the line, in order.
            backlog_.insert(backlog_.begin(), std::make_move_iterator(s.inflight.begin()),
                            std::make_move_iterator(s.inflight.end()));
            s.inflight.clear();
            s.placed = 0;
            s.channel.reset();
            s.state = SeatState::dead;
            s.pid = 0;

            if (start_failures_ >= max_start_failures) {
                const int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
                break_pool_locked("the pool's workers die as they start: worker " + std::to_string(pid) +
                                  (sig ? " killed by " + signal_name(sig) : " exited with status " +
                                                                                 std::to_string(WEXITSTATUS(status))));
            }
            const bool wanted = state_ == State::open || state_ == State::closed ||
                                (state_ == State::draining && outstanding_ > 0);
            if (wanted) spawn_locked(s);
        }
        // Moved: this thread keeps no reference once the sink has published the failure.
        if (have_lost) lost_task.sink->fail(lost_task.first, std::move(lost_error));
        // failed_whole tasks have had every item failed already; count them done.
        const std::size_t settled = failed_whole.size();
        std::vector<Task> doomed;
        {
            std::lock_guard lock(mutex_);
            if (state_ == State::broken) doomed = take_all_tasks_locked();
            else dispatch_locked();
        }
        if (!doomed.empty()) fail_tasks(doomed, std::make_exception_ptr(Error(broken_reason_)));
        finish_tasks(settled);
    }

    void break_pool_locked(std::string reason) {
        if (state_ == State::terminated || state_ == State::broken) return;
        state_ = State::broken;
        broken_reason_ = std::move(reason);
    }

    /// Returns the poll timeout (ms) until the next item could overstay task_timeout; kills
    /// the workers whose item already has.
    int check_timeouts_locked() {
        if (!options_.task_timeout) return -1;
        const auto limit_ns = static_cast<std::int64_t>(options_.task_timeout->count() * 1e9);
        const std::int64_t now = monotonic_ns();
        std::int64_t next = -1;
        for (Seat& s : seats_) {
            if (s.state == SeatState::dead || s.inflight.empty() || s.pid <= 0) continue;
            const WorkerSlot& slot = link_.slot(static_cast<unsigned>(s.index));
            if (!slot.running.load(std::memory_order_acquire)) {
                next = next < 0 ? limit_ns : std::min(next, limit_ns);
                continue;
            }
            const std::int64_t age = now - slot.started_ns.load(std::memory_order_acquire);
            if (age >= limit_ns) {
                if (!s.timed_out) {
                    s.timed_out = {slot.task_id.load(std::memory_order_relaxed), slot.item.load(std::memory_order_relaxed)};
                    server_.kill(s.index, s.pid, SIGKILL);
                }
                continue;
            }
            next = next < 0 ? limit_ns - age : std::min(next, limit_ns - age);
        }
        if (next < 0) return -1;
        return static_cast<int>(std::min<std::int64_t>(next / 1'000'000 + 1, 60'000));
    }

    void shut_down_workers_locked() {
        for (Seat& s : seats_) {
            if (s.state == SeatState::dead) continue;
            link_.tasks(static_cast<unsigned>(s.index)).close();
            if (s.channel) ::shutdown(s.channel.get(), SHUT_RDWR);
        }
        server_.finish();
    }

    static constexpr int max_start_failures = 5;

    PoolOptions options_;
    pid_t owner_;
    PoolLink link_;
    UniqueFd wake_;
    ForkServer server_;

    std::vector<Seat> seats_;
    std::deque<Task> backlog_;
    double avg_task_ns_ = 0;
    int start_failures_ = 0;
    std::atomic<std::uint64_t> next_id_{1};

    struct Finished {
        Task task;
        std::span<const std::byte> body;
    };
    std::vector<Finished> finished_;  // the collector's scratch list

    std::thread collector_;
    std::thread::id collector_id_;
};

}  // namespace detail
}  // namespace mproc
