// A program for test_lifetime: builds a tree of processes with mproc under a ChildGuard, prints
// every pid of the tree, then ends the way it is asked to. The test checks, from outside, that
// nothing of the tree survives and that the program's exit status is the conventional one.
//
//     lifetime_program <mode> <ending> [handler]
//
// mode:
//   pool    a Pool of 4 workers, each in a long task
//   pool_busy  the same, and a thread of the program's own calling apply() on a second pool in a
//           loop, catching nothing (when the guard ends the children, that call fails)
//   tree    a Process tree 3 levels deep: child -> grandchild -> great-grandchild
//   nested  the same tree, with a ChildGuard in every level
//   stubborn  the tree, whose great-grandchild blocks SIGINT and SIGTERM (only SIGKILL ends it),
//           under a guard of 4 s
//   queue   a consumer Process blocked in mproc::Queue::get on a queue nobody puts to
//   pipe    a consumer Process blocked reading a Pipe the program keeps open
// ending:
//   wait    wait for a signal (the test sends SIGINT, SIGTERM or SIGKILL, or types Ctrl-C)
//   exit    after a line on stdin, call exit(0)
//   throw   after a line on stdin, throw std::runtime_error out of main
// handler (with ending wait): the program's own SIGINT and SIGTERM handler, which prints
// "handler <signal> <children>" (children: "none" if this process had no child left, not even a
// zombie, when the handler ran; "some" otherwise) and makes main return 40 + the signal (in the
// other processes of the tree it dies of the signal):
//   plain    installed with sa_handler, before the guard
//   siginfo  installed with SA_SIGINFO, before the guard
//   after    installed after the guard; it calls mproc::ChildGuard::terminate_children() itself
//
// Output, on stdout: one line "pid <pid> <role>" per process of the tree (role: main, server,
// worker, child, grandchild, great-grandchild, consumer), then "ready". Nothing else is ever
// written by any process of the tree unless something went wrong (or a handler ran).
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <mproc/guard.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

namespace {

using namespace std::chrono_literals;

/// Where every process of the tree reports its pid (a Pool's tasks cannot capture: globals).
mproc::Connection<int> reports;  // read by main
mproc::Connection<int> report;   // written by the tree
/// A Pool's workers report through shared memory: they hold no descriptor of the program's but
/// mproc's own (the fork server closes the rest).
std::optional<mproc::Queue<int>> worker_reports;

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
    if (!reports.poll(60s)) fail("a process of the tree did not report in 60 s");
    return reports.recv();
}

/// A long task: sleeps for an hour. It would say so if a signal ever interrupted it or if it ever
/// finished: a worker must do neither — the parent's guard decides how it ends.
int long_task(int index) {
    worker_reports->put(static_cast<int>(::getpid()));
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

int quick_task(int i) { return i + 1; }

/// Waits for signals forever, as pause() does (the thread's own mask kept: a signal mproc left
/// blocked stays blocked, and the test sees it). sigsuspend, not pause: GCC 12's ThreadSanitizer
/// runtime sometimes loses an asynchronous signal that reaches a thread blocked in pause() — its
/// handler never runs (a ten-line program with a SIGINT handler, sent SIGINT as it prints "ready":
/// 2 lost in 200 runs; with sigsuspend, 0 in 500; clang 16's runtime, 0 in 500 with pause). Here
/// that was a Ctrl-C the guard never saw, and a program that never ended.
[[noreturn]] void sleep_forever() {
    sigset_t mine;
    ::pthread_sigmask(SIG_SETMASK, nullptr, &mine);
    for (;;) ::sigsuspend(&mine);
}

/// One level of the tree: reports, starts the next level (if any) and waits for it. The last
/// level, when `stubborn`, first blocks SIGINT and SIGTERM.
void tree_level(int level, int depth, bool guarded, bool stubborn) {
    std::optional<mproc::ChildGuard> guard;
    if (guarded) guard.emplace();
    if (level == depth && stubborn) {
        sigset_t both;
        sigemptyset(&both);
        sigaddset(&both, SIGINT);
        sigaddset(&both, SIGTERM);
        ::pthread_sigmask(SIG_BLOCK, &both, nullptr);
    }
    report.send(static_cast<int>(::getpid()));
    if (level == depth) sleep_forever();
    mproc::Process next(tree_level, level + 1, depth, guarded, stubborn);
    next.start();
    // A join in slices rather than one wait: the same guess as sleep_forever's, not proven. Once
    // (in one TSan run, not reproduced in 200 since) a level that had started the next one did not
    // die of the SIGTERM its guard sent; a thread that comes back from a wait every 100 ms gives a
    // signal the TSan runtime holds back a point at which to run its handler.
    while (!next.join(mproc::Seconds{0.1})) {}
    std::printf("level %d: child ended\n", level);  // never: the tree ends from the top
}

// The program's own handler (see the top of this file). Async-signal-safe throughout: it tells
// main through a pipe (it may run on any thread of the program).
// In the other processes of the tree, which inherit it, it does what the default would: die of the
// signal.
int caught_pipe[2] = {-1, -1};
pid_t main_pid = 0;

void write_text(const char* text) {
    std::size_t left = std::strlen(text);
    while (left > 0) {
        const ssize_t put = ::write(1, text, left);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return;
        text += put;
        left -= static_cast<std::size_t>(put);
    }
}

void on_signal(int sig) {
    if (::getpid() != main_pid) {
        ::signal(sig, SIG_DFL);
        ::raise(sig);
        return;
    }
    const int saved_errno = errno;
    siginfo_t info{};
    const bool none = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0 && errno == ECHILD;
    write_text(sig == SIGINT ? "handler 2 " : "handler 15 ");
    write_text(none ? "none\n" : "some\n");
    const unsigned char byte = static_cast<unsigned char>(sig);
    while (::write(caught_pipe[1], &byte, 1) < 0 && errno == EINTR) {}
    errno = saved_errno;
}

void on_signal_info(int sig, siginfo_t*, void*) { on_signal(sig); }

void on_signal_after_guard(int sig) {
    mproc::ChildGuard::terminate_children();
    on_signal(sig);
}

void install_handler(const std::string& style) {
    if (::pipe2(caught_pipe, O_CLOEXEC) != 0) fail("pipe2 failed");
    main_pid = ::getpid();
    for (int sig : {SIGINT, SIGTERM}) {
        struct sigaction action {};
        sigemptyset(&action.sa_mask);
        if (style == "siginfo") {
            action.sa_sigaction = on_signal_info;
            action.sa_flags = SA_SIGINFO;
        } else {
            action.sa_handler = style == "after" ? on_signal_after_guard : on_signal;
        }
        if (::sigaction(sig, &action, nullptr) != 0) fail("sigaction failed");
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 && argc != 4)
        fail(
            "usage: lifetime_program pool|pool_busy|tree|nested|stubborn|queue|pipe wait|exit|throw "
            "[plain|siginfo|after]");
    const std::string mode = argv[1];
    const std::string ending = argv[2];
    const std::string handler = argc == 4 ? argv[3] : "";
    if (ending != "wait" && ending != "exit" && ending != "throw") fail("unknown ending " + ending);
    if (!handler.empty() && handler != "plain" && handler != "siginfo" && handler != "after")
        fail("unknown handler " + handler);

    if (handler == "plain" || handler == "siginfo") install_handler(handler);
    // A generous grace: each process of the tree ends at once on SIGTERM, but a loaded machine
    // can take more than the default second to schedule a whole chain of them, and a child still
    // reaping its own children when its parent's grace ran out would be killed, orphaning them.
    // The stubborn tree waits out its guards' graces: a shorter one.
    mproc::ChildGuard guard(mproc::Seconds{mode == "stubborn" ? 4.0 : 10.0});
    if (handler == "after") install_handler(handler);
    std::tie(reports, report) = mproc::Pipe<int>(/*duplex=*/false);

    // Whatever the mode builds lives until main ends (or never ends, for exit and throw).
    std::optional<mproc::Pool> pool;
    std::vector<mproc::AsyncResult<int>> tasks;
    std::optional<mproc::Process> top;
    // The queue and the pipe: the consumer reads, nobody ever writes; main holds the writing end.
    mproc::Queue<int> queue;
    mproc::Connection<int> work_out, work_in;
    std::tie(work_out, work_in) = mproc::Pipe<int>(/*duplex=*/false);

    print_pid(::getpid(), "main");
    std::optional<mproc::Pool> busy;
    std::optional<std::thread> user_thread;
    if (mode == "pool" || mode == "pool_busy") {
        worker_reports.emplace();
        pool.emplace(4u);
        for (int i = 0; i < 4; ++i) tasks.push_back(pool->apply_async(long_task, std::tuple{i}));
        std::vector<pid_t> workers;
        for (int i = 0; i < 4; ++i) {
            try {
                workers.push_back(worker_reports->get(60s));
            } catch (const mproc::Empty&) {
                fail("a worker did not report in 60 s");
            }
        }
        const std::vector<pid_t> direct = mproc::active_children();
        if (direct.size() != 1) fail("a Pool should have one direct child, its fork server");
        print_pid(direct[0], "server");
        for (pid_t pid : workers) print_pid(pid, "worker");
        if (mode == "pool_busy") {
            // A thread of the program's own keeps using a pool, catching nothing: when the guard
            // ends the children, its call fails — and the program must still end as the signal
            // says, not by that thread's uncaught exception.
            busy.emplace(1u);
            for (pid_t pid : mproc::active_children())
                if (pid != direct[0]) print_pid(pid, "server");
            for (int tries = 0; busy->worker_pids().empty(); ++tries) {
                if (tries > 60000) fail("the second pool's worker did not start");
                std::this_thread::sleep_for(1ms);
            }
            print_pid(busy->worker_pids()[0], "worker");
            user_thread.emplace([&busy] {
                for (int i = 0;; i = (i + 1) % 1000) (void)busy->apply(quick_task, i);
            });
        }
    } else if (mode == "tree" || mode == "nested" || mode == "stubborn") {
        top.emplace(tree_level, 1, 3, mode == "nested", mode == "stubborn");
        top->start();
        const char* roles[] = {"child", "grandchild", "great-grandchild"};
        for (const char* role : roles) print_pid(next_report(), role);
    } else if (mode == "queue") {
        top.emplace([&] {
            report.send(static_cast<int>(::getpid()));
            for (;;) std::printf("consumer: got %d\n", queue.get());  // blocks: nothing is ever put
        });
        top->start();
        print_pid(next_report(), "consumer");
    } else if (mode == "pipe") {
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

    if (ending == "wait") {
        if (handler.empty()) sleep_forever();
        unsigned char sig = 0;
        while (::read(caught_pipe[0], &sig, 1) < 0 && errno == EINTR) {}
        // The handler ran after the guard had reaped every child: what remains is to unwind.
        return 40 + sig;
    }
    char line[64];
    if (!std::fgets(line, sizeof line, stdin)) {}  // a line, or the end of stdin: go
    if (ending == "exit") std::exit(0);
    throw std::runtime_error("lifetime_program: thrown out of main");
}
