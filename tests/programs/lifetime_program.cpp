// A program for test_lifetime: builds a tree of processes with mproc under a ChildGuard, prints
// every pid of the tree, then ends the way it is asked to. The test checks, from outside, that
// nothing of the tree survives and that the program's exit status is the conventional one.
//
//     lifetime_program <mode> <ending>
//
// mode:
//   pool    a Pool of 4 workers, each in a long task
//   tree    a Process tree 3 levels deep: child -> grandchild -> great-grandchild
//   nested  the same tree, with a ChildGuard in every level
//   queue   a consumer Process blocked forever reading a Pipe the program keeps open
// ending:
//   wait    wait for a signal (the test sends SIGINT, SIGTERM or SIGKILL, or types Ctrl-C)
//   exit    after a line on stdin, call exit(0)
//   throw   after a line on stdin, throw std::runtime_error out of main
//
// Output, on stdout: one line "pid <pid> <role>" per process of the tree (role: main, server,
// worker, child, grandchild, great-grandchild, consumer), then "ready". Nothing else is ever
// written by any process of the tree unless something went wrong.
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mproc/guard.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unistd.h>
#include <vector>

namespace {

using namespace std::chrono_literals;

/// Where every process of the tree reports its pid (a Pool's tasks cannot capture: globals).
mproc::Connection<int> reports;  // read by main
mproc::Connection<int> report;   // written by the tree

void print_pid(pid_t pid, const char* role) {
    std::printf("pid %d %s\n", static_cast<int>(pid), role);
    std::fflush(stdout);
}

[[noreturn]] void fail(const std::string& why) {
    std::fprintf(stderr, "lifetime_program: %s\n", why.c_str());
    std::exit(3);
}

/// Waits for one report from the tree; fails rather than hang.
int next_report() {
    if (!reports.poll(30s)) fail("a process of the tree did not report in 30 s");
    return reports.recv();
}

/// A long task: sleeps for an hour. It would say so if a signal ever interrupted it or if it ever
/// finished: a worker must do neither — the parent's guard decides how it ends.
int long_task(int index) {
    report.send(static_cast<int>(::getpid()));
    for (int second = 0; second < 3600; ++second) {
        timespec one{1, 0};
        while (::nanosleep(&one, &one) != 0) {
            std::printf("worker %d: interrupted\n", index);
            std::fflush(stdout);
        }
    }
    std::printf("worker %d: finished\n", index);
    return index;
}

[[noreturn]] void sleep_forever() {
    for (;;) ::pause();
}

/// One level of the tree: reports, starts the next level (if any) and waits for it.
void tree_level(int level, int depth, bool guarded) {
    std::optional<mproc::ChildGuard> guard;
    if (guarded) guard.emplace();
    report.send(static_cast<int>(::getpid()));
    if (level == depth) sleep_forever();
    mproc::Process next(tree_level, level + 1, depth, guarded);
    next.start();
    next.join();
    std::printf("level %d: child ended\n", level);  // never: the tree ends from the top
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) fail("usage: lifetime_program pool|tree|nested|queue wait|exit|throw");
    const std::string mode = argv[1];
    const std::string ending = argv[2];
    if (ending != "wait" && ending != "exit" && ending != "throw") fail("unknown ending " + ending);

    mproc::ChildGuard guard;
    std::tie(reports, report) = mproc::Pipe<int>(/*duplex=*/false);

    // Whatever the mode builds lives until main ends (or never ends, for exit and throw).
    std::optional<mproc::Pool> pool;
    std::vector<mproc::AsyncResult<int>> tasks;
    std::optional<mproc::Process> top;
    // The queue: the consumer reads, main holds the writing end open and never writes.
    mproc::Connection<int> work_out, work_in;
    std::tie(work_out, work_in) = mproc::Pipe<int>(/*duplex=*/false);

    print_pid(::getpid(), "main");
    if (mode == "pool") {
        pool.emplace(4u);
        for (int i = 0; i < 4; ++i) tasks.push_back(pool->apply_async(long_task, std::tuple{i}));
        std::vector<pid_t> workers;
        for (int i = 0; i < 4; ++i) workers.push_back(next_report());
        const std::vector<pid_t> direct = mproc::active_children();
        if (direct.size() != 1) fail("a Pool should have one direct child, its fork server");
        print_pid(direct[0], "server");
        for (pid_t pid : workers) print_pid(pid, "worker");
    } else if (mode == "tree" || mode == "nested") {
        top.emplace(tree_level, 1, 3, mode == "nested");
        top->start();
        const char* roles[] = {"child", "grandchild", "great-grandchild"};
        for (const char* role : roles) print_pid(next_report(), role);
    } else if (mode == "queue") {
        top.emplace([&] {
            report.send(static_cast<int>(::getpid()));
            for (;;) std::printf("consumer: got %d\n", work_out.recv());  // blocks: nothing is ever sent
        });
        top->start();
        print_pid(next_report(), "consumer");
    } else {
        fail("unknown mode " + mode);
    }
    std::printf("ready\n");
    std::fflush(stdout);

    if (ending == "wait") sleep_forever();
    char line[64];
    if (!std::fgets(line, sizeof line, stdin)) {}  // a line, or the end of stdin: go
    if (ending == "exit") std::exit(0);
    throw std::runtime_error("lifetime_program: thrown out of main");
}
