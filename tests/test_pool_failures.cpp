// Pool failures: workers that die (segfault, abort, _exit, SIGKILL, out of memory) never hang the
// pool; task_timeout; max_tasks_per_child; the initializer, in every worker and in replacements.
//
// The workload: 400 items on 2 workers; item i dies when i % 10 == 9 (40 deaths), by the means
// death_of(i) rotating through segfault, abort(), _exit(3), SIGKILL and an out-of-memory death
// (see pool_test::die_out_of_memory). Every other item appends i to a log and returns i*i+1.
#include "test_pool_common.hpp"

#include <mproc/sync.hpp>

#include <limits>
#include <numeric>
#include <ranges>
#include <regex>

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

constexpr long workload_items = 400;
constexpr long workload_deaths = 40;

std::vector<long> workload() {
    std::vector<long> xs(workload_items);
    std::iota(xs.begin(), xs.end(), 0L);
    return xs;
}
long square(long x) { return x * x; }
int pid_of_worker(int) { return static_cast<int>(::getpid()); }

/// The items that ran (by the task log): exactly the 360 that do not die, each at least once.
void require_every_survivor_ran(const pool_test::TaskLog& log) {
    const auto ran = log.numbers();
    std::set<long> distinct(ran.begin(), ran.end());
    std::set<long> expected;
    for (long i = 0; i < workload_items; ++i)
        if (!pool_test::dies(i)) expected.insert(i);
    CHECK(distinct.size() == expected.size());
    CHECK(distinct == expected);
}

/// After the deaths: the pool still works, on two workers none of which is one that died (a first
/// worker may still serve: the deaths can all fall on the other seat's workers, as on a loaded
/// machine); every dead worker was reaped.
void require_pool_recovered(mproc::Pool& pool, const std::set<pid_t>& dead) {
    std::vector<long> xs(100);
    std::iota(xs.begin(), xs.end(), 0L);
    std::vector<long> expected;
    for (long x : xs) expected.push_back(x * x);
    CHECK(pool.map(square, xs) == expected);
    CHECK(pool.apply(square, 12L) == 144);
    pool_test::wait_until_replaced(pool, std::vector<pid_t>(dead.begin(), dead.end()), 2);
    for (pid_t p : dead) CHECK(pool_test::gone(p));
}

}  // namespace

// =================================================================================================
// worker deaths
// =================================================================================================

TEST_CASE("imap: 400 items, every 10th kills its worker: 360 results and 40 WorkerLost in place") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "imap through 40 worker deaths");
    {
        mproc::Pool pool(2);
        (void)pool_test::all_worker_pids(pool, 2);
        std::set<pid_t> dead;
        auto results = pool.imap(pool_test::square_or_die, workload());
        long i = 0;
        for (auto it = results.begin(); it != results.end(); ++it, ++i)
            pool_test::check_outcome(
                i, [&] { return *it; }, &dead);
        CHECK(i == workload_items);
        require_every_survivor_ran(log);
        CHECK(dead.size() == static_cast<std::size_t>(workload_deaths));  // each death, its own worker
        require_pool_recovered(pool, dead);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("imap with chunksize 5: still 360 results and 40 WorkerLost in place") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "imap chunksize 5 through 40 worker deaths");
    mproc::Pool pool(2);
    (void)pool_test::all_worker_pids(pool, 2);  // both workers up
    std::set<pid_t> dead;
    auto results = pool.imap(pool_test::square_or_die, workload(), 5);
    long i = 0;
    for (auto it = results.begin(); it != results.end(); ++it, ++i)
        pool_test::check_outcome(
            i, [&] { return *it; }, &dead);
    CHECK(i == workload_items);
    CHECK(dead.size() == static_cast<std::size_t>(workload_deaths));
    require_every_survivor_ran(log);
    require_pool_recovered(pool, dead);
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("imap_unordered through worker deaths: 360 results and 40 WorkerLost") {
    Watchdog dog(280s, "imap_unordered through 40 worker deaths");
    pool_test::TaskLog log;
    mproc::Pool pool(2);
    std::multiset<long> values;
    std::map<int, int> signals;
    long n = 0;
    auto results = pool.imap_unordered(pool_test::square_or_die, workload(), 3);
    for (auto it = results.begin(); it != results.end(); ++it, ++n) {
        try {
            values.insert(*it);
        } catch (const mproc::WorkerLost& e) {
            ++signals[e.signal()];
        }
    }
    CHECK(n == workload_items);
    std::multiset<long> expected;
    for (long i = 0; i < workload_items; ++i)
        if (!pool_test::dies(i)) expected.insert(i * i + 1);
    CHECK(values == expected);
    // 8 of each: SIGSEGV, SIGABRT, exit (signal 0), and 16 SIGKILL (sigkill + oom).
    CHECK(signals[SIGSEGV] == 8);
    CHECK(signals[SIGABRT] == 8);
    CHECK(signals[0] == 8);
    CHECK(signals[SIGKILL] == 16);
}

TEST_CASE("apply_async: 400 calls, every 10th kills its worker: each result is right or WorkerLost") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "apply_async through 40 worker deaths");
    mproc::Pool pool(2);
    (void)pool_test::all_worker_pids(pool, 2);  // both workers up
    std::vector<mproc::AsyncResult<long>> results;
    std::atomic<int> errors_seen{0};
    std::atomic<int> values_seen{0};
    for (long i = 0; i < workload_items; ++i)
        results.push_back(pool.apply_async(
            pool_test::square_or_die, std::tuple{i}, [&](long) { ++values_seen; },
            [&](std::exception_ptr e) {
                try {
                    std::rethrow_exception(e);
                } catch (const mproc::WorkerLost&) {
                    ++errors_seen;
                } catch (...) {}
            }));
    std::set<pid_t> dead;
    for (long i = 0; i < workload_items; ++i) {
        auto& r = results[static_cast<std::size_t>(i)];
        REQUIRE(r.wait(240s));
        pool_test::check_outcome(
            i, [&] { return r.get(); }, &dead);
        // A task run alone is named by its task id alone.
        if (pool_test::dies(i)) {
            try {
                (void)r.get();
            } catch (const mproc::WorkerLost& e) {
                CHECK(std::regex_search(std::string(e.what()), std::regex("^task [0-9]+ lost: worker [0-9]+ ")));
            }
        }
    }
    CHECK(values_seen == workload_items - workload_deaths);
    CHECK(errors_seen == workload_deaths);
    CHECK(dead.size() == static_cast<std::size_t>(workload_deaths));
    require_every_survivor_ran(log);
    require_pool_recovered(pool, dead);
}

TEST_CASE("map through worker deaths throws the first error (item 9) only after every task finished") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "map through 40 worker deaths");
    mproc::Pool pool(2);
    (void)pool_test::all_worker_pids(pool, 2);  // both workers up
    std::set<pid_t> dead;                          // the workers the errors name
    for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}}) {
        INFO("chunksize " << chunksize);
        try {
            (void)pool.map(pool_test::square_or_die, workload(), chunksize);
            FAIL("map should throw");
        } catch (const mproc::WorkerLost& e) {
            // Item 9 is the lowest failing index; it died of SIGSEGV.
            INFO(e.what());
            CHECK(e.signal() == SIGSEGV);
            CHECK(e.pid() > 0);
            dead.insert(e.pid());
            CHECK_THAT(std::string(e.what()), Catch::Contains("task "));
            CHECK_THAT(std::string(e.what()), Catch::Contains("(item 9)"));
            CHECK_THAT(std::string(e.what()), Catch::Contains("worker " + std::to_string(e.pid())));
            CHECK_THAT(std::string(e.what()), Catch::Contains("killed by SIGSEGV"));
        }
        // By the time map threw, every other item had run.
        require_every_survivor_ran(log);
    }
    require_pool_recovered(pool, dead);
}

TEST_CASE("map_async through worker deaths: error_callback gets the first error after all tasks") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "map_async through 40 worker deaths");
    mproc::Pool pool(2);
    std::exception_ptr error;
    std::size_t log_size_at_callback = 0;
    auto am = pool.map_async(pool_test::square_or_die, workload(), 1, {}, [&](std::exception_ptr e) {
        error = e;
        log_size_at_callback = log.lines().size();
    });
    REQUIRE(am.wait(240s));
    CHECK_FALSE(am.successful());
    CHECK_THROWS_AS(am.get(), mproc::WorkerLost);
    REQUIRE(error);
    try {
        std::rethrow_exception(error);
    } catch (const mproc::WorkerLost& e) {
        CHECK(e.signal() == SIGSEGV);
    }
    CHECK(log_size_at_callback >= static_cast<std::size_t>(workload_items - workload_deaths));
}

TEST_CASE("starmap through worker deaths throws the first error only after every task finished") {
    pool_test::TaskLog log;
    Watchdog dog(280s, "starmap through 40 worker deaths");
    mproc::Pool pool(2);
    std::vector<std::tuple<long, long>> args;
    for (long i : workload()) args.emplace_back(i, 1L);
    auto as = pool.starmap_async(pool_test::square_or_die2, args, 1);
    REQUIRE(as.wait(240s));
    try {
        (void)as.get();
        FAIL("starmap should throw");
    } catch (const mproc::WorkerLost& e) {
        INFO(e.what());
        CHECK(e.signal() == SIGSEGV);
        CHECK(e.exit_status() == 0);
        CHECK_THAT(std::string(e.what()), Catch::Contains("item 9)"));
        CHECK_THAT(std::string(e.what()), Catch::Contains("killed by SIGSEGV"));
    }
    require_every_survivor_ran(log);

    // And synchronously, with the default chunksize.
    CHECK_THROWS_AS(pool.starmap(pool_test::square_or_die2, args), mproc::WorkerLost);
    require_every_survivor_ran(log);

    // The survivors' results, through imap over the same pairs' first elements.
    long i = 0;
    std::vector<long> firsts;
    for (const auto& t : args) firsts.push_back(std::get<0>(t));
    auto results = pool.imap(pool_test::square_or_die, firsts);
    for (auto it = results.begin(); it != results.end(); ++it, ++i) pool_test::check_outcome(i, [&] { return *it; });
}

TEST_CASE("workers killed from outside, while idle or busy, are replaced; nothing hangs") {
    pool_test::Gate gate;
    pool_test::TaskLog log;  // before the pool: gated_logged() writes to it in the workers
    Watchdog dog(200s, "workers killed from outside");
    mproc::Pool pool(2);
    // Idle workers killed: later tasks run on their replacements and none fails.
    for (int round = 0; round < 5; ++round) {
        const auto pids = pool_test::all_worker_pids(pool, 2);
        for (pid_t p : pids) ::kill(p, SIGKILL);
        std::vector<long> xs(20);
        std::iota(xs.begin(), xs.end(), 0L);
        std::vector<long> expected;
        for (long x : xs) expected.push_back(x * x);
        CHECK(pool.map(square, xs, 1) == expected);
        pool_test::wait_until_replaced(pool, pids, 2);
    }
    // Busy workers killed: each one's task fails with WorkerLost carrying its pid and SIGKILL.
    auto blocked = pool.apply_async(pool_test::gated_logged, std::tuple{gate.read_fd(), 5});
    auto other = pool.apply_async(pool_test::gated_logged, std::tuple{gate.read_fd(), 6});
    pool_test::wait_for_log_lines(log, 2);  // both tasks are running (blocked at the closed gate)
    const auto pids = pool_test::all_worker_pids(pool, 2);
    for (pid_t p : pids) ::kill(p, SIGKILL);
    for (auto* r : {&blocked, &other}) {
        REQUIRE(r->wait(60s));
        try {
            (void)r->get();
            FAIL("the task should be lost");
        } catch (const mproc::WorkerLost& e) {
            CHECK(e.signal() == SIGKILL);
            CHECK(std::find(pids.begin(), pids.end(), e.pid()) != pids.end());
        }
    }
    CHECK(pool.apply(square, 3L) == 9);
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("a pool whose every task kills its worker still finishes and stays usable") {
    Watchdog dog(200s, "every task dies");
    mproc::Pool pool(2);
    std::vector<long> dying;  // 9, 19, ... : all die
    for (long i = 0; i < 30; ++i) dying.push_back(10 * i + 9);
    long lost = 0;
    auto results = pool.imap(pool_test::square_or_die, dying);
    for (auto it = results.begin(); it != results.end(); ++it) {
        try {
            (void)*it;
        } catch (const mproc::WorkerLost&) {
            ++lost;
        }
    }
    CHECK(lost == 30);
    CHECK(pool.apply(square, 5L) == 25);
}

// =================================================================================================
// task_timeout
// =================================================================================================

namespace {
long exit_3(long) { pool_test::die_by(pool_test::Death::exit3); }
long sigchld_ignored_here(long) { return mproc::detail::sigchld_ignored() ? 1 : 0; }
}  // namespace

TEST_CASE("In a program that ignores SIGCHLD a pool still says how a worker ended, and joins") {
    // The fork server inherited SIG_IGN: the kernel reaped its workers and the pool reported
    // "exited with status 0" for a worker that exited with 3; and joining the pool failed on the
    // server's discarded status.
    Watchdog dog(120s, "SIGCHLD ignored");
    const mproc_test::IgnoringSigchld ignoring;
    mproc::Pool pool(1);
    CHECK(pool.apply(sigchld_ignored_here, 0L) == 1);  // tasks run with the program's disposition
    try {
        pool.apply(exit_3, 0L);
        FAIL("expected WorkerLost");
    } catch (const mproc::WorkerLost& e) {
        CHECK(e.exit_status() == 3);
        CHECK(e.signal() == 0);
    }
    CHECK(pool.apply(sigchld_ignored_here, 0L) == 1);  // the replacement too
    pool.close();
    CHECK(pool.join(60s));
    mproc::Pool terminated(1);
    CHECK_NOTHROW(terminated.terminate());
}

TEST_CASE("task_timeout and stall_timeout longer than mproc counts down never fire") {
    // Seconds{1e12} in nanoseconds is past what an int64_t holds: converted as it was, the stall
    // watchdog found the pool stalled at once (and the task_timeout was undefined behaviour).
    Watchdog dog(120s, "huge timeouts");
    mproc::Pool pool({.processes = 1, .task_timeout = mproc::Seconds{1e12}, .stall_timeout = mproc::Seconds{1e12}});
    CHECK(pool.apply(pool_test::sleep_then, 0L) == 0);
    std::vector<long> zeros(4, 0);
    CHECK(pool.map(pool_test::sleep_then, zeros) == zeros);
    const mproc::RestartCounts restarts = pool.stats().restarts();
    CHECK(restarts.timeout == 0);
    CHECK(restarts.crashed == 0);
    const mproc::Seconds forever{std::numeric_limits<double>::infinity()};
    mproc::Pool unbounded({.processes = 1, .task_timeout = forever, .stall_timeout = forever});
    CHECK(unbounded.apply(pool_test::sleep_then, 0L) == 0);
}

TEST_CASE("A NaN task_timeout or stall_timeout is refused when the pool is made") {
    // Guards the check the pool always made (a NaN is not positive) now that the timeouts are
    // converted once, when the pool is made.
    const mproc::Seconds nan{std::numeric_limits<double>::quiet_NaN()};
    CHECK_THROWS_WITH(mproc::Pool({.processes = 1, .task_timeout = nan}), Catch::Matchers::Contains("positive"));
    CHECK_THROWS_WITH(mproc::Pool({.processes = 1, .stall_timeout = nan}), Catch::Matchers::Contains("positive"));
}

TEST_CASE("task_timeout: a task past it fails with TimeoutError, its worker is replaced, the rest complete") {
    Watchdog dog(200s, "task_timeout");
    std::vector<pid_t> workers;
    {
        mproc::Pool pool({.processes = 2, .task_timeout = 500ms});
        const auto first = pool_test::all_worker_pids(pool, 2);
        auto slow = pool.apply_async(pool_test::sleep_then, std::tuple{30L});
        std::vector<long> xs(200);
        std::iota(xs.begin(), xs.end(), 0L);
        std::vector<long> expected;
        for (long x : xs) expected.push_back(x * x);
        auto quick = pool.map_async(square, xs, 1);

        REQUIRE(slow.wait(60s));  // long before the 30 s sleep ends
        try {
            (void)slow.get();
            FAIL("the slow task should time out");
        } catch (const mproc::TimeoutError& e) {
            INFO(e.what());
            CHECK_THAT(std::string(e.what()), Catch::Contains("task_timeout"));
        } catch (const std::exception& e) {
            FAIL("expected mproc::TimeoutError, got " << e.what());
        }
        REQUIRE(quick.wait(60s));
        CHECK(quick.get() == expected);

        // A slow item inside a map fails alone.
        std::vector<long> mixed = {0, 0, 30, 0, 0};
        auto imap_results = pool.imap(pool_test::sleep_then, mixed);
        std::size_t i = 0;
        for (auto it = imap_results.begin(); it != imap_results.end(); ++it, ++i) {
            INFO("item " << i);
            if (mixed[i] == 30) CHECK_THROWS_AS(*it, mproc::TimeoutError);
            else CHECK(*it == 0);
        }
        CHECK(i == mixed.size());

        // The pool is usable, on a replaced worker.
        CHECK(pool.map(square, xs) == expected);
        const auto now = pool_test::all_worker_pids(pool, 2);
        bool replaced = false;
        for (pid_t p : now)
            if (std::find(first.begin(), first.end(), p) == first.end()) replaced = true;
        CHECK(replaced);
        workers = now;
    }
    POOL_REQUIRE_NOTHING_LEFT(workers[0], workers[1]);
}

// =================================================================================================
// max_tasks_per_child
// =================================================================================================

TEST_CASE("max_tasks_per_child = 2: worker pids rotate, no worker serves more than 2 tasks") {
    Watchdog dog(200s, "max_tasks_per_child");
    mproc::Pool pool({.processes = 2, .max_tasks_per_child = 2});
    std::vector<int> xs(20, 0);
    const auto pids = pool.map(pid_of_worker, xs, 1);
    REQUIRE(pids.size() == 20);
    std::map<int, int> served;
    for (int p : pids) ++served[p];
    CHECK(served.size() >= 10);
    for (auto [pid, n] : served) {
        INFO("worker " << pid);
        CHECK(n <= 2);
        CHECK(pid != ::getpid());
    }
    // Counted in chunks, as Python does: chunks of 5 items, 2 chunks per worker.
    const auto chunked = pool.map(pid_of_worker, std::vector<int>(40, 0), 5);
    std::map<int, int> per_pid;
    for (int p : chunked) ++per_pid[p];
    for (auto [pid, n] : per_pid) CHECK(n <= 10);
    CHECK(per_pid.size() >= 4);
    // And through apply_async.
    std::set<int> apply_pids;
    for (int i = 0; i < 10; ++i) apply_pids.insert(pool.apply(pid_of_worker, 0));
    CHECK(apply_pids.size() >= 5);
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

// =================================================================================================
// the initializer
// =================================================================================================

namespace {
int g_initialized = 0;  // in a worker: how many times the initializer ran there
std::pair<int, int> init_count_and_pid(int) { return {g_initialized, static_cast<int>(::getpid())}; }
}  // namespace

TEST_CASE("the initializer runs once in every worker, replacements included") {
    pool_test::TaskLog log;  // the initializer logs the pid of each worker it runs in
    Watchdog dog(200s, "initializer in replacements");
    g_initialized = 0;
    mproc::Pool pool({.processes = 2, .initializer = [] {
                          ++g_initialized;
                          pool_test::log_line(::getpid());
                      }});
    CHECK(g_initialized == 0);  // not in this process

    std::set<int> workers_seen;
    auto check_round = [&] {
        const auto out = pool.map(init_count_and_pid, std::vector<int>(40, 0), 1);
        for (auto [count, pid] : out) {
            CHECK(count == 1);
            workers_seen.insert(pid);
        }
    };
    check_round();
    // Replacements after workers are killed from outside.
    for (int round = 0; round < 3; ++round) {
        for (pid_t p : pool_test::all_worker_pids(pool, 2)) ::kill(p, SIGKILL);
        check_round();
    }
    // Replacements after tasks kill their workers.
    auto results = pool.imap(pool_test::square_or_die, std::vector<long>{9, 19, 29, 1, 2});
    for (auto it = results.begin(); it != results.end(); ++it) {
        try {
            (void)*it;
        } catch (const mproc::WorkerLost&) {}
    }
    check_round();
    CHECK(workers_seen.size() >= 4);

    pool.close();
    pool.join();
    // Every worker that answered ran the initializer exactly once (each logged its pid once).
    const auto logged = log.numbers();
    for (int pid : workers_seen) {
        INFO("worker " << pid);
        CHECK(logged.count(pid) == 1);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("an initializer that throws makes submissions fail with mproc::Error naming it; nothing hangs") {
    Watchdog dog(200s, "throwing initializer");
    std::vector<pid_t> seen;
    {
        mproc::Pool pool({.processes = 2, .initializer = [] { throw std::runtime_error("no database"); }});
        try {  // apply_async throws at once if the pool already knows, else the result fails
            auto first = pool.apply_async(square, std::tuple{3L});
            REQUIRE(first.wait(60s));
            (void)first.get();
            FAIL("the task should fail: the workers cannot start");
        } catch (const mproc::Error& e) {
            INFO(e.what());
            CHECK_THAT(std::string(e.what()), Catch::Contains("initializer"));
            CHECK_THAT(std::string(e.what()), Catch::Contains("no database"));
        }
        // Once the pool knows, submitting throws at once, with the same reason.
        try {
            (void)pool.map(square, std::vector<long>{1, 2, 3});
            FAIL("map should fail");
        } catch (const mproc::Error& e) {
            CHECK_THAT(std::string(e.what()), Catch::Contains("initializer"));
        }
        CHECK_THROWS_AS(pool.apply(square, 1L), mproc::Error);
        seen = pool.worker_pids();
    }
    POOL_REQUIRE_NOTHING_LEFT();
    for (pid_t p : seen) CHECK(pool_test::gone(p));
}

/// A task submitted to a pool whose initializer fails: apply_async throws at once if the pool
/// already knows, else the result fails when it does. Either way an mproc::Error, whose message
/// contains `expected` when given.
void require_submission_fails(mproc::Pool& pool, const char* expected = nullptr) {
    try {
        auto r = pool.apply_async(square, std::tuple{3L});
        REQUIRE(r.wait(60s));
        (void)r.get();
        FAIL("the task should fail: the workers cannot start");
    } catch (const mproc::Error& e) {
        if (expected) CHECK_THAT(std::string(e.what()), Catch::Contains(expected));
    }
}

TEST_CASE("an initializer that throws: close and join return") {
    Watchdog dog(200s, "throwing initializer, join");
    mproc::Pool pool({.processes = 2, .initializer = [] { throw 7; }});
    require_submission_fails(pool, "initializer");
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("an initializer that fails in one worker after join() began: join still returns") {
    // The first worker's initializer fails at once and breaks the pool; close() and join() follow
    // while the second worker's initializer is still running. Its failure, reported once the pool
    // is already draining, must not turn the draining pool back into a broken one (its collector
    // would then never end, and join() would wait for it forever).
    Watchdog dog(200s, "late initializer failure, join");
    mproc::Value<int> starts(0);
    mproc::Pool pool({.processes = 2, .initializer = [starts]() mutable {
                          if (starts++ != 0) std::this_thread::sleep_for(700ms);
                          throw 7;
                      }});
    require_submission_fails(pool, "initializer");
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("an initializer that kills its worker does not make the pool fork forever") {
    Watchdog dog(200s, "dying initializer");
    mproc::Pool pool({.processes = 2, .initializer = [] { pool_test::die_by(pool_test::Death::exit3); }});
    require_submission_fails(pool);
    CHECK_THROWS_AS(pool.apply(square, 1L), mproc::Error);
}
