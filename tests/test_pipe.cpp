// Pipe: duplex and simplex connections, typed and raw messages, poll, end of stream, closed peers
// (without SIGPIPE), very large messages, mutual sends, truncated and malformed frames, slices
// (send_bytes with an offset, recv_bytes_into), and descriptors passed with send_fd / recv_fd.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>
#include <mproc/wait.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <mutex>
#include <optional>
#include <sched.h>
#include <stdexcept>
#include <string>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {

struct Point {
    std::string label;
    std::vector<double> xs;
    template <class Archive> void serialize(Archive& ar) { ar(label, xs); }
    bool operator==(const Point&) const = default;
};

struct Plain {
    int id;
    double weight;
    bool operator==(const Plain&) const = default;
};

std::vector<std::byte> pattern_bytes(std::size_t n, unsigned seed = 1) {
    std::vector<std::byte> out(n);
    std::uint32_t x = seed * 2654435761u + 1;
    for (auto& b : out) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b = static_cast<std::byte>(x);
    }
    return out;
}
std::string pattern_string(std::size_t n, unsigned seed = 1) {
    const auto bytes = pattern_bytes(n, seed);
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

/// Runs `body` in a child process and returns its exit code, killing it (and failing) if it has not
/// finished in `limit`: a regression that hangs fails instead of stalling the suite.
template <class Body> int run_guarded(Body body, mproc::Seconds limit = 120s) {
    mproc::Process p([body]() mutable {
        mproc_test::default_fatal_signals();
        try {
            ::_exit(body() ? 0 : 2);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "guarded body threw: %s\n", e.what());
            ::_exit(3);
        }
    });
    p.start();
    if (!p.join(limit)) {
        p.kill();
        p.join();
        FAIL("the guarded exchange did not finish in " << limit.count() << " s (a hang)");
    }
    return p.exitcode().value_or(-1000);
}

/// Writes `bytes` straight into a descriptor, bypassing the connection's framing.
void write_raw(int fd, const void* data, std::size_t n) {
    auto* at = static_cast<const char*>(data);
    while (n != 0) {
        const ssize_t put = ::write(fd, at, n);
        if (put < 0 && errno == EINTR) continue;
        REQUIRE(put > 0);
        at += put;
        n -= static_cast<std::size_t>(put);
    }
}
std::vector<std::byte> frame_of(std::span<const std::byte> payload) {
    std::vector<std::byte> frame(8 + payload.size());
    const std::uint64_t length = payload.size();
    std::memcpy(frame.data(), &length, 8);
    if (!payload.empty()) std::memcpy(frame.data() + 8, payload.data(), payload.size());
    return frame;
}

/// SIGPIPE at its default action (which kills) and not blocked, as in a program that never touched it.
void require_default_sigpipe() {
    ::signal(SIGPIPE, SIG_DFL);
    struct sigaction current {};
    REQUIRE(::sigaction(SIGPIPE, nullptr, &current) == 0);
    REQUIRE(current.sa_handler == SIG_DFL);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGPIPE);
    REQUIRE(::pthread_sigmask(SIG_UNBLOCK, &mask, nullptr) == 0);
    sigset_t blocked;
    REQUIRE(::pthread_sigmask(SIG_BLOCK, nullptr, &blocked) == 0);
    REQUIRE(sigismember(&blocked, SIGPIPE) == 0);
}
bool sigpipe_pending() {
    sigset_t pending;
    sigpending(&pending);
    return sigismember(&pending, SIGPIPE) == 1;
}

template <class F> void check_truncated(F&& recv) {
    try {
        recv();
        FAIL("a truncated frame was received as a whole message");
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("truncated"));
    } catch (const mproc::EOFError&) {
        SUCCEED("end of stream");
    }
}

/// A process that writes a frame header claiming `claimed` bytes, then `sent` of them, and exits;
/// the writing end is closed here after, so the reader then sees the end of the stream.
void send_part_of_frame(mproc::Connection<std::string>& writer, std::uint64_t claimed, std::size_t sent) {
    mproc::Process p([&writer, claimed, sent] {
        const auto some = pattern_bytes(sent);
        write_raw(writer.fileno(), &claimed, sizeof claimed);
        write_raw(writer.fileno(), some.data(), some.size());
    });
    p.start();
    writer.close();
    REQUIRE(p.join(60s));
}

}  // namespace

TEST_CASE("a duplex pipe carries messages each way, in order") {
    auto [a, b] = mproc::Pipe<std::string>();
    CHECK(a.readable());
    CHECK(a.writable());
    CHECK(b.readable());
    CHECK(b.writable());
    a.send("ping");
    CHECK(b.recv() == "ping");
    b.send("pong");
    CHECK(a.recv() == "pong");
    for (int i = 0; i < 100; ++i) a.send(std::to_string(i));
    b.send("");
    for (int i = 0; i < 100; ++i) CHECK(b.recv() == std::to_string(i));
    CHECK(a.recv().empty());
}

TEST_CASE("a duplex pipe works between processes, both ways") {
    auto [parent_conn, child_conn] = mproc::Pipe<std::string>();
    mproc::Process p([&child_conn = child_conn] {
        const std::string question = child_conn.recv();
        child_conn.send("answer to " + question);
        child_conn.send(mproc::current_process().name());
    });
    p.set_name("responder");
    p.start();
    parent_conn.send("life");
    CHECK(parent_conn.recv() == "answer to life");
    CHECK(parent_conn.recv() == "responder");
    REQUIRE(p.join());
    CHECK(p.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a simplex pipe sends one way, and the wrong direction is an Error") {
    auto [reader, writer] = mproc::Pipe<int>(/*duplex=*/false);
    CHECK(reader.readable());
    CHECK_FALSE(reader.writable());
    CHECK_FALSE(writer.readable());
    CHECK(writer.writable());
    writer.send(7);
    CHECK(reader.recv() == 7);
    CHECK_THROWS_AS(reader.send(1), mproc::Error);
    CHECK_THROWS_AS(writer.recv(), mproc::Error);
    CHECK_THROWS_AS(writer.poll(), mproc::Error);
    CHECK_THROWS_AS(writer.recv_bytes(), mproc::Error);
    const std::byte one{1};
    CHECK_THROWS_AS(reader.send_bytes({&one, 1}), mproc::Error);
    // The connection is still good after the refusals.
    writer.send(8);
    CHECK(reader.recv() == 8);

    mproc::Process p([&writer = writer] { writer.send(99); });
    p.start();
    CHECK(reader.recv() == 99);
    REQUIRE(p.join());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("typed messages: user types, trivially copyable structs, nested containers") {
    {
        auto [a, b] = mproc::Pipe<Point>();
        a.send(Point{"p", {1.5, -2.0}});
        a.send(Point{});
        CHECK(b.recv() == Point{"p", {1.5, -2.0}});
        CHECK(b.recv() == Point{});
    }
    {
        auto [a, b] = mproc::Pipe<Plain>(false);
        b.send(Plain{3, 0.25});
        CHECK(a.recv() == Plain{3, 0.25});
    }
    {
        using Nested = std::map<std::string, std::vector<std::optional<std::variant<int, std::string>>>>;
        auto [a, b] = mproc::Pipe<Nested>();
        const Nested value{{"x", {1, std::nullopt, std::string("s")}}, {"", {}}};
        mproc::Process p([&b = b, value] { b.send(value); });
        p.start();
        CHECK(a.recv() == value);
        REQUIRE(p.join());
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("send_bytes and recv_bytes carry raw messages, empty and large") {
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        auto [a, b] = mproc::Pipe(duplex);  // the default: std::vector<std::byte>
        auto& reader = a;
        auto& writer = b;
        const auto small = pattern_bytes(100);
        const auto mib = pattern_bytes(1u << 20, 2);
        writer.send_bytes({});
        writer.send_bytes(small);
        CHECK(reader.recv_bytes().empty());
        CHECK(reader.recv_bytes() == small);
        // A MiB does not fit a pipe's buffer: the writer is another process.
        mproc::Process p([&writer = writer, &mib] {
            writer.send_bytes(mib);
            writer.send_bytes({});
        });
        p.start();
        CHECK(reader.recv_bytes() == mib);
        CHECK(reader.recv_bytes().empty());
        REQUIRE(p.join());
        CHECK(p.exitcode() == 0);
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("raw and typed messages interoperate") {
    auto [a, b] = mproc::Pipe<std::vector<std::string>>();
    const std::vector<std::string> value{"a", "", "ccc"};
    a.send_bytes(mproc::to_bytes(value));
    CHECK(b.recv() == value);
    a.send(value);
    CHECK(b.recv_bytes() == mproc::to_bytes(value));
}

TEST_CASE("poll reports whether a message is there, without waiting unless asked") {
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        auto [reader, writer] = mproc::Pipe<int>(duplex);
        CHECK_FALSE(reader.poll());
        CHECK_FALSE(reader.poll(0s));
        CHECK_FALSE(reader.poll(100ms));
        writer.send(1);
        CHECK(reader.poll());
        CHECK(reader.poll(100ms));
        CHECK(reader.poll(std::nullopt));  // waits forever, but the message is there
        CHECK(reader.recv() == 1);
        CHECK_FALSE(reader.poll());

        // A message sent later by another process wakes a waiting poll.
        mproc_test::ReadySignal go;
        mproc::Process p([&writer = writer, &go] {
            go.notify();
            writer.send(2);
        });
        p.start();
        REQUIRE(go.wait());
        CHECK(reader.poll(60s));
        CHECK(reader.recv() == 2);
        REQUIRE(p.join());

        // Closed peers make the end readable: recv will say why.
        writer.close();
        CHECK(reader.poll());
        CHECK_THROWS_AS(reader.recv(), mproc::EOFError);
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("recv after every peer has closed throws EOFError once the messages are read") {
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        auto [reader, writer] = mproc::Pipe<std::string>(duplex);
        mproc::Process p([&writer = writer] {
            writer.send("last words");
            writer.close();
        });
        p.start();
        writer.close();  // the parent's copy; the child's is the only one left
        CHECK(reader.recv() == "last words");
        CHECK_THROWS_AS(reader.recv(), mproc::EOFError);
        CHECK_THROWS_AS(reader.recv(), mproc::EOFError);  // and stays so
        CHECK_THROWS_AS(reader.recv_bytes(), mproc::EOFError);
        REQUIRE(p.join());
        CHECK(p.exitcode() == 0);
    }
    {
        // The peer is a process that exits without closing explicitly.
        auto [a, b] = mproc::Pipe<int>();
        mproc::Process p([&b = b] { b.send(1); });
        p.start();
        b.close();
        CHECK(a.recv() == 1);
        CHECK_THROWS_AS(a.recv(), mproc::EOFError);
        REQUIRE(p.join());
    }
    try {
        auto [a, b] = mproc::Pipe<int>();
        b.close();
        (void)a.recv();
        FAIL("recv from a closed peer returned");
    } catch (const mproc::EOFError& e) {
        CHECK(std::string(e.what()).find('\n') == std::string::npos);
        CHECK_THAT(e.what(), Catch::Contains("closed"));
    }
    CHECK(mproc_test::child_count() == 0);
}

/// For one test: how a simplex pipe's writes keep SIGPIPE away — 0: pwritev2's RWF_NOSIGNAL where
/// the kernel has it (the SigpipeShield where it does not), -1: the SigpipeShield. Put back after.
class PipeWrites {
public:
    explicit PipeWrites(int how) : before_(mproc::detail::pipe_nosignal_support().exchange(how)) {}
    ~PipeWrites() { mproc::detail::pipe_nosignal_support().store(before_); }
    PipeWrites(const PipeWrites&) = delete;
    PipeWrites& operator=(const PipeWrites&) = delete;

private:
    int before_;
};

TEST_CASE("send to a closed peer throws BrokenPipeError and SIGPIPE never fires") {
    const int nosignal = GENERATE(0, -1);
    CAPTURE(nosignal);
    const PipeWrites writes(nosignal);
    require_default_sigpipe();
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        {
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            reader.close();
            CHECK_THROWS_AS(writer.send("anyone?"), mproc::BrokenPipeError);
            CHECK_THROWS_AS(writer.send("anyone?"), mproc::Error);
            CHECK_THROWS_AS(writer.send_bytes(pattern_bytes(10)), mproc::BrokenPipeError);
            CHECK_THROWS_AS(writer.send_bytes(pattern_bytes(1u << 20)), mproc::BrokenPipeError);
        }
        {
            // The peer is a process that reads one message and exits while a large send is under way.
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            mproc::Process p([&reader = reader] { (void)reader.recv(); });
            p.start();
            reader.close();
            writer.send("one");
            CHECK_THROWS_AS(writer.send(pattern_string(16u << 20)), mproc::BrokenPipeError);
            REQUIRE(p.join());
            CHECK(p.exitcode() == 0);
        }
        CHECK_FALSE(sigpipe_pending());
    }
    struct sigaction after {};
    REQUIRE(::sigaction(SIGPIPE, nullptr, &after) == 0);
    CHECK(after.sa_handler == SIG_DFL);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a reader that leaves in the middle of a large message gives BrokenPipeError and never SIGPIPE") {
    const int nosignal = GENERATE(0, -1);
    CAPTURE(nosignal);
    const PipeWrites writes(nosignal);
    require_default_sigpipe();
    auto [reader, writer] = mproc::Pipe<std::string>(/*duplex=*/false);
    SECTION("in the pipe: messages under the bulk lane's size, until the reader goes") {
        // The writer waits for room with part of a message in the pipe when the reader goes: the
        // kernel then raises SIGPIPE and returns the bytes it took, a short write, not EPIPE.
        mproc::Process p([&reader = reader] {
            // 64 KiB of the messages, read raw; then away while the writer waits on a full pipe.
            std::vector<char> some(64 * 1024);
            std::size_t got = 0;
            while (got < some.size()) {
                const ssize_t n = ::read(reader.fileno(), some.data() + got, some.size() - got);
                if (n <= 0) break;
                got += static_cast<std::size_t>(n);
            }
            ::usleep(200'000);
        });
        p.start();
        reader.close();
        const auto message = pattern_bytes(15000);
        CHECK_THROWS_AS(
            [&] {
                for (int i = 0; i < 100'000; ++i) writer.send_bytes(message);
            }(),
            mproc::BrokenPipeError);
        REQUIRE(p.join());
        CHECK(p.exitcode() == 0);
    }
    SECTION("in the bulk lane: one message of 8 MiB") {
        mproc::Process p([&reader = reader] {
            (void)reader.poll(60s);  // the message's turn has come: away, while the writer fills the lane
            ::usleep(200'000);
        });
        p.start();
        reader.close();
        CHECK_THROWS_AS(writer.send_bytes(pattern_bytes(8u << 20)), mproc::BrokenPipeError);
        REQUIRE(p.join());
        CHECK(p.exitcode() == 0);
    }
    CHECK_FALSE(sigpipe_pending());
}

TEST_CASE("use after close throws mproc::Error") {
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        auto [reader, writer] = mproc::Pipe<int>(duplex);
        reader.close();
        writer.close();
        CHECK(reader.closed());
        CHECK(writer.closed());
        CHECK(reader.fileno() < 0);
        reader.close();  // closing twice is harmless
        CHECK_THROWS_AS(writer.send(1), mproc::Error);
        CHECK_THROWS_AS(writer.send_bytes({}), mproc::Error);
        CHECK_THROWS_AS(reader.recv(), mproc::Error);
        CHECK_THROWS_AS(reader.recv_bytes(), mproc::Error);
        CHECK_THROWS_AS(reader.poll(), mproc::Error);
        CHECK_THROWS_AS(reader.poll(1s), mproc::Error);
    }
}

// A Connection's moves are declared noexcept: each of its members must move without allocating
// (a std::deque's move allocates; it once held the received descriptors).
static_assert(std::is_nothrow_move_constructible_v<mproc::detail::DescriptorQueue>);
static_assert(std::is_nothrow_move_assignable_v<mproc::detail::DescriptorQueue>);
static_assert(std::is_nothrow_move_constructible_v<mproc::detail::FrameReader>);
static_assert(std::is_nothrow_move_assignable_v<mproc::detail::FrameReader>);
static_assert(std::is_nothrow_move_constructible_v<mproc::Buffer>);
static_assert(std::is_nothrow_move_assignable_v<mproc::Buffer>);
static_assert(std::is_nothrow_move_constructible_v<mproc::detail::UniqueFd>);
static_assert(std::is_nothrow_move_assignable_v<mproc::detail::UniqueFd>);

TEST_CASE("connections move, and a moved-from connection is closed") {
    auto [a, b] = mproc::Pipe<int>();
    mproc::Connection<int> moved(std::move(a));
    CHECK(a.closed());  // NOLINT(bugprone-use-after-move)
    CHECK_THROWS_AS(a.send(1), mproc::Error);
    moved.send(5);
    CHECK(b.recv() == 5);
    mproc::Connection<int> assigned;
    CHECK(assigned.closed());
    CHECK_THROWS_AS(assigned.recv(), mproc::Error);
    assigned = std::move(b);
    moved.send(6);
    CHECK(assigned.recv() == 6);
}

TEST_CASE("a connection's descriptor is close-on-exec") {
    auto [a, b] = mproc::Pipe<int>();
    auto [r, w] = mproc::Pipe<int>(false);
    for (int fd : {a.fileno(), b.fileno(), r.fileno(), w.fileno()}) CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
}

TEST_CASE("a 64 MiB message goes through while the other side reads") {
    const std::string big = pattern_string(64u << 20, 3);
    const bool duplex = GENERATE(true, false);
    INFO("duplex " << duplex);
    {
        auto [reader, writer] = mproc::Pipe<std::string>(duplex);
        SECTION("from a child") {
            mproc::Process p([&writer = writer, &big] { writer.send(big); });
            p.start();
            CHECK(reader.recv() == big);
            REQUIRE(p.join(120s));
            CHECK(p.exitcode() == 0);
        }
        SECTION("to a child") {
            mproc::Process p([&reader = reader, &big] { ::_exit(reader.recv() == big ? 0 : 7); });
            p.start();
            writer.send(big);
            REQUIRE(p.join(120s));
            CHECK(p.exitcode() == 0);
        }
        SECTION("raw bytes") {
            const auto bytes = pattern_bytes(64u << 20, 4);
            mproc::Process p([&reader = reader, &bytes] { ::_exit(reader.recv_bytes() == bytes ? 0 : 7); });
            p.start();
            writer.send_bytes(bytes);
            REQUIRE(p.join(120s));
            CHECK(p.exitcode() == 0);
        }
    }
    CHECK(mproc_test::child_count() == 0);
}

// Large messages take most of their system calls and wake-ups from the kernel's small default
// buffers: the writing end grows its socket's send buffer (a simplex end's lane's) so that a few
// are in flight (up to 4 MiB and wmem_max); a pipe is never grown. Connections that only ever send
// small messages keep the kernel's defaults.
TEST_CASE("a connection's kernel buffer grows with the messages it sends, and only then") {
    const auto pipe_size = [](const mproc::Connection<>& end) { return ::fcntl(end.fileno(), F_GETPIPE_SZ); };
    const auto send_buffer = [](const mproc::Connection<>& end) {
        int size = 0;
        socklen_t length = sizeof size;
        REQUIRE(::getsockopt(end.fileno(), SOL_SOCKET, SO_SNDBUF, &size, &length) == 0);
        return size;
    };
    const auto read_limit = [](const char* path, long fallback) {
        long value = fallback;
        if (std::FILE* f = std::fopen(path, "r")) {
            if (std::fscanf(f, "%ld", &value) != 1) value = fallback;
            std::fclose(f);
        }
        return value;
    };
    SECTION("simplex: the pipe never grows; large messages go by the bulk lane") {
        // An enlarged pipe counts against the user's pipe-user-pages-soft: a simplex pipe sends the
        // bytes of its large messages by its lane (a socket) instead, and keeps the kernel's pipe.
        // The lane's two sockets are the ones the Pipe opened (found by their descriptors).
        const auto sockets_open = [] {
            std::vector<int> fds;
            for (int fd = 0; fd < 1024; ++fd) {
                struct stat st {};
                if (::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) fds.push_back(fd);
            }
            return fds;
        };
        const auto sockets_before = sockets_open();
        auto [reader, writer] = mproc::Pipe(false);
        std::vector<int> lane;
        for (const int fd : sockets_open())
            if (std::find(sockets_before.begin(), sockets_before.end(), fd) == sockets_before.end()) lane.push_back(fd);
        REQUIRE(lane.size() == 2);
        const auto lane_buffer = [](int fd) {
            int size = 0;
            socklen_t length = sizeof size;
            REQUIRE(::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &length) == 0);
            return size;
        };
        const int lane_before = std::max(lane_buffer(lane[0]), lane_buffer(lane[1]));
        const int before = pipe_size(writer);
        for (int i = 0; i < 50; ++i) {
            writer.send_bytes(pattern_bytes(1000, static_cast<unsigned>(i)));
            CHECK(reader.recv_bytes() == pattern_bytes(1000, static_cast<unsigned>(i)));
        }
        CHECK(std::max(lane_buffer(lane[0]), lane_buffer(lane[1])) == lane_before);  // small: untouched
        const auto big = pattern_bytes(300u << 10, 1);
        const auto bigger = pattern_bytes(3u << 20, 2);
        mproc::Process p([&reader = reader, &big, &bigger] {
            ::_exit(reader.recv_bytes() == big && reader.recv_bytes() == bigger ? 0 : 7);
        });
        p.start();
        writer.send_bytes(big);
        writer.send_bytes(bigger);
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == 0);
        CHECK(pipe_size(writer) == before);
        CHECK(pipe_size(reader) == before);
        // The writer's end of the lane grew to hold a few of them; the reader's did not.
        const long most = read_limit("/proc/sys/net/core/wmem_max", 212992) * 2;
        const int grown = std::max(lane_buffer(lane[0]), lane_buffer(lane[1]));
        CHECK(grown >= std::min(4L << 20, std::max<long>(lane_before, most)));
        CHECK(std::min(lane_buffer(lane[0]), lane_buffer(lane[1])) == lane_before);
    }
    SECTION("duplex: the socket's send buffer grows") {
        auto [a, b] = mproc::Pipe();
        const int before = send_buffer(a);
        a.send_bytes(pattern_bytes(1000, 3));
        CHECK(b.recv_bytes() == pattern_bytes(1000, 3));
        CHECK(send_buffer(a) == before);
        const auto big = pattern_bytes(1u << 20, 4);
        mproc::Process p([&b = b, &big] { ::_exit(b.recv_bytes() == big ? 0 : 7); });
        p.start();
        a.send_bytes(big);
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == 0);
        const long most = read_limit("/proc/sys/net/core/wmem_max", 212992) * 2;
        CHECK(send_buffer(a) >= std::min(4L << 20, std::max<long>(before, most)));
        CHECK(send_buffer(b) == before);  // only the end that sent the large message
    }
    CHECK(mproc_test::child_count() == 0);
}

// A reader trusts a frame's length up to 1 MiB: once a read has found the header, the rest of a
// frame that is all there is taken in one more read, rather than in reads that double from 64 KiB
// (past 1 MiB it still grows only as bytes arrive, so a length that lies costs at most that much
// memory).
TEST_CASE("a frame of up to 1 MiB that has arrived whole is taken in two reads: its header's, then the rest") {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    const mproc::UniqueFd reader_end(fds[0]), writer_end(fds[1]);
    const int big = 2 << 20;  // the kernel caps it at wmem_max; 300 KiB fits in the default's double
    ::setsockopt(writer_end.get(), SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    const auto payload = pattern_bytes(300u << 10, 9);
    mproc::Buffer frame;
    mproc::detail::begin_frame(frame);
    frame.append(payload.data(), payload.size());
    mproc::detail::finish_frame(frame);
    REQUIRE(::send(writer_end.get(), frame.data(), frame.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(frame.size()));
    mproc::detail::FrameReader in;
    const ssize_t first = in.fill(reader_end.get(), /*nonblocking=*/true);  // the header, and what came with it
    REQUIRE(first > 8);
    CHECK(in.fill(reader_end.get(), /*nonblocking=*/true) == static_cast<ssize_t>(frame.size()) - first);
    const auto got = in.buffered_frame();
    REQUIRE(got);
    CHECK(std::equal(got->begin(), got->end(), payload.begin(), payload.end()));
}

// Messages on each side of the sizes where a frame's header and payload go out in separate pieces,
// the pipe grows, or a write is cut short by a full pipe: every one arrives whole and in order.
TEST_CASE("messages of every size around the pipe's and the socket's limits arrive whole, in order") {
    const bool duplex = GENERATE(true, false);
    INFO("duplex " << duplex);
    const std::vector<std::size_t> sizes{0,
                                         1,
                                         7,
                                         8,
                                         65528,
                                         65535,
                                         65536,
                                         65537,
                                         131072 - 8,
                                         131072 + 1,
                                         1u << 20,
                                         (1u << 20) - 8,
                                         (1u << 20) + 1,
                                         3u << 20,
                                         5000,
                                         (16u << 10) - 1,  // around a simplex pipe's bulk lane (16 KiB and up)
                                         16u << 10,
                                         (16u << 10) + 1,
                                         (32u << 10) - 1,
                                         32u << 10,
                                         (4u << 20) + 3};
    auto [reader, writer] = mproc::Pipe<std::string>(duplex);
    mproc::Process p([&reader = reader, &sizes] {
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            const auto bytes = reader.recv_bytes();
            if (bytes != pattern_bytes(sizes[i], static_cast<unsigned>(i))) ::_exit(10 + static_cast<int>(i));
            if (reader.recv() != pattern_string(sizes[i] / 2, static_cast<unsigned>(i)))
                ::_exit(40 + static_cast<int>(i));
        }
        ::_exit(0);
    });
    p.start();
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        writer.send_bytes(pattern_bytes(sizes[i], static_cast<unsigned>(i)));
        writer.send(pattern_string(sizes[i] / 2, static_cast<unsigned>(i)));
    }
    REQUIRE(p.join(120s));
    CHECK(p.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

// Two ends that both send a large message before reading: a duplex send that finds the socket full
// reads what the peer sends meanwhile into memory, so both sends complete and the messages are then
// received whole. (Two simplex pipes used as a pair have no such buffering: like OS pipes, and
// Python's, they deadlock when both writers fill them — use a duplex pipe for that pattern.)
TEST_CASE("two processes that both send 8 MiB before reading do not deadlock") {
    const int code = run_guarded([] {
        const auto to_child = pattern_bytes(8u << 20, 5);
        const auto to_parent = pattern_bytes(8u << 20, 6);
        auto [here, there] = mproc::Pipe<std::vector<std::byte>>();
        mproc::Process peer([&there = there, &to_child, &to_parent] {
            there.send(to_parent);
            there.send_bytes(to_parent);
            ::_exit(there.recv() == to_child && there.recv_bytes() == to_child ? 0 : 7);
        });
        peer.start();
        there.close();
        here.send(to_child);
        here.send_bytes(to_child);
        const bool received = here.recv() == to_parent && here.recv_bytes() == to_parent;
        const bool joined = peer.join();
        return received && joined && peer.exitcode() == 0;
    });
    CHECK(code == 0);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("messages buffered during a blocked send are all delivered, in order") {
    const int code = run_guarded([] {
        auto [here, there] = mproc::Pipe<std::string>();
        mproc::Process peer([&there = there] {
            // Many small messages, then a big one, while the parent is busy sending its own big one.
            for (int i = 0; i < 2000; ++i) there.send(std::to_string(i));
            there.send(pattern_string(4u << 20, 8));
            for (int i = 0; i < 3; ++i)
                if (there.recv() != pattern_string(4u << 20, static_cast<unsigned>(10 + i))) ::_exit(7);
        });
        peer.start();
        there.close();
        for (int i = 0; i < 3; ++i) here.send(pattern_string(4u << 20, static_cast<unsigned>(10 + i)));
        // The peer's small messages had to be read into memory for these sends to finish.
        bool ok = here.poll();
        for (int i = 0; i < 2000; ++i) ok = ok && here.recv() == std::to_string(i);
        ok = ok && here.recv() == pattern_string(4u << 20, 8);
        return ok && peer.join() && peer.exitcode() == 0;
    });
    CHECK(code == 0);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a truncated frame is a SerializationError or EOFError, never a hang") {
    const bool duplex = GENERATE(true, false);
    INFO("duplex " << duplex);
    {
        SECTION("a writer that sends part of a frame and exits") {
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            send_part_of_frame(writer, 1u << 20, 1000);
            check_truncated([&reader = reader] { (void)reader.recv(); });
            check_truncated([&reader = reader] { (void)reader.recv_bytes(); });  // and again: no hang
        }
        SECTION("a writer that sends part of a large raw message and exits") {
            // recv_bytes reads the rest of a large message straight into the value: the end of
            // the stream half-way through it is a truncated frame too, and then the end.
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            send_part_of_frame(writer, 200000, 50000);
            try {
                (void)reader.recv_bytes();
                FAIL("a truncated frame was received as a whole message");
            } catch (const mproc::SerializationError& e) {
                CHECK_THAT(e.what(), Catch::Contains("truncated frame: the peer closed after 50008 bytes of a 200008"));
            }
            CHECK_THROWS_AS(reader.recv_bytes(), mproc::EOFError);
        }
        SECTION("a writer that sends half a frame header and exits") {
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            mproc::Process p([&writer = writer] {
                const std::uint32_t half = 12;
                write_raw(writer.fileno(), &half, sizeof half);
            });
            p.start();
            writer.close();
            REQUIRE(p.join(60s));
            check_truncated([&reader = reader] { (void)reader.recv(); });
        }
        SECTION("a writer killed by SIGKILL in the middle of a 64 MiB send") {
            auto [reader, writer] = mproc::Pipe<std::string>(duplex);
            mproc::Process p([&writer = writer] { writer.send(pattern_string(64u << 20)); });
            p.start();
            writer.close();
            // Nothing is read until the writer is dead, so it cannot have sent more than the
            // descriptor's buffer: it is blocked mid-message when the signal arrives.
            REQUIRE(reader.poll(60s));
            p.kill();
            REQUIRE(p.join(60s));
            CHECK(p.exitcode() == -SIGKILL);
            check_truncated([&reader = reader] { (void)reader.recv(); });
        }
    }
    CHECK(mproc_test::child_count() == 0);
}

// recv_bytes reads the rest of a large message straight into the value; a read that fails half-way
// (here EAGAIN, the descriptor made non-blocking by its owner) must leave the message where it was.
TEST_CASE("a large message whose read fails half-way is received whole by the next recv_bytes") {
    const bool duplex = GENERATE(true, false);
    INFO("duplex " << duplex);
    auto [reader, writer] = mproc::Pipe<std::string>(duplex);
    const auto message = pattern_bytes(65536, 5);
    const std::uint64_t length = message.size();
    write_raw(writer.fileno(), &length, sizeof length);
    write_raw(writer.fileno(), message.data(), 30000);
    REQUIRE(::fcntl(reader.fileno(), F_SETFL, ::fcntl(reader.fileno(), F_GETFL) | O_NONBLOCK) == 0);
    CHECK_THROWS_AS(reader.recv_bytes(), mproc::Error);  // EAGAIN: the rest is not there yet
    write_raw(writer.fileno(), message.data() + 30000, message.size() - 30000);
    writer.send_bytes(pattern_bytes(10, 6));
    CHECK(reader.recv_bytes() == message);
    CHECK(reader.recv_bytes() == pattern_bytes(10, 6));
}

TEST_CASE("malformed frames are SerializationErrors and the connection stays usable") {
    for (bool duplex : {true, false}) {
        INFO("duplex " << duplex);
        auto [reader, writer] = mproc::Pipe<std::vector<std::string>>(duplex);
        const std::vector<std::string> good{"still", "works"};

        // Garbage sent as a message.
        const auto garbage = pattern_bytes(37);
        writer.send_bytes(garbage);
        writer.send(good);
        CHECK_THROWS_AS(reader.recv(), mproc::SerializationError);
        CHECK(reader.recv() == good);

        // A well-framed message whose content claims 2^62 strings.
        const std::uint64_t huge = std::uint64_t{1} << 62;
        std::vector<std::byte> lying(8);
        std::memcpy(lying.data(), &huge, 8);
        const auto frame = frame_of(lying);
        write_raw(writer.fileno(), frame.data(), frame.size());
        writer.send(good);
        CHECK_THROWS_AS(reader.recv(), mproc::SerializationError);
        CHECK(reader.recv() == good);

        // A valid value followed by bytes that belong to no value.
        auto padded = mproc::to_bytes(good);
        padded.push_back(std::byte{0});
        writer.send_bytes(padded);
        // An empty message, where a vector needs at least its length.
        writer.send_bytes({});
        writer.send(good);
        CHECK_THROWS_AS(reader.recv(), mproc::SerializationError);
        CHECK_THROWS_AS(reader.recv(), mproc::SerializationError);
        CHECK(reader.recv() == good);
        CHECK_FALSE(reader.poll());
    }
}

TEST_CASE("send_bytes with an offset and a size sends that slice, and a range past the end sends nothing") {
    auto [a, b] = mproc::Pipe<std::vector<std::byte>>();
    const auto data = pattern_bytes(10);
    const std::span<const std::byte> all(data);
    a.send_bytes(all, 2, 3);
    CHECK(b.recv_bytes() == std::vector<std::byte>(data.begin() + 2, data.begin() + 5));
    a.send_bytes(all, 4);  // the rest
    CHECK(b.recv_bytes() == std::vector<std::byte>(data.begin() + 4, data.end()));
    a.send_bytes(all, 10);  // the end itself: an empty message
    CHECK(b.recv_bytes().empty());
    a.send_bytes(all, 0, 10);
    CHECK(b.recv_bytes() == data);
    a.send_bytes(all, 3, 0);
    CHECK(b.recv_bytes().empty());

    CHECK_THROWS_AS(a.send_bytes(all, 11), mproc::Error);
    CHECK_THROWS_AS(a.send_bytes(all, 11, 0), mproc::Error);
    CHECK_THROWS_AS(a.send_bytes(all, 8, 3), mproc::Error);
    CHECK_THROWS_AS(a.send_bytes(all, 0, 11), mproc::Error);
    CHECK_THROWS_AS(a.send_bytes(all, 1, SIZE_MAX), mproc::Error);  // offset + size would wrap
    CHECK_FALSE(b.poll());                                          // nothing was sent
    a.send_bytes(all, 9, 1);
    CHECK(b.recv_bytes() == std::vector<std::byte>{data[9]});
}

TEST_CASE("recv_bytes_into fills the buffer from an offset, and a message too long stays in the connection") {
    auto [a, b] = mproc::Pipe<std::vector<std::byte>>();
    const auto data = pattern_bytes(6);
    std::vector<std::byte> buffer(10, std::byte{0x55});

    a.send_bytes(data);
    CHECK(b.recv_bytes_into(buffer, 3) == 6);
    CHECK(std::equal(data.begin(), data.end(), buffer.begin() + 3));
    CHECK(buffer[0] == std::byte{0x55});
    CHECK(buffer[9] == std::byte{0x55});

    a.send_bytes(data);
    CHECK(b.recv_bytes_into(buffer) == 6);  // offset 0 by default
    CHECK(std::equal(data.begin(), data.end(), buffer.begin()));
    a.send_bytes(data);
    CHECK(b.recv_bytes_into(buffer, 4) == 6);  // an exact fit

    // Too short: BufferTooShort (an mproc::Error) says how long the message is; the buffer is
    // untouched, and the message is still the next one, whole.
    a.send_bytes(data);
    a.send_bytes(pattern_bytes(2, 9));
    std::vector<std::byte> small(8, std::byte{0x11});
    try {
        b.recv_bytes_into(small, 3);
        FAIL("a 6-byte message fitted in 5 bytes");
    } catch (const mproc::BufferTooShort& e) {
        CHECK(e.message_size() == 6);
        CHECK_THAT(e.what(), Catch::Contains("stays in the connection"));
    }
    CHECK(small == std::vector<std::byte>(8, std::byte{0x11}));
    CHECK_THROWS_AS(b.recv_bytes_into(small, 3), mproc::Error);  // still there, still too long
    CHECK(b.recv_bytes_into(small, 2) == 6);                     // a larger room takes it
    CHECK(std::equal(data.begin(), data.end(), small.begin() + 2));
    CHECK(b.recv_bytes() == pattern_bytes(2, 9));  // and the next one follows

    // An offset past the end: an Error before anything is read.
    a.send_bytes(data);
    CHECK_THROWS_AS(b.recv_bytes_into(buffer, 11), mproc::Error);
    CHECK(b.recv_bytes() == data);
    // An empty message fits anywhere, even at the very end.
    a.send_bytes({});
    CHECK(b.recv_bytes_into(buffer, 10) == 0);
    // A typed message is bytes too.
    auto [c, d] = mproc::Pipe<int>();
    c.send(7);
    std::array<std::byte, sizeof(int)> raw{};
    CHECK(d.recv_bytes_into(raw) == sizeof(int));
    int seven = 0;
    std::memcpy(&seven, raw.data(), sizeof seven);
    CHECK(seven == 7);
}

TEST_CASE("a simplex pipe's large message by its bulk lane: recv_bytes_into, too short, and one that does not decode") {
    auto [reader, writer] = mproc::Pipe<std::vector<std::string>>(false);
    const auto big = pattern_bytes(100'000, 3);
    const std::vector<std::string> good{"still", std::string(50'000, 'w'), "works"};
    mproc::Process p([&writer = writer, &big, &good] {
        writer.send_bytes(big);
        writer.send_bytes(big);
        writer.send_bytes(pattern_bytes(40'000, 4));  // bytes that are no vector of strings
        writer.send(good);
        writer.send_bytes(pattern_bytes(5, 5));
    });
    p.start();
    writer.close();
    // Its frame in the pipe is what poll and mproc::wait see.
    CHECK(reader.poll(60s));
    CHECK(mproc::wait({reader}, 60s) == std::vector<std::size_t>{0});
    // Too short: the message stays, whole, for a larger room.
    std::vector<std::byte> room(100'010, std::byte{0x11});
    try {
        (void)reader.recv_bytes_into(room, 11);
        FAIL("a 100,000-byte message fitted in 99,999 bytes");
    } catch (const mproc::BufferTooShort& e) {
        CHECK(e.message_size() == big.size());
    }
    CHECK(room == std::vector<std::byte>(100'010, std::byte{0x11}));
    CHECK(reader.recv_bytes_into(room, 10) == big.size());
    CHECK(std::equal(big.begin(), big.end(), room.begin() + 10));
    CHECK(room[9] == std::byte{0x11});
    CHECK(reader.recv_bytes() == big);
    // A message that does not decode is dropped, and the next one follows.
    CHECK_THROWS_AS(reader.recv(), mproc::SerializationError);
    CHECK(reader.recv() == good);
    CHECK(reader.recv_bytes() == pattern_bytes(5, 5));
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 0);
    CHECK_THROWS_AS(reader.recv_bytes(), mproc::EOFError);
}

namespace {
/// Where process `pid` sleeps in the kernel (its wchan).
std::string kernel_wait_of(pid_t pid) {
    std::ifstream wchan("/proc/" + std::to_string(pid) + "/wchan");
    std::string where;
    std::getline(wchan, where);
    return where;
}
/// Whether process `pid` sleeps in a write to a full pipe.
bool blocked_writing_pipe(pid_t pid) { return kernel_wait_of(pid).find("pipe_write") != std::string::npos; }
/// Whether process `pid` sleeps in a send to a full socket.
bool blocked_sending(pid_t pid) {
    const std::string where = kernel_wait_of(pid);
    return where.find("sock_alloc_send") != std::string::npos || where.find("wait_for_wmem") != std::string::npos ||
           where.find("unix_stream") != std::string::npos;
}
/// Kills `p` once `blocked(pid)` says it sleeps where the test wants it (within 60 s), and reaps it.
template <class Blocked> void kill_when(mproc::Process& p, Blocked blocked) {
    const auto until = std::chrono::steady_clock::now() + 60s;
    while (!blocked(p.pid()) && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    REQUIRE(blocked(p.pid()));
    p.kill();
    REQUIRE(p.join(60s));
}
}  // namespace

TEST_CASE(
    "a writer killed between its message's lane bytes and its frame: the next large message is an error, "
    "never those bytes") {
    // The writer's end is shared with the process that dies, as a parent shares it with the
    // children it starts one after another. The pipe is full, so the dying writer's first bytes
    // are in the lane when it blocks on its frame, and no frame ever claims them.
    auto [reader, writer] = mproc::Pipe<std::string>(false);
    for (unsigned i = 0; i < 16; ++i) writer.send_bytes(pattern_bytes(4096 - 8, i));  // 64 KiB: full
    const auto first = pattern_bytes(1u << 20, 100), second = pattern_bytes(1u << 20, 200);
    mproc::Process dying([&writer = writer, &first] { writer.send_bytes(first); });
    dying.start();
    kill_when(dying, blocked_writing_pipe);
    for (unsigned i = 0; i < 16; ++i) REQUIRE(reader.recv_bytes() == pattern_bytes(4096 - 8, i));
    mproc::Process next([&reader = reader, &writer = writer, &second] {
        reader.close();
        writer.send_bytes(pattern_bytes(10, 7));
        try {
            writer.send_bytes(second);  // the reader shuts the lane when it finds it out of step
        } catch (const mproc::BrokenPipeError&) {}
    });
    next.start();
    writer.close();
    CHECK(reader.recv_bytes() == pattern_bytes(10, 7));
    try {
        const auto got = reader.recv_bytes();
        FAIL("a large message was received: " << (got == second ? "the right one" : "the dead writer's bytes"));
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("no message claims"));
    }
    reader.close();
    REQUIRE(next.join(60s));
    CHECK(next.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a writer killed in the middle of its message's lane bytes, after its frame: an error, never mixed bytes") {
    // The message is larger than the lane holds: the frame is in the pipe and the writer waits
    // for room when it dies. The next writer's message then follows what it left, and a reader
    // that took the frame's length of bytes from there would hand out a mix of the two.
    auto [reader, writer] = mproc::Pipe<std::string>(false);
    const auto first = pattern_bytes(16u << 20, 100), second = pattern_bytes(16u << 20, 200);
    mproc::Process dying([&writer = writer, &first] { writer.send_bytes(first); });
    dying.start();
    REQUIRE(reader.poll(60s));  // its frame
    kill_when(dying, blocked_sending);
    mproc::Process next([&reader = reader, &writer = writer, &second] {
        reader.close();
        try {
            writer.send_bytes(second);  // the reader shuts the lane when it finds it out of step
        } catch (const mproc::BrokenPipeError&) {}
    });
    next.start();
    writer.close();
    try {
        const auto got = reader.recv_bytes();
        FAIL("a large message was received: " << (got == first ? "the dead writer's, whole" : "a mix of two"));
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("no message claims"));
    }
    REQUIRE(next.join(60s));  // not left waiting for room in a lane nobody reads
    CHECK(next.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

namespace {
/// Runs `send` in a process that is the first of a new pid namespace, so its id is 1, as is every
/// such process's: a writer whose id a dead one had. When `kill_blocked`, the process is killed
/// once it sleeps writing a full pipe. Returns false when this process may not make a namespace.
template <class Send> bool as_pid_one(Send send, bool kill_blocked) {
    mproc::Process outer([&] {
        if (::unshare(CLONE_NEWPID) != 0) std::_Exit(77);
        const pid_t one = ::fork();
        if (one == 0) {
            send();
            std::_Exit(0);
        }
        if (one < 0) std::_Exit(3);
        if (kill_blocked) {
            const auto until = std::chrono::steady_clock::now() + 60s;
            while (!blocked_writing_pipe(one) && std::chrono::steady_clock::now() < until) ::usleep(1000);
            ::kill(one, SIGKILL);
        }
        int status = 0;
        while (::waitpid(one, &status, 0) < 0 && errno == EINTR) {}
        std::_Exit(kill_blocked ? (WIFSIGNALED(status) ? 0 : 4) : (WIFEXITED(status) ? WEXITSTATUS(status) : 5));
    });
    outer.start();
    REQUIRE(outer.join(120s));
    if (outer.exitcode() == 77) return false;
    CHECK(outer.exitcode() == 0);
    return true;
}
}  // namespace

TEST_CASE("a writer whose process id a dead writer had, and whose count it inherited, gets no tag of that writer's") {
    // Both writers are forked from this process after its last large message (so both count on
    // from the same number) and both have id 1. The first dies with its whole message in the
    // lane and its frame not sent; the second sends one of the same length: a tag made of the
    // id and the count alone would be the same, and the reader would hand out the dead bytes.
    auto [reader, writer] = mproc::Pipe<std::string>(false);
    for (unsigned i = 0; i < 16; ++i) writer.send_bytes(pattern_bytes(4096 - 8, i));  // 64 KiB: full
    const auto first = pattern_bytes(32u << 10, 100), second = pattern_bytes(32u << 10, 200);
    if (!as_pid_one([&writer = writer, &first] { writer.send_bytes(first); }, /*kill_blocked=*/true)) {
        WARN("skipped: this process may not make a pid namespace (CI runs as root, where it may)");
        return;
    }
    bool drained = true;
    std::thread drain([&reader = reader, &drained] {  // the second writer's frame needs room in the pipe
        for (unsigned i = 0; i < 16; ++i) drained = reader.recv_bytes() == pattern_bytes(4096 - 8, i) && drained;
    });
    const bool second_ran = as_pid_one([&writer = writer, &second] { writer.send_bytes(second); }, false);
    drain.join();
    REQUIRE(second_ran);
    REQUIRE(drained);
    try {
        const auto got = reader.recv_bytes();
        FAIL("a large message was received: " << (got == second ? "the right one" : "the dead writer's bytes"));
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("no message claims"));
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a bulk frame on a connection without a bulk lane is a SerializationError, and the stream goes on") {
    // A duplex pipe carries every message in its socket: a header that says "the bytes come by
    // the lane" is malformed there, and must not make the reader wait for them.
    auto [a, b] = mproc::Pipe<std::string>();
    const std::uint64_t bulk[2] = {(std::uint64_t{1} << 62) | 100'000, 12345};  // header, tag
    write_raw(a.fileno(), bulk, sizeof bulk);
    a.send("after");
    write_raw(a.fileno(), bulk, sizeof bulk);
    a.send("and after");
    a.close();  // a reader that took the tag for a frame's header fails at the end, rather than wait
    try {
        (void)b.recv();
        FAIL("a bulk frame was received on a duplex pipe");
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("no bulk lane"));
    }
    CHECK(b.recv() == "after");
    // Not "too short for a 100,000-byte message": the frame is malformed, and goes.
    std::vector<std::byte> room(10);
    CHECK_THROWS_AS(b.recv_bytes_into(room), mproc::SerializationError);
    CHECK(b.recv() == "and after");
}

TEST_CASE("send_fd and recv_fd pass a descriptor to a child, which writes into it") {
    auto [parent_end, child_end] = mproc::Pipe<std::string>();
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    mproc_test::ReadySignal started;
    mproc::Process child([&child_end = child_end, &parent_end = parent_end, fds, &started] {
        parent_end.close();
        ::close(fds[0]);
        ::close(fds[1]);  // the child's copies from the fork: it must write through the one it receives
        started.notify();
        mproc::UniqueFd received = child_end.recv_fd();
        if (!received) std::_Exit(10);
        if ((::fcntl(received.get(), F_GETFD) & FD_CLOEXEC) == 0) std::_Exit(11);
        const std::string text = child_end.recv();
        if (::write(received.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) std::_Exit(12);
        received.reset();
        child_end.send("written");
        std::_Exit(0);
    });
    child.start();
    child_end.close();
    // Sent once the child has closed its inherited copies: only the passed descriptor reaches the pipe.
    REQUIRE(started.wait());
    parent_end.send_fd(fds[1]);
    ::close(fds[1]);  // send_fd sent a copy; this end is no longer needed here
    parent_end.send("through the passed descriptor");
    CHECK(parent_end.recv() == "written");
    std::string got(64, '\0');
    const ssize_t n = ::read(fds[0], got.data(), got.size());
    REQUIRE(n > 0);
    got.resize(static_cast<std::size_t>(n));
    CHECK(got == "through the passed descriptor");
    char more = 0;
    CHECK(::read(fds[0], &more, 1) == 0);  // every write end is closed: the child's copy was its own
    ::close(fds[0]);
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("descriptors and messages keep their order, and neither is taken for the other") {
    auto [a, b] = mproc::Pipe<int>();
    int first[2], second[2];
    REQUIRE(::pipe2(first, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(second, O_CLOEXEC) == 0);
    a.send(1);
    a.send_fd(first[1]);
    a.send(2);
    a.send_fd(second[1]);
    CHECK(b.poll());
    CHECK_THROWS_AS(b.recv_fd(), mproc::Error);  // the next one is a message...
    CHECK(b.recv() == 1);                        // ...which is still there
    CHECK_THROWS_AS(b.recv(), mproc::Error);     // the next one is a descriptor...
    CHECK_THROWS_AS(b.recv_bytes(), mproc::Error);
    std::array<std::byte, 16> room{};
    CHECK_THROWS_AS(b.recv_bytes_into(room), mproc::Error);
    mproc::UniqueFd one = b.recv_fd();  // ...which is still there
    CHECK(b.recv() == 2);
    mproc::UniqueFd two = b.recv_fd();
    REQUIRE(one);
    REQUIRE(two);
    // Each is its own pipe's write end.
    REQUIRE(::write(one.get(), "1", 1) == 1);
    REQUIRE(::write(two.get(), "2", 1) == 1);
    char byte = 0;
    REQUIRE(::read(first[0], &byte, 1) == 1);
    CHECK(byte == '1');
    REQUIRE(::read(second[0], &byte, 1) == 1);
    CHECK(byte == '2');
    for (int fd : {first[0], first[1], second[0], second[1]}) ::close(fd);
    // Both ways.
    int third[2];
    REQUIRE(::pipe2(third, O_CLOEXEC) == 0);
    b.send_fd(third[0]);
    mproc::UniqueFd back = a.recv_fd();
    REQUIRE(::write(third[1], "3", 1) == 1);
    REQUIRE(::read(back.get(), &byte, 1) == 1);
    CHECK(byte == '3');
    ::close(third[0]);
    ::close(third[1]);
}

namespace {
/// Whether any descriptor of this process is open on the pipe whose inode is `inode`.
bool pipe_open_here(ino_t inode) {
    for (int fd = 0; fd < 4096; ++fd) {
        struct stat st {};
        if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode) && st.st_ino == inode) return true;
    }
    return false;
}
}  // namespace

TEST_CASE("a control message that brings two descriptors keeps the first and closes the second") {
    // detail::recv_with_fd (the fork server's and the pool's control messages) has room for two
    // descriptors: the second must not stay open, owned by no one.
    int pair[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    mproc::detail::UniqueFd sender(pair[0]), receiver(pair[1]);
    const auto first = mproc_test::pipe_write_end(), second = mproc_test::pipe_write_end();
    REQUIRE(mproc_test::send_descriptors(sender.get(), {first.fd, second.fd}));
    ::close(first.fd);
    ::close(second.fd);  // from here, only the copies in flight hold the two pipes
    char got = 0;
    mproc::detail::UniqueFd kept;
    REQUIRE(mproc::detail::recv_with_fd(receiver.get(), &got, 1, &kept) == 1);
    CHECK(got == 'x');
    REQUIRE(kept);
    CHECK(mproc_test::inode_of(kept.get()) == first.inode);
    CHECK_FALSE(pipe_open_here(second.inode));  // closed, not left open and unowned
}

TEST_CASE("send_fd and recv_fd: an Error on a simplex pipe's ends and for a bad descriptor") {
    auto [reader, writer] = mproc::Pipe<int>(false);
    CHECK_THROWS_AS(writer.send_fd(0), mproc::Error);
    CHECK_THROWS_AS(reader.recv_fd(), mproc::Error);
    CHECK_THROWS_AS(reader.send_fd(0), mproc::Error);  // and the wrong direction
    CHECK_THROWS_AS(writer.recv_fd(), mproc::Error);
    CHECK_FALSE(reader.poll());  // nothing was sent
    try {
        writer.send_fd(0);
    } catch (const mproc::Error& e) {
        CHECK_THAT(e.what(), Catch::Contains("duplex"));
    }

    auto [a, b] = mproc::Pipe<int>();
    CHECK_THROWS_AS(a.send_fd(-1), mproc::Error);
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    ::close(fds[0]);
    ::close(fds[1]);
    CHECK_THROWS_AS(a.send_fd(fds[0]), mproc::Error);  // not open
    CHECK_FALSE(b.poll());
    a.close();
    CHECK_THROWS_AS(a.send_fd(0), mproc::Error);
    CHECK_THROWS_AS(a.recv_fd(), mproc::Error);
}

TEST_CASE("send_fd to a closed peer is a BrokenPipeError without SIGPIPE, and recv_fd at the end an EOFError") {
    require_default_sigpipe();
    {
        auto [a, b] = mproc::Pipe<int>();
        b.close();
        CHECK_THROWS_AS(a.send_fd(0), mproc::BrokenPipeError);
        CHECK_THROWS_AS(a.recv_fd(), mproc::EOFError);
    }
    {
        // A descriptor sent before the peer closed is still received, then the end of the stream.
        auto [a, b] = mproc::Pipe<int>();
        a.send_fd(0);
        a.close();
        mproc::UniqueFd got = b.recv_fd();
        CHECK(got);
        CHECK_THROWS_AS(b.recv_fd(), mproc::EOFError);
    }
    {
        // Descriptors received but never taken are closed with the connection.
        auto [a, b] = mproc::Pipe<int>();
        int fds[2];
        REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
        a.send_fd(fds[1]);
        ::close(fds[1]);
        a.send(5);
        CHECK_THROWS_AS(b.recv(), mproc::Error);  // fills b's buffer (and its descriptor queue)
        b.close();
        char byte = 0;
        CHECK(::read(fds[0], &byte, 1) == 0);  // no write end left anywhere
        ::close(fds[0]);
    }
    CHECK_FALSE(sigpipe_pending());
}

// ---- one end shared by threads ------------------------------------------------------------------

namespace {

/// A message that says who sent it and checks itself: "<thread>:<seq>:" and then `size` bytes of a
/// letter both pick (sizes from a small one to one past a socket's buffer and a simplex lane's
/// threshold).
std::string shared_message(int thread, int seq) {
    static constexpr std::size_t sizes[] = {10, 5000, 70000};
    std::string text = std::to_string(thread) + ":" + std::to_string(seq) + ":";
    text.append(sizes[static_cast<std::size_t>(seq) % 3], static_cast<char>('a' + (thread * 31 + seq) % 26));
    return text;
}

/// A thread of this process, for as long as the object lives; `asleep()` waits until the kernel
/// has it asleep in a read, a readv, a recvmsg or a poll (where a receive, a send waiting for room
/// or a wait sleeps; not on a lock, where a sanitizer's own locks would put it).
class Sleeper {
public:
    template <class Body> explicit Sleeper(Body body) {
        thread_ = std::thread([this, body = std::move(body)]() mutable {
            id_.store(static_cast<pid_t>(::gettid()));
            body();
        });
    }
    ~Sleeper() {
        if (thread_.joinable()) thread_.join();
    }
    Sleeper(const Sleeper&) = delete;
    Sleeper& operator=(const Sleeper&) = delete;

    /// `in_a_wait` false: asleep anywhere (a call waiting for its turn sleeps on a futex).
    void asleep(bool in_a_wait = true) const {
        const auto limit = std::chrono::steady_clock::now() + 60s;
        for (;;) {
            if (const pid_t id = id_.load(); id != 0 && mproc_test::thread_asleep(id, in_a_wait)) return;
            REQUIRE(std::chrono::steady_clock::now() < limit);
            std::this_thread::sleep_for(1ms);
        }
    }
    void join() { thread_.join(); }

private:
    std::atomic<pid_t> id_{0};
    std::thread thread_;
};

}  // namespace

TEST_CASE("threads that share one end take turns a whole message at a time", "[threads]") {
    // Four threads send on one end and two receive on the other, with messages from a few bytes to
    // one that fills the socket (and goes by a simplex pipe's lane). Before the ends had locks, two
    // sends interleaved their bytes, and the reader got frames that did not decode.
    const mproc_test::Watchdog dog(300s, "threads sharing one end");
    for (const bool duplex : {true, false}) {
        INFO((duplex ? "duplex" : "simplex"));
        auto [reader, writer] = mproc::Pipe<std::string>(duplex);
        constexpr int senders = 4, per_sender = 150, total = senders * per_sender;
        std::atomic<int> claimed{0};
        std::mutex errors_mutex;
        std::vector<std::string> errors;
        const auto failed = [&](const std::string& what) {
            const std::lock_guard lock(errors_mutex);
            errors.push_back(what);
        };
        std::vector<std::vector<std::pair<int, int>>> got(2);  // per receiver: (thread, seq) in order
        {
            std::vector<std::thread> threads;
            for (int r = 0; r < 2; ++r)
                threads.emplace_back([&, r, &reader = reader] {
                    try {
                        while (claimed.fetch_add(1) < total) {
                            // The second receiver polls first: a poll waits for its turn, too.
                            if (r == 1)
                                while (!reader.poll(mproc::Seconds{0.01})) {}
                            const std::string text = reader.recv();
                            const auto colon = text.find(':'), second = text.find(':', colon + 1);
                            const int thread = std::stoi(text.substr(0, colon));
                            const int seq = std::stoi(text.substr(colon + 1, second - colon - 1));
                            if (text != shared_message(thread, seq)) failed("a message arrived changed");
                            got[static_cast<std::size_t>(r)].emplace_back(thread, seq);
                        }
                    } catch (const std::exception& e) {
                        failed(std::string("receive: ") + e.what());
                        reader.close();  // the senders must not wait for room for ever
                    }
                });
            for (int t = 0; t < senders; ++t)
                threads.emplace_back([&, t, &writer = writer] {
                    try {
                        for (int seq = 0; seq < per_sender; ++seq) writer.send(shared_message(t, seq));
                    } catch (const std::exception& e) {
                        failed(std::string("send: ") + e.what());
                    }
                });
            for (std::thread& t : threads) t.join();
        }
        INFO((errors.empty() ? std::string() : errors.front()));
        REQUIRE(errors.empty());
        // Each message once; and in each receiver, each sender's messages in the order sent.
        std::vector<std::vector<int>> seen(senders, std::vector<int>(per_sender, 0));
        for (const auto& mine : got) {
            std::vector<int> last(senders, -1);
            for (const auto& [thread, seq] : mine) {
                ++seen[static_cast<std::size_t>(thread)][static_cast<std::size_t>(seq)];
                CHECK(seq > last[static_cast<std::size_t>(thread)]);
                last[static_cast<std::size_t>(thread)] = seq;
            }
        }
        for (const auto& counts : seen) CHECK(std::count(counts.begin(), counts.end(), 1) == per_sender);
    }
}

TEST_CASE("a send that finds the socket full while another thread receives on the same end does not deadlock",
          "[threads]") {
    // Both ends send 8 MiB messages (past what the sockets hold) from one thread while another
    // thread of the same end receives: the sender waits for room, and the receiver reads.
    const mproc_test::Watchdog dog(300s, "full sockets with a receiving thread on each end");
    auto [a, b] = mproc::Pipe<std::string>();
    const std::string big(8u << 20, 'x');
    constexpr int messages = 4;
    std::atomic<int> received{0}, failures{0};
    const auto sender = [&](mproc::Connection<std::string>& end) {
        return std::thread([&] {
            try {
                for (int i = 0; i < messages; ++i) end.send(big);
            } catch (const std::exception&) {
                ++failures;
            }
        });
    };
    const auto receiver = [&](mproc::Connection<std::string>& end) {
        return std::thread([&] {
            try {
                for (int i = 0; i < messages; ++i)
                    if (end.recv() == big) ++received;
            } catch (const std::exception&) {
                ++failures;
            }
        });
    };
    std::thread threads[] = {sender(a), receiver(a), sender(b), receiver(b)};
    for (std::thread& t : threads) t.join();
    CHECK(failures == 0);
    CHECK(received == 2 * messages);
}

TEST_CASE(
    "close from another thread: later calls throw, a receive inside returns what arrives, then the "
    "descriptors go",
    "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    auto [a, b] = mproc::Pipe<int>();
    const std::size_t open = mproc_test::open_descriptors();
    int got = 0;
    std::string after;
    Sleeper receiver([&, &a = a] {
        got = a.recv();
        try {
            (void)a.recv();
        } catch (const mproc::Error& e) {
            after = e.what();
        }
    });
    receiver.asleep();
    a.close();  // at once, with the receive still inside
    CHECK(a.closed());
    CHECK(a.fileno() == -1);
    CHECK_THROWS_AS(a.send(1), mproc::Error);
    CHECK_THROWS_AS(a.poll(), mproc::Error);
    // The receive still reads the descriptor: it was not closed under it (before, it was, and its
    // number could have been reused by the next descriptor the program opened).
    CHECK(mproc_test::open_descriptors() == open);
    b.send(42);
    receiver.join();
    CHECK(got == 42);
    CHECK(after == "recv on a closed connection");
    CHECK(mproc_test::open_descriptors() == open - 1);  // released by the receive as it left
}

TEST_CASE("close from another thread wakes a call waiting for its turn, which throws", "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    auto [a, b] = mproc::Pipe<int>();
    int got = 0;
    Sleeper first([&, &a = a] { got = a.recv(); });
    first.asleep();
    std::atomic<bool> second_done{false};
    std::string second_error;
    Sleeper second([&, &a = a] {
        try {
            (void)a.recv();
        } catch (const mproc::Error& e) {
            second_error = e.what();
        }
        second_done = true;
    });
    second.asleep(/*in_a_wait=*/false);  // waiting for the receive turn the first receive holds
    a.close();
    const auto limit = std::chrono::steady_clock::now() + 30s;
    while (!second_done && std::chrono::steady_clock::now() < limit) std::this_thread::sleep_for(1ms);
    // Before, the second receive waited for the first to give its turn back, which it did only
    // once a message came: it throws with no message sent now.
    CHECK(second_done);
    b.send(7);  // the first receive, still inside, returns it
    first.join();
    second.join();
    CHECK(got == 7);
    CHECK(second_error == "recv on a closed connection");
}

TEST_CASE("poll with a timeout while another thread receives says false in time", "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    auto [a, b] = mproc::Pipe<int>();
    int got = 0;
    Sleeper receiver([&, &a = a] { got = a.recv(); });
    receiver.asleep();
    CHECK_FALSE(a.poll(mproc::Seconds{0.05}));
    CHECK_FALSE(a.poll());
    b.send(7);
    receiver.join();
    CHECK(got == 7);
}

TEST_CASE("poll with a timeout says false in time while other threads keep sending on the same end", "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    auto [a, b] = mproc::Pipe<int>();
    int got = 0;
    Sleeper receiver([&, &a = a] { got = a.recv(); });
    receiver.asleep();
    // Two senders take turns on `a` as fast as they can (a drain on `b` keeps the socket from
    // filling): the end's word changes all the time, and each hand-over of the send turn wakes
    // whoever waits for it. The poll waits for the receive turn: its timeout must end its wait
    // however often the word changes (before, each wake-up or change sent it round again, and
    // only a sleep that lasted until the deadline ended it: it never came).
    std::atomic<bool> stop{false};
    std::atomic<long> drained{0};
    std::thread drain([&, &b = b] {
        try {
            while (b.recv() >= 0) ++drained;
        } catch (const mproc::EOFError&) {}
    });
    std::vector<std::thread> senders;
    for (int t = 0; t < 2; ++t)
        senders.emplace_back([&, &a = a] {
            while (!stop) a.send(1);
        });
    while (drained < 1000) std::this_thread::sleep_for(1ms);
    for (int i = 0; i < 5; ++i) CHECK_FALSE(a.poll(mproc::Seconds{0.02}));
    stop = true;
    for (auto& t : senders) t.join();
    b.send(-1);  // the first receive
    receiver.join();
    CHECK(got == -1);
    a.close();  // the drain's end of stream
    drain.join();
}

TEST_CASE("a child forked while a parent thread waits in a recv of an end finds the end as it was", "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    // The parent's receive sleeps in read(2), its buffer made ready for what comes: the child's
    // copy must hold only what had come (nothing), not that room. Before, the child's poll()
    // found a message in bytes never read, and its recv() threw "truncated input".
    auto [a, b] = mproc::Pipe<int>();
    int got = 0;
    Sleeper receiver([&, &a = a] { got = a.recv(); });
    receiver.asleep();
    mproc::Process child([&a = a] {
        if (a.poll()) std::_Exit(3);  // nothing was sent
        a.send(12);  // and the end still works
    });
    child.start();
    const bool ended = child.join(60s);
    if (!ended) child.kill();
    REQUIRE(ended);
    CHECK(child.exitcode() == 0);
    CHECK(b.recv() == 12);
    b.send(5);  // the parent's receive
    receiver.join();
    CHECK(got == 5);
}

TEST_CASE("a child forked while a parent thread waits in a poll of an end can receive from that end", "[threads]") {
    const mproc_test::Watchdog dog(300s, "an end shared by threads");
    // The child's copy of the end's receive lock was taken by a thread it does not have: the locks
    // are made afresh in the child (without, its receive waited for ever). The parent's thread
    // waits in poll, which takes no message: the one sent goes to the child.
    auto [a, b] = mproc::Pipe<int>();
    bool readable = false;
    Sleeper poller([&, &a = a] { readable = a.poll(std::nullopt); });
    poller.asleep();
    mproc::Process child([&a = a] { a.send(a.recv() + 1); });
    child.start();
    b.send(10);
    const bool ended = child.join(60s);
    if (!ended) child.kill();
    REQUIRE(ended);
    CHECK(child.exitcode() == 0);
    CHECK(b.recv() == 11);
    b.send(0);  // for the parent's poll, if the child took the first message before it looked
    poller.join();
    CHECK(readable);
}

TEST_CASE("a send waiting for room in a full socket keeps no receive on the same end waiting", "[threads]") {
    // Before, the send held the end's receive lock through its wait for room: a receive on another
    // thread waited until the peer read, and a peer that waits for that reply before it reads
    // never would.
    const mproc_test::Watchdog dog(300s, "a receive beside a send waiting for room");
    auto [a, b] = mproc::Pipe<std::string>();
    const std::string big(32u << 20, 'x');
    Sleeper sender([&, &a = a] { a.send(big); });
    sender.asleep();  // waiting for room: b reads nothing yet
    b.send("hi");
    std::atomic<bool> got{false};
    std::string reply;
    std::thread receiver([&, &a = a] {
        reply = a.recv();
        got = true;
    });
    const auto limit = std::chrono::steady_clock::now() + 60s;
    while (!got && std::chrono::steady_clock::now() < limit) std::this_thread::sleep_for(1ms);
    CHECK(got.load());
    CHECK(b.recv() == big);  // lets the send finish
    receiver.join();
    sender.join();
    CHECK(reply == "hi");
}

TEST_CASE("a child's close() of an end the parent closed while a thread was inside releases the child's descriptor",
          "[threads]") {
    // The child's copy of the end is closed, its descriptors owed: nothing of the child is inside,
    // so its own close() lets them go (before, they stayed open until the child ended).
    const mproc_test::Watchdog dog(300s, "a close in a child of an end closed with a call inside");
    auto [a, b] = mproc::Pipe<int>();
    const int fd = a.fileno();
    int got = 0;
    Sleeper receiver([&, &a = a] { got = a.recv(); });
    receiver.asleep();
    a.close();  // the receive is inside: the descriptor stays
    mproc::Process child([&a = a, fd] {
        a.close();
        if (::fcntl(fd, F_GETFD) >= 0) throw std::runtime_error("the child's descriptor is still open");
    });
    child.start();
    const bool ended = child.join(60s);
    if (!ended) child.kill();
    REQUIRE(ended);
    CHECK(child.exitcode() == 0);
    b.send(5);
    receiver.join();
    CHECK(got == 5);
}

TEST_CASE("mproc::wait on an end closed from another thread keeps its descriptor until the wait ends", "[threads]") {
    // Before, close() closed the descriptor under the wait's poll: its number was free for the
    // next file the program opened, which the wait then reported on.
    const mproc_test::Watchdog dog(300s, "a wait on an end closed from another thread");
    auto [a, b] = mproc::Pipe<int>();
    const std::size_t open = mproc_test::open_descriptors();
    std::vector<std::size_t> ready;
    Sleeper waiter([&, &a = a] { ready = mproc::wait({a}); });
    waiter.asleep();
    a.close();
    CHECK(mproc_test::open_descriptors() == open);
    b.send(1);
    waiter.join();
    CHECK(ready == std::vector<std::size_t>{0});
    CHECK(mproc_test::open_descriptors() == open - 1);  // let go as the wait ended
}
