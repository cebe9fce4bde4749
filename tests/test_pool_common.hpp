// Helpers shared by the Pool tests: a watchdog that turns a hang into a failure, a gate that holds a
// task until the test lets it go, a log that workers append to, the ways a worker is made to die, and
// the check that a Pool leaves no process behind.
#pragma once

#include <catch2/catch.hpp>
#include <mproc/pool.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <sys/resource.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "support.hpp"

namespace pool_test {

using namespace std::chrono_literals;
using mproc_test::Watchdog;

/// A pipe created *before* the pool, so that every worker (a fork of the pool's fork server, itself a
/// fork of this process at the pool's construction) has both ends. A task blocked in gated() runs
/// until the test calls open(n).
class Gate {
public:
    Gate() {
        if (::pipe(fds_) != 0) throw std::runtime_error("pipe failed");
    }
    ~Gate() {
        ::close(fds_[0]);
        ::close(fds_[1]);
    }
    Gate(const Gate&) = delete;
    Gate& operator=(const Gate&) = delete;
    int read_fd() const { return fds_[0]; }
    /// Lets `n` gated tasks go.
    void open(int n = 1) {
        for (int i = 0; i < n; ++i) {
            const char byte = 'g';
            while (::write(fds_[1], &byte, 1) < 0 && errno == EINTR) {}
        }
    }

private:
    int fds_[2] = {-1, -1};
};

/// In a worker: blocks until the gate lets one task through, then returns `value`.
inline int gated(int read_fd, int value) {
    char byte = 0;
    while (::read(read_fd, &byte, 1) < 0 && errno == EINTR) {}
    return value;
}
/// The one-argument form, for map/imap: blocks like gated() and returns the descriptor.
inline int gated_fd(int read_fd) { return gated(read_fd, read_fd); }

/// A file that tasks append lines to (O_APPEND: lines from several workers never interleave). The path
/// is a global set before the pool exists, so workers see it; tasks take no captures.
inline char g_log_path[256] = {};

class TaskLog {
public:
    TaskLog() {
        std::snprintf(g_log_path, sizeof g_log_path, "/tmp/mproc-pooltest-%d-XXXXXX", static_cast<int>(::getpid()));
        const int fd = ::mkstemp(g_log_path);
        if (fd < 0) throw std::runtime_error("mkstemp failed");
        ::close(fd);
        path_ = g_log_path;
    }
    ~TaskLog() {
        ::unlink(path_.c_str());
        g_log_path[0] = '\0';
    }
    TaskLog(const TaskLog&) = delete;
    TaskLog& operator=(const TaskLog&) = delete;

    std::vector<std::string> lines() const {
        std::ifstream in(path_);
        std::vector<std::string> out;
        for (std::string line; std::getline(in, line);) out.push_back(line);
        return out;
    }
    /// Every line read as an integer.
    std::multiset<long> numbers() const {
        std::multiset<long> out;
        for (const auto& l : lines()) out.insert(std::stol(l));
        return out;
    }

private:
    std::string path_;
};

/// In a worker: appends "<n>\n" to the TaskLog.
inline void log_line(long n) {
    const int fd = ::open(g_log_path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error(std::string("cannot open the task log: ") + std::strerror(errno));
    const std::string line = std::to_string(n) + "\n";
    const ssize_t put = ::write(fd, line.data(), line.size());
    ::close(fd);
    if (put != static_cast<ssize_t>(line.size())) throw std::runtime_error("short write to the task log");
}

/// In a worker: logs `value` (so the test knows the task is running), then blocks like gated().
inline int gated_logged(int read_fd, int value) {
    log_line(value);
    return gated(read_fd, value);
}

/// Waits for `done()`, failing instead of hanging after `limit`.
template <class Done> void wait_for(Done done, const char* what, std::chrono::seconds limit = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) FAIL("waited " << limit.count() << " s for: " << what);
        std::this_thread::sleep_for(5ms);
    }
}

/// Waits (failing instead of hanging) until the log holds at least `n` lines.
inline void wait_for_log_lines(const TaskLog& log, std::size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (log.lines().size() < n && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
    REQUIRE(log.lines().size() >= n);
}

/// Waits (failing instead of hanging) until the pool lists `n` workers and none of `old`.
inline std::vector<pid_t> wait_until_replaced(mproc::Pool& pool, const std::vector<pid_t>& old, std::size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
        auto now = pool.worker_pids();
        const bool fresh = std::none_of(now.begin(), now.end(),
                                        [&](pid_t p) { return std::find(old.begin(), old.end(), p) != old.end(); });
        if ((fresh && now.size() == n) || std::chrono::steady_clock::now() > deadline) {
            INFO("workers now: " << now.size());
            REQUIRE(fresh);
            REQUIRE(now.size() == n);
            return now;
        }
        std::this_thread::sleep_for(1ms);
    }
}

// ---- the ways a worker dies ---------------------------------------------------------------------

enum class Death { segv = 0, abort_ = 1, exit3 = 2, sigkill = 3, oom = 4 };
inline constexpr int death_kinds = 5;

/// What WorkerLost must report for each way of dying: (signal, exit status).
inline std::pair<int, int> expected_end(Death d) {
    switch (d) {
        case Death::segv: return {SIGSEGV, 0};
        case Death::abort_: return {SIGABRT, 0};
        case Death::exit3: return {0, 3};
        case Death::sigkill: return {SIGKILL, 0};
        case Death::oom: return {SIGKILL, 0};
    }
    return {-1, -1};
}
inline const char* expected_words(Death d) {
    switch (d) {
        case Death::segv: return "killed by SIGSEGV";
        case Death::abort_: return "killed by SIGABRT";
        case Death::exit3: return "exited with status 3";
        case Death::sigkill:
        case Death::oom: return "killed by SIGKILL";
    }
    return "?";
}

/// An out-of-memory death as the kernel deals it. Without sanitizers: the address space is capped a
/// little above what the worker uses, the worker allocates (and touches) 1 MiB blocks until malloc
/// fails — really running out of memory — and then dies by SIGKILL, as the OOM killer would make it.
/// Under ASan/TSan (whose shadow memory makes RLIMIT_AS unusable, and whose allocators abort rather
/// than fail) it touches 32 MiB and then takes the same SIGKILL.
[[noreturn]] inline void die_out_of_memory() {
    std::vector<void*> blocks;
#if !MPROC_TEST_SANITIZED
    long pages = 0;
    if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
        std::fclose(f);
    }
    const rlim_t cap = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE)) + (64u << 20);
    const rlimit limit{cap, cap};
    if (pages > 0 && ::setrlimit(RLIMIT_AS, &limit) == 0) {
        for (int i = 0; i < 100000; ++i) {
            void* p = std::malloc(1u << 20);
            if (!p) break;  // out of memory
            std::memset(p, 0x5a, 1u << 20);
            blocks.push_back(p);
        }
    }
#else
    for (int i = 0; i < 32; ++i) {
        void* p = std::malloc(1u << 20);
        if (!p) break;
        std::memset(p, 0x5a, 1u << 20);
        blocks.push_back(p);
    }
#endif
    ::kill(::getpid(), SIGKILL);
    for (;;) ::pause();
}

/// In a worker: dies by `d`. The signal dispositions the test framework installed (inherited
/// through fork) are reset first so the worker dies of the signal itself, and no core is dumped.
[[noreturn]] inline void die_by(Death d) {
    mproc_test::default_fatal_signals();
    const rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    switch (d) {
        case Death::segv: std::raise(SIGSEGV); break;
        case Death::abort_: std::abort();
        case Death::exit3: ::_exit(3);
        case Death::sigkill: ::kill(::getpid(), SIGKILL); break;
        case Death::oom: die_out_of_memory();
    }
    for (;;) ::pause();
}

/// Item i of the "every 10th dies" workload: 9, 19, 29... die, rotating through the five deaths.
inline bool dies(long i) { return i % 10 == 9; }
inline Death death_of(long i) { return static_cast<Death>((i / 10) % death_kinds); }

/// Sleeps `seconds`, then returns them: a task that is still running when the test acts.
inline long sleep_then(long seconds) {
    std::this_thread::sleep_for(std::chrono::seconds(seconds));
    return seconds;
}

/// The task of that workload: logs i, returns i*i+1 — or dies.
inline long square_or_die(long i) {
    if (dies(i)) die_by(death_of(i));
    log_line(i);
    return i * i + 1;
}
inline long square_or_die2(long i, long offset) {
    if (dies(i)) die_by(death_of(i));
    log_line(i);
    return i * i + offset;
}

/// Checks one outcome of the workload: the right value, or the right WorkerLost.
template <class Get> void check_outcome(long i, Get&& get, std::set<pid_t>* dead_pids = nullptr) {
    INFO("item " << i);
    if (!dies(i)) {
        long v = -1;
        REQUIRE_NOTHROW(v = get());
        CHECK(v == i * i + 1);
        return;
    }
    try {
        (void)get();
        FAIL("item " << i << " should have failed with WorkerLost");
    } catch (const mproc::WorkerLost& e) {
        const auto [sig, status] = expected_end(death_of(i));
        INFO("what(): " << e.what());
        CHECK(e.pid() > 0);
        CHECK(e.signal() == sig);
        CHECK(e.exit_status() == status);
        const std::string what = e.what();
        CHECK_THAT(what, Catch::Contains("task "));
        CHECK_THAT(what, Catch::Contains("worker " + std::to_string(e.pid())));
        CHECK_THAT(what, Catch::Contains(expected_words(death_of(i))));
        if (dead_pids) dead_pids->insert(e.pid());
    }
}

/// The pool's worker pids once it knows all `n` of them. A pool learns a worker's pid when the fork
/// server's report of the fork reaches its collector, a moment after the worker exists; this waits
/// for that (failing instead of hanging) and returns the pids.
inline std::vector<pid_t> all_worker_pids(mproc::Pool& pool, std::size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
        auto pids = pool.worker_pids();
        if (pids.size() == n || std::chrono::steady_clock::now() > deadline) {
            REQUIRE(pids.size() == n);
            return pids;
        }
        std::this_thread::sleep_for(1ms);
    }
}

// ---- nothing left behind ------------------------------------------------------------------------

inline std::string describe_children() {
    std::ostringstream out;
    for (const auto& c : mproc_test::children_of()) out << c.pid << "(" << c.state << ") ";
    return out.str();
}

/// True when `pid` no longer exists at all (not even as a zombie).
inline bool gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

/// The pool and everything it started are gone: this process has no child, live or zombie (checked
/// at once: the fork server is reaped synchronously by join/terminate/the destructor), and none of
/// the worker pids seen is still around.
#define POOL_REQUIRE_NOTHING_LEFT(...)                          \
    do {                                                        \
        INFO("children: " << ::pool_test::describe_children()); \
        CHECK(mproc_test::child_count() == 0);                  \
        for (pid_t pid_ : std::vector<pid_t>{__VA_ARGS__}) {    \
            INFO("worker " << pid_ << " is still there");       \
            CHECK(::pool_test::gone(pid_));                     \
        }                                                       \
    } while (0)

/// A close() from another thread while a map still reads its input: the input calls at_item() at
/// the item where the close must come, which waits until another thread has called pool.close();
/// that thread then joins the pool (which must wait for the rest of the map). Used with a
/// mproc::Pool and a mproc::mpi::Pool.
template <class Pool> class CloseMidInput {
public:
    explicit CloseMidInput(Pool& pool)
        : closer_([this, &pool] {
              std::unique_lock lock(m_);
              cv_.wait(lock, [&] { return reached_; });
              if (!given_up_) pool.close();
              closed_ = true;
              cv_.notify_all();
              lock.unlock();
              if (!given_up_) pool.join();
          }) {}
    ~CloseMidInput() {
        {
            std::lock_guard lock(m_);
            if (!reached_) given_up_ = reached_ = true;  // the map never got there: let the thread go
        }
        cv_.notify_all();
        if (closer_.joinable()) closer_.join();
    }
    CloseMidInput(const CloseMidInput&) = delete;
    CloseMidInput& operator=(const CloseMidInput&) = delete;

    void at_item() {
        std::unique_lock lock(m_);
        reached_ = true;
        cv_.notify_all();
        cv_.wait(lock, [&] { return closed_; });
    }
    /// Waits for the closing thread (its close() and join()).
    void join() { closer_.join(); }

private:
    std::mutex m_;
    std::condition_variable cv_;
    bool reached_ = false, closed_ = false, given_up_ = false;
    std::thread closer_;  // last: it starts once the rest is built
};

}  // namespace pool_test
