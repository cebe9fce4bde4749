// Pool and the parent's threads: callbacks run in the parent, on one thread, one at a time, all of
// them before join() returns, and a throwing callback wedges nothing; several parent threads submit
// to one pool at once (run this under ThreadSanitizer too); workers are replaced safely while the
// parent's other threads allocate and hold locks.
#include "test_pool_common.hpp"

#include <latch>
#include <mproc/process.hpp>
#include <numeric>

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

int square(int x) { return x * x; }
int add(int x, int y) { return x + y; }
int fail_if_negative(int x) {
    if (x < 0) throw std::invalid_argument("negative: " + std::to_string(x));
    return x;
}

std::vector<int> iota_vec(int n, int from = 0) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), from);
    return v;
}
std::vector<int> squares_of(const std::vector<int>& xs) {
    std::vector<int> out;
    for (int x : xs) out.push_back(x * x);
    return out;
}

/// Records where and how callbacks run: which threads, in which process, and whether two ever
/// overlapped. Safe to call from any thread (a buggy pool might call it from several).
struct CallbackProbe {
    std::atomic<int> inside{0};
    std::atomic<int> max_inside{0};
    std::atomic<long> calls{0};
    std::mutex mutex;
    std::set<std::thread::id> threads;
    std::set<pid_t> pids;

    void enter() {
        const int now = inside.fetch_add(1) + 1;
        int seen = max_inside.load();
        while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {}
        {
            std::lock_guard lock(mutex);
            threads.insert(std::this_thread::get_id());
            pids.insert(::getpid());
        }
        std::this_thread::sleep_for(50us);  // widen the window in which an overlap would show
    }
    void leave() {
        calls.fetch_add(1);
        inside.fetch_sub(1);
    }
};

}  // namespace

// =================================================================================================
// callbacks
// =================================================================================================

TEST_CASE("callbacks run in the parent, on one thread, one at a time; after join() all have run") {
    Watchdog dog(240s, "callbacks");
    CallbackProbe probe;
    long plain_counter = 0;  // no atomics: join() must order every callback before the read below
    constexpr int submitters = 4, per_thread = 100, maps_per_thread = 5;
    std::set<std::thread::id> submitting_threads;
    std::mutex submitting_mutex;
    {
        mproc::Pool pool(2);
        std::latch start(submitters);
        std::vector<std::thread> threads;
        for (int t = 0; t < submitters; ++t) {
            threads.emplace_back([&, t] {
                {
                    std::lock_guard lock(submitting_mutex);
                    submitting_threads.insert(std::this_thread::get_id());
                }
                start.arrive_and_wait();
                for (int i = 0; i < per_thread; ++i) {
                    const int x = (i % 10 == 0) ? -i - 1 : i + t * 1000;
                    (void)pool.apply_async(
                        fail_if_negative, std::tuple{x},
                        [&](int) {
                            probe.enter();
                            ++plain_counter;
                            probe.leave();
                        },
                        [&](std::exception_ptr) {
                            probe.enter();
                            ++plain_counter;
                            probe.leave();
                        });  // the AsyncResult is dropped at once: its callback still runs
                }
                for (int m = 0; m < maps_per_thread; ++m)
                    (void)pool.map_async(square, iota_vec(50), 3, [&](const std::vector<int>& v) {
                        probe.enter();
                        if (v == squares_of(iota_vec(50))) ++plain_counter;
                        probe.leave();
                    });
            });
        }
        for (auto& th : threads) th.join();
        pool.close();
        pool.join();
        // Every callback has run by now.
        CHECK(plain_counter == submitters * (per_thread + maps_per_thread));
        CHECK(probe.calls.load() == submitters * (per_thread + maps_per_thread));
    }
    CHECK(probe.max_inside.load() == 1);
    REQUIRE(probe.threads.size() == 1);
    const auto callback_thread = *probe.threads.begin();
    CHECK(callback_thread != std::this_thread::get_id());
    CHECK(submitting_threads.count(callback_thread) == 0);
    CHECK(probe.pids == std::set<pid_t>{::getpid()});  // in the parent, not in a worker
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("a callback that throws while stderr is a pipe nobody reads does not end the program by SIGPIPE") {
    // The pool reports what escaped the callback on stderr, from its own thread: with the reader
    // of stderr gone (`prog 2>&1 | head`), that write must not raise SIGPIPE. In a child, whose
    // stderr and SIGPIPE disposition are its own.
    // (No watchdog thread: under ThreadSanitizer a child forked from a threaded process warns on
    // stderr when it starts threads, and that write to the closed pipe would be what kills it.)
    mproc::Process p([] {
        if (!mproc_test::stderr_to_a_gone_reader()) std::_Exit(3);
        mproc::Pool pool(1);
        auto bad = pool.apply_async(square, std::tuple{4}, [](int) { throw std::runtime_error("callback boom"); });
        if (!bad.wait(60s)) std::_Exit(4);
        if (pool.apply(square, 3) != 9) std::_Exit(5);
    });
    p.start();
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 0);
}

TEST_CASE("a callback that throws wedges nothing; get() of its result rethrows the callback's exception") {
    Watchdog dog(200s, "throwing callback");
    mproc_test::StderrCapture err;  // the pool reports what escaped the callback on stderr
    {
        mproc::Pool pool(2);
        auto bad = pool.apply_async(square, std::tuple{4}, [](int) { throw std::runtime_error("callback boom"); });
        std::vector<mproc::AsyncResult<int>> others;
        int after = 0;
        for (int i = 0; i < 100; ++i) others.push_back(pool.apply_async(square, std::tuple{i}, [&](int) { ++after; }));
        auto am = pool.map_async(square, iota_vec(100), 1);
        auto bad_map = pool.map_async(square, iota_vec(10), 1,
                                      [](const std::vector<int>&) { throw std::length_error("map callback boom"); });
        auto bad_error_cb = pool.apply_async(fail_if_negative, std::tuple{-5}, {},
                                             [](std::exception_ptr) { throw std::logic_error("error callback boom"); });

        REQUIRE(bad.wait(60s));
        CHECK_FALSE(bad.successful());
        CHECK_THROWS_AS(bad.get(), std::runtime_error);
        CHECK_THROWS_WITH(bad.get(), "callback boom");
        for (int i = 0; i < 100; ++i) CHECK(others[static_cast<std::size_t>(i)].get() == i * i);
        CHECK(am.get() == squares_of(iota_vec(100)));
        CHECK_THROWS_AS(bad_map.get(), std::length_error);
        REQUIRE(bad_error_cb.wait(60s));
        CHECK_THROWS(bad_error_cb.get());  // the task's error or the callback's: it reaches the caller
        CHECK(pool.apply(square, 9) == 81);  // still usable
        pool.close();
        pool.join();  // returns
        CHECK(after == 100);
    }
    err.restore();
    const std::string text = err.text();
    INFO("stderr: " << text);
    CHECK_THAT(text, Catch::Contains("callback boom"));
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("waiting for a result, or joining, inside a callback fails with mproc::Error instead of deadlocking") {
    pool_test::Gate gate;
    Watchdog dog(200s, "wait inside a callback");
    mproc::Pool pool(2);
    auto blocker = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1});
    bool wait_refused = false, join_refused = false, terminate_refused = false;
    auto ar = pool.apply_async(square, std::tuple{3}, [&](int) {
        try {
            blocker.wait();
        } catch (const mproc::Error&) {
            wait_refused = true;
        }
        try {
            pool.join();
        } catch (const mproc::Error&) {
            join_refused = true;
        }
        try {
            pool.terminate();
        } catch (const mproc::Error&) {
            terminate_refused = true;
        }
    });
    CHECK(ar.get() == 9);
    CHECK(wait_refused);
    CHECK(join_refused);
    CHECK(terminate_refused);
    gate.open();
    CHECK(blocker.get() == 1);
}

TEST_CASE("the callback of an empty map_async does not run alongside another callback") {
    // An empty input has no task: if its callback ran at once on the submitting thread, it could run
    // while the pool's thread is inside another callback — two callbacks at once.
    pool_test::Gate gate;
    Watchdog dog(200s, "empty map_async callback");
    mproc::Pool pool(2);
    std::atomic<bool> first_inside{false}, release_first{false};
    std::atomic<int> inside{0}, max_inside{0};
    std::thread::id first_thread, empty_thread;
    auto enter = [&] {
        const int now = ++inside;
        int seen = max_inside.load();
        while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {}
    };
    auto first = pool.apply_async(square, std::tuple{2}, [&](int) {
        enter();
        first_thread = std::this_thread::get_id();
        first_inside = true;
        const auto deadline = std::chrono::steady_clock::now() + 30s;
        while (!release_first && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
        --inside;
    });
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (!first_inside && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
    REQUIRE(first_inside);
    auto empty = pool.map_async(square, std::vector<int>{}, 0, [&](const std::vector<int>&) {
        enter();
        empty_thread = std::this_thread::get_id();
        --inside;
    });
    release_first = true;
    CHECK(first.get() == 4);
    CHECK(empty.get().empty());
    CHECK(max_inside.load() == 1);
    CHECK(empty_thread == first_thread);  // every callback on the pool's one thread
}

// =================================================================================================
// several parent threads, one pool
// =================================================================================================

TEST_CASE("four parent threads submit to one pool at once: apply_async, map, starmap, imap all right") {
    Watchdog dog(280s, "four submitting threads");
    mproc::Pool pool(2);
    constexpr int threads_n = 4;
    std::latch start(threads_n);
    std::atomic<int> failures{0};
    std::vector<std::string> problems(threads_n);
    std::vector<std::thread> threads;
    for (int t = 0; t < threads_n; ++t) {
        threads.emplace_back([&, t] {
            auto fail = [&](const std::string& what) {
                ++failures;
                problems[static_cast<std::size_t>(t)] += what + "; ";
            };
            start.arrive_and_wait();
            try {
                for (int round = 0; round < 3; ++round) {
                    std::vector<mproc::AsyncResult<int>> rs;
                    for (int i = 0; i < 50; ++i) rs.push_back(pool.apply_async(add, std::tuple{i, t * 1000}));
                    const auto xs = iota_vec(200, t * 10000);
                    const auto mapped = pool.map(square, xs, static_cast<std::size_t>(round * 5));
                    if (mapped != squares_of(xs)) fail("map");
                    std::vector<std::tuple<int, int>> pairs;
                    for (int i = 0; i < 100; ++i) pairs.emplace_back(i, t);
                    const auto sums = pool.starmap_async(add, pairs, 7).get();
                    for (int i = 0; i < 100; ++i)
                        if (sums[static_cast<std::size_t>(i)] != i + t) fail("starmap");
                    std::vector<int> lazy;
                    for (int v : pool.imap(square, xs, static_cast<std::size_t>(round + 1))) lazy.push_back(v);
                    if (lazy != squares_of(xs)) fail("imap");
                    std::multiset<int> un;
                    for (int v : pool.imap_unordered(square, xs)) un.insert(v);
                    const auto sq = squares_of(xs);
                    if (un != std::multiset<int>(sq.begin(), sq.end())) fail("imap_unordered");
                    for (int i = 0; i < 50; ++i)
                        if (rs[static_cast<std::size_t>(i)].get() != i + t * 1000) fail("apply_async");
                    if (pool.apply(square, t + round) != (t + round) * (t + round)) fail("apply");
                }
            } catch (const std::exception& e) {
                fail(std::string("exception: ") + e.what());
            }
        });
    }
    for (auto& th : threads) th.join();
    for (int t = 0; t < threads_n; ++t) {
        INFO("thread " << t << ": " << problems[static_cast<std::size_t>(t)]);
        CHECK(problems[static_cast<std::size_t>(t)].empty());
    }
    CHECK(failures == 0);
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("parent threads may close, terminate and submit concurrently without crashing") {
    Watchdog dog(200s, "concurrent terminate");
    for (int round = 0; round < 5; ++round) {
        mproc::Pool pool(2);
        std::latch start(3);
        std::atomic<int> ok{0}, refused{0}, other{0};
        auto submitter = [&] {
            start.arrive_and_wait();
            for (int i = 0; i < 200; ++i) {
                try {
                    auto r = pool.apply_async(square, std::tuple{i});
                    try {
                        if (r.get(60s) == i * i) ++ok;
                    } catch (const mproc::TimeoutError&) {
                        ++other;  // a pending result must settle when the pool is terminated
                    } catch (const mproc::Error&) {
                        ++refused;
                    }
                } catch (const mproc::Error&) {
                    ++refused;
                }
            }
        };
        std::thread a(submitter), b(submitter);
        start.arrive_and_wait();
        std::this_thread::sleep_for(std::chrono::milliseconds(round));  // vary where terminate lands
        pool.terminate();
        a.join();
        b.join();
        CHECK(other == 0);
        CHECK(ok + refused == 400);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// =================================================================================================
// replacing workers while the parent's other threads allocate and hold locks
// =================================================================================================

namespace {

long die_every_third(long i) {
    if (i % 3 == 0) pool_test::die_by(pool_test::Death::sigkill);
    return i * 2;
}

/// Runs in a child process (the test bounds it with join(120s)): four threads allocate, grow strings
/// and take a mutex without pause, while a pool created among them loses 100 workers and replaces
/// them. Throws (exit status 1, reason on stderr) on any wrong outcome.
void churn_scenario() {
    std::atomic<bool> stop{false};
    std::mutex shared_mutex;
    std::vector<std::string> shared;
    std::atomic<long> spins{0};
    std::vector<std::thread> busy;
    for (int t = 0; t < 4; ++t) {
        busy.emplace_back([&, t] {
            std::string grow;
            while (!stop.load(std::memory_order_relaxed)) {
                auto block = std::make_unique<std::vector<int>>(static_cast<std::size_t>(256 + t * 64), t);
                grow += std::to_string(block->size());
                if (grow.size() > 4096) grow.clear();
                std::lock_guard lock(shared_mutex);
                shared.push_back(grow.substr(0, 16));
                if (shared.size() > 64) shared.erase(shared.begin(), shared.begin() + 32);
                spins.fetch_add(1, std::memory_order_relaxed);
            }
        });
    }
    auto fail = [&](const std::string& why) {
        stop = true;
        for (auto& th : busy) th.join();
        throw std::runtime_error(why);
    };

    {
        mproc::Pool pool(2);  // its fork server is forked while the four threads run
        std::vector<long> xs(300);
        std::iota(xs.begin(), xs.end(), 0L);
        long values = 0, lost = 0;
        auto results = pool.imap(die_every_third, xs);
        long i = 0;
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            try {
                const long v = *it;
                if (i % 3 == 0 || v != i * 2) fail("item " + std::to_string(i) + ": wrong value " + std::to_string(v));
                ++values;
            } catch (const mproc::WorkerLost& e) {
                if (i % 3 != 0 || e.signal() != SIGKILL) fail("item " + std::to_string(i) + ": " + e.what());
                ++lost;
            }
        }
        if (values != 200 || lost != 100) fail("values " + std::to_string(values) + ", lost " + std::to_string(lost));

        // Workers killed from outside while a map runs: every task completes or is lost.
        std::vector<long> ys(200, 1);
        auto am = pool.map_async(die_every_third, ys, 1);
        for (int k = 0; k < 10; ++k)
            for (pid_t p : pool.worker_pids()) ::kill(p, SIGKILL);
        try {
            (void)am.get(100s);
        } catch (const mproc::WorkerLost&) {
        } catch (const std::exception& e) {
            fail(std::string("map under kills: ") + e.what());
        }
        if (pool.map(die_every_third, std::vector<long>{1, 2, 4}) != std::vector<long>{2, 4, 8})
            fail("the pool does not work after the kills");

        // A second pool, created and destroyed among the busy threads.
        mproc::Pool second(2);
        if (second.apply(die_every_third, 5L) != 10) fail("second pool");
        pool.close();
        pool.join();
    }
    if (mproc_test::child_count() != 0) fail("children left: " + pool_test::describe_children());
    stop = true;
    for (auto& th : busy) th.join();
    if (spins.load() == 0) throw std::runtime_error("the busy threads never ran");
}

}  // namespace

TEST_CASE("replacing 100+ workers while 4 parent threads allocate and lock never deadlocks") {
    REQUIRE(mproc_test::child_count() == 0);
    mproc::Process scenario([] {
        mproc_test::default_fatal_signals();
        churn_scenario();
    });
    scenario.set_name("churn-scenario");
    scenario.start();
    const bool finished = scenario.join(120s);
    if (!finished) {
        scenario.kill();
        scenario.join();
    }
    REQUIRE(finished);  // false: deadlocked (or far too slow)
    CHECK(scenario.exitcode() == 0);
    POOL_REQUIRE_NOTHING_LEFT();
}
