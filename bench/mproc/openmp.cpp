// mproc benchmarks — Pool.map against threads: OpenMP's `parallel for schedule(dynamic)` over the
// same CPU-bound kernel, in the same process, one right after the other.
//
//   bench_mproc_openmp map --grain-us 20 --seconds 1    items of about that many µs each: items/s of
//                                                    each (mproc: Pool.map, default chunksize;
//                                                    limit: OpenMP with as many threads as workers)
//
// The kernel is a loop of integer steps whose count is calibrated here, once, to the grain; both
// run exactly the same items, and their results must agree item by item.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <mproc/mproc.hpp>
#include <omp.h>

#include "../common/bench.hpp"

namespace {

// Set before the Pool forks its workers, so they see it too.
std::uint64_t steps_per_item = 1;

/// The kernel: `steps_per_item` rounds of xorshift from the item's seed.
std::uint64_t work(std::uint64_t seed) {
    std::uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (std::uint64_t i = 0; i < steps_per_item; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

/// Steps that take about `grain_us` on one core (the best of a few tries).
std::uint64_t calibrate(double grain_us) {
    steps_per_item = 1u << 20;
    double best = 1e30;
    std::uint64_t sink = 0;
    for (int i = 0; i < 5; ++i) {
        const std::int64_t t0 = bench::now_ns();
        sink += work(static_cast<std::uint64_t>(i));
        best = std::min(best, static_cast<double>(bench::now_ns() - t0));
    }
    if (sink == 42) bench::die("unlikely");  // keeps the loop
    const double ns_per_step = best / static_cast<double>(steps_per_item);
    return std::max<std::uint64_t>(1, static_cast<std::uint64_t>(grain_us * 1000.0 / ns_per_step));
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    try {
        if (args.op() != "map") bench::die("unknown operation " + args.op());
        const double grain_us = static_cast<double>(args.num("grain-us", 20));
        const double seconds = std::stod(args.str("seconds", "1"));
        const std::uint64_t steps = calibrate(grain_us);
        steps_per_item = steps;

        mproc::Pool pool;  // before any OpenMP thread exists
        const int workers = static_cast<int>(pool.processes());
        (void)pool.map(work, std::vector<std::uint64_t>{1, 2, 3, 4});  // warm up
        const auto items = static_cast<std::size_t>(seconds * workers * 1e6 / grain_us);
        std::vector<std::uint64_t> seeds(items);
        for (std::size_t i = 0; i < items; ++i) seeds[i] = i;

        std::int64_t t0 = bench::now_ns();
        const std::vector<std::uint64_t> by_pool = pool.map(work, seeds);
        const double pool_s = bench::seconds_since(t0);

        std::vector<std::uint64_t> by_threads(items);
        omp_set_num_threads(workers);
#pragma omp parallel for schedule(dynamic)
        for (std::size_t i = 0; i < std::min<std::size_t>(items, 64); ++i)
            by_threads[i] = work(i);  // starts the threads
        t0 = bench::now_ns();
#pragma omp parallel for schedule(dynamic)
        for (std::size_t i = 0; i < items; ++i) by_threads[i] = work(seeds[i]);
        const double threads_s = bench::seconds_since(t0);

        if (by_pool != by_threads) bench::die("wrong result: Pool.map and OpenMP disagree");
        const auto n = static_cast<double>(items);
        for (const auto& [impl, s] : {std::pair<const char*, double>{"mproc", pool_s}, {"limit", threads_s}})
            bench::Record("openmp", impl, n / s, "items/s")
                .set("size", grain_us)
                .set("items", n)
                .set("seconds", s)
                .set("workers", static_cast<double>(workers))
                .set("steps_per_item", static_cast<double>(steps))
                .print();
    } catch (const std::exception& e) {
        bench::die(std::string("openmp: ") + e.what());
    }
    return 0;
}
