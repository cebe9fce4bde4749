// mproc — EINTR-safe, SIGPIPE-free reads and writes, and waiting on descriptors.
#pragma once

#include <cerrno>
#include <csignal>
#include <cstddef>
#include <ctime>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include "clock.hpp"

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

/// One write that never raises SIGPIPE: send(MSG_NOSIGNAL) on sockets, a shielded write on pipes.
/// `nonblocking` asks for MSG_DONTWAIT (sockets only). Retries EINTR.
inline ssize_t write_some(int fd, const void* src, std::size_t n, bool is_socket, bool nonblocking = false) noexcept {
    ssize_t put;
    if (is_socket) {
        const int flags = MSG_NOSIGNAL | (nonblocking ? MSG_DONTWAIT : 0);
        do put = ::send(fd, src, n, flags);
        while (put < 0 && errno == EINTR);
        return put;
    }
    SigpipeShield shield;
    do put = ::write(fd, src, n);
    while (put < 0 && errno == EINTR);
    if (put < 0 && errno == EPIPE) {
        const int saved = errno;
        shield.note_epipe();
        errno = saved;
    }
    return put;
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
