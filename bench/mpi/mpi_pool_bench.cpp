// Tasks per second of Pool::map over `n` tasks of x*x at a given chunksize, best of `repeat` runs:
//     mpirun --oversubscribe -n 3 mpi_pool_bench N CHUNKSIZE [REPEAT]     mproc::mpi::Pool, 2 worker ranks
//     mpi_pool_bench --local N CHUNKSIZE [REPEAT]                       mproc::Pool, 2 forked workers
// Prints one JSON line: {"op": "pool_map", "impl": ..., "value": tasks/s, "unit": "tasks/s", ...}.
// mpi4py_pool.py is its twin for mpi4py.futures; run.sh runs them side by side.
// MPROC_BENCH_PER_RANK=K runs each rank's tasks in a local pool of K processes (0: one per CPU,
// mproc's default); MPROC_BENCH_PER_RANK=in_rank (the default here, as mpi4py does) in the rank.
//
//     mpirun ... mpi_pool_bench --busy US N     map of N tasks that each keep a CPU busy for US µs,
//                                               chunksize 1: the workers' busy share (each worker's
//                                               time in tasks over the span of its tasks, by its
//                                               own clock; the mean over the workers)
//                                               {"op": "pool_busy", "value": share, "unit": "share", ...}
#include <mproc/mpi.hpp>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <unistd.h>
#include <vector>

long long square(long long x) { return x * x; }

/// Keeps this CPU busy for `us` microseconds; returns where and when it ran: (pid, start, end),
/// in ns of CLOCK_MONOTONIC of the worker's machine.
std::tuple<long long, long long, long long> spin(long long us) {
    const auto begun = std::chrono::steady_clock::now();
    const auto until = begun + std::chrono::microseconds(us);
    while (std::chrono::steady_clock::now() < until) {}
    const auto ns = [](auto t) {
        return static_cast<long long>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
    };
    return {static_cast<long long>(::getpid()), ns(begun), ns(std::chrono::steady_clock::now())};
}

/// The workers' busy share of a map of `n` tasks of `us` µs each at chunksize 1, best of `repeat`:
/// for each worker, the time it spent in tasks over the time from its first task's start to its
/// last one's end (the gaps are the time it waited for work), the mean over the workers. Each
/// worker's times come from its own clock, so this holds across hosts too.
double busy_share(mproc::mpi::Pool& pool, long long us, std::size_t n, int repeat) {
    pool.map(spin, std::vector<long long>(std::min<std::size_t>(n, 200), us), 1);  // warm up
    double best = 0;
    for (int r = 0; r < repeat; ++r) {
        const auto out = pool.map(spin, std::vector<long long>(n, us), 1);
        if (out.size() != n) {
            std::fprintf(stderr, "bench: wrong result\n");
            std::exit(1);
        }
        struct Span {
            long long first = LLONG_MAX, last = 0, busy = 0;
        };
        std::map<long long, Span> workers;
        for (const auto& [pid, start, end] : out) {
            Span& w = workers[pid];
            w.first = std::min(w.first, start);
            w.last = std::max(w.last, end);
            w.busy += end - start;
        }
        double sum = 0;
        for (const auto& [pid, w] : workers) sum += static_cast<double>(w.busy) / static_cast<double>(w.last - w.first);
        best = std::max(best, sum / static_cast<double>(workers.size()));
    }
    return best;
}

/// The pool's options from MPROC_BENCH_PER_RANK (see above).
mproc::mpi::PoolOptions bench_options() {
    mproc::mpi::PoolOptions o;
    const char* per_rank = std::getenv("MPROC_BENCH_PER_RANK");
    if (!per_rank || std::string(per_rank) == "in_rank") o.in_rank = true;
    else o.processes_per_rank = static_cast<unsigned>(std::atoi(per_rank));
    return o;
}
const char* per_rank_label() {
    const char* per_rank = std::getenv("MPROC_BENCH_PER_RANK");
    return per_rank ? per_rank : "in_rank";
}

template <class Pool>
double best_rate(Pool& pool, const std::vector<long long>& xs, std::size_t chunksize, int repeat) {
    pool.map(square, std::vector<long long>(xs.begin(), xs.begin() + std::min<std::size_t>(xs.size(), 2000)), 1);
    double best = 0;
    for (int r = 0; r < repeat; ++r) {
        const auto begun = std::chrono::steady_clock::now();
        const auto out = pool.map(square, xs, chunksize);
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begun).count();
        for (std::size_t i = 0; i < xs.size(); ++i)
            if (out[i] != xs[i] * xs[i]) {
                std::fprintf(stderr, "bench: wrong result at %zu\n", i);
                std::exit(1);
            }
        best = std::max(best, static_cast<double>(xs.size()) / seconds);
    }
    return best;
}

int main(int argc, char** argv) {
    const bool local = argc > 1 && std::string(argv[1]) == "--local";
    std::optional<mproc::mpi::Init> mpi;
    if (!local) mpi.emplace(argc, argv);  // worker ranks serve here
    if (argc == 4 && std::string(argv[1]) == "--busy") {
        const long long us = std::atoll(argv[2]);
        const auto n = static_cast<std::size_t>(std::atoll(argv[3]));
        mproc::mpi::Pool pool(bench_options());
        std::printf(
            "{\"op\": \"pool_busy\", \"impl\": \"mproc.mpi.Pool\", \"value\": %.3f, \"unit\": \"share\", "
            "\"task_us\": %lld, \"n\": %zu, \"workers\": %u, \"per_rank\": \"%s\"}\n",
            busy_share(pool, us, n, 3), us, n, pool.processes(), per_rank_label());
        return 0;
    }
    const int first = local ? 2 : 1;
    if (argc < first + 2) {
        std::fprintf(stderr, "usage: mpi_pool_bench [--local] N CHUNKSIZE [REPEAT]\n");
        return 2;
    }
    const auto n = static_cast<std::size_t>(std::atoll(argv[first]));
    const auto chunksize = static_cast<std::size_t>(std::atoll(argv[first + 1]));
    const int repeat = argc > first + 2 ? std::atoi(argv[first + 2]) : 3;
    std::vector<long long> xs(n);
    std::iota(xs.begin(), xs.end(), 0LL);

    double rate = 0;
    unsigned workers = 0;
    if (local) {
        mproc::Pool pool(2);
        workers = pool.processes();
        rate = best_rate(pool, xs, chunksize, repeat);
    } else {
        mproc::mpi::Pool pool(bench_options());
        workers = pool.processes();
        rate = best_rate(pool, xs, chunksize, repeat);
    }
    std::printf(
        "{\"op\": \"pool_map\", \"impl\": \"%s\", \"value\": %.0f, \"unit\": \"tasks/s\", \"n\": %zu, "
        "\"chunksize\": %zu, \"workers\": %u, \"per_rank\": \"%s\"}\n",
        local ? "mproc.Pool" : "mproc.mpi.Pool", rate, n, chunksize, workers, local ? "-" : per_rank_label());
    return 0;
}
