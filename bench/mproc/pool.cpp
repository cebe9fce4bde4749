// mproc benchmarks — Pool. Twin: bench/python/pool.py (same operations, sizes, checks and output).
//
//   bench_mproc_pool map         --n 1000000            Pool.map(square, xs), default chunksize: tasks/s
//   bench_mproc_pool map_c1      --n 100000             Pool.map(square, xs, 1): tasks/s
//   bench_mproc_pool apply_async --n 100000             apply_async(square, (i,), callback) × n, then get all: tasks/s
//   bench_mproc_pool apply_lat   --n 2000 [--pin]       apply(square, i) one at a time: p50/p90/p99 µs
//                                                       (--pin: this process, and so the pool, on one CPU)
//   bench_mproc_pool starmap     --n 1000000            Pool.starmap(add, pairs), default chunksize: tasks/s
//   bench_mproc_pool memory                             private memory of each idle worker: MiB
//   bench_mproc_pool idle        --seconds 1            CPU of an idle Pool (this process, helpers, workers): %
//   bench_mproc_pool uneven      --n 2000               map over items whose time varies 100× (20 µs .. 2 ms):
//                                                       makespan / (total work / workers + longest item)
//                                                       (--chunksize N: fixed chunks, for comparison)
//   bench_mproc_pool apply_async --stats-ms 10          as apply_async, with another thread calling stats() every 10 ms
//
// Every pool has cpu_count() workers (Python: os.cpu_count()), is created and warmed up (one small
// map) before the clock starts, and every result is collected and checked.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <thread>
#include <tuple>
#include <vector>

#include <mproc/mproc.hpp>

#include "../common/bench.hpp"

namespace {

std::int64_t square(std::int64_t x) { return x * x; }
std::int64_t add(std::int64_t x, std::int64_t y) { return x + y; }

std::vector<std::int64_t> iota_vec(long long n) {
    std::vector<std::int64_t> xs(static_cast<std::size_t>(n));
    std::iota(xs.begin(), xs.end(), std::int64_t{0});
    return xs;
}

/// sum of i*i for i < n
std::int64_t sum_squares(long long n) {
    std::int64_t s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += i * i;
    return s;
}

void warm_up(mproc::Pool& pool) {
    const auto r = pool.map(square, iota_vec(100));
    bench::check(r.size() == 100 && r[99] == 99 * 99, "warm-up map");
}

void bench_map(const bench::Args& args, bool chunk1) {
    const long long n = args.num("n", chunk1 ? 100'000 : 1'000'000);
    const auto xs = iota_vec(n);
    mproc::Pool pool;
    warm_up(pool);
    const std::int64_t t0 = bench::now_ns();
    const std::vector<std::int64_t> r = chunk1 ? pool.map(square, xs, 1) : pool.map(square, xs);
    const double s = bench::seconds_since(t0);
    bench::check(static_cast<long long>(r.size()) == n, "map returned " + std::to_string(r.size()) + " results");
    bench::check(std::accumulate(r.begin(), r.end(), std::int64_t{0}) == sum_squares(n), "map: sum of results");
    for (long long i = 0; i < n; i += 9973) bench::check(r[i] == i * i, "map: result out of order");
    bench::Record(chunk1 ? "pool_map_c1" : "pool_map", "mproc", static_cast<double>(n) / s, "tasks/s")
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("processes", pool.processes())
        .print();
}

void bench_apply_async(const bench::Args& args) {
    const long long n = args.num("n", 100'000);
    const long long stats_ms = args.num("stats-ms", 0);
    mproc::Pool pool;
    warm_up(pool);
    // With --stats-ms: what asking for stats() while the pool works costs it.
    std::atomic<bool> done{false};
    std::atomic<long long> polls{0};
    std::thread poller;
    if (stats_ms > 0)
        poller = std::thread([&] {
            while (!done.load()) {
                bench::check(pool.stats().workers.size() == pool.processes(), "stats() workers");
                polls.fetch_add(1);
                std::this_thread::sleep_for(std::chrono::milliseconds(stats_ms));
            }
        });
    std::vector<std::int64_t> got;  // touched only by the callbacks (one at a time, on the pool's thread)
    got.reserve(static_cast<std::size_t>(n));
    std::vector<mproc::AsyncResult<std::int64_t>> results;
    results.reserve(static_cast<std::size_t>(n));
    const std::int64_t t0 = bench::now_ns();
    for (std::int64_t i = 0; i < n; ++i)
        results.push_back(pool.apply_async(square, std::tuple{i}, [&got](std::int64_t v) { got.push_back(v); }));
    for (auto& r : results) r.get();
    const double s = bench::seconds_since(t0);
    done.store(true);
    if (poller.joinable()) poller.join();
    bench::check(static_cast<long long>(got.size()) == n, "callbacks ran " + std::to_string(got.size()) + " times");
    bench::check(std::accumulate(got.begin(), got.end(), std::int64_t{0}) == sum_squares(n), "apply_async: sum");
    bench::Record(stats_ms > 0 ? "pool_apply_async_stats" : "pool_apply_async", "mproc", static_cast<double>(n) / s,
                  "tasks/s")
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("stats_calls", static_cast<double>(polls.load()))
        .print();
}

/// Busy for `us` microseconds of wall time.
std::int64_t spin_us(std::int64_t us) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    std::int64_t spins = 0;
    while (std::chrono::steady_clock::now() < until) ++spins;
    return us;
}

/// Stragglers: a map whose items take from 20 µs to 2 ms (log-uniform, a fixed pseudo-random
/// order), default chunksize. The ideal makespan is the total work spread evenly over the workers
/// plus the longest item (no schedule can do better than either).
void bench_uneven(const bench::Args& args) {
    const long long n = args.num("n", 2000);
    std::vector<std::int64_t> us(static_cast<std::size_t>(n));
    const bool sparse = args.num("sparse", 0) != 0;  // 2% of the items 2 ms, the rest 20 µs
    std::uint64_t state = 88172645463325252ull;
    std::int64_t total = 0, longest = 0;
    for (auto& u : us) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        const double unit = static_cast<double>(state % 1'000'000) / 1e6;
        u = sparse ? (unit < 0.02 ? 2000 : 20) : static_cast<std::int64_t>(20.0 * std::pow(100.0, unit));
        total += u;
        longest = std::max(longest, u);
    }
    mproc::Pool pool;
    warm_up(pool);
    const std::int64_t t0 = bench::now_ns();
    // --chunksize N: fixed chunks instead (Python's default is n / (4 × workers)), for comparison.
    const auto chunksize = static_cast<std::size_t>(args.num("chunksize", 0));
    const std::vector<std::int64_t> r = pool.map(spin_us, us, chunksize);
    const double s = bench::seconds_since(t0);
    bench::check(r == us, "uneven map: results");
    const double ideal = (static_cast<double>(total) / pool.processes() + static_cast<double>(longest)) / 1e6;
    bench::Record("pool_uneven", "mproc", s / ideal, "× ideal")
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("ideal_seconds", ideal)
        .set("processes", pool.processes())
        .print();
}

void bench_apply_latency(const bench::Args& args) {
    const long long n = args.num("n", 2000);
    const bool pin = args.flag("pin");
    if (pin) bench::pin_to_cpu(bench::first_allowed_cpu());  // before the pool: its processes inherit it
    mproc::Pool pool;
    warm_up(pool);
    for (std::int64_t i = 0; i < 100; ++i) bench::check(pool.apply(square, i) == i * i, "apply warm-up");
    std::vector<std::int64_t> lat;
    lat.reserve(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t t0 = bench::now_ns();
        const std::int64_t r = pool.apply(square, i);
        lat.push_back(bench::now_ns() - t0);
        bench::check(r == i * i, "apply result");
    }
    bench::latency_record(pin ? "pool_apply_lat_pinned" : "pool_apply_lat", "mproc", lat).print();
}

void bench_starmap(const bench::Args& args) {
    const long long n = args.num("n", 1'000'000);
    std::vector<std::tuple<std::int64_t, std::int64_t>> pairs;
    pairs.reserve(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) pairs.emplace_back(i, i);
    mproc::Pool pool;
    warm_up(pool);
    const std::int64_t t0 = bench::now_ns();
    const std::vector<std::int64_t> r = pool.starmap(add, pairs);
    const double s = bench::seconds_since(t0);
    bench::check(static_cast<long long>(r.size()) == n, "starmap result count");
    bench::check(std::accumulate(r.begin(), r.end(), std::int64_t{0}) == n * (n - 1), "starmap: sum of results");
    bench::Record("pool_starmap", "mproc", static_cast<double>(n) / s, "tasks/s")
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .print();
}

void bench_memory(const bench::Args& args) {
    mproc::Pool pool;
    warm_up(pool);
    bench::sleep_s(static_cast<double>(args.num("settle_ms", 300)) / 1000.0);
    const auto pids = pool.worker_pids();
    bench::check(pids.size() == pool.processes(), "worker_pids() size");
    double total = 0;
    for (pid_t p : pids) total += static_cast<double>(bench::private_kib(p));
    const double per_worker_mib = total / static_cast<double>(pids.size()) / 1024.0;
    double helpers_kib = 0;  // the fork server and anything else between us and the workers
    for (pid_t c : bench::children_of(::getpid())) helpers_kib += static_cast<double>(bench::private_kib(c));
    bench::Record("pool_worker_memory", "mproc", per_worker_mib, "MiB")
        .set("workers", static_cast<double>(pids.size()))
        .set("helpers_private_mib", helpers_kib / 1024.0)
        .set("parent_private_mib", static_cast<double>(bench::private_kib(::getpid())) / 1024.0)
        .print();
}

void bench_idle(const bench::Args& args) {
    mproc::Pool pool;
    warm_up(pool);
    bench::sleep_s(0.2);
    // This process (its collector thread included), its helpers and the workers.
    std::vector<pid_t> pids{::getpid()};
    for (std::size_t i = 0; i < pids.size(); ++i)
        for (pid_t c : bench::children_of(pids[i])) pids.push_back(c);
    bench::idle_record("idle_pool", "mproc", pids, static_cast<double>(args.num("ms", 1000)) / 1000.0);
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    const std::string& op = args.op();
    try {
        if (op == "map") bench_map(args, false);
        else if (op == "map_c1") bench_map(args, true);
        else if (op == "apply_async") bench_apply_async(args);
        else if (op == "apply_lat") bench_apply_latency(args);
        else if (op == "starmap") bench_starmap(args);
        else if (op == "memory") bench_memory(args);
        else if (op == "idle") bench_idle(args);
        else if (op == "uneven") bench_uneven(args);
        else bench::die("unknown operation " + op);
    } catch (const std::exception& e) {
        bench::die(op + ": " + e.what());
    }
    return 0;
}
