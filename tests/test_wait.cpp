// mproc::wait: a mix of connections, processes and raw descriptors; timeouts; messages already
// buffered in a connection; interrupted waits; what cannot be waited on.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>
#include <mproc/wait.hpp>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <mutex>
#include <poll.h>
#include <pthread.h>
#include <string>
#include <sys/time.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {

using Indices = std::vector<std::size_t>;

/// A plain pipe of the test's own.
struct RawPipe {
    int read_end = -1;
    int write_end = -1;
    RawPipe() {
        int fds[2];
        REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
        read_end = fds[0];
        write_end = fds[1];
    }
    ~RawPipe() {
        if (read_end >= 0) ::close(read_end);
        if (write_end >= 0) ::close(write_end);
    }
    RawPipe(const RawPipe&) = delete;
    RawPipe& operator=(const RawPipe&) = delete;
    void put(char byte) const { REQUIRE(::write(write_end, &byte, 1) == 1); }
    char take() const {
        char byte = 0;
        REQUIRE(::read(read_end, &byte, 1) == 1);
        return byte;
    }
};

using mproc_test::Watchdog;

volatile std::sig_atomic_t alarms = 0;
void count_alarm(int) { alarms = alarms + 1; }

}  // namespace

TEST_CASE("wait returns the ready ones among connections, processes and raw descriptors") {
    auto [near, far] = mproc::Pipe<std::string>();
    RawPipe raw;
    RawPipe go;  // tells the child to end
    mproc::Process child([&go] {
        mproc_test::default_fatal_signals();
        char byte = 0;
        while (::read(go.read_end, &byte, 1) < 0 && errno == EINTR) {}
    });
    child.start();
    std::vector<mproc::Waitable> objects = {near, child, raw.read_end};

    // Nothing is ready: the timeout passes and the answer is empty.
    CHECK(mproc::wait(objects, 10ms).empty());
    CHECK(mproc::wait(objects, 0s).empty());

    far.send("hello");
    CHECK(mproc::wait(objects, 60s) == Indices{0});
    raw.put('x');
    CHECK(mproc::wait(objects, 60s) == Indices{0, 2});
    CHECK(near.recv() == "hello");
    CHECK(raw.take() == 'x');
    CHECK(mproc::wait(objects, 0s).empty());

    go.put('g');  // the child ends: its sentinel is ready, and stays so
    CHECK(mproc::wait(objects) == Indices{1});
    CHECK(mproc::wait(objects, 0s) == Indices{1});
    REQUIRE(child.join(60s));
    CHECK(mproc::wait(objects, 0s) == Indices{1});

    // A braced list in place; a raw descriptor alone.
    far.send("again");
    CHECK(mproc::wait({near, raw.read_end}) == Indices{0});
    raw.put('y');
    CHECK(mproc::wait({raw.read_end}, 60s) == Indices{0});

    // The end of a stream is ready too (recv then throws EOFError), as is a hung-up raw pipe.
    (void)near.recv();
    far.close();
    CHECK(mproc::wait({near}, 60s) == Indices{0});
    CHECK_THROWS_AS(near.recv(), mproc::EOFError);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a connection with a whole message already buffered is ready though its descriptor is not") {
    auto [near, far] = mproc::Pipe<int>();
    far.send(1);
    far.send(2);  // both are in the socket before near reads: its first read takes both
    CHECK(near.recv() == 1);
    pollfd p{near.fileno(), POLLIN, 0};
    REQUIRE(::poll(&p, 1, 0) == 0);  // the socket is empty: 2 waits in near's own buffer
    RawPipe raw;
    CHECK(mproc::wait({raw.read_end, near}, 60s) == Indices{1});  // at once, not after 60 s
    CHECK(mproc::wait({raw.read_end, near}, 0s) == Indices{1});
    raw.put('z');
    CHECK(mproc::wait({raw.read_end, near}, 0s) == Indices{0, 1});  // and the others ready with it
    CHECK(near.recv() == 2);
    CHECK(mproc::wait({near}, 0s).empty());
}

TEST_CASE("wait with no timeout waits for the first one to become ready") {
    auto [near, far] = mproc::Pipe<int>();
    mproc::Process sender([&far = far] {
        std::this_thread::sleep_for(100ms);
        far.send(7);
    });
    sender.start();
    far.close();
    CHECK(mproc::wait({near}) == Indices{0});
    CHECK(near.recv() == 7);
    REQUIRE(sender.join(60s));
    CHECK(sender.exitcode() == 0);
}

TEST_CASE("an object of a class derived from Process is waited on as its Process") {
    struct Worker : mproc::Process {
        using mproc::Process::Process;
    };
    Worker worker([] { std::this_thread::sleep_for(50ms); });
    worker.start();
    RawPipe idle;
    CHECK(mproc::wait({idle.read_end, worker}, 60s) == Indices{1});
    REQUIRE(worker.join(60s));
    CHECK(worker.exitcode() == 0);
}

TEST_CASE("signals that interrupt wait neither end it early nor make it miss its deadline") {
    const Watchdog watchdog(120s);  // a wait that restarted its whole timeout on each alarm never ends
    struct sigaction action {
    }, previous{};
    action.sa_handler = count_alarm;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: poll fails with EINTR on every alarm
    REQUIRE(::sigaction(SIGALRM, &action, &previous) == 0);
    itimerval every_5ms{{0, 5000}, {0, 5000}};
    REQUIRE(::setitimer(ITIMER_REAL, &every_5ms, nullptr) == 0);
    alarms = 0;
    RawPipe raw;
    const auto start = std::chrono::steady_clock::now();
    const Indices ready = mproc::wait({raw.read_end}, 300ms);
    const auto waited = std::chrono::steady_clock::now() - start;
    const int interrupted = alarms;
    // Something ready arrives while alarms keep interrupting: it is seen.
    raw.put('a');
    const Indices later = mproc::wait({raw.read_end}, 60s);
    itimerval off{};
    ::setitimer(ITIMER_REAL, &off, nullptr);
    ::sigaction(SIGALRM, &previous, nullptr);
    CHECK(ready.empty());
    CHECK(interrupted > 0);    // the wait was interrupted...
    CHECK(waited >= 300ms);    // ...and still waited its whole timeout, no less
    CHECK(later == Indices{0});
}

TEST_CASE("what cannot be waited on is an mproc::Error, before any waiting") {
    auto [near, far] = mproc::Pipe<int>();
    auto [reader, writer] = mproc::Pipe<int>(false);
    mproc::Process never_started([] {});
    CHECK_THROWS_AS(mproc::wait({never_started}, 0s), mproc::Error);
    CHECK_THROWS_AS(mproc::wait({writer}, 0s), mproc::Error);  // a write-only end
    CHECK_THROWS_AS(mproc::wait({-1}, 0s), mproc::Error);
    near.close();
    CHECK_THROWS_AS(mproc::wait({far, near}), mproc::Error);  // closed: no wait, no hang
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    ::close(fds[0]);
    ::close(fds[1]);
    CHECK_THROWS_AS(mproc::wait({fds[0]}), mproc::Error);  // not an open descriptor
    mproc::Process closed([] {});
    closed.start();
    REQUIRE(closed.join(60s));
    closed.close();
    CHECK_THROWS_AS(mproc::wait({closed}), mproc::Error);
    // An empty list sleeps for the timeout, as Python's does.
    CHECK(mproc::wait(std::vector<mproc::Waitable>{}, 10ms).empty());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a Process closed on another thread while a wait holds it: the wait watches a descriptor of its own") {
    // mproc::wait holds each object for the length of its poll (Waitable::hold). A Process may be
    // joined and closed by another thread once its child has ended; the poll must still watch
    // that child's end, not the number close() freed (the next descriptor the program opens gets
    // it). The steps of such a race, in order, on one thread:
    mproc::Process child([] {});
    child.start();
    const mproc::Waitable waitable(child);
    const int held = waitable.hold();
    REQUIRE(child.join(60s));
    child.close();  // what another thread may do meanwhile
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);  // takes the lowest free numbers
    // The held descriptor is still open, and still the child's: it reports the child's end
    // (before, it was the sentinel itself, closed above, its number now one of the pipe's ends,
    // which a poll would watch for ever).
    CHECK(held != fds[0]);
    CHECK(held != fds[1]);
    pollfd polled{held, POLLIN, 0};
    CHECK(::poll(&polled, 1, 0) == 1);
    CHECK((polled.revents & POLLIN) != 0);
    waitable.let_go(held);
    CHECK(::fcntl(held, F_GETFD) == -1);  // let go: closed
    ::close(fds[0]);
    ::close(fds[1]);
    CHECK(mproc_test::child_count() == 0);
}
