// Process: exit codes, signals, joins with timeouts, names, moves, output buffering, and that no
// child is ever left behind.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>

#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/wait.h>
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
    for (const char* mode : {"synced return", "unsynced return", "synced exit", "unsynced exit"}) {
        INFO("mode: " << mode);
        const std::string text = run_buffered_output(mode);
        INFO("output: " << text);
        for (const char* token : {"<parent-printf>", "<parent-iostream>", "<parent-fmt>", "<child-printf>",
                                  "<child-iostream>", "<child-fmt>", "<parent-after>"})
            CHECK(occurrences(text, token) == 1);
        // The parent's first words come out before anything the child wrote.
        CHECK(text.find("<parent-fmt>") < text.find("<child-printf>"));
    }
    CHECK(mproc_test::child_count() == 0);
}
