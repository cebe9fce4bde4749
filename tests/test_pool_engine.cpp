// The Pool engine under attack: task_timeout on an idle pool and during delivery, a stopped worker,
// shutdown from two threads at once, a Pool destroyed inside its own callback, a child process
// using its parent's pool, descriptors and process limits, and a Pipe's EOF beside a pool.
#include "test_pool_common.hpp"

#include <mproc/detail/os/memory_use.hpp>
#include <mproc/detail/os/spin.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>
#include <mproc/shared_memory.hpp>
#include <mproc/sync.hpp>

#include <cstring>
#include <dirent.h>
#include <fstream>
#include <grp.h>
#include <numeric>
#include <optional>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <thread>
#include <utility>

using namespace std::chrono_literals;
using pool_test::wait_for;
using pool_test::Watchdog;

namespace {

int square(int x) { return x * x; }
[[noreturn]] int hang(int) {
    for (;;) ::pause();
}
std::vector<char> big_result(int mib) { return std::vector<char>(static_cast<std::size_t>(mib) << 20, 'r'); }
std::size_t length_of(const std::string& s) { return s.size(); }
int first_byte(mproc::SharedMemory block) { return static_cast<int>(block.data()[0]); }

/// The resident memory of process `pid`, in bytes (a worker receiving a large task grows by
/// what it has taken); 0 once it is gone.
std::uint64_t resident(pid_t pid) { return mproc::detail::resident_bytes(pid); }

/// A pool of one worker with task_timeout 1 s, whose worker is stopped (SIGSTOP) once it has run
/// a task: what it does next, the test lets it do.
struct StoppedWorker {
    mproc::Pool pool{mproc::PoolOptions{.processes = 1, .task_timeout = mproc::Seconds{1}}};
    pid_t worker = pool_test::all_worker_pids(pool, 1)[0];
    StoppedWorker() {
        CHECK(pool.apply(square, 2) == 4);
        REQUIRE(::kill(worker, SIGSTOP) == 0);
    }
};

using mproc_test::open_descriptors;

/// Runs `body` in a child process (so limits and uids it changes stay there) and requires that it
/// returned normally: a failure inside throws, and the child reports it on stderr with status 1.
template <class Body> void in_child(Body body) {
    mproc::Process p(body);
    p.start();
    p.join();
    REQUIRE(p.exitcode() == std::optional<int>(0));
}

/// The sanitizers' runtimes need descriptors of their own (UBSan's pointer checks probe memory
/// through a pipe): with none left they report errors that are not there. The tests that use up
/// every descriptor run in the builds without them.
bool skip_when_sanitized() {
    if (!MPROC_TEST_SANITIZED) return false;
    WARN("skipped under the sanitizers: their runtimes need descriptors this test uses up");
    return true;
}

/// ThreadSanitizer cannot follow a thread started in a forked child of a threaded process (it
/// reports a "dup thread"): the tests whose child starts a Pool run in the other builds.
bool skip_under_thread_sanitizer() {
    if (mproc_test::under_thread_sanitizer())
        WARN("skipped under ThreadSanitizer: a Pool started in a forked child of a threaded test");
    return mproc_test::under_thread_sanitizer();
}

void expect(bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("expectation failed: " + what);
}

/// Waits until `pool` has `workers` workers again, then checks that a map runs on them.
void expect_recovered(mproc::Pool& pool, std::size_t workers) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (pool.worker_pids().size() != workers) {
        expect(std::chrono::steady_clock::now() < deadline, "the pool to start a replacement");
        std::this_thread::sleep_for(10ms);
    }
    std::vector<int> xs(100);
    std::iota(xs.begin(), xs.end(), 0);
    expect(pool.map(square, xs).back() == 99 * 99, "a map after the recovery");
}

/// 400 descriptors sent on a socket pair and never received, 100 to a message: for a user other
/// than root they count against RLIMIT_NOFILE as descriptors in flight (a send of one more fails
/// with ETOOMANYREFS once they exceed it).
class InFlight {
public:
    InFlight() {
        expect(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_) == 0, "socketpair");
        for (int sent = 0; sent < 400; sent += 100) {
            std::vector<int> fds(100);
            for (int& fd : fds) fd = ::dup(fds_[1]);
            const bool sent_them = mproc_test::send_descriptors(fds_[0], fds);
            for (int fd : fds) ::close(fd);
            expect(sent_them, "descriptors in flight");
        }
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    ~InFlight() {
        ::close(fds_[0]);
        ::close(fds_[1]);
    }

private:
    int fds_[2] = {-1, -1};
};

/// Runs `body` in a child that is user nobody: root is exempt from the limit on descriptors in
/// flight. Skipped when the tests do not run as root, and under ThreadSanitizer (a Pool in a
/// forked child).
template <class Body> void in_child_as_nobody(Body body) {
    if (skip_under_thread_sanitizer()) return;
    if (::geteuid() != 0) {
        SUCCEED("skipped: needs root, to run its child as another user");
        return;
    }
    in_child([&] {
        expect(::setresgid(65534, 65534, 65534) == 0 && ::setresuid(65534, 65534, 65534) == 0, "become nobody");
        body();
    });
}

/// Root is exempt from RLIMIT_NPROC: a test of that limit run as root becomes nobody first.
void become_subject_to_nproc() {
    if (::geteuid() != 0) return;
    ::setgroups(0, nullptr);
    expect(::setgid(65534) == 0 && ::setuid(65534) == 0, "setuid(nobody)");
}

/// Lowers this process's soft limit of `resource` to `soft` for its lifetime (or until restore()).
class ScopedLimit {
public:
    ScopedLimit(int resource, rlim_t soft) : resource_(resource) {
        expect(::getrlimit(resource_, &old_) == 0, "getrlimit");
        rlimit tight = old_;
        tight.rlim_cur = soft;
        expect(::setrlimit(resource_, &tight) == 0, "setrlimit");
    }
    ScopedLimit(const ScopedLimit&) = delete;
    ScopedLimit& operator=(const ScopedLimit&) = delete;
    ~ScopedLimit() { restore(); }
    void restore() {
        if (std::exchange(active_, false)) ::setrlimit(resource_, &old_);
    }

private:
    int resource_;
    rlimit old_{};
    bool active_ = true;
};

}  // namespace

// =================================================================================================
// task_timeout
// =================================================================================================

TEST_CASE("task_timeout fires for a task sent to a pool that was idle") {
    Watchdog dog(120s, "task_timeout on an idle pool");
    mproc::Pool pool({.processes = 2, .task_timeout = mproc::Seconds{1}});
    CHECK(pool.map(square, std::vector<int>{1, 2, 3}) == std::vector<int>{1, 4, 9});  // just after a map
    auto a = pool.apply_async(hang, std::tuple{1});
    REQUIRE(a.wait(60s));  // the pool's own timeout ends it: nothing else would
    CHECK_THROWS_WITH(a.get(), Catch::Contains("task_timeout"));
    std::this_thread::sleep_for(500ms);  // idle for a while
    auto b = pool.apply_async(hang, std::tuple{2});
    REQUIRE(b.wait(60s));
    CHECK_THROWS_AS(b.get(), mproc::TimeoutError);
    CHECK(pool.apply(square, 5) == 25);
}

TEST_CASE("task_timeout does not count the time a finished task's result waits for the pool") {
    Watchdog dog(120s, "task_timeout and delivery");
    mproc::Pool pool({.processes = 2, .task_timeout = mproc::Seconds{1}});
    std::atomic<bool> in_callback{false};
    // The first callback holds the pool's thread for 2.5 s; meanwhile the second task finishes at
    // once and its 16 MiB result waits on the worker's socket.
    auto slow = pool.apply_async(square, std::tuple{3}, [&](int) {
        in_callback = true;
        std::this_thread::sleep_for(2500ms);
    });
    wait_for([&] { return in_callback.load(); }, "the first callback");
    auto big = pool.apply_async(big_result, std::tuple{16});
    CHECK(slow.get() == 9);
    const std::vector<char> r = big.get();
    CHECK(r.size() == std::size_t{16} << 20);
}

TEST_CASE("a worker stopped while idle: the tasks queued on it move to another worker after task_timeout") {
    Watchdog dog(180s, "a stopped worker");
    mproc::Pool pool({.processes = 2, .task_timeout = mproc::Seconds{1}});
    const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
    // Both workers past their start (a worker stopped before it says it is ready is not watched).
    for (int i = 0; i < 4; ++i) CHECK(pool.map(square, std::vector<int>{1, 2, 3, 4}, 1).back() == 16);
    REQUIRE(::kill(workers[0], SIGSTOP) == 0);
    std::vector<int> xs(20);
    std::iota(xs.begin(), xs.end(), 0);
    std::vector<int> expected;
    for (int x : xs) expected.push_back(x * x);
    CHECK(pool.map(square, xs, 1) == expected);  // none fails: none ever ran on the stopped worker
    CHECK(pool.apply(square, 7) == 49);
    pool.close();
    pool.join();
    for (pid_t w : workers) CHECK(pool_test::gone(w));
}

TEST_CASE("a worker receiving a large task slowly but steadily is not taken for stalled") {
    // A worker reading a task too large for its ring was taken for idle by the stall check: with
    // a task queued behind, it was killed as stalled after max(task_timeout, 1 s), however steadily
    // the bytes came, so a task whose argument took longer than that to arrive went to one fresh
    // worker after another. Now it is stalled only when it neither takes the bytes sent nor runs
    // (it may be growing its buffer for them). Played here by a worker that runs 3 ms in every
    // 300. Found by a review.
    Watchdog dog(180s, "a slow large task");
    StoppedWorker stopped;
    auto& [pool, worker] = stopped;
    const std::size_t size = std::size_t{32} << 20;
    auto big = pool.apply_async(length_of, std::tuple{std::string(size, 'x')});
    auto queued = pool.apply_async(square, std::tuple{3});  // behind it, on the same worker
    // Until it holds most of the task: the stops must not reach the run itself (a 32 MiB copy,
    // which task_timeout would end if it were stopped for long in it).
    const std::uint64_t before = resident(worker);
    const auto start = std::chrono::steady_clock::now();
    while (!pool_test::gone(worker) && resident(worker) < before + size / 4 * 3) {
        REQUIRE(std::chrono::steady_clock::now() < start + 120s);
        ::kill(worker, SIGCONT);
        std::this_thread::sleep_for(3ms);
        ::kill(worker, SIGSTOP);
        std::this_thread::sleep_for(300ms);
    }
    const double receiving = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ::kill(worker, SIGCONT);
    INFO("received three quarters in " << receiving << " s; " << pool.stats().workers[0].last_restart);
    REQUIRE(receiving > 1.5);  // longer than task_timeout: the test shows nothing otherwise
    REQUIRE(big.wait(60s));
    CHECK(big.get() == size);
    CHECK(queued.get() == 9);
    CHECK(pool.stats().restarts().total() == 0);
    CHECK(pool.worker_pids() == std::vector<pid_t>{worker});
}

TEST_CASE("a worker stopped while receiving a large task is replaced after task_timeout, and the task runs") {
    // The stall check took a worker receiving a task for idle, and with nothing queued behind
    // that task found nothing untaken: a worker stopped there held the call for ever. Found by a
    // review.
    Watchdog dog(180s, "a worker stopped while receiving");
    StoppedWorker stopped;
    auto& [pool, worker] = stopped;
    const std::uint64_t before = resident(worker);
    const std::size_t size = std::size_t{64} << 20;
    auto big = pool.apply_async(length_of, std::tuple{std::string(size, 'x')});
    // It takes the first megabytes of the task, and stays stopped there.
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    ::kill(worker, SIGCONT);
    while (resident(worker) < before + (4u << 20)) {
        REQUIRE(std::chrono::steady_clock::now() < deadline);
        std::this_thread::sleep_for(1ms);
    }
    ::kill(worker, SIGSTOP);
    REQUIRE(resident(worker) < before + size / 2);  // still receiving
    REQUIRE(big.wait(60s));
    CHECK(big.get() == size);
    CHECK(pool.stats().restarts().timeout == 1);
    CHECK(pool_test::gone(worker));
}

TEST_CASE("join with a worker stopped while idle returns, and the worker is reaped") {
    Watchdog dog(120s, "join with a stopped worker");
    mproc::Pool pool(2);
    const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
    CHECK(pool.apply(square, 2) == 4);
    REQUIRE(::kill(workers[1], SIGSTOP) == 0);
    pool.close();
    pool.join();  // gives the workers a grace to exit, then kills what is left
    for (pid_t w : workers) CHECK(pool_test::gone(w));  // the fork server reaps them before it exits
}

TEST_CASE("join(timeout) with a worker stopped while idle: false during its grace, then join() reaps it") {
    Watchdog dog(120s, "join with a timeout and a stopped worker");
    mproc::Pool pool(2);
    const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
    CHECK(pool.apply(square, 2) == 4);
    REQUIRE(::kill(workers[1], SIGSTOP) == 0);
    pool.close();
    // Every task is done, but the stopped worker cannot exit: the fork server waits its grace
    // (seconds) before it kills it, so the workers have not finished within 0.3 s.
    CHECK_FALSE(pool.join(mproc::Seconds{0.3}));
    CHECK(pool.join(mproc::Seconds{60}));
    for (pid_t w : workers) CHECK(pool_test::gone(w));
    CHECK(mproc_test::child_count() == 0);
}

// =================================================================================================
// lifecycle from several threads, inside callbacks, from other processes
// =================================================================================================

TEST_CASE("two threads shutting a pool down at once: terminate with terminate, with close+join, join with join") {
    Watchdog dog(300s, "concurrent shutdown");
    for (int round = 0; round < 30; ++round) {
        INFO("round " << round);
        mproc::Pool pool(2);
        std::vector<mproc::AsyncResult<int>> pending;
        for (int i = 0; i < 4; ++i) pending.push_back(pool.apply_async(square, std::tuple{i}));
        const int kind = round % 3;
        auto first = [&] {
            if (kind == 2) {
                pool.close();
                pool.join();
            } else {
                pool.terminate();
            }
        };
        auto second = [&] {
            if (kind == 0) {
                pool.terminate();
            } else {
                pool.close();
                pool.join();
            }
        };
        std::thread a(first), b(second);
        a.join();
        b.join();
        for (auto& r : pending) {
            REQUIRE(r.wait(60s));
            if (kind == 2) CHECK(r.successful());
        }
        CHECK(pool.worker_pids().empty());
        pool.terminate();  // once more, after all that: nothing to do
        pool.join();
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("destroying a Pool inside its own callback tears it down once the callback returns") {
    Watchdog dog(120s, "a pool destroyed in its callback");
    pool_test::Gate gate;  // before the pool: its workers inherit it
    std::optional<mproc::Pool> pool;
    pool.emplace(2);
    const std::vector<pid_t> workers = pool_test::all_worker_pids(*pool, 2);
    const std::vector<pid_t> server = mproc::active_children();
    REQUIRE(server.size() == 1);
    auto stuck = pool->apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1});
    std::atomic<bool> destroyed{false};
    auto ar = pool->apply_async(square, std::tuple{6}, [&](int) {
        pool.reset();
        destroyed = true;
    });
    CHECK(ar.get() == 36);
    CHECK(destroyed);
    REQUIRE(stuck.wait(60s));  // pending work fails: the pool is gone
    CHECK_THROWS_AS(stuck.get(), mproc::Error);
    wait_for([&] { return pool_test::gone(server[0]); }, "the fork server to be reaped");
    for (pid_t w : workers) wait_for([&] { return pool_test::gone(w); }, "the workers to be gone");
}

TEST_CASE("a worker that has answered a task is in worker_pids(), under the pid that ran it") {
    // The pid comes with the worker's first frame, ahead of its results: not later, from the fork
    // server, whose report the pool may not have read yet when the first result is delivered.
    Watchdog dog(120s, "worker_pids after a first result");
    for (int round = 0; round < 100; ++round) {
        mproc::Pool pool(1);
        const pid_t ran = pool.apply(+[] { return ::getpid(); });
        REQUIRE(pool.worker_pids() == std::vector<pid_t>{ran});
        pool.terminate();
        pool.join();
    }
}

TEST_CASE("a child process calling its parent's Pool gets mproc::Error and changes nothing") {
    Watchdog dog(120s, "a pool used from a child");
    mproc::Pool pool(2);
    const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
    mproc::Process child([&pool] {
        mproc_test::Refusals refused;
        refused.expect([&] { pool.terminate(); });
        refused.expect([&] { pool.close(); });
        refused.expect([&] { pool.join(); });
        refused.expect([&] { (void)pool.apply(square, 2); });
        if (refused.count != 4)
            throw std::runtime_error("only " + std::to_string(refused.count) + " of 4 calls refused");
    });
    child.start();
    child.join();
    CHECK(child.exitcode() == std::optional<int>(0));
    CHECK(pool.apply(square, 9) == 81);
    CHECK(pool.worker_pids() == workers);
    for (pid_t w : workers) CHECK_FALSE(pool_test::gone(w));
}

TEST_CASE("in a child the parent's results and imap and its worker_pids are mproc::Error and not a hang") {
    // A child's copy of a call not yet complete waited for ever for outcomes that reach only the
    // parent; worker_pids() answered with the parent's workers.
    Watchdog dog(120s, "a pool's results used from a child");
    mproc::Pool pool(1);
    auto squares = pool.imap(square, std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8}, 1);
    auto it = squares.begin();
    mproc::AsyncResult<int> done = pool.apply_async(square, std::tuple{3});
    REQUIRE(done.get(60s) == 9);
    mproc::AsyncResult<long> pending = pool.apply_async(pool_test::sleep_then, std::tuple{2L});
    REQUIRE_FALSE(pending.ready());
    mproc::Process child([&] {
        mproc_test::Refusals refused;
        refused.expect([&] { (void)pending.get(); });
        refused.expect([&] { (void)pending.wait(30s); });
        refused.expect([&] {
            for (; it != squares.end(); ++it) {}
        });
        refused.expect([&] { (void)pool.worker_pids(); });
        refused.expect([&] { (void)done.get(); });  // complete before the fork, but the parent's all the same
        refused.expect([&] { (void)done.ready(); });
        std::_Exit(refused.count == 6 ? 0 : 10 + refused.count);
    });
    child.start();
    REQUIRE(child.join(60s));
    INFO("the child's exit status: 10 + the uses refused");
    CHECK(child.exitcode().value_or(-1000) == 0);
    CHECK(pending.get(60s) == 2);
    std::vector<int> got;
    for (; it != squares.end(); ++it) got.push_back(*it);
    CHECK(got == std::vector<int>{1, 4, 9, 16, 25, 36, 49, 64});
}

TEST_CASE("a child forked while a parent thread is inside a result's call gets mproc::Error from it, not a hang") {
    // get() of a complete result took the result's lock before it checked the process: a child
    // forked while another thread held that lock had a copy held for ever.
    if (skip_under_thread_sanitizer()) return;
    Watchdog dog(200s, "a result's lock copied into a child");
    mproc::Pool pool(1);
    mproc::AsyncResult<int> done = pool.apply_async(square, std::tuple{3});
    REQUIRE(done.get(60s) == 9);
    std::atomic<bool> stop{false};
    std::thread asker([&] {
        while (!stop) (void)done.successful();
    });
    const mproc_test::RoundsSeen seen = mproc_test::forked_rounds(20, [&] {
        mproc_test::Refusals refused;
        refused.expect([&] { (void)done.get(); });
        refused.expect([&] { (void)done.successful(); });
        std::_Exit(refused.count == 2 ? 0 : 1);
    });
    stop = true;
    asker.join();
    CHECK(seen.hung == 0);
    CHECK(seen.failed == 0);
}

TEST_CASE("a Pool destroyed in a child while a thread of the parent waits in join: the child goes on") {
    // The child's copy destroyed its condition variables, which waited for the parent's waiter.
    if (skip_under_thread_sanitizer()) return;
    Watchdog dog(120s, "a pool destroyed in a child");
    auto pool = std::make_unique<mproc::Pool>(1);
    mproc::AsyncResult<long> pending = pool->apply_async(pool_test::sleep_then, std::tuple{1L});
    pool->close();
    std::thread joiner([&] { pool->join(); });
    std::this_thread::sleep_for(200ms);  // the joiner waits on the pool's condition variable
    mproc::Process child([&] {
        pool.reset();
        std::_Exit(0);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == std::optional<int>(0));
    joiner.join();
    CHECK(pending.get(60s) == 1);
}

// =================================================================================================
// descriptors and process limits
// =================================================================================================

TEST_CASE("a Pipe made before the pool reaches EOF when its writer closes: the pool holds no copy of it") {
    Watchdog dog(120s, "EOF beside a pool");
    auto [reader, writer] = mproc::Pipe<int>(/*duplex=*/false);
    mproc::Pool pool(2);
    CHECK(pool.apply(square, 4) == 16);
    writer.send(1);
    writer.close();
    CHECK(reader.recv() == 1);
    REQUIRE(reader.poll(30s));
    CHECK_THROWS_AS(reader.recv(), mproc::EOFError);
}

TEST_CASE("a pool whose respawn cannot get descriptors keeps serving on the workers it has, then recovers") {
    Watchdog dog(180s, "respawn at the descriptor limit");
    if (skip_when_sanitized()) return;
    in_child([] {
        mproc::Pool pool(2);
        const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
        // Use up every descriptor the limit allows, so that a replacement cannot get its channel.
        ScopedLimit limit(RLIMIT_NOFILE, open_descriptors() + 8);
        std::vector<int> hogs;
        for (int fd; (fd = ::dup(0)) >= 0;) hogs.push_back(fd);
        ::kill(workers[0], SIGKILL);
        for (int i = 0; i < 50; ++i) expect(pool.apply(square, i) == i * i, "a task on the remaining worker");
        for (int fd : hogs) ::close(fd);
        limit.restore();
        expect_recovered(pool, 2);
    });
}

TEST_CASE("a failed fork (RLIMIT_NPROC) is not a worker's death: the pool keeps serving, retries, and recovers") {
    Watchdog dog(180s, "respawn at the process limit");
    if (skip_under_thread_sanitizer()) return;
    in_child([] {
        become_subject_to_nproc();
        mproc::Pool pool(2);
        const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
        const std::vector<pid_t> server = mproc::active_children();
        expect(server.size() == 1, "one fork server");
        rlimit old{};
        expect(::prlimit(server[0], RLIMIT_NPROC, nullptr, &old) == 0, "prlimit");
        rlimit none = old;
        none.rlim_cur = 0;  // the server may fork nothing
        expect(::prlimit(server[0], RLIMIT_NPROC, &none, nullptr) == 0, "prlimit");
        ::kill(workers[0], SIGKILL);
        for (int i = 0; i < 50; ++i) expect(pool.apply(square, i) == i * i, "a task on the remaining worker");
        std::this_thread::sleep_for(300ms);  // several failed forks meanwhile
        for (int i = 0; i < 20; ++i) expect(pool.apply(square, i) == i * i, "a task after failed forks");
        expect(::prlimit(server[0], RLIMIT_NPROC, &old, nullptr) == 0, "prlimit");
        expect_recovered(pool, 2);

        // A pool of one: while its only worker cannot be replaced, a task waits; it runs once
        // the limit is lifted.
        mproc::Pool solo(1);
        const std::vector<pid_t> solo_worker = pool_test::all_worker_pids(solo, 1);
        pid_t solo_server = 0;
        for (pid_t pid : mproc::active_children())
            if (pid != server[0]) solo_server = pid;
        expect(::prlimit(solo_server, RLIMIT_NPROC, &none, nullptr) == 0, "prlimit");
        ::kill(solo_worker[0], SIGKILL);
        std::this_thread::sleep_for(100ms);
        auto waiting = solo.apply_async(square, std::tuple{5});
        std::this_thread::sleep_for(300ms);
        expect(!waiting.ready(), "no worker to run it yet");
        expect(::prlimit(solo_server, RLIMIT_NPROC, &old, nullptr) == 0, "prlimit");
        expect(waiting.wait(60s) && waiting.get() == 25, "the task to run once a worker could start");
    });
}

TEST_CASE("a worker's channel the kernel will not pass now (ETOOMANYREFS) is not a dead fork server") {
    // A user whose descriptors in flight exceed its RLIMIT_NOFILE cannot send one more
    // (ETOOMANYREFS): the spawn request for a replacement failed, the pool took its fork server
    // for gone and broke for good, every later call failing. Now the replacement is tried again
    // later. (Root is exempt: the child becomes user nobody.) Found by an audit.
    Watchdog dog(180s, "a channel refused");
    in_child_as_nobody([] {
        mproc::Pool pool(2);
        const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 2);
        // 400 descriptors in flight, then a limit below that.
        std::optional<InFlight> flood(std::in_place);
        ScopedLimit low(RLIMIT_NOFILE, 256);
        ::kill(workers[0], SIGKILL);
        for (int i = 0; i < 50; ++i) expect(pool.apply(square, i) == i * i, "a task on the remaining worker");
        std::this_thread::sleep_for(300ms);  // replacements refused meanwhile
        for (int i = 0; i < 20; ++i) expect(pool.apply(square, i) == i * i, "a task after refused replacements");
        low.restore();
        flood.reset();
        expect_recovered(pool, 2);
    });
}

TEST_CASE("a worker whose socket refuses a descriptor (ETOOMANYREFS) is replaced, and its task is not blamed") {
    // A segment's memfd the kernel would not send to a worker (too many descriptors in flight)
    // ends that worker, its ring announcing bytes that can no longer follow: the task it was
    // running was charged with the death and failed ("killed by SIGKILL"), though it did
    // nothing wrong. Now it runs again on the replacement. Found by an audit.
    Watchdog dog(180s, "a descriptor refused");
    in_child_as_nobody([] {
        pool_test::Gate gate;
        mproc::Pool pool(1);
        const pid_t worker = pool_test::all_worker_pids(pool, 1)[0];
        auto running = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 7});
        const auto deadline = std::chrono::steady_clock::now() + 60s;
        while (!pool.stats().workers[0].current_task) {
            expect(std::chrono::steady_clock::now() < deadline, "the gated task to start");
            std::this_thread::sleep_for(1ms);
        }
        std::optional<InFlight> flood(std::in_place);
        ScopedLimit low(RLIMIT_NOFILE, 256);
        mproc::SharedMemory late(4096);  // made after the Pool: its memfd goes to the worker
        auto next = pool.apply_async(first_byte, std::tuple{late});
        while (!pool_test::gone(worker)) {
            expect(std::chrono::steady_clock::now() < deadline, "the worker to be ended");
            std::this_thread::sleep_for(1ms);
        }
        low.restore();
        flood.reset();
        gate.open();
        expect(running.wait(60s), "the gated task to run again");
        expect(running.get() == 7, "the gated task's result");
        expect(next.get() == 0, "the next task, with the block");
        expect_recovered(pool, 1);
    });
}

TEST_CASE("a fork server that cannot receive a worker's channel starts no worker without one, and recovers") {
    // At its descriptor limit the fork server got the spawn request with the channel dropped
    // (MSG_CTRUNC), and started the worker anyway, on no channel: a task too large for the ring
    // reached it by the channel it did not have, and failed (before that fix, went to one such
    // worker after another for ever). Found by an audit.
    Watchdog dog(180s, "the fork server at its descriptor limit");
    if (skip_under_thread_sanitizer()) return;
    in_child([] {
        mproc::Pool pool(1);
        const std::vector<pid_t> workers = pool_test::all_worker_pids(pool, 1);
        const std::vector<pid_t> server = mproc::active_children();
        expect(server.size() == 1, "one fork server");
        rlimit old{};
        expect(::prlimit(server[0], RLIMIT_NOFILE, nullptr, &old) == 0, "prlimit");
        rlimit none = old;
        none.rlim_cur = 3;  // the server can receive no descriptor
        expect(::prlimit(server[0], RLIMIT_NOFILE, &none, nullptr) == 0, "prlimit");
        ::kill(workers[0], SIGKILL);
        std::this_thread::sleep_for(300ms);  // replacements asked for meanwhile
        const auto length = [](const std::string& s) { return s.size(); };
        auto big = pool.apply_async(length, std::tuple{std::string(std::size_t{4} << 20, 'x')});
        std::this_thread::sleep_for(300ms);
        const unsigned restarts = pool.stats().workers[0].restarts.total();
        expect(::prlimit(server[0], RLIMIT_NOFILE, &old, nullptr) == 0, "prlimit");
        expect(restarts == 1, "no worker started without its channel (" + std::to_string(restarts) + " restarts)");
        expect(big.wait(60s), "the large task to run once a worker could start");
        expect(big.get() == std::size_t{4} << 20, "the large task's result");
        expect(pool.apply(square, 7) == 49, "a task after the recovery");
    });
}

TEST_CASE("a Pool constructor that fails (descriptor limit) throws mproc::Error and leaves no process, no descriptor") {
    Watchdog dog(180s, "constructors at the descriptor limit");
    if (skip_when_sanitized()) return;
    in_child([] {
        int failures = 0;
        for (int spare = 0; spare <= 12; ++spare) {
            const std::size_t before = open_descriptors();
            ScopedLimit limit(RLIMIT_NOFILE, before + static_cast<rlim_t>(spare) + 8);
            std::vector<int> hogs;
            for (int i = 0; i < 8; ++i) hogs.push_back(::dup(0));
            bool threw = false;
            try {
                mproc::Pool pool(4);
                (void)pool.apply(square, 2);
            } catch (const mproc::Error&) {
                threw = true;
                ++failures;
            } catch (const std::exception& e) {
                throw std::runtime_error(std::string("not an mproc::Error: ") + e.what());
            }
            for (int fd : hogs) ::close(fd);
            limit.restore();
            expect(mproc_test::child_count() == 0,
                   "no process left after spare " + std::to_string(spare) + (threw ? " (threw)" : ""));
            expect(open_descriptors() == before, "no descriptor left after spare " + std::to_string(spare));
        }
        expect(failures > 0, "some constructor failed");
    });
}

namespace {
std::size_t descriptors_in_worker(int) { return open_descriptors(); }
}  // namespace

TEST_CASE("a Pool's workers hold none of the parent's close-on-exec descriptors, however many there are") {
    // The fork server closes them a batch at a time, looking again after each batch (it may have
    // no memory to spare for a list): 600 of them take three looks.
    Watchdog dog(120s, "a pool started beside 600 descriptors");
    const std::size_t before = open_descriptors();
    std::vector<int> many;
    const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    REQUIRE(null >= 0);
    many.push_back(null);
    for (int i = 1; i < 600; ++i) {
        const int fd = ::fcntl(null, F_DUPFD_CLOEXEC, 0);
        REQUIRE(fd >= 0);
        many.push_back(fd);
    }
    std::size_t in_worker = 0;
    {
        mproc::Pool pool(1);
        in_worker = pool.apply(descriptors_in_worker, 0);
    }
    for (int fd : many) ::close(fd);
    INFO("this process " << before << " descriptors (and 600 more while the pool started); its worker " << in_worker);
    CHECK(in_worker < before + 16);  // its own channel and memfds, never the 600
}

namespace {
/// Tasks (processes and threads) the kernel counts against `uid`'s RLIMIT_NPROC.
long tasks_of_user(uid_t uid) {
    long n = 0;
    if (DIR* proc = ::opendir("/proc")) {
        while (const dirent* e = ::readdir(proc)) {
            if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
            std::ifstream status(std::string("/proc/") + e->d_name + "/status");
            std::string line;
            long owner = -1, threads = 0;
            while (std::getline(status, line)) {
                if (line.rfind("Uid:", 0) == 0) owner = std::stol(line.substr(4));
                if (line.rfind("Threads:", 0) == 0) threads = std::stol(line.substr(8));
            }
            if (owner == static_cast<long>(uid)) n += threads;
        }
        ::closedir(proc);
    }
    return n;
}
}  // namespace

TEST_CASE("a Pool constructor whose thread cannot start throws mproc::Error and leaves no process behind") {
    Watchdog dog(180s, "a constructor whose thread cannot start");
    if (skip_under_thread_sanitizer()) return;
    in_child([] {
        become_subject_to_nproc();
        // Room for the fork server, not for the pool's thread (nor for workers).
        ScopedLimit limit(RLIMIT_NPROC, static_cast<rlim_t>(tasks_of_user(::getuid()) + 1));
        bool threw = false;
        try {
            mproc::Pool pool(2);
        } catch (const mproc::Error& e) {
            threw = true;
        } catch (const std::exception& e) {
            throw std::runtime_error(std::string("not an mproc::Error: ") + e.what());
        }
        limit.restore();
        expect(threw, "the constructor to fail");
        expect(mproc_test::child_count() == 0, "no process left");
        mproc::Pool pool(2);  // and with the limit lifted, a pool starts
        expect(pool.apply(square, 3) == 9, "a task");
    });
}

TEST_CASE("an error callback run by terminate() that calls terminate() or join() gets mproc::Error") {
    Watchdog dog(120s, "callbacks at teardown");
    pool_test::Gate gate;
    mproc::Pool pool(2);
    std::atomic<int> refused{0};
    auto a = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1}, {}, [&](std::exception_ptr) {
        try {
            pool.terminate();
        } catch (const mproc::Error&) {
            ++refused;
        }
        try {
            pool.join();
        } catch (const mproc::Error&) {
            ++refused;
        }
    });
    pool_test::all_worker_pids(pool, 2);
    pool.terminate();  // fails the task: its error callback runs here, on this thread
    CHECK(refused == 2);
    CHECK_THROWS_AS(a.get(), mproc::Error);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("an error callback run by terminate() that destroys the Pool: the teardown completes") {
    Watchdog dog(120s, "a pool destroyed at teardown");
    pool_test::Gate gate;
    std::optional<mproc::Pool> pool;
    pool.emplace(2);
    auto b = pool->apply_async(pool_test::gated, std::tuple{gate.read_fd(), 2}, {},
                               [&](std::exception_ptr) { pool.reset(); });
    pool_test::all_worker_pids(*pool, 2);
    pool->terminate();
    CHECK_FALSE(pool.has_value());
    CHECK_THROWS_AS(b.get(), mproc::Error);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a task_timeout that is not positive is refused") {
    CHECK_THROWS_AS(mproc::Pool({.processes = 1, .task_timeout = mproc::Seconds{0}}), mproc::Error);
    CHECK_THROWS_AS(mproc::Pool({.processes = 1, .task_timeout = mproc::Seconds{-1}}), mproc::Error);
    CHECK(mproc_test::child_count() == 0);
}

// =================================================================================================
// One CPU: a wait that watches for its peer yields to it instead of spinning beside it
// =================================================================================================

namespace {

/// Pins the calling thread to one CPU of its mask for the object's lifetime (threads and processes
/// it starts meanwhile inherit that), then gives it its mask back. `ok()`: the pin took (checked
/// by the test's own thread: Catch's assertions are not for other threads).
class PinnedToOneCpu {
public:
    PinnedToOneCpu() {
        if (::sched_getaffinity(0, sizeof old_, &old_) != 0) return;
        int first = 0;
        while (first < CPU_SETSIZE && !CPU_ISSET(first, &old_)) ++first;
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(first, &one);
        ok_ = ::sched_setaffinity(0, sizeof one, &one) == 0;
    }
    PinnedToOneCpu(const PinnedToOneCpu&) = delete;
    PinnedToOneCpu& operator=(const PinnedToOneCpu&) = delete;
    ~PinnedToOneCpu() {
        if (ok_) ::sched_setaffinity(0, sizeof old_, &old_);
    }
    bool ok() const noexcept { return ok_; }

private:
    cpu_set_t old_{};
    bool ok_ = false;
};

}  // namespace

TEST_CASE("on_one_cpu follows the calling thread's affinity mask") {
    bool pinned = false, free = true;
    std::thread([&] {
        PinnedToOneCpu pin;
        pinned = pin.ok() && mproc::detail::on_one_cpu();
    }).join();
    std::thread([&] { free = mproc::detail::on_one_cpu(); }).join();  // a fresh thread, this one's mask
    CHECK(pinned);
    CHECK(free == (mproc::cpu_count() == 1));
}

TEST_CASE("spin_until on a thread pinned to one CPU sees what a thread on the same CPU publishes") {
    // The publisher can run only when the watcher lets the CPU go: the watch must yield to it, and
    // return true (the budget is a guard against a hang, never reached when it does).
    Watchdog dog(120s, "a watch on one CPU");
    for (int round = 0; round < 20; ++round) {
        std::atomic<bool> published{false};
        bool pinned = false, seen = false;
        std::thread([&] {
            PinnedToOneCpu pin;
            pinned = pin.ok();
            if (!pinned) return;
            std::thread publisher([&] { published.store(true, std::memory_order_release); });
            seen = mproc::detail::spin_until([&] { return published.load(std::memory_order_acquire); },
                                             std::chrono::microseconds(std::chrono::seconds(30)));
            publisher.join();
        }).join();
        CAPTURE(round);
        REQUIRE(pinned);
        REQUIRE(seen);
    }
}

TEST_CASE("a Pool on one CPU serves apply, a streamed map and apply_async with callbacks") {
    // Its worker and collector watch their rings between tasks (detail::spin_until): on one CPU
    // that watch yields at every look. Every answer must still arrive, and right.
    Watchdog dog(120s, "a pool on one CPU");
    PinnedToOneCpu pin;
    REQUIRE(pin.ok());
    mproc::Pool pool(2);
    for (int i = 0; i < 300; ++i) REQUIRE(pool.apply(square, i) == i * i);
    std::vector<int> xs(20000);
    std::iota(xs.begin(), xs.end(), 0);
    const std::vector<int> squares = pool.map(square, xs, 1);
    REQUIRE(squares.size() == xs.size());
    for (std::size_t i = 0; i < xs.size(); ++i) REQUIRE(squares[i] == xs[i] * xs[i]);
    std::atomic<long> sum{0};
    std::vector<mproc::AsyncResult<int>> pending;
    for (int i = 0; i < 2000; ++i)
        pending.push_back(pool.apply_async(square, std::tuple{i % 100}, [&](int r) { sum += r; }));
    for (auto& r : pending) r.get();
    long want = 0;
    for (int i = 0; i < 2000; ++i) want += (i % 100) * (i % 100);
    CHECK(sum == want);
    pool.close();
    pool.join();
}
