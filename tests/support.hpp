// Test helpers: what processes this test process has left behind, and plumbing for child tests.
#pragma once

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <initializer_list>
#include <mutex>
#include <poll.h>
#include <pthread.h>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include <mproc/errors.hpp>
#include <mproc/process.hpp>

// 1 in a build with a sanitizer (whose runtime needs descriptors and memory of its own).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MPROC_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define MPROC_TEST_SANITIZED 1
#endif
#endif
#ifndef MPROC_TEST_SANITIZED
#define MPROC_TEST_SANITIZED 0
#endif

namespace mproc_test {

struct ProcEntry {
    pid_t pid;
    char state;  // 'Z' for a zombie
};

/// Every process whose parent is `parent` (this process by default), zombies included.
inline std::vector<ProcEntry> children_of(pid_t parent = ::getpid()) {
    std::vector<ProcEntry> found;
    DIR* proc = ::opendir("/proc");
    if (!proc) return found;
    while (dirent* entry = ::readdir(proc)) {
        const std::string name = entry->d_name;
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::ifstream stat("/proc/" + name + "/stat");
        std::string line;
        if (!std::getline(stat, line)) continue;
        const auto close = line.rfind(')');
        if (close == std::string::npos) continue;
        std::istringstream rest(line.substr(close + 2));
        char state = '?';
        pid_t ppid = 0;
        rest >> state >> ppid;
        if (ppid == parent) found.push_back({static_cast<pid_t>(std::stol(name)), state});
    }
    ::closedir(proc);
    return found;
}

/// Number of children, live or zombie, this process has right now.
inline std::size_t child_count() { return children_of().size(); }

/// Makes this process's stderr a pipe nobody reads, SIGPIPE at its default, as for `prog 2>&1 |
/// head` once head has gone (in a child: both are the process's own). False if it cannot.
inline bool stderr_to_a_gone_reader() noexcept {
    ::signal(SIGPIPE, SIG_DFL);
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0 || ends[0] == 2 || ::dup2(ends[1], 2) < 0) return false;
    ::close(ends[0]);  // no reader
    return true;
}

/// Sends one byte with `fds` attached (SCM_RIGHTS) on the Unix socket `socket`: true when sent.
/// The descriptors stay open here; the copies in flight are the receiver's once it reads.
inline bool send_descriptors(int socket, const std::vector<int>& fds) {
    char byte = 'x';
    iovec iov{&byte, 1};
    std::vector<char> control(CMSG_SPACE(fds.size() * sizeof(int)));  // operator new: aligned for cmsghdr
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds.data(), fds.size() * sizeof(int));
    ssize_t sent;
    do sent = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    return sent == 1;
}

/// A pipe's write end to pass around (close-on-exec; the caller closes it), its read end closed,
/// and the pipe's inode, by which the descriptor is recognised wherever it arrives.
struct PipeEnd {
    int fd;
    ino_t inode;
};
inline PipeEnd pipe_write_end() {
    int ends[2];
    struct stat about {};
    if (::pipe2(ends, O_CLOEXEC) != 0 || ::fstat(ends[0], &about) != 0) throw std::runtime_error("pipe2");
    ::close(ends[0]);
    return {ends[1], about.st_ino};
}
/// The inode of what `fd` is open on (0 if it is not open).
inline ino_t inode_of(int fd) {
    struct stat about {};
    return ::fstat(fd, &about) == 0 ? about.st_ino : 0;
}

/// The number of descriptors this process has open.
inline std::size_t open_descriptors() {
    std::size_t n = 0;
    if (DIR* dir = ::opendir("/proc/self/fd")) {
        while (const dirent* e = ::readdir(dir))
            if (e->d_name[0] != '.') ++n;
        ::closedir(dir);
    }
    return n - 1;  // the directory's own
}

/// In a child: puts the signals the test framework catches back to their default action, so a
/// child that is sent or raises one dies of it without running the framework's failure report.
inline void default_fatal_signals() {
    for (int sig : {SIGTERM, SIGINT, SIGSEGV, SIGABRT, SIGILL, SIGFPE, SIGBUS}) ::signal(sig, SIG_DFL);
}

/// A plain pipe for tests that must not depend on mproc::Pipe: a child writes one byte when it is
/// ready, the parent waits for it (failing instead of hanging after `timeout_ms`).
class ReadySignal {
public:
    ReadySignal() {
        if (::pipe2(fds_, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    }
    ~ReadySignal() {
        for (int fd : fds_)
            if (fd >= 0) ::close(fd);
    }
    ReadySignal(const ReadySignal&) = delete;
    ReadySignal& operator=(const ReadySignal&) = delete;

    /// In the child.
    void notify() const {
        const char byte = 'r';
        while (::write(fds_[1], &byte, 1) < 0 && errno == EINTR) {}
    }
    /// In the parent: true once the child has notified; false on timeout or if it died first.
    bool wait(int timeout_ms = 30000) {
        if (fds_[1] >= 0) {
            ::close(fds_[1]);
            fds_[1] = -1;
        }
        pollfd p{fds_[0], POLLIN, 0};
        int n;
        do n = ::poll(&p, 1, timeout_ms);
        while (n < 0 && errno == EINTR);
        if (n <= 0) return false;
        char byte = 0;
        return ::read(fds_[0], &byte, 1) == 1;
    }

private:
    int fds_[2] = {-1, -1};
};

/// Sends this process's fd 2 to an in-memory file while alive; children started meanwhile inherit it.
/// `text()` returns what was written there (by this process or its children), at any time.
class StderrCapture {
public:
    StderrCapture() {
        file_ = ::memfd_create("mproc-test-stderr", MFD_CLOEXEC);
        saved_ = ::fcntl(2, F_DUPFD_CLOEXEC, 3);
        if (file_ < 0 || saved_ < 0 || ::dup2(file_, 2) < 0) throw std::runtime_error("cannot capture stderr");
    }
    ~StderrCapture() {
        restore();
        if (file_ >= 0) ::close(file_);
    }
    StderrCapture(const StderrCapture&) = delete;
    StderrCapture& operator=(const StderrCapture&) = delete;

    /// Puts the real stderr back (children already started keep writing to the capture).
    void restore() {
        if (saved_ >= 0) {
            ::dup2(saved_, 2);
            ::close(saved_);
            saved_ = -1;
        }
    }
    std::string text() const {
        std::string out;
        char chunk[4096];
        off_t at = 0;
        for (;;) {
            const ssize_t got = ::pread(file_, chunk, sizeof chunk, at);
            if (got <= 0) break;
            out.append(chunk, static_cast<std::size_t>(got));
            at += got;
        }
        return out;
    }

private:
    int file_ = -1;
    int saved_ = -1;
};

/// While alive, this process ignores SIGCHLD (the kernel reaps its children and keeps no status);
/// the disposition before is put back after.
class IgnoringSigchld {
public:
    IgnoringSigchld() {
        struct sigaction ignore {};
        ignore.sa_handler = SIG_IGN;
        ::sigemptyset(&ignore.sa_mask);
        ::sigaction(SIGCHLD, &ignore, &before_);
    }
    ~IgnoringSigchld() { ::sigaction(SIGCHLD, &before_, nullptr); }
    IgnoringSigchld(const IgnoringSigchld&) = delete;
    IgnoringSigchld& operator=(const IgnoringSigchld&) = delete;

private:
    struct sigaction before_ {};
};

/// Counts the uses that throw mproc::Error: in a forked child, which says how many with its exit
/// status (a failed check there cannot report).
struct Refusals {
    int count = 0;
    template <class Use> void expect(Use&& use) {
        try {
            use();
        } catch (const mproc::Error&) {
            ++count;
        }
    }
};

/// What forked_rounds saw.
struct RoundsSeen {
    int hung = 0;    // children that had not ended after 30 s (killed then); the rounds stop at the first
    int failed = 0;  // children that ended with a status other than 0
};

/// Forks up to `rounds` children, one after another, each running `body` (which exits with 0 when
/// all is well), while the caller's other threads go on. The caller checks what it returns once
/// its threads have stopped (a failed REQUIRE would leave them running).
template <class Body> RoundsSeen forked_rounds(int rounds, const Body& body) {
    RoundsSeen seen;
    for (int round = 0; round < rounds && seen.hung == 0; ++round) {
        mproc::Process child(body);
        child.start();
        if (!child.join(mproc::Seconds{30})) {
            ++seen.hung;
            child.kill();
            (void)child.join(mproc::Seconds{60});
        } else if (child.exitcode() != 0) {
            ++seen.failed;
        }
    }
    return seen;
}

/// Whether the kernel has thread `tid` of this process asleep ('S'), and, when `in_a_wait`, in a
/// read, readv, recvmsg or poll (not on a lock, where a sanitizer's own locks could put it).
inline bool thread_asleep(pid_t tid, bool in_a_wait = false) {
    const std::string task = "/proc/self/task/" + std::to_string(tid);
    std::ifstream stat(task + "/stat"), syscall(task + "/syscall");
    std::string line;
    std::getline(stat, line);
    const auto end = line.rfind(')');
    if (end == std::string::npos || end + 2 >= line.size() || line[end + 2] != 'S') return false;
    if (!in_a_wait) return true;
    long number = -1;
    syscall >> number;
    bool waiting = number == SYS_read || number == SYS_readv || number == SYS_recvmsg || number == SYS_ppoll;
#ifdef SYS_poll  // not on every architecture (arm64 has ppoll alone)
    waiting = waiting || number == SYS_poll;
#endif
    return waiting;
}

/// Whether this build runs under ThreadSanitizer, which cannot follow a thread started in a child
/// forked from a threaded process (such tests are skipped there and run in the other builds).
constexpr bool under_thread_sanitizer() {
#if defined(__SANITIZE_THREAD__)
    return true;
#elif defined(__has_feature)
    return __has_feature(thread_sanitizer);
#else
    return false;
#endif
}

/// Ends the whole test program with a message if it is still alive after `limit`: a hang becomes a
/// failure instead of a stuck CI job. The limits are generous: they never measure speed. Its
/// thread has every signal blocked, so signals go to the test's threads.
class Watchdog {
public:
    explicit Watchdog(std::chrono::seconds limit, std::string what = "the test") : what_(std::move(what)) {
        sigset_t all, saved;
        sigfillset(&all);
        ::pthread_sigmask(SIG_SETMASK, &all, &saved);
        // Returns once its thread runs: a test that forks next must not copy a thread's start-up into
        // the child (under GCC 12's AddressSanitizer the child then deadlocks on an allocator lock the
        // starting thread held: 4 forks in 3,000 in a loop that forks beside a new thread).
        thread_ = std::thread([this, limit] {
            std::unique_lock lock(mutex_);
            running_ = true;
            changed_.notify_all();
            if (!changed_.wait_for(lock, limit, [&] { return disarmed_; })) {
                std::fprintf(stderr, "\nWATCHDOG: '%s' did not finish within %llds: it hangs\n", what_.c_str(),
                             static_cast<long long>(limit.count()));
                std::fflush(stderr);
                std::_Exit(97);
            }
        });
        ::pthread_sigmask(SIG_SETMASK, &saved, nullptr);
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return running_; });
    }
    ~Watchdog() {
        {
            std::lock_guard lock(mutex_);
            disarmed_ = true;
        }
        changed_.notify_all();
        thread_.join();
    }
    Watchdog(const Watchdog&) = delete;
    Watchdog& operator=(const Watchdog&) = delete;

private:
    std::string what_;
    std::mutex mutex_;
    std::condition_variable changed_;
    bool disarmed_ = false;
    bool running_ = false;
    std::thread thread_;
};

}  // namespace mproc_test
