// mproc::mpi::Pool under mpirun: the local Pool's calls, ordering and exceptions across MPI ranks,
// tasks named across ranks (dladdr), close/join/terminate, and the Python tutorial's Pool programs.
// Run as `mpirun --oversubscribe -n 3 test_mpi_pool [tag]`: rank 0 runs these cases, ranks 1 and
// 2 are the pool's workers (main is in test_mpi_main.cpp).
#include <catch2/catch.hpp>

#include <mproc/mpi.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <dlfcn.h>
#include <fstream>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <ranges>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/resource.h>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

#include "fragile.hpp"
#include "mpi/mpi_testlib.hpp"
#include "test_pool_common.hpp"

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

int square(int x) { return x * x; }
int add(int x, int y) { return x + y; }
long long index_tag(long long i) { return i * 7 + 3; }
void nothing(int) {}

int my_rank() {
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}
int rank_of_task(int) { return my_rank(); }
pid_t pid_of_task(int) { return ::getpid(); }
pid_t parent_of(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(stat, line);
    const auto close = line.rfind(')');  // the name may hold spaces: the fields follow its ')'
    if (close == std::string::npos) return 0;
    char state = 0;
    pid_t parent = 0;
    std::istringstream(line.substr(close + 1)) >> state >> parent;
    return parent;
}
/// The task's own pid, and its parent's parent.
std::pair<pid_t, pid_t> pid_and_grandparent(int) { return {::getpid(), parent_of(::getppid())}; }
/// Allocates and touches `mib` MiB, and returns how many bytes it touched.
long allocate_mib(long mib) {
    std::vector<char> block(static_cast<std::size_t>(mib) << 20);
    for (std::size_t i = 0; i < block.size(); i += 4096) block[i] = 1;
    return static_cast<long>(block.size());
}
/// Leaks `mib` MiB (touched) on every call, and returns its process: a worker that runs it grows
/// without end.
pid_t leak_mib_pid(long mib) {
    auto* block = new char[static_cast<std::size_t>(mib) << 20];
    for (std::size_t i = 0; i < (static_cast<std::size_t>(mib) << 20); i += 4096) block[i] = 1;
    static std::vector<char*> kept;
    kept.push_back(block);  // never freed
    return ::getpid();
}
long worker_resident(long) { return static_cast<long>(mproc::detail::resident_bytes()); }
[[noreturn]] int hang(int) {
    for (;;) ::pause();
}
/// Kills its own process the first time it sees `mark` (a file it then leaves); returns 1 after.
int die_once(const std::string& mark) {
    if (::access(mark.c_str(), F_OK) == 0) return 1;
    std::ofstream(mark) << "seen";
    ::raise(SIGKILL);
    return 0;
}
/// Writes its pid into `path` (renamed into place: a reader sees all of it or nothing), then
/// sleeps ten minutes: a pool that does not end it hangs its join(), which the watchdog ends.
pid_t pid_then_sleep(const std::string& path) {
    const std::string part = path + ".part";
    std::ofstream(part) << ::getpid();
    std::rename(part.c_str(), path.c_str());
    std::this_thread::sleep_for(std::chrono::minutes(10));
    return ::getpid();
}
/// Adds a line to `path` (each run of the task, in order), then sleeps `ms` milliseconds.
int mark_then_nap(const std::string& path, int ms) {
    std::ofstream(path, std::ios::app) << ::getpid() << '\n';
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}
std::size_t lines_in(const std::string& path) {
    std::ifstream in(path);
    std::size_t n = 0;
    for (std::string line; std::getline(in, line);) ++n;
    return n;
}
std::pair<pid_t, pid_t> nap_pid_and_grandparent(int) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return {::getpid(), parent_of(::getppid())};
}
/// The rank a task ran on, and that rank's hostname.
std::pair<int, std::string> where_task(int) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    return {rank, host};
}

/// Sleeps `ms` milliseconds, longer on rank 1 (the slow rank) when `slow_rank_one` is set.
int nap(int ms, bool slow_rank_one) {
    const int rank = my_rank();
    std::this_thread::sleep_for(std::chrono::milliseconds(slow_rank_one && rank == 1 ? ms * 20 : ms));
    return rank;
}
int nap_ms(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}

struct Unusual : std::exception {
    const char* what() const noexcept override { return "an unusual failure"; }
};

int thrower(int kind) {
    switch (kind) {
        case 0: return 0;
        case 1: throw std::invalid_argument("bad argument 1");
        case 2: throw std::out_of_range("index 2 out of range");
        case 3: throw std::overflow_error("overflow 3");
        case 4: throw std::runtime_error("runtime 4");
        case 5: throw std::bad_alloc();
        case 6: throw Unusual();
        default: throw 42;
    }
}
int fail_on_multiples_of(int x, int m) {
    if (x % m == 0) throw std::domain_error("multiple " + std::to_string(x));
    return x;
}

std::pair<std::size_t, std::uint64_t> digest(const std::vector<std::uint8_t>& v) {
    std::uint64_t sum = 0;
    for (std::uint8_t b : v) sum = sum * 31 + b;
    return {v.size(), sum};
}
std::string big_string(std::size_t n) { return std::string(n, 'z'); }

int initialized_value = 0;
void init_worker() { initialized_value = 4242; }
int read_initialized(int) { return initialized_value; }
void failing_init() { throw std::runtime_error("no database on this rank"); }

std::uintptr_t where_testlib(int) { return mproc_mpi_testlib_where(); }

struct Cube {
    long operator()(long x) const { return x * x * x; }
};

std::vector<int> iota_vector(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), 0);
    return v;
}

}  // namespace

// ---- the Python tutorial programs for Pool (docs/python-twins/) -----------------------------------

TEST_CASE("tutorial: apply_async with a callback over MPI ranks, then close and join", "[tutorial]") {
    Watchdog dog(120s, "tutorial apply_async");
    std::vector<int> result_list;  // touched only by the callback, on rank 0
    mproc::mpi::Pool pool;
    for (int i = 0; i < 10; ++i)
        pool.apply_async(square, std::tuple{i}, [&](int result) { result_list.push_back(result); });
    pool.close();
    pool.join();
    std::sort(result_list.begin(), result_list.end());
    CHECK(result_list == std::vector<int>{0, 1, 4, 9, 16, 25, 36, 49, 64, 81});
}

TEST_CASE("tutorial: starmap over MPI ranks keeps the input order", "[tutorial]") {
    Watchdog dog(120s, "tutorial starmap");
    const std::vector<int> x = {1, 2, 3, 4, 5};
    const std::vector<int> y = {1, 1, 1, 1, 1};
    std::vector<std::tuple<int, int>> zip_args;
    for (std::size_t i = 0; i < x.size(); ++i) zip_args.emplace_back(x[i], y[i]);
    mproc::mpi::Pool pool;
    const std::vector<int> output = pool.starmap(add, zip_args);
    pool.close();
    pool.join();
    CHECK(output == std::vector<int>{2, 3, 4, 5, 6});
}

// ---- the calls ------------------------------------------------------------------------------------

TEST_CASE("apply and apply_async run on the worker ranks", "[api]") {
    Watchdog dog(120s, "apply");
    mproc::mpi::Pool pool;
    REQUIRE(pool.ranks().size() == 2);
    CHECK(pool.processes() >= 2);  // every rank's local workers (one per CPU)
    CHECK(pool.apply(square, 7) == 49);
    CHECK(pool.apply(add, 40, 2) == 42);
    std::set<int> ranks;
    for (int i = 0; i < 50; ++i) ranks.insert(pool.apply(rank_of_task, i));
    CHECK(ranks.count(0) == 0);
    CHECK(std::all_of(ranks.begin(), ranks.end(), [](int r) { return r == 1 || r == 2; }));

    int seen = 0;
    auto ar = pool.apply_async(square, std::tuple{9}, [&](int v) { seen = v; });
    CHECK(ar.get() == 81);
    CHECK(seen == 81);  // the callback ran before get() returned
    CHECK(ar.ready());
    CHECK(ar.successful());

    std::exception_ptr error;
    auto bad = pool.apply_async(thrower, std::tuple{1}, {}, [&](std::exception_ptr e) { error = e; });
    CHECK_THROWS_AS(bad.get(), std::invalid_argument);
    CHECK(error != nullptr);
    CHECK_FALSE(bad.successful());

    auto slow = pool.apply_async(nap_ms, std::tuple{300});
    CHECK_THROWS_AS(slow.get(10ms), mproc::TimeoutError);
    CHECK(slow.get() == 300);

    CHECK(pool.apply(Cube{}, 5L) == 125);  // a stateless callable
    pool.apply(nothing, 1);                 // a void task
    const auto pids = pool.worker_pids();
    CHECK(pids.size() == 2);
    CHECK(std::find(pids.begin(), pids.end(), ::getpid()) == pids.end());
    // Tasks run in each rank's local workers: children of its fork server, a child of the rank.
    for (int i = 0; i < 20; ++i) {
        const auto [pid, grandparent] = pool.apply(pid_and_grandparent, i);
        CHECK(std::find(pids.begin(), pids.end(), pid) == pids.end());
        CHECK(std::find(pids.begin(), pids.end(), grandparent) != pids.end());
    }
    // Where each worker runs: its rank, host and pid, in the order of worker_pids().
    const auto places = pool.ranks();
    REQUIRE(places.size() == pids.size());
    for (std::size_t i = 0; i < places.size(); ++i) {
        CHECK(places[i].rank == static_cast<int>(i) + 1);
        CHECK(places[i].pid == pids[i]);
    }
    for (int i = 0; i < 20; ++i) {
        const auto [rank, host] = pool.apply(where_task, i);
        REQUIRE(rank >= 1);
        REQUIRE(rank <= static_cast<int>(places.size()));
        CHECK(places[static_cast<std::size_t>(rank) - 1].host == host);
    }
    pool.close();
    pool.join();
}

TEST_CASE("in_rank: tasks run in the ranks' own processes, one at a time", "[api]") {
    Watchdog dog(120s, "in_rank");
    mproc::mpi::Pool pool({.in_rank = true});
    const auto pids = pool.worker_pids();
    std::set<pid_t> ran_in;
    for (int i = 0; i < 20; ++i) ran_in.insert(pool.apply(pid_of_task, i));
    for (pid_t p : ran_in) CHECK(std::find(pids.begin(), pids.end(), p) != pids.end());
    CHECK(pool.map(square, iota_vector(100), 7) == pool.map(square, iota_vector(100), 1));
    pool.close();
    pool.join();
}

TEST_CASE("each rank's local pool: processes_per_rank, max_tasks_per_child, task_timeout", "[api]") {
    Watchdog dog(120s, "local pools");
    {
        // Two local workers per rank: four processes run tasks, two per rank, at once.
        mproc::mpi::Pool pool({.processes_per_rank = 2});
        std::set<std::pair<pid_t, pid_t>> seen;
        for (const auto& pg : pool.map(nap_pid_and_grandparent, iota_vector(40), 1)) seen.insert(pg);
        std::map<pid_t, std::set<pid_t>> by_rank;
        for (const auto& [pid, rank_pid] : seen) by_rank[rank_pid].insert(pid);
        CHECK(by_rank.size() == 2);
        for (const auto& [rank_pid, workers] : by_rank) CHECK(workers.size() == 2);
        pool.close();
        pool.join();
    }
    {
        // One task per local worker: every task in a process of its own.
        mproc::mpi::Pool pool({.processes_per_rank = 1, .max_tasks_per_child = 1});
        std::set<pid_t> pids;
        for (int i = 0; i < 12; ++i) pids.insert(pool.apply(pid_and_grandparent, i).first);
        CHECK(pids.size() == 12);
        pool.close();
        pool.join();
    }
    {
        // A task past task_timeout fails with TimeoutError naming rank 0's task and the rank; the
        // rank goes on.
        mproc::mpi::Pool pool({.processes_per_rank = 1, .task_timeout = mproc::Seconds(0.5)});
        CHECK(pool.processes() == 2);
        try {
            pool.apply(nap_ms, 30'000);
            FAIL("no TimeoutError");
        } catch (const mproc::TimeoutError& e) {
            CHECK_THAT(e.what(), Catch::Contains("on rank "));
        }
        CHECK(pool.apply(square, 12) == 144);
        // Each item of one call is named as rank 0 knows it (the tasks of a call share one call
        // on the rank, each keeps its own name).
        auto items = pool.imap(nap_ms, std::vector<int>(4, 30'000), 1);
        int timed_out = 0;
        int index = 0;
        for (auto it = items.begin(); it != items.end(); ++it, ++index) {
            try {
                (void)*it;
            } catch (const mproc::TimeoutError& e) {
                ++timed_out;
                CHECK_THAT(e.what(), Catch::StartsWith("task ") && Catch::Contains(" on rank "));
                // Its item counted in rank 0's call, not in the rank's local task.
                if (index > 0) CHECK_THAT(e.what(), Catch::Contains("(item " + std::to_string(index) + ") on rank "));
            }
        }
        CHECK(timed_out == 4);
        pool.close();
        pool.join();
    }
    {
        // An item whose worker is lost runs again, as many times as the call's max_retries says.
        mproc::mpi::Pool pool({.processes_per_rank = 1});
        const std::string stem = "/tmp/mproc-mpi-retry-" + std::to_string(::getpid()) + "-";
        std::vector<std::string> marks;
        for (int i = 0; i < 4; ++i) marks.push_back(stem + std::to_string(i));
        CHECK(pool.map(die_once, marks, 1, mproc::CallOptions{.max_retries = 1}) == std::vector<int>(4, 1));
        for (auto& m : marks) m += "b";
        CHECK_THROWS_AS(pool.map(die_once, marks, 1), mproc::WorkerLost);  // the pool's: no retry
        for (const auto& m : marks) {
            std::remove(m.c_str());
            std::remove(m.substr(0, m.size() - 1).c_str());
        }
        pool.close();
        pool.join();
    }
    if (!MPROC_TEST_SANITIZED) {
        // A task that allocates past memory_limit fails with MemoryLimitExceeded; the rank goes on.
        mproc::mpi::Pool pool({.processes_per_rank = 1, .memory_limit = std::size_t{64} << 20});
        CHECK(pool.apply(allocate_mib, 8L) == 8L << 20);
        CHECK_THROWS_AS(pool.apply(allocate_mib, 512L), mproc::MemoryLimitExceeded);
        CHECK(pool.apply(allocate_mib, 8L) == 8L << 20);
        pool.close();
        pool.join();
    }
    {
        // A local worker left above max_memory_per_child after a task is replaced; every result
        // is right. Two ranks, one worker each, six 16 MiB leaks each: each is replaced.
        long base = 0;
        {
            mproc::mpi::Pool probe({.processes_per_rank = 1});
            base = probe.apply(worker_resident, 0L);
            probe.close();
            probe.join();
        }
        REQUIRE(base > 0);
        mproc::mpi::Pool pool(
            {.processes_per_rank = 1, .max_memory_per_child = static_cast<std::size_t>(base) + (40u << 20)});
        std::set<pid_t> pids;
        for (int i = 0; i < 12; ++i) pids.insert(pool.apply(leak_mib_pid, 16L));
        CHECK(pids.size() >= 3);
        pool.close();
        pool.join();
    }
    {
        // A rank whose local workers are all stuck: stall_timeout fails the task with
        // TimeoutError, named as rank 0 knows it; the stuck worker is replaced.
        mproc::mpi::Pool pool({.processes_per_rank = 1, .stall_timeout = mproc::Seconds(1.0)});
        try {
            pool.apply(hang, 1);
            FAIL("no TimeoutError");
        } catch (const mproc::TimeoutError& e) {
            CHECK_THAT(e.what(), Catch::Contains("stall_timeout") && Catch::Contains(" on rank "));
        }
        CHECK(pool.apply(square, 7) == 49);
        pool.close();
        pool.join();
    }
    CHECK_THROWS_WITH(mproc::mpi::Pool({.task_timeout = mproc::Seconds(0)}), Catch::Contains("must be positive"));
}

TEST_CASE("map, starmap and imap keep the input order over 10,000 tasks", "[order]") {
    Watchdog dog(300s, "ordering");
    constexpr int n = 10'000;
    const std::vector<int> xs = iota_vector(n);
    std::vector<int> expected(n);
    for (int i = 0; i < n; ++i) expected[static_cast<std::size_t>(i)] = i * i;
    mproc::mpi::Pool pool;

    for (std::size_t chunksize : {0, 1, 7, 1000}) {
        INFO("chunksize " << chunksize);
        CHECK(pool.map(square, xs, chunksize) == expected);
    }
    std::vector<std::tuple<int, int>> pairs;
    for (int i = 0; i < n; ++i) pairs.emplace_back(i, 2 * i);
    std::vector<int> sums(n);
    for (int i = 0; i < n; ++i) sums[static_cast<std::size_t>(i)] = 3 * i;
    CHECK(pool.starmap(add, pairs) == sums);
    CHECK(pool.starmap(add, pairs, 1) == sums);

    for (std::size_t chunksize : {1, 16}) {
        INFO("imap chunksize " << chunksize);
        std::vector<int> got;
        for (int v : pool.imap(square, xs, chunksize)) got.push_back(v);
        CHECK(got == expected);
        std::multiset<int> unordered;
        for (int v : pool.imap_unordered(square, xs, chunksize)) unordered.insert(v);
        CHECK(unordered == std::multiset<int>(expected.begin(), expected.end()));
    }

    // Any input range; results land at their index.
    const auto tags = pool.map(index_tag, std::views::iota(0LL, 5000LL));
    REQUIRE(tags.size() == 5000);
    for (long long i = 0; i < 5000; ++i) CHECK(tags[static_cast<std::size_t>(i)] == i * 7 + 3);
    const std::list<int> listed = {5, 4, 3};
    CHECK(pool.map(square, listed) == std::vector<int>{25, 16, 9});
    CHECK(pool.map(square, std::vector<int>{}).empty());
    pool.close();
    pool.join();
}

TEST_CASE("map_async and starmap_async: results, callbacks and error callbacks", "[api]") {
    Watchdog dog(120s, "map_async");
    mproc::mpi::Pool pool;
    const std::vector<int> xs = iota_vector(1000);
    std::vector<int> from_callback;
    auto am = pool.map_async(square, xs, 0, [&](const std::vector<int>& v) { from_callback = v; });
    const std::vector<int> got = am.get();
    CHECK(got.size() == 1000);
    CHECK(got[999] == 999 * 999);
    CHECK(from_callback == got);

    std::vector<std::pair<int, int>> pairs = {{1, 2}, {3, 4}};
    auto as = pool.starmap_async(add, pairs);
    CHECK(as.get() == std::vector<int>{3, 7});

    std::exception_ptr error;
    std::vector<std::tuple<int, int>> failing;
    for (int i = 1; i <= 100; ++i) failing.emplace_back(i, 10);
    auto af = pool.starmap_async(fail_on_multiples_of, failing, 3, {}, [&](std::exception_ptr e) { error = e; });
    CHECK_THROWS_WITH(af.get(), "multiple 10");  // the lowest failing index
    CHECK(error != nullptr);
    pool.close();
    pool.join();
}

TEST_CASE("close() and join() while a map still reads its input: the map completes", "[api]") {
    // map() hands its tasks to the ranks as it reads its input (detail/pool/feed.hpp): a close()
    // from another thread after the first parts went out must not refuse the rest, and join()
    // must wait for them.
    Watchdog dog(300s, "close during a map");
    mproc::mpi::Pool pool;
    constexpr int n = 600'000;
    pool_test::CloseMidInput closing(pool);
    auto input = std::views::iota(0, n) | std::views::transform([&](int i) {
                     if (i == 400'000) closing.at_item();  // 1.6 MB of items read: parts were handed over
                     return i % 1000;
                 });
    std::vector<int> r;
    CHECK_NOTHROW(r = pool.map(square, input));
    closing.join();
    REQUIRE(r.size() == static_cast<std::size_t>(n));
    CHECK(r[n - 1] == (n - 1) % 1000 * ((n - 1) % 1000));
}

TEST_CASE("large arguments and results cross in one message each", "[api]") {
    Watchdog dog(300s, "large");
    mproc::mpi::Pool pool;
    std::vector<std::uint8_t> big(48u << 20);
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::uint8_t>(i * 131 + 7);
    const auto [size, sum] = pool.apply(digest, big);
    CHECK(size == big.size());
    CHECK(sum == digest(big).second);
    const std::string s = pool.apply(big_string, std::size_t{24u << 20});
    CHECK(s.size() == (24u << 20));
    CHECK(s.find_first_not_of('z') == std::string::npos);
    // Many mid-sized tasks at once stay bounded per rank and all come back.
    std::vector<std::vector<std::uint8_t>> many(40, std::vector<std::uint8_t>(1u << 20, 9));
    const auto digests = pool.map(digest, many, 1);
    REQUIRE(digests.size() == 40);
    for (const auto& d : digests) CHECK(d.first == (1u << 20));
    pool.close();
    pool.join();
}

TEST_CASE("a fast rank takes more of the work than a slow one", "[balance]") {
    Watchdog dog(300s, "balance");
    mproc::mpi::Pool pool;
    std::vector<mproc::AsyncResult<int>> results;
    for (int i = 0; i < 300; ++i) results.push_back(pool.apply_async(nap, std::tuple{2, true}));
    std::map<int, int> per_rank;
    for (auto& r : results) ++per_rank[r.get()];
    INFO("rank 1 (40 ms a task) ran " << per_rank[1] << ", rank 2 (2 ms a task) ran " << per_rank[2]);
    CHECK(per_rank[1] + per_rank[2] == 300);
    CHECK(per_rank[2] > 3 * per_rank[1]);
    pool.close();
    pool.join();
}

// ---- exceptions -----------------------------------------------------------------------------------

TEST_CASE("while the ranks' windows are full and tasks wait on rank 0, its MPI thread sleeps", "[balance]") {
    Watchdog dog(120s, "no busy loop with a backlog");
    mproc::mpi::Pool pool({.in_rank = true});
    auto many = pool.map_async(nap_ms, std::vector<int>(40, 300), 1);
    std::this_thread::sleep_for(700ms);  // the windows are sized to the 300 ms tasks by now
    // Rank 0 has nothing to do but wait for results (a few a second): a thread looking again at
    // once because the backlog is not empty would use about the whole 2.5 s.
    rusage before{}, after{};
    ::getrusage(RUSAGE_SELF, &before);
    std::this_thread::sleep_for(2500ms);
    ::getrusage(RUSAGE_SELF, &after);
    const auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
    const double used = seconds(after.ru_utime) + seconds(after.ru_stime) - seconds(before.ru_utime) -
                        seconds(before.ru_stime);
    INFO("rank 0's CPU while it waits: " << used << " s");
    CHECK(used < 0.5);
    CHECK(many.cancel());
    pool.close();
    pool.join();
}

TEST_CASE("standard exceptions keep their type and what(); others become mproc::RemoteError", "[exceptions]") {
    Watchdog dog(120s, "exceptions");
    mproc::mpi::Pool pool;
    CHECK(pool.apply(thrower, 0) == 0);
    CHECK_THROWS_MATCHES(pool.apply(thrower, 1), std::invalid_argument, Catch::Message("bad argument 1"));
    CHECK_THROWS_MATCHES(pool.apply(thrower, 2), std::out_of_range, Catch::Message("index 2 out of range"));
    CHECK_THROWS_MATCHES(pool.apply(thrower, 3), std::overflow_error, Catch::Message("overflow 3"));
    CHECK_THROWS_MATCHES(pool.apply(thrower, 4), std::runtime_error, Catch::Message("runtime 4"));
    CHECK_THROWS_AS(pool.apply(thrower, 5), std::bad_alloc);
    try {
        pool.apply(thrower, 6);
        FAIL("no exception");
    } catch (const mproc::RemoteError& e) {
        CHECK(std::string(e.type_name()).find("Unusual") != std::string::npos);
        CHECK(std::string(e.what()).find("an unusual failure") != std::string::npos);
    }
    try {
        pool.apply(thrower, 7);
        FAIL("no exception");
    } catch (const mproc::RemoteError& e) {
        CHECK(std::string(e.type_name()) == "int");
    }
    // map: the lowest failing index; imap: each failed item rethrows and the iteration goes on.
    CHECK_THROWS_WITH(pool.map(thrower, std::vector<int>{0, 0, 4, 1, 0}, 1), "runtime 4");
    std::vector<std::tuple<int, int>> args;
    for (int i = 1; i <= 30; ++i) args.emplace_back(i, 7);
    CHECK_THROWS_WITH(pool.starmap(fail_on_multiples_of, args, 4), "multiple 7");
    int values = 0, failures = 0;
    const std::vector<int> kinds = {0, 1, 0, 2, 0};
    auto it = pool.imap(thrower, kinds);
    for (auto i = it.begin(); i != it.end(); ++i) {
        try {
            (void)*i;
            ++values;
        } catch (const std::logic_error&) {
            ++failures;
        }
    }
    CHECK(values == 3);
    CHECK(failures == 2);
    pool.close();
    pool.join();
}

namespace {
using mproc_test::Fragile;
Fragile make_fragile(long n) { return Fragile{n, std::to_string(n)}; }
long fragile_number(Fragile f) { return f.n; }
}  // namespace

TEST_CASE("a result that does not encode, or arguments that do not decode, fail only their item", "[exceptions]") {
    Watchdog dog(120s, "serialisation failures");
    mproc::mpi::Pool pool;
    CHECK_THROWS_WITH(pool.apply(make_fragile, 13L),
                      Catch::Contains("13 cannot be encoded") && Catch::Contains("Fragile"));
    CHECK_THROWS_AS(pool.apply(make_fragile, 13L), mproc::SerializationError);
    CHECK(pool.apply(make_fragile, 12L).text == "12");
    std::vector<long> xs = {10, 11, 12, 13, 14, 15};
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{3}, std::size_t{6}}) {
        INFO("chunksize " << chunksize);
        CHECK_THROWS_AS(pool.map(make_fragile, xs, chunksize), mproc::SerializationError);
        std::size_t i = 0;
        auto results = pool.imap(make_fragile, xs, chunksize);
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            if (xs[i] == 13) CHECK_THROWS_AS(*it, mproc::SerializationError);
            else CHECK((*it).text == std::to_string(xs[i]));
        }
        CHECK(i == xs.size());
    }
    std::vector<Fragile> args;
    for (long n : {5L, 6L, 7L, 8L}) args.push_back(Fragile{n, "x"});
    std::size_t i = 0;
    auto numbers = pool.imap(fragile_number, args, 4);
    for (auto it = numbers.begin(); it != numbers.end(); ++it, ++i) {
        if (args[i].n == 7) CHECK_THROWS_WITH(*it, Catch::Contains("7 is refused on decoding"));
        else CHECK(*it == args[i].n);
    }
    CHECK(i == args.size());
    pool.close();
    pool.join();
}

TEST_CASE("the initializer runs on every worker rank; one that throws breaks the pool", "[exceptions]") {
    Watchdog dog(120s, "initializer");
    {
        mproc::mpi::Pool pool({.initializer = init_worker});
        const auto got = pool.map(read_initialized, iota_vector(40), 1);
        CHECK(std::all_of(got.begin(), got.end(), [](int v) { return v == 4242; }));
        pool.close();
        pool.join();
    }
    {
        mproc::mpi::Pool pool({.initializer = failing_init});
        CHECK_THROWS_WITH(pool.apply(square, 3),
                          Catch::Contains("initializer failed") && Catch::Contains("no database on this rank"));
        CHECK_THROWS_AS(pool.apply_async(square, std::tuple{3}), mproc::Error);
        pool.close();
        pool.join();
    }
    mproc::mpi::Pool after;  // the ranks serve the next pool as usual
    CHECK(after.apply(square, 6) == 36);
}

// ---- naming functions across ranks -----------------------------------------------------------------

TEST_CASE("a task that lives in a shared library is found on every rank by its offset", "[dladdr]") {
    Watchdog dog(120s, "shared library");
    mproc::mpi::Pool pool;
    const auto got = pool.map(mproc_mpi_testlib_scale, iota_vector(1000), 10);
    REQUIRE(got.size() == 1000);
    for (int i = 0; i < 1000; ++i) CHECK(got[static_cast<std::size_t>(i)] == 3 * i + 1);
    CHECK(pool.apply(mproc_mpi_testlib_scale, 14) == 43);

    // With address-space randomisation the library sits elsewhere on the other ranks, so a raw
    // address would not do.
    std::ifstream aslr("/proc/sys/kernel/randomize_va_space");
    int randomised = 0;
    aslr >> randomised;
    if (randomised != 0) {
        std::set<std::uintptr_t> where;
        for (int i = 0; i < 8; ++i) where.insert(pool.apply(where_testlib, i));
        where.insert(mproc_mpi_testlib_where());
        CHECK(where.size() > 1);
    }
    pool.close();
    pool.join();
}

TEST_CASE("a function the other ranks cannot resolve fails with a clear mproc::Error", "[dladdr]") {
    Watchdog dog(120s, "unresolvable");
    mproc::mpi::Pool pool;

    // Loaded on rank 0 only: the workers cannot find the library.
    void* plugin = ::dlopen(MPROC_MPI_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(plugin != nullptr);
    auto twice = reinterpret_cast<int (*)(int)>(::dlsym(plugin, "mproc_mpi_plugin_twice"));
    REQUIRE(twice != nullptr);
    CHECK(twice(4) == 8);
    try {
        pool.apply(twice, 4);
        FAIL("no exception");
    } catch (const mproc::Error& e) {
        CHECK_THAT(e.what(), Catch::Contains("has not loaded") && Catch::Contains("mproc_mpi_plugin"));
    }
    CHECK_THROWS_AS(pool.map(twice, iota_vector(10), 3), mproc::Error);

    // Code in no loaded object at all: refused on rank 0, before anything is sent.
    void* anonymous = ::mmap(nullptr, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(anonymous != MAP_FAILED);
    auto nowhere = reinterpret_cast<int (*)(int)>(anonymous);
    CHECK_THROWS_WITH(pool.apply_async(nowhere, std::tuple{1}), Catch::Contains("in no loaded object"));
    ::munmap(anonymous, 4096);

    CHECK(pool.apply(square, 5) == 25);  // the pool goes on
    pool.close();
    pool.join();
    ::dlclose(plugin);
}

// ---- libraries by identity (their own mpirun: the workers keep what they load) ----------------

namespace {
void load_on_worker(const char* path) {
    if (::dlopen(path, RTLD_NOW | RTLD_LOCAL) == nullptr) throw std::runtime_error(::dlerror());
}
void load_moved_copy() { load_on_worker(MPROC_MPI_MOVED_COPY); }
void load_other_build() { load_on_worker(MPROC_MPI_REBUILT_OTHER); }

using IntFunction = int (*)(int);
IntFunction twice_in(void* library) {
    return reinterpret_cast<IntFunction>(::dlsym(library, "mproc_mpi_plugin_twice"));
}
}  // namespace

TEST_CASE("A library the workers loaded from another folder is found by its file name and build-id", "[buildid]") {
    Watchdog dog(120s, "moved library");
    mproc::mpi::Pool pool({.initializer = load_moved_copy});  // the workers load the copy
    void* library = ::dlopen(MPROC_MPI_MOVED, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(library != nullptr);
    const IntFunction twice = twice_in(library);
    REQUIRE(twice != nullptr);
    std::vector<int> doubled;
    for (int x : iota_vector(50)) doubled.push_back(2 * x);
    CHECK(pool.map(twice, iota_vector(50), 5) == doubled);
    CHECK(pool.apply(twice, 21) == 42);
    pool.close();
    pool.join();
    ::dlclose(library);
}

TEST_CASE("A library of another build on the workers is refused with a message that says so", "[buildid]") {
    Watchdog dog(120s, "another build");
    mproc::mpi::Pool pool({.initializer = load_other_build});  // the same file name, another build-id
    void* library = ::dlopen(MPROC_MPI_REBUILT, RTLD_NOW | RTLD_LOCAL);
    REQUIRE(library != nullptr);
    const IntFunction twice = twice_in(library);
    REQUIRE(twice != nullptr);
    try {
        pool.apply(twice, 4);
        FAIL("no exception");
    } catch (const mproc::Error& e) {
        CHECK_THAT(e.what(), Catch::Contains("another build") && Catch::Contains("build-id") &&
                                 Catch::Contains("other-build/libmproc_mpi_rebuilt.so"));
    }
    CHECK(pool.apply(square, 5) == 25);  // the pool goes on
    pool.close();
    pool.join();
    ::dlclose(library);
}

// ---- lifetime -------------------------------------------------------------------------------------

TEST_CASE("close refuses new tasks; join waits for every task and callback", "[lifetime]") {
    Watchdog dog(120s, "close/join");
    mproc::mpi::Pool pool;
    CHECK_THROWS_AS(pool.join(), mproc::Error);  // before close
    std::atomic<int> callbacks{0};
    for (int i = 0; i < 200; ++i) pool.apply_async(nap_ms, std::tuple{1}, [&](int) { ++callbacks; });
    pool.close();
    CHECK_THROWS_AS(pool.apply(square, 1), mproc::Error);
    CHECK_THROWS_AS(pool.map(square, iota_vector(3)), mproc::Error);
    pool.join();
    CHECK(callbacks == 200);
}

TEST_CASE("join(timeout): false while tasks run, then true; the pool stays joinable", "[lifetime]") {
    Watchdog dog(120s, "join with a timeout");
    mproc::mpi::Pool pool;
    auto slow = pool.apply_async(nap_ms, std::tuple{3000});
    pool.close();
    CHECK_FALSE(pool.join(mproc::Seconds{0.1}));
    CHECK_FALSE(slow.ready());
    CHECK(pool.join(mproc::Seconds{60}));
    CHECK(slow.get() == 3000);
    CHECK(pool.join(mproc::Seconds{0}));
}

TEST_CASE("terminate fails pending results at once; the ranks drop their queued tasks", "[lifetime]") {
    Watchdog dog(120s, "terminate");
    {
        mproc::mpi::Pool pool;
        std::vector<mproc::AsyncResult<int>> pending;
        for (int i = 0; i < 40; ++i) pending.push_back(pool.apply_async(nap_ms, std::tuple{250}));
        const auto begun = std::chrono::steady_clock::now();
        pool.terminate();
        CHECK(std::chrono::steady_clock::now() - begun < 5s);  // 40 × 250 ms would take 5 s on two ranks
        int failed = 0;
        for (auto& r : pending) {
            try {
                r.get();
            } catch (const mproc::Error&) {
                ++failed;
            }
        }
        CHECK(failed == 40);
        CHECK_THROWS_AS(pool.apply(square, 2), mproc::Error);
    }
    // The next pool waits at most for the tasks that were running, not for the 40.
    const auto begun = std::chrono::steady_clock::now();
    mproc::mpi::Pool next;
    CHECK(next.map(square, iota_vector(100)) == [] {
        std::vector<int> v(100);
        for (int i = 0; i < 100; ++i) v[static_cast<std::size_t>(i)] = i * i;
        return v;
    }());
    CHECK(std::chrono::steady_clock::now() - begun < 4s);
    next.close();
    next.join();
    // A pool destroyed with work pending terminates it too.
    {
        mproc::mpi::Pool doomed;
        auto r = doomed.apply_async(nap_ms, std::tuple{200});
        (void)r;
    }
}

TEST_CASE("cancel: the call completes with CancelledError, its queued tasks are dropped, the pool goes on",
          "[lifetime]") {
    Watchdog dog(120s, "cancel over MPI");
    mproc::mpi::Pool pool;
    std::vector<mproc::AsyncResult<int>> busy;
    for (int i = 0; i < 8; ++i) busy.push_back(pool.apply_async(nap_ms, std::tuple{200}));
    auto queued = pool.apply_async(nap_ms, std::tuple{5000});
    auto many = pool.map_async(nap_ms, std::vector<int>(20, 300));
    CHECK(queued.cancel());
    CHECK(many.cancel());
    CHECK_THROWS_AS(queued.get(), mproc::CancelledError);
    CHECK_THROWS_AS(many.get(), mproc::CancelledError);
    for (auto& r : busy) CHECK(r.get() == 200);
    CHECK_FALSE(busy[0].cancel());  // finished: nothing to cancel
    CHECK(pool.apply(square, 6) == 36);
    CHECK_THROWS_AS(pool.stats(), mproc::Error);  // the local pool's only
    pool.close();
    pool.join();
}

TEST_CASE("cancel ends a task already running in a rank's local pool; the pool goes on", "[lifetime]") {
    Watchdog dog(120s, "cancel a running task over MPI");
    mproc::mpi::Pool pool({.processes_per_rank = 1});
    const std::string path = "/tmp/mproc-mpi-cancel-" + std::to_string(::getpid());
    std::remove(path.c_str());
    auto r = pool.apply_async(pid_then_sleep, std::tuple{path});
    pid_t task_pid = 0;
    for (int i = 0; i < 3000 && !task_pid; ++i) {  // until it runs (at most 30 s)
        std::ifstream(path) >> task_pid;
        if (!task_pid) std::this_thread::sleep_for(10ms);
    }
    REQUIRE(task_pid > 0);
    CHECK(r.cancel());
    CHECK_THROWS_AS(r.get(), mproc::CancelledError);
    // Its process ends (the local pool kills it, then reaps it): not a minute later.
    bool ended = false;
    for (int i = 0; i < 3000 && !ended; ++i) {
        ended = ::kill(task_pid, 0) != 0 && errno == ESRCH;
        if (!ended) std::this_thread::sleep_for(10ms);
    }
    CHECK(ended);
    std::remove(path.c_str());
    CHECK(pool.map(square, iota_vector(50)) == [] {
        std::vector<int> v(50);
        for (int i = 0; i < 50; ++i) v[static_cast<std::size_t>(i)] = i * i;
        return v;
    }());
    // Cancelled at once: the task reaches its rank together with the cancel (or the cancel is
    // sent before it), and is either never run or ended; join() does not wait ten minutes.
    std::remove(path.c_str());
    for (int i = 0; i < 4; ++i) {
        auto at_once = pool.apply_async(pid_then_sleep, std::tuple{path});
        CHECK(at_once.cancel());
        CHECK_THROWS_AS(at_once.get(), mproc::CancelledError);
    }
    pool.close();
    pool.join();
    std::remove(path.c_str());
}

TEST_CASE("cancel with in_rank: the tasks a rank holds of the call are not run", "[lifetime]") {
    Watchdog dog(120s, "cancel in_rank over MPI");
    mproc::mpi::Pool pool({.in_rank = true});
    const std::string path = "/tmp/mproc-mpi-cancel-runs-" + std::to_string(::getpid());
    std::remove(path.c_str());
    // Each rank gets its first window (4 tasks) at once and runs one task at a time.
    auto many = pool.starmap_async(mark_then_nap, std::vector<std::tuple<std::string, int>>(16, {path, 1500}), 1);
    for (int i = 0; i < 3000 && lines_in(path) < 2; ++i) std::this_thread::sleep_for(10ms);
    CHECK(many.cancel());
    CHECK_THROWS_AS(many.get(), mproc::CancelledError);
    CHECK(pool.apply(square, 7) == 49);  // after the running two; the queued ones are skipped
    pool.close();
    pool.join();
    // The two running when the cancel came, and at most one more per rank that began before it
    // arrived: not the eight the ranks held.
    CHECK(lines_in(path) <= 4);
    std::remove(path.c_str());
}

TEST_CASE("an imap range destroyed after join(): the cancel it makes does not stall a later join()", "[lifetime]") {
    Watchdog dog(120s, "imap destroyed after join");
    mproc::mpi::Pool pool;
    {
        auto squares = pool.imap(square, iota_vector(10));
        auto it = squares.begin();
        CHECK(*it == 0);
        pool.close();
        pool.join();  // every task in flight finishes; the pool's thread ends
    }                 // the range cancels what it thinks is in flight
    pool.join();
}

TEST_CASE("one live pool at a time; more processes than worker ranks is an error", "[lifetime]") {
    Watchdog dog(120s, "one pool");
    CHECK_THROWS_WITH(mproc::mpi::Pool(5), Catch::Contains("only 2 worker ranks"));
    mproc::mpi::Pool first;
    CHECK_THROWS_WITH(mproc::mpi::Pool(), Catch::Contains("another mproc::mpi::Pool is running"));
    first.close();
    first.join();
    mproc::mpi::Pool one(1);  // after join, the next may start; this one uses rank 1 alone
    CHECK(one.ranks().size() == 1);
    std::set<int> ranks;
    for (int i = 0; i < 20; ++i) ranks.insert(one.apply(rank_of_task, i));
    CHECK(ranks == std::set<int>{1});
    one.close();
    one.join();
    // An mpi::Pool is an mproc::Pool: code written for the local pool takes it.
    mproc::mpi::Pool as_local;
    mproc::Pool& base = as_local;
    CHECK(base.map(square, std::vector<int>{3, 4}) == std::vector<int>{9, 16});
}
