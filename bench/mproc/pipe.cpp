// mproc benchmarks — Pipe. Twin: bench/python/pipe.py.
//
//   bench_mproc_pipe rtt    --size 64 --n 20000 [--pin] [--simplex]   duplex Pipe<std::string> (or two
//                           simplex ones), send/recv echoed by a child: p50/p90/p99 µs
//   bench_mproc_pipe oneway --size 1048576 --n 512 [--duplex]   Pipe(duplex=false), or a duplex Pipe
//                                                               with --duplex: send_bytes -> recv_bytes: MB/s
//   bench_mproc_pipe sweep  --sizes 64,...,4194304 --bytes 67108864   oneway at each size
//
// --pin pins this process, and so the child it forks, to one CPU (sched_setaffinity) before
// anything is created. Every message carries its sequence number and is checked on arrival.
#include <cstddef>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <mproc/mproc.hpp>

#include "../common/bench.hpp"

namespace {

/// Echoes 64 B messages through a child: over one duplex Pipe (a socketpair), or with --simplex
/// over two simplex Pipes (one pipe each way), the transport each is held to.
void bench_rtt(const bench::Args& args) {
    const auto size = static_cast<std::size_t>(args.num("size", 64));
    const long long n = args.num("n", 20'000);
    const long long warm = args.num("warm", 1000);
    const bool pin = args.flag("pin");
    const bool simplex = args.flag("simplex");
    if (pin) bench::pin_to_cpu(bench::first_allowed_cpu());

    // to_child: parent writes, child reads; to_parent: child writes, parent reads. A duplex pair
    // serves both ways through one socketpair.
    auto [down_read, down_write] = mproc::Pipe<std::string>(!simplex);
    auto [up_read, up_write] = simplex ? mproc::Pipe<std::string>(false)
                                       : std::pair<mproc::Connection<std::string>, mproc::Connection<std::string>>();
    mproc::Connection<std::string>& parent_out = down_write;
    mproc::Connection<std::string>& parent_in = simplex ? up_read : down_write;
    mproc::Connection<std::string>& child_in = down_read;
    mproc::Connection<std::string>& child_out = simplex ? up_write : down_read;
    mproc::Process echo([&] {
        parent_out.close();
        if (simplex) parent_in.close();
        for (;;) {
            std::string m = child_in.recv();
            if (m.empty()) return;
            child_out.send(m);
        }
    });
    echo.start();
    child_in.close();
    if (simplex) child_out.close();

    std::string msg(size, 'x');
    std::vector<std::int64_t> lat;
    lat.reserve(static_cast<std::size_t>(n));
    for (long long i = 0; i < warm + n; ++i) {
        bench::stamp(msg.data(), size, static_cast<std::uint64_t>(i));
        const std::int64_t t0 = bench::now_ns();
        parent_out.send(msg);
        const std::string back = parent_in.recv();
        const std::int64_t t1 = bench::now_ns();
        if (back.size() != size || !bench::stamp_matches(back.data(), size, static_cast<std::uint64_t>(i)))
            bench::die("wrong result: echo " + std::to_string(i));
        if (i >= warm) lat.push_back(t1 - t0);
    }
    parent_out.send(std::string());
    echo.join();
    bench::check(echo.exitcode() == 0, "echo process exit code");
    std::string op = pin ? "pipe_rtt_pinned" : "pipe_rtt";
    if (simplex) op += "_simplex";
    bench::latency_record(op, "mproc", lat).set("size", static_cast<double>(size)).print();
}

/// One-way throughput at one size: a child sends n + 1 messages, the clock starts at the first.
void oneway(const std::string& op, std::size_t size, long long n, bool duplex) {
    auto [reader, writer] = mproc::Pipe(duplex);
    mproc::Process producer([&reader = reader, &writer = writer, size, n] {
        reader.close();
        std::vector<std::byte> buf(size, std::byte{'x'});
        for (long long i = 0; i <= n; ++i) {
            bench::stamp(reinterpret_cast<char*>(buf.data()), size, static_cast<std::uint64_t>(i));
            writer.send_bytes(buf);
        }
    });
    producer.start();
    writer.close();
    auto first = reader.recv_bytes();
    bench::check(first.size() == size, "first message size");
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 1; i <= n; ++i) {
        const std::vector<std::byte> m = reader.recv_bytes();
        if (m.size() != size ||
            !bench::stamp_matches(reinterpret_cast<const char*>(m.data()), size, static_cast<std::uint64_t>(i)))
            bench::die("wrong result: message " + std::to_string(i) + " of " + std::to_string(size) + " B");
    }
    const double s = bench::seconds_since(t0);
    producer.join();
    bench::check(producer.exitcode() == 0, "producer exit code");
    const double bytes = static_cast<double>(size) * static_cast<double>(n);
    bench::Record(op, "mproc", bytes / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("msgs_per_s", static_cast<double>(n) / s)
        .print();
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    const std::string& op = args.op();
    try {
        if (op == "rtt") bench_rtt(args);
        else if (op == "oneway")
            oneway(args.flag("duplex") ? "pipe_oneway_duplex" : "pipe_oneway",
                   static_cast<std::size_t>(args.num("size", 1 << 20)), args.num("n", 512), args.flag("duplex"));
        else if (op == "sweep") {
            const long long budget = args.num("bytes", 64LL << 20);
            for (long long size : args.sizes("sizes", {64, 1024, 4096, 65536, 1 << 20, 4 << 20}))
                oneway("pipe_sweep", static_cast<std::size_t>(size), bench::count_for(size, budget, 16, 100'000),
                       false);
        } else bench::die("unknown operation " + op);
    } catch (const std::exception& e) {
        bench::die(op + ": " + e.what());
    }
    return 0;
}
