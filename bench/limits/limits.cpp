// mproc benchmarks — the raw OS limits: what the kernel and the hardware allow with no library at
// all. Each measures the same thing as the mproc and Python benchmarks it stands beside.
//
//   bench_limits pipe_rtt    --size 64 --n 20000 [--pin] [--socket]   write/read echo over two pipes
//                                                                     (or one socketpair): p50/p90/p99 µs
//   bench_limits pipe_oneway --size 1048576 --n 512    write(2) -> read(2): the best of a pipe, a pipe
//                                                     enlarged with F_SETPIPE_SZ and a socketpair: MB/s
//   bench_limits pipe_sweep  --sizes ... --bytes B     pipe_oneway at each size
//   bench_limits fork_wait   --n 300 [--resident-mib 1024]   fork(); child _exit(0); waitpid: p50 µs
//   bench_limits shm_ring    --size 64 --n 200000      SPSC byte ring in MAP_SHARED memory, producer
//                                                     process -> consumer process: msgs/s, MB/s
//   bench_limits ring_sweep  --sizes ... --bytes B     shm_ring at each size
//   bench_limits mpmc_ring   --size 64 --n 400000      bounded MPMC ring (Vyukov) in MAP_SHARED memory,
//                                                     4 producer -> 4 consumer processes: msgs/s
//   bench_limits shm_memcpy  --size 1048576 --bytes B  memcpy into (pre-faulted) shared memory: MB/s
//   bench_limits idle_read   --ms 1000                 CPU of a child blocked in read(2): %
//   bench_limits fork_memory                           private memory of an idle forked child: MiB
//   bench_limits build_info                            nothing (the build-time rows are timed by run.py)
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../common/bench.hpp"

namespace {

void read_full(int fd, void* dst, std::size_t n) {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
        const ssize_t got = ::read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) bench::die("read: " + std::string(got == 0 ? "end of file" : std::strerror(errno)));
        p += got;
        n -= static_cast<std::size_t>(got);
    }
}
void write_full(int fd, const void* src, std::size_t n) {
    const auto* p = static_cast<const char*>(src);
    while (n > 0) {
        const ssize_t put = ::write(fd, p, n);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) bench::die("write: " + std::string(std::strerror(errno)));
        p += put;
        n -= static_cast<std::size_t>(put);
    }
}

pid_t fork_or_die() {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) bench::die("fork");
    return pid;
}
void reap(pid_t pid) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) bench::die("wrong result: child failed");
}

// ---- pipe ping-pong ------------------------------------------------------------------------

void pipe_rtt(const bench::Args& args) {
    const auto size = static_cast<std::size_t>(args.num("size", 64));
    const long long n = args.num("n", 20'000);
    const long long warm = args.num("warm", 1000);
    const bool pin = args.flag("pin");
    const bool socket = args.flag("socket");
    if (pin) bench::pin_to_cpu(bench::first_allowed_cpu());
    int to_child[2], to_parent[2];
    if (socket) {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) bench::die("socketpair");
        to_child[0] = sv[1];   // the child reads and writes sv[1]
        to_child[1] = sv[0];   // the parent reads and writes sv[0]
        to_parent[0] = sv[0];
        to_parent[1] = sv[1];
    } else if (::pipe(to_child) != 0 || ::pipe(to_parent) != 0) {
        bench::die("pipe");
    }
    const pid_t pid = fork_or_die();
    std::vector<char> buf(size);
    if (pid == 0) {
        for (long long i = 0; i < warm + n; ++i) {
            read_full(to_child[0], buf.data(), size);
            write_full(to_parent[1], buf.data(), size);
        }
        ::_exit(0);
    }
    std::vector<std::int64_t> lat;
    lat.reserve(static_cast<std::size_t>(n));
    std::vector<char> back(size);
    for (long long i = 0; i < warm + n; ++i) {
        bench::stamp(buf.data(), size, static_cast<std::uint64_t>(i));
        const std::int64_t t0 = bench::now_ns();
        write_full(to_child[1], buf.data(), size);
        read_full(to_parent[0], back.data(), size);
        const std::int64_t t1 = bench::now_ns();
        if (!bench::stamp_matches(back.data(), size, static_cast<std::uint64_t>(i))) bench::die("wrong result: echo");
        if (i >= warm) lat.push_back(t1 - t0);
    }
    reap(pid);
    std::string op = pin ? "pipe_rtt_pinned" : "pipe_rtt";
    if (socket) op += "_socketpair";
    bench::latency_record(op, "limit", lat).set("size", static_cast<double>(size)).print();
}

// ---- pipe one-way ----------------------------------------------------------------------------

/// The most a pipe may hold without privileges (/proc/sys/fs/pipe-max-size), 1 MiB when unreadable.
int pipe_max_size() {
    long max = 1 << 20;
    if (std::FILE* f = std::fopen("/proc/sys/fs/pipe-max-size", "r")) {
        if (std::fscanf(f, "%ld", &max) != 1) max = 1 << 20;
        std::fclose(f);
    }
    return static_cast<int>(max);
}

/// One-way throughput of one raw transport: "pipe" (a pipe as it comes), "bigpipe" (a pipe
/// enlarged with F_SETPIPE_SZ to pipe-max-size) or "socketpair" (a Unix stream socketpair, its
/// buffers as large as SO_SNDBUF/SO_RCVBUF allow). A child writes n + 1 messages; the clock starts
/// at the first. Returns MB/s.
double raw_oneway(const std::string& transport, std::size_t size, long long n) {
    int fds[2];  // fds[0] reads, fds[1] writes
    if (transport == "socketpair") {
        if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) bench::die("socketpair");
        int big = 4 << 20;  // the kernel caps it at net.core.wmem_max / rmem_max
        ::setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        ::setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    } else {
        if (::pipe(fds) != 0) bench::die("pipe");
        if (transport == "bigpipe" && ::fcntl(fds[1], F_SETPIPE_SZ, pipe_max_size()) < 0)
            bench::die("F_SETPIPE_SZ: " + std::string(std::strerror(errno)));
    }
    const pid_t pid = fork_or_die();
    std::vector<char> buf(size, 'x');
    if (pid == 0) {
        ::close(fds[0]);
        for (long long i = 0; i <= n; ++i) {
            bench::stamp(buf.data(), size, static_cast<std::uint64_t>(i));
            write_full(fds[1], buf.data(), size);
        }
        ::_exit(0);
    }
    ::close(fds[1]);
    read_full(fds[0], buf.data(), size);
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 1; i <= n; ++i) {
        read_full(fds[0], buf.data(), size);
        if (!bench::stamp_matches(buf.data(), size, static_cast<std::uint64_t>(i))) bench::die("wrong result: message");
    }
    const double s = bench::seconds_since(t0);
    ::close(fds[0]);
    reap(pid);
    return static_cast<double>(size) * static_cast<double>(n) / s / 1e6;
}

/// The raw one-way limit at one size: the best of the three raw transports in this run (its name
/// in "transport", each one's figure beside it), so a Pipe is held to the fastest way to move the bytes.
void pipe_oneway(const std::string& op, std::size_t size, long long n) {
    const char* transports[] = {"pipe", "bigpipe", "socketpair"};
    double mbs[3];
    std::size_t top = 0;
    for (std::size_t i = 0; i < 3; ++i) {
        mbs[i] = raw_oneway(transports[i], size, n);
        if (mbs[i] > mbs[top]) top = i;
    }
    bench::Record best(op, "limit", mbs[top], "MB/s");
    for (std::size_t i = 0; i < 3; ++i) best.set(std::string("mbs_") + transports[i], mbs[i]);
    best.set("size", static_cast<double>(size))
        .set("n", static_cast<double>(n))
        .set("transport", std::string(transports[top]))
        .print();
}

// ---- fork + waitpid --------------------------------------------------------------------------

void fork_wait(const bench::Args& args) {
    const long long n = args.num("n", 300);
    const long long warm = args.num("warm", 20);
    const long long resident = args.num("resident-mib", 0);
    bench::hold_resident(resident);
    std::vector<std::int64_t> lat;
    for (long long i = 0; i < warm + n; ++i) {
        const std::int64_t t0 = bench::now_ns();
        const pid_t pid = ::fork();
        if (pid < 0) bench::die("fork");
        if (pid == 0) ::_exit(0);
        reap(pid);
        const std::int64_t t1 = bench::now_ns();
        if (i >= warm) lat.push_back(t1 - t0);
    }
    bench::latency_record(resident >= 1024 ? "process_start_join_1g" : "process_start_join", "limit", lat)
        .set("resident_mib", static_cast<double>(resident))
        .print();
}

// ---- SPSC ring in shared memory ----------------------------------------------------------------

/// A single-producer single-consumer byte ring: each message is an 8-byte length then its bytes,
/// streamed through in pieces when it is larger than the ring. Indices only grow; each side
/// caches the other's index and reads it again only when it must wait. Waiting spins briefly,
/// then yields the CPU (this is the hardware's limit, not a design for idle waiting).
struct alignas(64) Ring {
    static constexpr std::size_t capacity = 4u << 20;  // a power of two
    alignas(64) std::atomic<std::uint64_t> head{0};    // bytes written (producer)
    alignas(64) std::atomic<std::uint64_t> tail{0};    // bytes read (consumer)
    alignas(64) char data[capacity];
};

inline void wait_a_little(unsigned& spins) {
    if (++spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else {
        ::sched_yield();
    }
}

class RingWriter {
public:
    explicit RingWriter(Ring& r) : r_(r) {}
    void write(const char* src, std::size_t n) {
        while (n > 0) {
            unsigned spins = 0;
            while (head_ - tail_cache_ == Ring::capacity) {
                tail_cache_ = r_.tail.load(std::memory_order_acquire);
                if (head_ - tail_cache_ == Ring::capacity) wait_a_little(spins);
            }
            const std::size_t room = Ring::capacity - static_cast<std::size_t>(head_ - tail_cache_);
            const std::size_t at = static_cast<std::size_t>(head_ & (Ring::capacity - 1));
            const std::size_t piece = std::min({n, room, Ring::capacity - at});
            std::memcpy(r_.data + at, src, piece);
            head_ += piece;
            src += piece;
            n -= piece;
            if (n > 0) r_.head.store(head_, std::memory_order_release);  // let a long message stream
        }
    }
    void publish() { r_.head.store(head_, std::memory_order_release); }

private:
    Ring& r_;
    std::uint64_t head_ = 0;
    std::uint64_t tail_cache_ = 0;
};

class RingReader {
public:
    explicit RingReader(Ring& r) : r_(r) {}
    void read(char* dst, std::size_t n) {
        while (n > 0) {
            unsigned spins = 0;
            while (head_cache_ == tail_) {
                head_cache_ = r_.head.load(std::memory_order_acquire);
                if (head_cache_ == tail_) wait_a_little(spins);
            }
            const std::size_t avail = static_cast<std::size_t>(head_cache_ - tail_);
            const std::size_t at = static_cast<std::size_t>(tail_ & (Ring::capacity - 1));
            const std::size_t piece = std::min({n, avail, Ring::capacity - at});
            std::memcpy(dst, r_.data + at, piece);
            tail_ += piece;
            dst += piece;
            n -= piece;
            r_.tail.store(tail_, std::memory_order_release);
        }
    }

private:
    Ring& r_;
    std::uint64_t tail_ = 0;
    std::uint64_t head_cache_ = 0;
};

Ring* map_ring() {
    void* p = ::mmap(nullptr, sizeof(Ring), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) bench::die("mmap");
    return new (p) Ring();
}

void shm_ring(const std::string& op, std::size_t size, long long n) {
    Ring* ring = map_ring();
    const pid_t pid = fork_or_die();
    if (pid == 0) {
        RingWriter w(*ring);
        std::vector<char> msg(size, 'x');
        for (long long i = 0; i <= n; ++i) {
            bench::stamp(msg.data(), size, static_cast<std::uint64_t>(i));
            const std::uint64_t len = size;
            w.write(reinterpret_cast<const char*>(&len), sizeof len);
            w.write(msg.data(), size);
            w.publish();  // every message is visible on its own, as a queue's must be
        }
        ::_exit(0);
    }
    RingReader r(*ring);
    std::vector<char> msg(size);
    auto receive = [&](long long i) {
        std::uint64_t len = 0;
        r.read(reinterpret_cast<char*>(&len), sizeof len);
        if (len != size) bench::die("wrong result: ring length");
        r.read(msg.data(), size);
        if (!bench::stamp_matches(msg.data(), size, static_cast<std::uint64_t>(i)))
            bench::die("wrong result: ring message");
    };
    receive(0);
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 1; i <= n; ++i) receive(i);
    const double s = bench::seconds_since(t0);
    reap(pid);
    ::munmap(ring, sizeof(Ring));
    const double bytes = static_cast<double>(size) * static_cast<double>(n);
    bench::Record(op, "limit", bytes / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .set("msgs_per_s", static_cast<double>(n) / s)
        .print();
}

// ---- MPMC ring in shared memory ----------------------------------------------------------------

/// A bounded multi-producer multi-consumer ring of fixed-size cells (Dmitry Vyukov's design): each
/// cell has a sequence number that says whose turn it is; a producer claims a position with a
/// compare-and-swap on the enqueue cursor, fills the cell and publishes it through the sequence;
/// a consumer does the same on the dequeue cursor. No lock, no system call; waiting spins, then
/// yields. It survives nothing (a process killed between claim and publish stalls everyone behind
/// it): the limit, not a design.
struct MpmcRing {
    static constexpr std::size_t cells = 4096;  // a power of two
    static constexpr std::size_t cell_bytes = 120;
    struct alignas(128) Cell {
        std::atomic<std::uint64_t> sequence;
        std::uint32_t length;
        char data[cell_bytes];
    };
    alignas(64) std::atomic<std::uint64_t> enqueue_at{0};
    alignas(64) std::atomic<std::uint64_t> dequeue_at{0};
    alignas(64) std::atomic<int> go{0};
    alignas(64) std::atomic<std::uint64_t> received{0};
    alignas(64) std::atomic<std::uint64_t> id_sum{0};
    Cell cell[cells];

    void put(const char* src, std::uint32_t n) {
        unsigned spins = 0;
        std::uint64_t at = enqueue_at.load(std::memory_order_relaxed);
        for (;;) {
            Cell& c = cell[at & (cells - 1)];
            const std::uint64_t seq = c.sequence.load(std::memory_order_acquire);
            if (seq == at) {
                if (enqueue_at.compare_exchange_weak(at, at + 1, std::memory_order_relaxed)) {
                    c.length = n;
                    std::memcpy(c.data, src, n);
                    c.sequence.store(at + 1, std::memory_order_release);
                    return;
                }
            } else if (seq < at) {  // full
                wait_a_little(spins);
                at = enqueue_at.load(std::memory_order_relaxed);
            } else {
                at = enqueue_at.load(std::memory_order_relaxed);
            }
        }
    }
    std::uint32_t get(char* dst) {
        unsigned spins = 0;
        std::uint64_t at = dequeue_at.load(std::memory_order_relaxed);
        for (;;) {
            Cell& c = cell[at & (cells - 1)];
            const std::uint64_t seq = c.sequence.load(std::memory_order_acquire);
            if (seq == at + 1) {
                if (dequeue_at.compare_exchange_weak(at, at + 1, std::memory_order_relaxed)) {
                    const std::uint32_t n = c.length;
                    std::memcpy(dst, c.data, n);
                    c.sequence.store(at + cells, std::memory_order_release);
                    return n;
                }
            } else if (seq < at + 1) {  // empty
                wait_a_little(spins);
                at = dequeue_at.load(std::memory_order_relaxed);
            } else {
                at = dequeue_at.load(std::memory_order_relaxed);
            }
        }
    }
};

/// `producers` processes put n messages of `size` bytes in all (each stamped with its id), and
/// `consumers` processes take them until each finds an empty stop message; every id must arrive
/// once. The clock runs from the start signal to the last consumer's exit.
void mpmc_ring(const bench::Args& args) {
    const auto size = static_cast<std::size_t>(args.num("size", 64));
    const long long n = args.num("n", 400'000);
    const int producers = static_cast<int>(args.num("producers", 4));
    const int consumers = static_cast<int>(args.num("consumers", 4));
    if (size < 8 || size > MpmcRing::cell_bytes) bench::die("mpmc_ring: size must be 8 to 120 bytes");
    void* mem = ::mmap(nullptr, sizeof(MpmcRing), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) bench::die("mmap");
    auto* ring = new (mem) MpmcRing();
    for (std::size_t i = 0; i < MpmcRing::cells; ++i) ring->cell[i].sequence.store(i, std::memory_order_relaxed);
    const long long each = n / producers;
    std::vector<pid_t> producer_pids, consumer_pids;
    for (int p = 0; p < producers; ++p) {
        const pid_t pid = fork_or_die();
        if (pid == 0) {
            while (ring->go.load(std::memory_order_acquire) == 0) ::sched_yield();
            std::vector<char> msg(size, 'x');
            for (long long i = 0; i < each; ++i) {
                bench::stamp(msg.data(), size, static_cast<std::uint64_t>(p * each + i));
                ring->put(msg.data(), static_cast<std::uint32_t>(size));
            }
            ::_exit(0);
        }
        producer_pids.push_back(pid);
    }
    for (int c = 0; c < consumers; ++c) {
        const pid_t pid = fork_or_die();
        if (pid == 0) {
            while (ring->go.load(std::memory_order_acquire) == 0) ::sched_yield();
            std::vector<char> msg(MpmcRing::cell_bytes);
            std::uint64_t count = 0, sum = 0;
            for (;;) {
                const std::uint32_t got = ring->get(msg.data());
                if (got == 0) break;
                if (got != size) ::_exit(3);
                ++count;
                sum += bench::stamp_of(msg.data(), size);
            }
            ring->received.fetch_add(count);
            ring->id_sum.fetch_add(sum);
            ::_exit(0);
        }
        consumer_pids.push_back(pid);
    }
    const std::int64_t t0 = bench::now_ns();
    ring->go.store(1, std::memory_order_release);
    for (pid_t pid : producer_pids) reap(pid);
    for (int c = 0; c < consumers; ++c) ring->put("", 0);
    for (pid_t pid : consumer_pids) reap(pid);
    const double s = bench::seconds_since(t0);
    const auto total = static_cast<std::uint64_t>(each * producers);
    if (ring->received.load() != total || ring->id_sum.load() != total * (total - 1) / 2)
        bench::die("wrong result: the MPMC ring lost or repeated messages");
    ::munmap(mem, sizeof(MpmcRing));
    bench::Record("queue_mpmc", "limit", static_cast<double>(total) * static_cast<double>(size) / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(total))
        .set("seconds", s)
        .set("msgs_per_s", static_cast<double>(total) / s)
        .set("producers", producers)
        .set("consumers", consumers)
        .print();
}

// ---- memcpy into shared memory ---------------------------------------------------------------

void shm_memcpy(const bench::Args& args) {
    const auto size = static_cast<std::size_t>(args.num("size", 1 << 20));
    const long long total = args.num("bytes", 1LL << 30);
    const std::size_t slots = 16;  // larger than the last-level cache, so the copies reach memory
    auto* shm = static_cast<char*>(
        ::mmap(nullptr, size * slots, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    if (shm == MAP_FAILED) bench::die("mmap");
    std::memset(shm, 0, size * slots);  // fault the pages in first
    std::vector<char> src(size, 'x');
    const long long n = std::max(1LL, total / static_cast<long long>(size));
    const std::int64_t t0 = bench::now_ns();
    for (long long i = 0; i < n; ++i) {
        src[0] = static_cast<char>(i);
        std::memcpy(shm + static_cast<std::size_t>(i % static_cast<long long>(slots)) * size, src.data(), size);
    }
    const double s = bench::seconds_since(t0);
    bench::check(
        shm[static_cast<std::size_t>((n - 1) % static_cast<long long>(slots)) * size] == static_cast<char>(n - 1),
        "memcpy landed");
    ::munmap(shm, size * slots);
    bench::Record("shm_memcpy", "limit", static_cast<double>(size) * static_cast<double>(n) / s / 1e6, "MB/s")
        .set("size", static_cast<double>(size))
        .set("n", static_cast<double>(n))
        .set("seconds", s)
        .print();
}

// ---- idle and memory floors ------------------------------------------------------------------

void idle_read(const bench::Args& args) {
    int fds[2];
    if (::pipe(fds) != 0) bench::die("pipe");
    const pid_t pid = fork_or_die();
    if (pid == 0) {
        ::close(fds[1]);
        char c;
        const ssize_t got = ::read(fds[0], &c, 1);
        ::_exit(got == 1 ? 0 : 3);
    }
    ::close(fds[0]);
    bench::sleep_s(0.2);
    const std::string op = args.str("as", "idle_read");
    bench::idle_record(op, "limit", {pid}, static_cast<double>(args.num("ms", 1000)) / 1000.0);
    write_full(fds[1], "s", 1);
    reap(pid);
}

void fork_memory(const bench::Args& args) {
    int fds[2];
    if (::pipe(fds) != 0) bench::die("pipe");
    const pid_t pid = fork_or_die();
    if (pid == 0) {
        ::close(fds[1]);
        char c;
        const ssize_t got = ::read(fds[0], &c, 1);
        ::_exit(got == 1 ? 0 : 3);
    }
    ::close(fds[0]);
    bench::sleep_s(static_cast<double>(args.num("settle_ms", 300)) / 1000.0);
    const double mib = static_cast<double>(bench::private_kib(pid)) / 1024.0;
    write_full(fds[1], "s", 1);
    reap(pid);
    bench::Record("pool_worker_memory", "limit", mib, "MiB").print();
}

}  // namespace

int main(int argc, char** argv) {
    const bench::Args args(argc, argv);
    const std::string& op = args.op();
    const long long budget = args.num("bytes", 64LL << 20);
    const std::vector<long long> sizes = args.sizes("sizes", {64, 1024, 4096, 65536, 1 << 20, 4 << 20});
    if (op == "pipe_rtt") pipe_rtt(args);
    else if (op == "pipe_oneway")
        pipe_oneway("pipe_oneway", static_cast<std::size_t>(args.num("size", 1 << 20)), args.num("n", 512));
    else if (op == "pipe_sweep") {
        for (long long size : sizes)
            pipe_oneway("pipe_sweep", static_cast<std::size_t>(size), bench::count_for(size, budget, 16, 100'000));
    } else if (op == "fork_wait") fork_wait(args);
    else if (op == "shm_ring")
        shm_ring("queue_tput", static_cast<std::size_t>(args.num("size", 64)), args.num("n", 200'000));
    else if (op == "ring_sweep") {
        for (long long size : sizes)
            shm_ring("queue_sweep", static_cast<std::size_t>(size), bench::count_for(size, budget, 16, 100'000));
    } else if (op == "shm_memcpy") shm_memcpy(args);
    else if (op == "mpmc_ring") mpmc_ring(args);
    else if (op == "idle_read") idle_read(args);
    else if (op == "fork_memory") fork_memory(args);
    else bench::die("unknown operation " + op);
    return 0;
}
