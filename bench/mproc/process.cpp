// mproc benchmarks — Process. Twin: bench/python/process.py.
//
//   bench_mproc_process start_join --n 300 [--resident-mib 1024]   Process(noop).start(); join():
//                        p50/p90/p99 µs per process (with a parent holding that much memory)
#include <string>
#include <vector>

#include <mproc/mproc.hpp>

#include "../common/bench.hpp"

namespace {

void noop() {}

void bench_start_join(const bench::Args& args) {
    const long long n = args.num("n", 300);
    const long long warm = args.num("warm", 20);
    const long long resident = args.num("resident-mib", 0);
    bench::hold_resident(resident);
    std::vector<std::int64_t> lat;
    lat.reserve(static_cast<std::size_t>(n));
    for (long long i = 0; i < warm + n; ++i) {
        const std::int64_t t0 = bench::now_ns();
        mproc::Process p(noop);
        p.start();
        p.join();
        const std::int64_t t1 = bench::now_ns();
        if (p.exitcode() != 0) bench::die("wrong result: process exit code");
        if (i >= warm) lat.push_back(t1 - t0);
    }
    bench::latency_record(resident >= 1024 ? "process_start_join_1g" : "process_start_join", "mproc", lat)
        .set("resident_mib", static_cast<double>(resident))
        .print();
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    try {
        if (args.op() == "start_join") bench_start_join(args);
        else bench::die("unknown operation " + args.op());
    } catch (const std::exception& e) {
        bench::die(args.op() + ": " + e.what());
    }
    return 0;
}
