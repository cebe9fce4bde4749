// mproc benchmarks — Queue. Twin: bench/python/queue_bench.py.
//
//   bench_mproc_queue tput  --size 64 --n 200000      1 producer process -> 1 consumer (this process): msgs/s, MB/s
//   bench_mproc_queue sweep --sizes 64,...,4194304 --bytes 67108864    tput at each size
//   bench_mproc_queue shm   --size 67108864 --n 16 --blocks 16  the same by SharedMemory handles: MB/s
//   bench_mproc_queue mpmc  --size 64 --n 400000      4 producer -> 4 consumer processes: msgs/s
//   bench_mproc_queue idle  --ms 1000                 CPU of a consumer blocked on an empty Queue: %
//
// The producer builds each message afresh (a std::string of `size` bytes carrying its sequence
// number), as the Python twin builds a bytes object; the consumer checks every one. The producer
// puts n + 1 messages; the clock starts when the first arrives, so process start-up is not timed.
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <mproc/mproc.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_memory.hpp>

#include "../common/bench.hpp"

namespace {

void tput(const std::string& op, std::size_t size, long long n) {
    mproc::Queue<std::string> q;
    mproc::Process producer([q, size, n]() mutable {
        // One message, stamped afresh for each put (put copies it): what is timed is the queue,
        // not the making of a new string, as the memcpy limit copies from one source.
        std::string m(size, 'x');
        for (long long i = 0; i <= n; ++i) {
            bench::stamp(m.data(), size, static_cast<std::uint64_t>(i));
            q.put(m);
        }
    });
    producer.start();
    const std::string first = q.get();
    bench::check(first.size() == size, "first message size");
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 1; i <= n; ++i) {
        const std::string m = q.get();
        if (m.size() != size || !bench::stamp_matches(m.data(), size, static_cast<std::uint64_t>(i)))
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

/// Items of `size` bytes by SharedMemory handle: `blocks` blocks go round between a producer
/// process and this one. The producer writes each free block whole (a memcpy from its own buffer,
/// as the memcpy limit does) with its sequence number at both ends, and puts the handle on `full`;
/// this process checks both stamps in place and hands the block back on `spare`. The first
/// `blocks` items go untimed, so that each block has been written and read once before the clock
/// starts (the limit's memory is touched first too), and as many blocks as the limit's slots (16)
/// make the copies reach memory rather than the cache.
void shm(std::size_t size, long long n, int blocks) {
    if (size < 16) bench::die("shm: --size must be 16 bytes or more");
    if (n < 1 || blocks < 1) bench::die("shm: --n and --blocks must be 1 or more");
    std::vector<mproc::SharedMemory> all;
    mproc::Queue<mproc::SharedMemory> full;
    mproc::Queue<mproc::SharedMemory> spare;
    for (int i = 0; i < blocks; ++i) {
        all.emplace_back(size);
        std::memset(all.back().data(), 0, size);
        spare.put(all.back());
    }
    const long long warm = blocks;
    mproc::Process producer([full, spare, size, n, warm]() mutable {
        std::vector<char> source(size, 'x');
        for (long long i = 0; i < warm + n; ++i) {
            const auto seq = static_cast<std::uint64_t>(i);
            bench::stamp(source.data(), size, seq);
            std::memcpy(source.data() + size - sizeof seq, &seq, sizeof seq);
            mproc::SharedMemory block = spare.get();
            std::memcpy(block.data(), source.data(), size);
            full.put(block);
        }
    });
    producer.start();
    for (long long i = 0; i < warm; ++i) spare.put(full.get());
    const std::int64_t t0 = bench::now_ns();
    for (long long i = warm; i < warm + n; ++i) {
        mproc::SharedMemory block = full.get();
        const auto seq = static_cast<std::uint64_t>(i);
        const auto* bytes = reinterpret_cast<const char*>(block.data());
        if (block.size() != size || !bench::stamp_matches(bytes, size, seq) ||
            std::memcmp(bytes + size - sizeof seq, &seq, sizeof seq) != 0)
            bench::die("wrong result: block " + std::to_string(i) + " of " + std::to_string(size) + " B");
        spare.put(block);
    }
    const double s = bench::seconds_since(t0);
    producer.join();
    bench::check(producer.exitcode() == 0, "producer exit code");
    const double bytes = static_cast<double>(size) * static_cast<double>(n);
    bench::Record("queue_shm", "mproc", bytes / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(n))
        .set("blocks", static_cast<double>(blocks))
        .set("seconds", s)
        .print();
}

/// `producers` processes put n messages in all (each stamped with its id) and `consumers` take
/// them until each gets an empty stop message; every id must arrive once. The clock runs from
/// the start signal to the last consumer's exit.
void mpmc(const bench::Args& args) {
    const auto size = static_cast<std::size_t>(args.num("size", 64));
    const long long n = args.num("n", 400'000);
    const int producers = static_cast<int>(args.num("producers", 4));
    const int consumers = static_cast<int>(args.num("consumers", 4));
    const long long each = n / producers;
    mproc::Queue<std::string> q;
    mproc::Queue<std::pair<std::uint64_t, std::uint64_t>> tallies;  // (count, sum of ids) per consumer
    mproc::Event go;
    std::vector<mproc::Process> procs;
    for (int p = 0; p < producers; ++p)
        procs.emplace_back([q, go, p, each, size]() mutable {
            go.wait();
            for (long long i = 0; i < each; ++i) {
                std::string m(size, 'x');
                bench::stamp(m.data(), size, static_cast<std::uint64_t>(p * each + i));
                q.put(m);
            }
        });
    for (int c = 0; c < consumers; ++c)
        procs.emplace_back([q, tallies, go, size]() mutable {
            go.wait();
            std::uint64_t count = 0, sum = 0;
            for (;;) {
                const std::string m = q.get();
                if (m.empty()) break;
                if (m.size() != size) std::_Exit(3);
                ++count;
                sum += bench::stamp_of(m.data(), size);
            }
            tallies.put({count, sum});
        });
    for (auto& p : procs) p.start();
    bench::sleep_s(0.2);  // every child is waiting on `go`
    const std::int64_t t0 = bench::now_ns();
    go.set();
    for (int p = 0; p < producers; ++p) procs[static_cast<std::size_t>(p)].join();
    for (int c = 0; c < consumers; ++c) q.put(std::string());
    std::uint64_t count = 0, sum = 0;
    for (int c = 0; c < consumers; ++c) {
        const auto [k, s] = tallies.get();
        count += k;
        sum += s;
    }
    for (auto& p : procs) p.join();
    const double s = bench::seconds_since(t0);
    for (auto& p : procs) bench::check(p.exitcode() == 0, "child exit code");
    const auto total = static_cast<std::uint64_t>(each * producers);
    if (count != total || sum != total * (total - 1) / 2) bench::die("wrong result: messages lost or repeated");
    bench::Record("queue_mpmc", "mproc", static_cast<double>(total) * static_cast<double>(size) / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(total))
        .set("seconds", s)
        .set("msgs_per_s", static_cast<double>(total) / s)
        .set("producers", producers)
        .set("consumers", consumers)
        .print();
}

void idle(const bench::Args& args) {
    mproc::Queue<std::string> q;
    mproc::Process consumer([q]() mutable {
        const std::string m = q.get();  // blocks: nothing is put until the measurement is over
        if (m != "stop") std::_Exit(3);
    });
    consumer.start();
    bench::sleep_s(0.2);
    bench::idle_record("idle_queue_consumer", "mproc", {consumer.pid()},
                       static_cast<double>(args.num("ms", 1000)) / 1000.0);
    q.put("stop");
    consumer.join();
    bench::check(consumer.exitcode() == 0, "consumer exit code");
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    const std::string& op = args.op();
    try {
        if (op == "tput") tput("queue_tput", static_cast<std::size_t>(args.num("size", 64)), args.num("n", 200'000));
        else if (op == "sweep") {
            const long long budget = args.num("bytes", 64LL << 20);
            for (long long size : args.sizes("sizes", {64, 1024, 4096, 65536, 1 << 20, 4 << 20}))
                tput("queue_sweep", static_cast<std::size_t>(size), bench::count_for(size, budget, 16, 100'000));
        } else if (op == "shm")
            shm(static_cast<std::size_t>(args.num("size", 64 << 20)), args.num("n", 16),
                static_cast<int>(args.num("blocks", 16)));
        else if (op == "mpmc") mpmc(args);
        else if (op == "idle") idle(args);
        else bench::die("unknown operation " + op);
    } catch (const std::exception& e) {
        bench::die(op + ": " + e.what());
    }
    return 0;
}
