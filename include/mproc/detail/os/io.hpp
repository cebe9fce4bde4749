// mproc — EINTR-safe, SIGPIPE-free reads and writes, and waiting on descriptors.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdarg>
#include <cstddef>
#include <cstdio>
#include <ctime>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "clock.hpp"
#include "sanitizer.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

/// Blocks SIGPIPE in this thread for its lifetime, and swallows a SIGPIPE that a write to a
/// closed pipe raised meanwhile, so the program's disposition never sees it. Sockets use
/// MSG_NOSIGNAL instead; this is for pipe(2) ends, which have no such flag.
class SigpipeShield {
public:
    SigpipeShield() noexcept {
        sigemptyset(&pipe_only_);
        sigaddset(&pipe_only_, SIGPIPE);
        pthread_sigmask(SIG_BLOCK, &pipe_only_, &previous_);
        // A SIGPIPE can only be pending here if this thread had it blocked already (one that is
        // not blocked is delivered, or discarded when ignored): only then is there one to keep.
        if (sigismember(&previous_, SIGPIPE) == 1) {
            sigset_t pending;
            sigpending(&pending);
            was_pending_ = sigismember(&pending, SIGPIPE) == 1;
        }
    }
    ~SigpipeShield() {
        if (raised_ && !was_pending_) {
            const timespec zero{0, 0};
            while (sigtimedwait(&pipe_only_, nullptr, &zero) < 0 && errno == EINTR) {}
        }
        pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
    }
    SigpipeShield(const SigpipeShield&) = delete;
    SigpipeShield& operator=(const SigpipeShield&) = delete;
    void note_epipe() noexcept { raised_ = true; }

private:
    sigset_t pipe_only_{};
    sigset_t previous_{};
    bool was_pending_ = false;
    bool raised_ = false;
};

/// read(2), retried on EINTR. Returns bytes read, 0 at end of file, -1 with errno set.
inline ssize_t read_some(int fd, void* dst, std::size_t n) noexcept {
    ssize_t got;
    do got = ::read(fd, dst, n);
    while (got < 0 && errno == EINTR);
    return got;
}

/// pwritev2's flag for "a closed reader is EPIPE, never SIGPIPE" (RWF_NOSIGNAL: Linux 6.18, this
/// project's CI kernel, has it; older kernels refuse the unknown flag with EOPNOTSUPP before writing
/// anything).
inline constexpr int rwf_nosignal = 0x00000100;

/// Whether writes to pipes try rwf_nosignal first: 0 yes, -1 no (the kernel or a seccomp filter
/// refused it once: every write then goes through a SigpipeShield). Tests set -1 to exercise the
/// shield. Under ThreadSanitizer, -1 from the start: its runtime does not intercept pwritev2, so it
/// would not see a pipe carry data between two threads of one process, and would report races.
inline std::atomic<int>& pipe_nosignal_support() noexcept {
#ifdef MPROC_TSAN
    static constinit std::atomic<int> support{-1};
#else
    static constinit std::atomic<int> support{0};
#endif
    return support;
}

/// One write that never raises SIGPIPE, of a message in pieces (a frame's header and its payload,
/// so they need not be copied together first): sendmsg(MSG_NOSIGNAL) on sockets; on pipes, one
/// pwritev2 with rwf_nosignal where the kernel has it (one system call), else a writev inside a
/// SigpipeShield (three). `nonblocking` asks for MSG_DONTWAIT (sockets only). Retries EINTR.
inline ssize_t write_some(int fd, const iovec* pieces, int count, bool is_socket, bool nonblocking = false) noexcept {
    ssize_t put;
    if (is_socket) {
        msghdr message{};
        message.msg_iov = const_cast<iovec*>(pieces);
        message.msg_iovlen = static_cast<std::size_t>(count);
        const int flags = MSG_NOSIGNAL | (nonblocking ? MSG_DONTWAIT : 0);
        do put = ::sendmsg(fd, &message, flags);
        while (put < 0 && errno == EINTR);
        return put;
    }
    std::atomic<int>& nosignal = pipe_nosignal_support();
    if (nosignal.load(std::memory_order_relaxed) == 0) {
        do put = ::pwritev2(fd, pieces, count, -1, rwf_nosignal);
        while (put < 0 && errno == EINTR);
        if (put >= 0 || errno == EPIPE || errno == EAGAIN || errno == EWOULDBLOCK) return put;
        // Refused, so nothing was written: the flag is unknown here (EOPNOTSUPP; ENOSYS before
        // pwritev2), or a seccomp filter denies the call (EPERM). Anything else, writev reports too.
        if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EPERM || errno == EINVAL)
            nosignal.store(-1, std::memory_order_relaxed);
    }
    std::size_t total = 0;
    for (int i = 0; i < count; ++i) total += pieces[i].iov_len;
    SigpipeShield shield;
    do put = ::writev(fd, pieces, count);
    while (put < 0 && errno == EINTR);
    // A reader that left while the write waited for room raises SIGPIPE too when part of the
    // message went in first: a short write may have one pending, as EPIPE does.
    if ((put < 0 && errno == EPIPE) || (put >= 0 && static_cast<std::size_t>(put) < total)) {
        const int saved = errno;
        shield.note_epipe();
        errno = saved;
    }
    return put;
}
/// write_some of one buffer.
inline ssize_t write_some(int fd, const void* src, std::size_t n, bool is_socket, bool nonblocking = false) noexcept {
    const iovec piece{const_cast<void*>(src), n};
    return write_some(fd, &piece, 1, is_socket, nonblocking);
}

/// Writes one of mproc's own reports to stderr: a line made with printf's `format`, in a fixed
/// buffer (no memory needed; cut at 4 KiB), written whole, EINTR retried, and never raising
/// SIGPIPE — a program whose stderr reader has gone (`prog 2>&1 | head`) keeps running. Errors
/// are dropped: there is nowhere left to report them.
[[gnu::format(printf, 1, 2)]] inline void report(const char* format, ...) noexcept {
    char line[4096];
    va_list args;
    va_start(args, format);
    const int n = std::vsnprintf(line, sizeof line, format, args);  // NOLINT(clang-analyzer-valist.Uninitialized)
    va_end(args);
    if (n <= 0) return;
    std::size_t left = std::min(static_cast<std::size_t>(n), sizeof line - 1);
    if (static_cast<std::size_t>(n) >= sizeof line) line[left - 1] = '\n';  // cut short, it still ends its line
    // Only a pipe or a socket (a journal's, say) can raise SIGPIPE: a terminal or a file is
    // written as it is.
    struct stat about {};
    const bool known = ::fstat(STDERR_FILENO, &about) == 0;
    const bool is_socket = known && S_ISSOCK(about.st_mode), is_pipe = known && S_ISFIFO(about.st_mode);
    for (const char* at = line; left > 0;) {
        ssize_t put;
        if (is_socket || is_pipe) {
            put = write_some(STDERR_FILENO, at, left, is_socket);
        } else {
            do put = ::write(STDERR_FILENO, at, left);
            while (put < 0 && errno == EINTR);
        }
        if (put <= 0) return;
        at += put;
        left -= static_cast<std::size_t>(put);
    }
}

/// What a pipe holds when it is made (Linux: 16 pages). mproc never grows one: a simplex Pipe
/// sends its large messages' bytes by a socket instead (pipe.hpp, the bulk lane).
inline constexpr std::size_t default_pipe_capacity = std::size_t{64} * 1024;

/// The most mproc asks a Unix socket's send buffer to hold (the kernel caps it at wmem_max).
inline constexpr std::size_t largest_socket_buffer = std::size_t{4} << 20;

/// Grows the send buffer of the Unix stream socket `fd` so that a few messages of `bytes` can be
/// in flight at once (at most largest_socket_buffer, and what net.core.wmem_max allows); never
/// shrinks it. Returns what it holds after (as SO_SNDBUF reports it).
inline std::size_t grow_socket_buffer(int fd, std::size_t bytes) noexcept {
    int now = 0;
    socklen_t length = sizeof now;
    if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &now, &length) != 0 || now < 0) return 0;
    const std::size_t want = std::min(largest_socket_buffer, bytes * 4);
    if (want <= static_cast<std::size_t>(now)) return static_cast<std::size_t>(now);
    const int asked = static_cast<int>(want / 2);  // the kernel doubles what it is given
    (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &asked, sizeof asked);
    length = sizeof now;
    if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &now, &length) != 0 || now < 0) return 0;
    return static_cast<std::size_t>(now);
}

/// poll(2) on one descriptor until `events` or the deadline; retries EINTR with the time left.
/// Returns the revents seen (0 on timeout), or -1 with errno set.
inline int wait_for(int fd, short events, const Deadline& deadline) noexcept {
    for (;;) {
        pollfd p{fd, events, 0};
        const int n = ::poll(&p, 1, poll_timeout_ms(deadline));
        if (n > 0) return p.revents;
        if (n == 0) {
            if (expired(deadline)) return 0;
            continue;  // rounded-up millisecond wait woke a hair early
        }
        if (errno != EINTR) return -1;
    }
}

}  // namespace mproc::detail
