// mproc benchmarks — SharedDict. Twin: bench/python/shared_dict.py (Manager().dict()).
//
//   bench_mproc_dict getset --n 100000 --keys 1000   n/2 d[k] = v, then n/2 v = d[k], in one process: ops/s
//   bench_mproc_dict incr   --n 10000 --procs 2      d["k"] += 1, n times in each of 2 processes: increments/s, lost
//
// incr: the processes start, block on a pipe, and are released together when the clock starts;
// the clock stops when both report done. Every increment must land: a lost one fails the run.
#include <string>
#include <unistd.h>
#include <vector>

#include <mproc/mproc.hpp>
#include <mproc/shared_dict.hpp>

#include "../common/bench.hpp"

namespace {

void getset(const bench::Args& args) {
    const long long n = args.num("n", 100'000);
    const long long nkeys = args.num("keys", 1000);
    std::vector<std::string> keys;
    for (long long i = 0; i < nkeys; ++i) keys.push_back("key" + std::to_string(i));
    mproc::SharedDict<std::string, long long> d;
    const long long sets = n / 2;
    const long long gets = n - sets;
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 0; i < sets; ++i) d[keys[static_cast<std::size_t>(i % nkeys)]] = i;
    const std::int64_t t1 = bench::now_ns();
    long long sum = 0;
    for (long long i = 0; i < gets; ++i) {
        const long long v = d[keys[static_cast<std::size_t>(i % nkeys)]];
        sum += v;
    }
    const std::int64_t t2 = bench::now_ns();
    // Key i % nkeys last got the largest j < sets with j % nkeys == i % nkeys.
    long long expect = 0;
    for (long long i = 0; i < gets; ++i) {
        const long long k = i % nkeys;
        expect += k + ((sets - 1 - k) / nkeys) * nkeys;
    }
    bench::check(sum == expect, "sum of the values read back");
    bench::check(static_cast<long long>(d.size()) == std::min(nkeys, sets), "dict size");
    const double s = static_cast<double>(t2 - t0) / 1e9;
    bench::Record("dict_getset", "mproc", static_cast<double>(n) / s, "ops/s")
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("set_ops_per_s", static_cast<double>(sets) / (static_cast<double>(t1 - t0) / 1e9))
        .set("get_ops_per_s", static_cast<double>(gets) / (static_cast<double>(t2 - t1) / 1e9))
        .print();
}

void incr(const bench::Args& args) {
    const long long n = args.num("n", 10'000);
    const long long procs = args.num("procs", 2);
    mproc::SharedDict<std::string, long long> d;
    d["k"] = 0;
    int go[2], done[2];
    if (::pipe(go) != 0 || ::pipe(done) != 0) bench::die("pipe");
    std::vector<mproc::Process> workers;
    for (long long p = 0; p < procs; ++p) {
        workers.emplace_back([d, n, go, done]() mutable {
            char c;
            if (::read(go[0], &c, 1) != 1) std::_Exit(2);
            for (long long i = 0; i < n; ++i) d["k"] += 1;
            if (::write(done[1], "d", 1) != 1) std::_Exit(2);
        });
        workers.back().start();
    }
    bench::sleep_s(0.05);  // let them reach the pipe
    const std::string release(static_cast<std::size_t>(procs), 'g');
    const std::int64_t t0 = bench::now_ns();
    if (::write(go[1], release.data(), release.size()) != static_cast<ssize_t>(release.size())) bench::die("write");
    for (long long p = 0; p < procs; ++p) {
        char c;
        if (::read(done[0], &c, 1) != 1) bench::die("a worker did not finish");
    }
    const double s = bench::seconds_since(t0);
    for (auto& w : workers) {
        w.join();
        bench::check(w.exitcode() == 0, "worker exit code");
    }
    const long long total = n * procs;
    const long long value = d["k"];
    const long long lost = total - value;
    bench::Record("dict_incr", "mproc", static_cast<double>(total) / s, "incr/s")
        .set("n", static_cast<double>(total))
        .set("seconds", s)
        .set("lost", static_cast<double>(lost))
        .print();
    bench::check(lost == 0, std::to_string(lost) + " of " + std::to_string(total) + " increments lost");
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    try {
        if (args.op() == "getset") getset(args);
        else if (args.op() == "incr") incr(args);
        else bench::die("unknown operation " + args.op());
    } catch (const std::exception& e) {
        bench::die(args.op() + ": " + e.what());
    }
    return 0;
}
