// A program for test_process: what a normal exit does with Process children still running.
//
//     daemon_program exit|return|guard
//
// It starts two children whose Process objects are still alive when the program ends: first a
// non-daemon "worker", which waits for a line on stdin and then says "worker: done", and then a
// daemon child, which waits forever. Each child says "<role>: terminated" if it receives SIGTERM.
// Once both are ready the program prints "ready" and ends:
//   exit    std::exit(0) with the Process objects on main's stack;
//   return  returns 0 from main, the Process objects being static;
//   guard   as exit, under a ChildGuard.
// Each line goes to stdout. Nothing else is written unless something went wrong.
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <mproc/guard.hpp>
#include <mproc/process.hpp>
#include <optional>
#include <poll.h>
#include <string>
#include <sys/signalfd.h>
#include <unistd.h>

namespace {

int ready_pipe[2] = {-1, -1};

[[noreturn]] void fail(const char* why) {
    std::fprintf(stderr, "daemon_program: %s\n", why);
    std::exit(3);
}

void say(const char* line) {
    const std::size_t n = std::strlen(line);
    std::size_t done = 0;
    while (done < n) {
        const ssize_t put = ::write(1, line + done, n - done);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) return;
        done += static_cast<std::size_t>(put);
    }
}

/// SIGTERM blocked and readable from a signalfd: no asynchronous handler, under any sanitizer.
int sigterm_fd() {
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    ::sigprocmask(SIG_BLOCK, &term, nullptr);
    return ::signalfd(-1, &term, SFD_CLOEXEC);
}

void notify_ready() {
    const char byte = 'r';
    while (::write(ready_pipe[1], &byte, 1) < 0 && errno == EINTR) {}
}

/// Waits for a line on stdin (then "worker: done") or SIGTERM (then "worker: terminated").
void worker() {
    const int term = sigterm_fd();
    notify_ready();
    pollfd watched[2] = {{0, POLLIN, 0}, {term, POLLIN, 0}};
    for (;;) {
        if (::poll(watched, 2, -1) < 0) continue;
        if (watched[1].revents != 0) {
            say("worker: terminated\n");
            ::_exit(15);
        }
        if (watched[0].revents != 0) {
            say("worker: done\n");
            return;
        }
    }
}

/// Waits for SIGTERM forever (then "daemon: terminated").
void daemon_child() {
    const int term = sigterm_fd();
    notify_ready();
    pollfd watched{term, POLLIN, 0};
    while (::poll(&watched, 1, -1) <= 0) {}
    say("daemon: terminated\n");
    ::_exit(15);
}

std::optional<mproc::Process> static_worker;
std::optional<mproc::Process> static_daemon;

void start_both(mproc::Process& work, mproc::Process& background) {
    background.set_daemon(true);
    work.start();
    background.start();
    ::close(ready_pipe[1]);
    for (int ready = 0; ready < 2; ++ready) {
        pollfd p{ready_pipe[0], POLLIN, 0};
        if (::poll(&p, 1, 60'000) <= 0) fail("a child did not start in 60 s");
        char byte = 0;
        if (::read(ready_pipe[0], &byte, 1) != 1) fail("a child died before it was ready");
    }
    say("ready\n");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) fail("usage: daemon_program exit|return|guard");
    const std::string ending = argv[1];
    if (::pipe2(ready_pipe, O_CLOEXEC) != 0) fail("pipe2 failed");
    if (ending == "return") {
        static_worker.emplace(worker);
        static_daemon.emplace(daemon_child);
        start_both(*static_worker, *static_daemon);
        return 0;
    }
    if (ending != "exit" && ending != "guard") fail("unknown ending");
    std::optional<mproc::ChildGuard> guard;
    if (ending == "guard") guard.emplace();
    mproc::Process work(worker);
    mproc::Process background(daemon_child);
    start_both(work, background);
    std::exit(0);
}
