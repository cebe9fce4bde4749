// Process: exit codes, signals, joins with timeouts, names, moves, output buffering, daemon
// children at a normal exit, the sentinel, close(), parent_process(), and that no child is ever
// left behind.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <memory>
#include <optional>
#include <poll.h>
#include <sched.h>
#include <set>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "support.hpp"

using namespace std::chrono_literals;

namespace mproc_test_types {
/// An exception type of the program's own, to see its name in the child's report.
struct CustomFailure : std::runtime_error {
    using std::runtime_error::runtime_error;
};
}  // namespace mproc_test_types

namespace {

/// A child body that waits for signals forever, after telling the parent it is running.
auto sleeper(mproc_test::ReadySignal& ready) {
    return [&ready] {
        mproc_test::default_fatal_signals();
        ready.notify();
        for (;;) ::pause();
    };
}

int exit_with(int code) { return code; }

}  // namespace

TEST_CASE("a process that returns exits with 0") {
    mproc::Process p([] {});
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 0);
    CHECK_FALSE(p.is_alive());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("Process::join in a program that ignores SIGCHLD is an Error that names the cause") {
    // The kernel reaps the child and keeps no status: join said "waitpid: No child processes",
    // after a second spent waiting for a status nobody would store.
    const mproc_test::IgnoringSigchld ignoring;
    mproc::Process child([] {});
    child.start();
    CHECK_THROWS_WITH(child.join(), Catch::Matchers::Contains("ignores SIGCHLD"));
    CHECK_THROWS_WITH(child.join(), Catch::Matchers::Contains("ignores SIGCHLD"));  // the same again
}

TEST_CASE("a target that calls exit(3) exits with 3") {
    mproc::Process p([] { std::exit(3); });
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 3);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a target that calls _exit(42) exits with 42") {
    mproc::Process p([] { ::_exit(42); });
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 42);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a target that throws exits with 1 and reports the exception on stderr") {
    SECTION("std::runtime_error, default name") {
        mproc_test::StderrCapture capture;
        mproc::Process p([] { throw std::runtime_error("the disk is full"); });
        p.start();
        capture.restore();
        REQUIRE(p.join());
        CHECK(p.exitcode() == 1);
        CHECK(capture.text() == "Process " + p.name() + ": std::runtime_error: the disk is full\n");
    }
    SECTION("a program's own exception type, given name") {
        mproc_test::StderrCapture capture;
        mproc::Process p([] { throw mproc_test_types::CustomFailure("bad input 7"); });
        p.set_name("loader");
        p.start();
        capture.restore();
        REQUIRE(p.join());
        CHECK(p.exitcode() == 1);
        CHECK(capture.text() == "Process loader: mproc_test_types::CustomFailure: bad input 7\n");
    }
    SECTION("something that is not a std::exception") {
        mproc_test::StderrCapture capture;
        mproc::Process p([] { throw 42; });
        p.set_name("thrower");
        p.start();
        capture.restore();
        REQUIRE(p.join());
        CHECK(p.exitcode() == 1);
        CHECK_THAT(capture.text(), Catch::StartsWith("Process thrower: int"));
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a target that throws while its stderr is a pipe nobody reads exits with 1, not by SIGPIPE") {
    // `prog 2>&1 | head`, with head gone: the report of the exception must not kill the child.
    mproc::Process p([] {
        if (!mproc_test::stderr_to_a_gone_reader()) std::_Exit(3);
        throw std::runtime_error("the disk is full");
    });
    p.start();
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 1);
}

TEST_CASE("terminate ends the child with -15 and kill with -9") {
    mproc_test::ReadySignal ready;
    mproc::Process p(sleeper(ready));
    p.start();
    REQUIRE(ready.wait());
    SECTION("terminate") {
        p.terminate();
        REQUIRE(p.join());
        CHECK(p.exitcode() == -SIGTERM);
    }
    SECTION("kill") {
        p.kill();
        REQUIRE(p.join());
        CHECK(p.exitcode() == -SIGKILL);
    }
    SECTION("any signal") {
        p.signal(SIGUSR1);
        REQUIRE(p.join());
        CHECK(p.exitcode() == -SIGUSR1);
    }
    CHECK_FALSE(p.is_alive());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a child that segfaults exits with -11") {
    mproc::Process p([] {
        mproc_test::default_fatal_signals();
        // A page with no access: a real fault, which no sanitizer mistakes for a null dereference.
        void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) ::_exit(99);
        *static_cast<volatile int*>(page) = 1;
        ::_exit(98);
    });
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == -SIGSEGV);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a child that aborts exits with -6") {
    mproc::Process p([] {
        mproc_test::default_fatal_signals();
        std::abort();
    });
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == -SIGABRT);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("join with a timeout returns false while the child runs, and is_alive says so") {
    mproc_test::ReadySignal ready;
    mproc::Process p(sleeper(ready));
    CHECK_FALSE(p.is_alive());
    CHECK(p.exitcode() == std::nullopt);
    p.start();
    REQUIRE(ready.wait());
    CHECK(p.pid() > 0);
    CHECK(p.pid() != ::getpid());
    CHECK_FALSE(p.join(100ms));
    CHECK_FALSE(p.join(0s));
    CHECK_FALSE(p.join(mproc::Seconds{-1.0}));
    CHECK(p.is_alive());
    CHECK(p.exitcode() == std::nullopt);
    p.terminate();
    CHECK(p.join(60s));
    CHECK_FALSE(p.is_alive());
    CHECK(p.exitcode() == -SIGTERM);
    // Joining again is harmless and signalling a reaped child does nothing.
    CHECK(p.join());
    CHECK(p.join(1ms));
    CHECK_NOTHROW(p.terminate());
    CHECK_NOTHROW(p.kill());
    CHECK(p.exitcode() == -SIGTERM);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("is_alive and exitcode reap a child that ended without join") {
    mproc::Process p([] { ::_exit(5); });
    p.start();
    // Wait, without reaping, until the child is a zombie.
    siginfo_t info{};
    REQUIRE(::waitid(P_PID, static_cast<id_t>(p.pid()), &info, WEXITED | WNOWAIT) == 0);
    CHECK_FALSE(p.is_alive());
    CHECK(p.exitcode() == 5);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("starting twice throws, and so do joining or starting what cannot be") {
    mproc::Process p([] {});
    CHECK_THROWS_AS(p.join(), mproc::Error);
    CHECK_THROWS_AS(p.join(1s), mproc::Error);
    p.start();
    CHECK_THROWS_AS(p.start(), mproc::Error);
    REQUIRE(p.join());
    CHECK_THROWS_AS(p.start(), mproc::Error);
    CHECK(p.exitcode() == 0);

    mproc::Process empty;
    CHECK_THROWS_AS(empty.start(), mproc::Error);
    CHECK_THROWS_AS(empty.join(), mproc::Error);
    CHECK_FALSE(empty.is_alive());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a capturing lambda sees the parent's data, and arguments are passed") {
    const std::vector<int> numbers{1, 2, 3, 4};
    const std::string greeting = "hello";
    int sum_in_parent = 10;
    mproc::Process p([&] {
        int sum = 0;
        for (int n : numbers) sum += n;
        ::_exit(sum == sum_in_parent && greeting == "hello" ? 0 : 7);
    });
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 0);

    mproc::Process q([](std::string name, int n) { ::_exit(name == "bob" && n == 42 ? 0 : 7); }, std::string("bob"),
                     42);
    q.start();
    REQUIRE(q.join());
    CHECK(q.exitcode() == 0);

    mproc::Process r(exit_with, 0);  // a function pointer; its result is ignored, as a target's is
    r.start();
    REQUIRE(r.join());
    CHECK(r.exitcode() == 0);

    // Move-only arguments are moved into the child.
    mproc::Process s([](std::unique_ptr<int> box) { ::_exit(box && *box == 9 ? 0 : 7); }, std::make_unique<int>(9));
    s.start();
    REQUIRE(s.join());
    CHECK(s.exitcode() == 0);

    // The child works on its own copy: the parent's data does not change.
    mproc::Process t([&] { sum_in_parent = -1; });
    t.start();
    REQUIRE(t.join());
    CHECK(sum_in_parent == 10);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("join on one thread while others poll is_alive and exitcode: every thread sees the same end") {
    // join reaped the child and dropped its record while a thread asking is_alive found it gone
    // (ECHILD) and waited for a status that was no longer recorded: a false Error after ~1 s.
    for (int round = 0; round < 40; ++round) {
        mproc::Process p([] {
            std::this_thread::sleep_for(2ms);
            std::_Exit(7);
        });
        p.start();
        std::atomic<int> errors{0};
        std::vector<std::thread> askers;
        for (int t = 0; t < 2; ++t)
            askers.emplace_back([&, t] {
                try {
                    if (t == 0)
                        while (p.is_alive()) {}
                    else
                        while (!p.exitcode()) {}
                } catch (const mproc::Error&) {
                    ++errors;
                }
            });
        bool joined = false;
        try {
            joined = p.join(60s);
        } catch (const mproc::Error&) {
            ++errors;
        }
        for (auto& t : askers) t.join();
        REQUIRE(errors == 0);
        CHECK(joined);
        CHECK(p.exitcode() == 7);
        CHECK_FALSE(p.is_alive());
    }
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("two threads starting one Process at once: one starts it, the other gets mproc::Error") {
    for (int round = 0; round < 20; ++round) {
        mproc::Process p([] { std::this_thread::sleep_for(20ms); });
        std::atomic<int> started{0}, refused{0};
        std::vector<std::thread> starters;
        for (int t = 0; t < 2; ++t)
            starters.emplace_back([&] {
                try {
                    p.start();
                    ++started;
                } catch (const mproc::Error&) {
                    ++refused;
                }
            });
        for (auto& t : starters) t.join();
        CHECK(started == 1);
        CHECK(refused == 1);
        CHECK(mproc_test::child_count() == 1);
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == 0);
        REQUIRE(mproc_test::child_count() == 0);
    }
}

TEST_CASE("a Process used in another process is an mproc::Error there, and its copy's destruction touches nothing") {
    mproc::Process sibling([] {
        for (;;) ::pause();
    });
    sibling.start();
    mproc::Process unstarted([] {});
    // The child has copies of both: each use is refused, and neither copy's child is touched.
    mproc::Process child([&] {
        mproc_test::Refusals refused;
        refused.expect([&] { (void)sibling.join(); });
        refused.expect([&] { (void)sibling.is_alive(); });
        refused.expect([&] { (void)sibling.exitcode(); });
        refused.expect([&] { sibling.terminate(); });
        refused.expect([&] { sibling.close(); });
        refused.expect([&] { unstarted.start(); });
        refused.expect([&] { (void)unstarted.pid(); });
        { const mproc::Process gone(std::move(sibling)); }  // its destructor leaves the parent's child alone
        std::_Exit(refused.count == 7 && mproc::active_children().empty() ? 0 : 1);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK(sibling.is_alive());  // the child neither signalled nor reaped it
    sibling.kill();
    REQUIRE(sibling.join(60s));
    CHECK(sibling.exitcode() == -SIGKILL);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a child forked while another thread is inside a Process's call gets mproc::Error from it, not a hang") {
    // Each member held the Process's lock before it checked the process: a child forked while a
    // thread of the parent held it had a copy held for ever.
    mproc::Process busy([] {
        for (;;) ::pause();
    });
    busy.start();
    std::atomic<bool> stop{false};
    std::thread asker([&] {
        while (!stop) (void)busy.is_alive();
    });
    const mproc_test::RoundsSeen seen = mproc_test::forked_rounds(20, [&] {
        mproc_test::Refusals refused;
        refused.expect([&] { (void)busy.is_alive(); });
        refused.expect([&] { (void)busy.join(1s); });
        std::_Exit(refused.count == 2 && !busy.closed() ? 0 : 1);
    });
    stop = true;
    asker.join();
    CHECK(seen.hung == 0);
    CHECK(seen.failed == 0);
    busy.kill();
    REQUIRE(busy.join(60s));
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("names: defaults, set_name, and current_process() inside the child") {
    CHECK(mproc::current_process().name() == "MainProcess");
    CHECK(mproc::current_process().pid() == ::getpid());

    mproc::Process a([] {});
    mproc::Process b([] {});
    CHECK_THAT(a.name(), Catch::StartsWith("Process-"));
    CHECK_THAT(b.name(), Catch::StartsWith("Process-"));
    CHECK(a.name() != b.name());

    auto [parent_end, child_end] = mproc::Pipe<std::tuple<std::string, int>>();
    mproc::Process named([&child_end = child_end] {
        child_end.send({mproc::current_process().name(), static_cast<int>(mproc::current_process().pid())});
    });
    named.set_name("loader");
    CHECK(named.name() == "loader");
    named.start();
    child_end.close();
    const auto [name, pid] = parent_end.recv();
    CHECK(name == "loader");
    CHECK(pid == named.pid());
    REQUIRE(named.join());
    CHECK(named.exitcode() == 0);

    auto [reader, writer] = mproc::Pipe<std::tuple<std::string, int>>(/*duplex=*/false);
    mproc::Process unnamed([&writer = writer] { writer.send({mproc::current_process().name(), 0}); });
    unnamed.start();
    writer.close();
    CHECK(std::get<0>(reader.recv()) == unnamed.name());
    REQUIRE(unnamed.join());
    CHECK(mproc::current_process().name() == "MainProcess");
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("processes move: a vector of eight started and joined") {
    std::vector<mproc::Process> processes;
    for (int i = 0; i < 8; ++i) processes.emplace_back([i] { ::_exit(10 + i); });
    for (auto& p : processes) p.start();
    // Growing the vector moves the started processes.
    processes.reserve(64);
    std::vector<mproc::Process> moved = std::move(processes);
    for (auto& p : moved) REQUIRE(p.join());
    for (int i = 0; i < 8; ++i) CHECK(moved[static_cast<std::size_t>(i)].exitcode() == 10 + i);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("a moved-from process is empty, and move assignment stops the process it replaces") {
    mproc_test::ReadySignal ready;
    mproc::Process running(sleeper(ready));
    running.start();
    REQUIRE(ready.wait());
    const pid_t pid = running.pid();

    mproc::Process holder(std::move(running));
    CHECK(holder.pid() == pid);
    CHECK(running.pid() == 0);  // NOLINT(bugprone-use-after-move)
    CHECK_FALSE(running.is_alive());
    CHECK_THROWS_AS(running.join(), mproc::Error);
    CHECK(holder.is_alive());

    holder = mproc::Process([] { ::_exit(4); });  // the sleeping child is terminated and reaped
    CHECK(mproc_test::child_count() == 0);
    holder.start();
    REQUIRE(holder.join());
    CHECK(holder.exitcode() == 4);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("destroying a started, unjoined process leaves no child and no zombie") {
    SECTION("a child that is still running") {
        mproc_test::ReadySignal ready;
        {
            mproc::Process p(sleeper(ready));
            p.start();
            REQUIRE(ready.wait());
            REQUIRE(mproc_test::child_count() == 1);
        }
        CHECK(mproc_test::child_count() == 0);
    }
    SECTION("a child that blocks SIGTERM gets SIGKILL after the grace period") {
        mproc_test::ReadySignal ready;
        {
            mproc::Process p([&ready] {
                sigset_t term;
                sigemptyset(&term);
                sigaddset(&term, SIGTERM);
                ::sigprocmask(SIG_BLOCK, &term, nullptr);
                ready.notify();
                for (;;) ::pause();
            });
            p.start();
            REQUIRE(ready.wait());
            REQUIRE(mproc_test::child_count() == 1);
        }
        CHECK(mproc_test::child_count() == 0);
    }
    SECTION("a child that ignores SIGTERM gets SIGKILL after the grace period") {
        mproc_test::ReadySignal ready;
        {
            mproc::Process p([&ready] {
                ::signal(SIGTERM, SIG_IGN);
                ready.notify();
                for (;;) ::pause();
            });
            p.start();
            REQUIRE(ready.wait());
        }
        CHECK(mproc_test::child_count() == 0);
    }
    SECTION("a child that already ended") {
        {
            mproc::Process p([] {});
            p.start();
            siginfo_t info{};
            REQUIRE(::waitid(P_PID, static_cast<id_t>(p.pid()), &info, WEXITED | WNOWAIT) == 0);
            REQUIRE(mproc_test::child_count() == 1);  // a zombie until someone reaps it
        }
        CHECK(mproc_test::child_count() == 0);
    }
    SECTION("eight children in a vector") {
        std::vector<std::unique_ptr<mproc_test::ReadySignal>> readies;
        {
            std::vector<mproc::Process> processes;
            for (int i = 0; i < 8; ++i) {
                readies.push_back(std::make_unique<mproc_test::ReadySignal>());
                processes.emplace_back(sleeper(*readies.back()));
                processes.back().start();
            }
            for (auto& r : readies) REQUIRE(r->wait());
            REQUIRE(mproc_test::child_count() == 8);
        }
        CHECK(mproc_test::child_count() == 0);
    }
    CHECK(mproc_test::child_count() == 0);
}

namespace {
int atexit_report_fd = -1;
void report_atexit() {
    if (atexit_report_fd >= 0) {
        const char byte = 'x';
        (void)!::write(atexit_report_fd, &byte, 1);
    }
}
}  // namespace

TEST_CASE("a child that returns does not run the parent's atexit handlers") {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
    atexit_report_fd = fds[1];
    static const bool registered = std::atexit(report_atexit) == 0;
    REQUIRE(registered);

    mproc::Process p([] {});
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 0);
    atexit_report_fd = -1;
    ::close(fds[1]);
    char byte = 0;
    CHECK(::read(fds[0], &byte, 1) == 0);  // end of file: nothing was written
    ::close(fds[0]);

    // The check can fail: a child that leaves through exit() does run them.
    REQUIRE(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
    atexit_report_fd = fds[1];
    mproc::Process exits([] { std::exit(0); });
    exits.start();
    REQUIRE(exits.join());
    atexit_report_fd = -1;
    ::close(fds[1]);
    CHECK(::read(fds[0], &byte, 1) == 1);
    ::close(fds[0]);
    CHECK(mproc_test::child_count() == 0);
}

namespace {
/// Runs the buffered-output program with stdout on a pipe; returns what it printed.
std::string run_buffered_output(const std::string& mode) {
    const std::string command = std::string(MPROC_BUFFERED_OUTPUT_PROGRAM) + " " + mode;
    FILE* out = ::popen(command.c_str(), "r");
    REQUIRE(out != nullptr);
    std::string text;
    std::array<char, 4096> chunk{};
    for (std::size_t got; (got = std::fread(chunk.data(), 1, chunk.size(), out)) != 0;) text.append(chunk.data(), got);
    const int status = ::pclose(out);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    return text;
}
std::size_t occurrences(const std::string& text, const std::string& token) {
    std::size_t count = 0;
    for (auto at = text.find(token); at != std::string::npos; at = text.find(token, at + 1)) ++count;
    return count;
}
}  // namespace

TEST_CASE("output buffered before start appears once, and a child's buffered output is not lost") {
    for (const char* mode : {"synced return", "unsynced return", "synced exit", "unsynced exit", "synced return rdbuf",
                             "unsynced return rdbuf", "unsynced return wide", "synced return tied"}) {
        INFO("mode: " << mode);
        const std::string text = run_buffered_output(mode);
        INFO("output: " << text);
        for (const char* token : {"<parent-printf>", "<parent-iostream>", "<parent-fmt>", "<child-printf>",
                                  "<child-iostream>", "<child-fmt>", "<parent-after>"})
            CHECK(occurrences(text, token) == 1);
        // A buffer the child gave std::cout itself is flushed as the child leaves, like the others.
        if (std::strstr(mode, "rdbuf")) CHECK(occurrences(text, "<child-rdbuf>") == 1);
        if (std::strstr(mode, "wide")) CHECK(occurrences(text, "<child-wide>") == 1);  // std::wcout's own buffer
        if (std::strstr(mode, "tied"))
            CHECK(occurrences(text, "<child-tied>") == 1);  // the stream std::cerr is tied to
        // The parent's first words come out before anything the child wrote.
        CHECK(text.find("<parent-fmt>") < text.find("<child-printf>"));
    }
    CHECK(mproc_test::child_count() == 0);
}

namespace {
/// A pipe of the test's own (close-on-exec), for children to report through.
struct TestPipe {
    int read_end = -1;
    int write_end = -1;
    TestPipe() {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
        read_end = fds[0];
        write_end = fds[1];
    }
    ~TestPipe() {
        if (read_end >= 0) ::close(read_end);
        if (write_end >= 0) ::close(write_end);
    }
    TestPipe(const TestPipe&) = delete;
    TestPipe& operator=(const TestPipe&) = delete;
    void put(char byte) const {
        while (::write(write_end, &byte, 1) < 0 && errno == EINTR) {}
    }
    /// The next byte, or 0 on timeout or at end of file (every writer gone).
    char get(int timeout_ms = 60'000) const {
        pollfd p{read_end, POLLIN, 0};
        int n;
        do n = ::poll(&p, 1, timeout_ms);
        while (n < 0 && errno == EINTR);
        char byte = 0;
        if (n <= 0 || ::read(read_end, &byte, 1) != 1) return 0;
        return byte;
    }
};

/// Whether `fd` becomes readable within `timeout_ms` (0: is readable now).
bool readable(int fd, int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    int n;
    do n = ::poll(&p, 1, timeout_ms);
    while (n < 0 && errno == EINTR);
    return n > 0 && (p.revents & POLLIN) != 0;
}
}  // namespace

TEST_CASE("daemon: false by default, set before start, an Error after it") {
    mproc::Process p([] {});
    CHECK_FALSE(p.daemon());
    p.set_daemon(true);
    CHECK(p.daemon());
    p.set_daemon(false);
    CHECK_FALSE(p.daemon());
    p.set_daemon(true);
    p.start();
    CHECK_THROWS_AS(p.set_daemon(false), mproc::Error);
    CHECK(p.daemon());  // unchanged
    REQUIRE(p.join());
    CHECK_THROWS_AS(p.set_daemon(true), mproc::Error);
    mproc::Process moved(std::move(p));
    CHECK(moved.daemon());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("join without a sentinel (no descriptor left for its pidfd) waits, with a timeout and without") {
    // With the descriptor limit at the lowest free number, start() finds no descriptor for the
    // child's pidfd: join then waits by waitid(WNOWAIT) (no timeout) or between naps (a timeout).
#if defined(__SANITIZE_ADDRESS__)
    // The ASan build's UBSan checks a vptr in start() by writing the object to a pipe of its own,
    // which it cannot open here: it reports the object as invalid and ends the program.
    WARN("skipped: UBSan's vptr check needs a descriptor");
    return;
#endif
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
    const int lowest = ::dup(0);
    REQUIRE(lowest >= 0);
    ::close(lowest);
    mproc::Process quick([] { std::this_thread::sleep_for(200ms); });
    mproc::Process slow([] {
        std::this_thread::sleep_for(500ms);
        std::_Exit(3);
    });
    rlimit low = saved;
    low.rlim_cur = static_cast<rlim_t>(lowest);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    try {
        quick.start();
        slow.start();
    } catch (...) {
        ::setrlimit(RLIMIT_NOFILE, &saved);
        throw;
    }
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
    CHECK_THROWS_AS(quick.sentinel(), mproc::Error);  // the path under test: no pidfd
    CHECK_THROWS_AS(slow.sentinel(), mproc::Error);
    CHECK(quick.join());
    CHECK(quick.exitcode() == 0);
    CHECK_FALSE(slow.join(mproc::Seconds{0.01}));
    CHECK(slow.join(60s));
    CHECK(slow.exitcode() == 3);
}

TEST_CASE("the sentinel becomes readable exactly when the child ends") {
    mproc::Process never_started([] {});
    CHECK_THROWS_AS(never_started.sentinel(), mproc::Error);

    TestPipe go;
    mproc::Process p([&go] {
        char byte = 0;
        while (::read(go.read_end, &byte, 1) < 0 && errno == EINTR) {}
    });
    p.start();
    const int sentinel = p.sentinel();
    CHECK(sentinel >= 0);
    CHECK(p.sentinel() == sentinel);  // the same descriptor, owned by the Process
    CHECK((::fcntl(sentinel, F_GETFD) & FD_CLOEXEC) != 0);
    CHECK_FALSE(readable(sentinel, 0));
    CHECK_FALSE(readable(sentinel, 50));  // the child waits for `go`: it cannot have ended
    CHECK(p.is_alive());
    go.put('g');
    REQUIRE(readable(sentinel, 60'000));
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 0);
    CHECK(readable(sentinel, 0));  // and it stays readable once reaped
    CHECK(p.sentinel() == sentinel);

    // A child killed by a signal: the same.
    mproc_test::ReadySignal ready;
    mproc::Process q(sleeper(ready));
    q.start();
    REQUIRE(ready.wait());
    CHECK_FALSE(readable(q.sentinel(), 0));
    q.kill();
    CHECK(readable(q.sentinel(), 60'000));
    REQUIRE(q.join(60s));
    CHECK(q.exitcode() == -SIGKILL);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("close: an Error while the child runs, and after it every use is an Error") {
    mproc_test::ReadySignal ready;
    mproc::Process p(sleeper(ready));
    p.start();
    REQUIRE(ready.wait());
    const int sentinel = p.sentinel();
    CHECK_THROWS_AS(p.close(), mproc::Error);
    // Nothing changed: the process still runs, and its sentinel is still there.
    CHECK_FALSE(p.closed());
    CHECK(p.is_alive());
    CHECK(p.sentinel() == sentinel);
    CHECK(::fcntl(sentinel, F_GETFD) >= 0);
    p.terminate();
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == -SIGTERM);
    const pid_t pid = p.pid();

    p.close();
    CHECK(p.closed());
    CHECK(::fcntl(sentinel, F_GETFD) < 0);  // released (nothing else opened a descriptor since)
    CHECK_THROWS_AS(p.start(), mproc::Error);
    CHECK_THROWS_AS(p.join(), mproc::Error);
    CHECK_THROWS_AS(p.join(1s), mproc::Error);
    CHECK_THROWS_AS(p.is_alive(), mproc::Error);
    CHECK_THROWS_AS(p.pid(), mproc::Error);
    CHECK_THROWS_AS(p.sentinel(), mproc::Error);
    CHECK_THROWS_AS(p.exitcode(), mproc::Error);
    CHECK_THROWS_AS(p.terminate(), mproc::Error);
    CHECK_THROWS_AS(p.kill(), mproc::Error);
    CHECK_THROWS_AS(p.set_daemon(true), mproc::Error);
    CHECK(pid > 0);
    CHECK_FALSE(p.name().empty());  // the name stays readable, as in Python
    p.close();                      // closing again does nothing

    // A child that ended but was never joined can be closed: close() reaps it.
    mproc::Process quick([] {});
    quick.start();
    REQUIRE(readable(quick.sentinel(), 60'000));
    quick.close();
    CHECK(quick.closed());
    // Never started: closing is allowed, and then starting is an Error.
    mproc::Process idle([] {});
    idle.close();
    CHECK_THROWS_AS(idle.start(), mproc::Error);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("parent_process(): the parent's pid and name in a child, empty in the program") {
    CHECK_FALSE(mproc::parent_process().has_value());
    const pid_t self = ::getpid();
    const std::string self_name = mproc::current_process().name();
    mproc::Process child([self, self_name] {
        const auto parent = mproc::parent_process();
        if (!parent) std::_Exit(10);
        if (parent->pid() != self) std::_Exit(11);
        if (parent->name() != self_name) std::_Exit(12);
        if (!parent->is_alive()) std::_Exit(13);
            // A grandchild sees this child as its parent.
        const pid_t me = ::getpid();
        mproc::Process grandchild([me] {
            const auto up = mproc::parent_process();
            std::_Exit(up && up->pid() == me && up->name() == "middle" ? 0 : 20);
        });
        grandchild.start();
        if (!grandchild.join() || grandchild.exitcode() != 0) std::_Exit(14);
            // A plain fork of this child was not started by mproc: empty there.
        const pid_t plain = ::fork();
        if (plain == 0) ::_exit(mproc::parent_process() ? 1 : 0);
        int status = 0;
        while (::waitpid(plain, &status, 0) < 0 && errno == EINTR) {}
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) std::_Exit(15);
        std::_Exit(0);
    });
    child.set_name("middle");
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK_FALSE(mproc::parent_process().has_value());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("when a child's target returns, its daemon children are terminated and the others joined") {
    TestPipe go;      // to the non-daemon grandchild
    TestPipe ready;   // from the daemon grandchild to the child
    TestPipe report;  // from the grandchildren
    mproc::Process child([&go, &ready, &report] {
        // Objects never destroyed: their children still run when the target returns.
        auto* joined = new mproc::Process([&go, &report] {
            mproc_test::default_fatal_signals();
            char byte = 0;
            while (::read(go.read_end, &byte, 1) < 0 && errno == EINTR) {}
            report.put('d');  // done
        });
        auto* daemonic = new mproc::Process([&ready, &report] {
            sigset_t term;
            sigemptyset(&term);
            sigaddset(&term, SIGTERM);
            ::sigprocmask(SIG_BLOCK, &term, nullptr);
            ready.put('r');
            int sig = 0;
            while (::sigwait(&term, &sig) != 0) {}
            report.put('t');  // terminated
            ::_exit(0);
        });
        daemonic->set_daemon(true);
        joined->start();  // first: a rule that terminated every child would signal it first
        daemonic->start();
        if (ready.get() != 'r') std::_Exit(10);  // SIGTERM now reaches the daemon's sigwait
    });
    child.start();
    ::close(report.write_end);  // the grandchildren hold it: at end of file, both are gone
    report.write_end = -1;
    // The child's target has returned; its end terminates the daemon grandchild...
    CHECK(report.get() == 't');
    // ...and then waits for the other one, which runs until told to finish.
    CHECK(child.is_alive());
    go.put('g');
    CHECK(report.get() == 'd');
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}

namespace {
/// tests/programs/daemon_program, with its stdin and stdout on pipes of the test's.
class DaemonProgram {
public:
    explicit DaemonProgram(const std::string& ending) {
        int in[2], out[2];
        REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
        REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            ::dup2(in[0], 0);
            ::dup2(out[1], 1);
            ::execl(MPROC_DAEMON_PROGRAM, MPROC_DAEMON_PROGRAM, ending.c_str(), static_cast<char*>(nullptr));
            ::_exit(127);
        }
        ::close(in[0]);
        ::close(out[1]);
        stdin_ = in[1];
        stdout_ = out[0];
    }
    ~DaemonProgram() {
        if (stdin_ >= 0) ::close(stdin_);
        ::close(stdout_);
        if (pid_ > 0 && !status_) {
            ::kill(pid_, SIGKILL);
            int status = 0;
            while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {}
        }
    }
    DaemonProgram(const DaemonProgram&) = delete;
    DaemonProgram& operator=(const DaemonProgram&) = delete;

    /// The next line it printed (without the newline); "<eof>" at the end, "<timeout>" after 60 s.
    std::string line() {
        for (;;) {
            if (const auto end = pending_.find('\n'); end != std::string::npos) {
                std::string out = pending_.substr(0, end);
                pending_.erase(0, end + 1);
                return out;
            }
            pollfd p{stdout_, POLLIN, 0};
            const int n = ::poll(&p, 1, 60'000);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return "<timeout>";
            char chunk[256];
            const ssize_t got = ::read(stdout_, chunk, sizeof chunk);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) return "<eof>";
            pending_.append(chunk, static_cast<std::size_t>(got));
        }
    }
    void type(const std::string& text) const {
        REQUIRE(::write(stdin_, text.data(), text.size()) == ssize_t(text.size()));
    }
    /// Still running (not even a zombie yet)?
    bool running() {
        if (status_) return false;
        int status = 0;
        const pid_t got = ::waitpid(pid_, &status, WNOHANG);
        if (got == pid_) status_ = status;
        return got == 0;
    }
    /// Its wait status, once it has ended (a failure after 60 s).
    int status() {
        for (int i = 0; i < 12'000 && running(); ++i) std::this_thread::sleep_for(5ms);
        REQUIRE(status_.has_value());
        return *status_;
    }

private:
    pid_t pid_ = -1;
    int stdin_ = -1;
    int stdout_ = -1;
    std::string pending_;
    std::optional<int> status_;
};
}  // namespace

TEST_CASE("at a normal exit, daemon children are terminated and the others joined") {
    const std::string ending = GENERATE(as<std::string>{}, "exit", "return");
    CAPTURE(ending);
    DaemonProgram program(ending);
    REQUIRE(program.line() == "ready");
    // The program is ending: its daemon child gets SIGTERM...
    CHECK(program.line() == "daemon: terminated");
    // ...while the program waits for its other child, which cannot end before it is told to.
    CHECK(program.running());
    program.type("go\n");
    CHECK(program.line() == "worker: done");
    CHECK(program.line() == "<eof>");  // every process of it is gone, and nothing more was said
    const int status = program.status();
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("at a normal exit under a ChildGuard, every child is terminated, daemon or not") {
    DaemonProgram program("guard");
    REQUIRE(program.line() == "ready");
    std::set<std::string> lines = {program.line(), program.line()};
    CHECK(lines == std::set<std::string>{"daemon: terminated", "worker: terminated"});
    CHECK(program.line() == "<eof>");
    const int status = program.status();
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
}

namespace {
/// In the first process of a new pid namespace (whose next pid can be set, so that a child gets
/// the pid an earlier one had): runs `body`, whose return is the exit status reported. -1 when
/// this process may not make such a namespace.
template <class Body> int in_pid_namespace(Body body) {
    mproc::Process outer([&] {
        if (::unshare(CLONE_NEWPID) != 0) std::_Exit(77);
        const pid_t init = ::fork();
        if (init == 0) std::_Exit(body());
        if (init < 0) std::_Exit(78);
        int status = 0;
        while (::waitpid(init, &status, 0) < 0 && errno == EINTR) {}
        std::_Exit(WIFEXITED(status) ? WEXITSTATUS(status) : 79);
    });
    outer.start();
    REQUIRE(outer.join(std::chrono::seconds(120)));
    return outer.exitcode() == 77 ? -1 : outer.exitcode().value_or(-2);
}

/// Makes the next process of this pid namespace get pid `next`.
bool next_pid_is(pid_t next) {
    std::ofstream last("/proc/sys/kernel/ns_last_pid");
    last << (next - 1);
    last.flush();
    return static_cast<bool>(last);
}
}  // namespace

TEST_CASE(
    "a child reaped outside mproc is never waited for again: its pid, given to a new child, is not taken for it") {
    // Each case: Process a's child is reaped by the program itself (waitpid) or by the kernel
    // (SIGCHLD ignored when it ended). a.join() says so; the next child gets a's pid; a.join()
    // still says so — before, it waited for that pid and took the new child's status as a's.
    const bool ignored = GENERATE(false, true);
    CAPTURE(ignored);
    const int result = in_pid_namespace([ignored] {
        mproc::Process a([] { std::_Exit(7); });
        if (ignored) ::signal(SIGCHLD, SIG_IGN);
        a.start();
        const pid_t pid = a.pid();
        if (ignored) {
            ::usleep(100'000);  // a ends, and the kernel reaps it
            ::signal(SIGCHLD, SIG_DFL);
        } else {
            int status = 0;
            if (::waitpid(pid, &status, 0) != pid) return 10;
        }
        try {
            a.join();
            return 11;
        } catch (const mproc::Error&) {}
        if (!next_pid_is(pid)) return 12;
        mproc::Process b([] {
            ::usleep(100'000);
            std::_Exit(42);
        });
        b.start();
        if (b.pid() != pid) return 13;
        try {
            a.join();
            return a.exitcode() == 42 ? 14 : 15;  // b's status taken as a's
        } catch (const mproc::Error&) {}
        if (!b.join(std::chrono::seconds(60)) || b.exitcode() != 42) return 16;
        return 0;
    });
    if (result == -1) {
        WARN("skipped: this process may not make a pid namespace (CI runs as root, where it may)");
        return;
    }
    CHECK(result == 0);
}

TEST_CASE(
    "without a guard, a child started after mproc's exit hook has ended the others runs and is joined, as in Python") {
    // An exit handler or static destructor that runs after mproc's own exit hook may start and
    // join a child of its own; only while that hook ends the children is a start refused.
    mproc::Process sandbox([] {
        ::signal(SIGTERM, SIG_DFL);  // the children's, not the test runner's handler
        mproc::Process daemon([] {
            for (;;) ::pause();
        });
        daemon.set_daemon(true);
        daemon.start();
        mproc::detail::end_process_children_at_exit();  // what the exit hook does
        if (daemon.exitcode() != -SIGTERM) std::_Exit(2);
        mproc::Process later([] { std::_Exit(7); });
        try {
            later.start();
        } catch (const mproc::Error&) {
            std::_Exit(3);  // refused
        }
        std::_Exit(later.join(std::chrono::seconds(60)) && later.exitcode() == 7 ? 0 : 4);
    });
    sandbox.start();
    REQUIRE(sandbox.join(std::chrono::seconds(120)));
    CHECK(sandbox.exitcode().value_or(-1) == 0);
}

namespace {
/// In a sandbox process: another thread starts a child running `target` whose fork is slowed
/// half a second after the child is made (a fork handler of the program's that sleeps in the
/// parent); 50 ms into it, `cleanup()` runs here. Returns the sandbox's exit status: 0 when
/// start() returned the child and its exit code was `expected`; 12 for another exit code; 13
/// when start() threw.
template <class Target, class Cleanup> int start_in_slowed_fork(Target target, int expected, Cleanup cleanup) {
    mproc::Process sandbox([&] {
        ::signal(SIGTERM, SIG_DFL);  // the child's, not the test runner's handler
        static std::atomic<bool> slow{false};
        ::pthread_atfork(
            nullptr,
            [] {
                if (slow) ::usleep(500'000);
            },
            nullptr);
        std::atomic<int> outcome{0};
        std::atomic<bool> forking{false};
        std::thread starter([&] {
            mproc::Process child(target);
            forking = true;
            try {
                child.start();
                outcome = child.join(std::chrono::seconds(60)) && child.exitcode() == expected ? 1 : 2;
            } catch (const mproc::Error&) {
                outcome = 3;  // "no child was started"
            }
        });
        slow = true;
        while (!forking) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // into the slowed fork
        cleanup();
        starter.join();
        std::_Exit(outcome == 1 ? 0 : 10 + outcome);
    });
    sandbox.start();
    REQUIRE(sandbox.join(std::chrono::seconds(120)));
    return sandbox.exitcode().value_or(-1);
}
}  // namespace

TEST_CASE("a child whose fork was under way when the exit hook began ending the children is started, not denied") {
    // The exit hook finds the fork under way and waits for it. start() must return the child (it
    // runs: it is joined as a non-daemon child is), not say that none was started — nor may the
    // hook give up on it and end it, as it does a daemon's.
    const int status = start_in_slowed_fork(
        [] {
            ::usleep(1'000'000);  // still running when the slowed fork returns
            std::_Exit(7);
        },
        7, [] { mproc::detail::end_process_children_at_exit(); });
    CHECK(status == 0);
}

TEST_CASE("a fork a cleanup stopped waiting for is ended by its own thread, and its Process says how it ended") {
    // A cleanup that waits 50 ms for forks under way ends every child and goes on without this
    // one; the forking thread then ends its child as the cleanup would have (SIGTERM here), and
    // start() returns it, its Process reporting that end.
    const int status = start_in_slowed_fork(
        [] {
            ::sleep(30);  // ended long before
            std::_Exit(7);
        },
        -SIGTERM,
        [] {
            mproc::detail::children().terminate_and_reap(1'000'000'000LL, mproc::detail::ChildRegistry::any_role,
                                                         50'000'000LL);
        });
    CHECK(status == 0);
}
