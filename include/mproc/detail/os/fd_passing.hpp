// mproc — small messages with an optional file descriptor over a Unix socket (SCM_RIGHTS).
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <sys/socket.h>
#include <sys/types.h>

#include "unique_fd.hpp"

namespace mproc::detail {

/// One sendmsg of `n` bytes with, if `fd` >= 0, a copy of `fd` attached (SCM_RIGHTS); `flags` are
/// added to MSG_NOSIGNAL (a closed peer never raises SIGPIPE). EINTR is retried. Returns the bytes
/// sent, or -1 with errno.
inline ssize_t send_some_with_fd(int socket, const void* data, std::size_t n, int fd, int flags = 0) noexcept {
    iovec iov{const_cast<void*>(data), n};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (fd >= 0) {
        std::memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
    }
    ssize_t sent;
    do sent = ::sendmsg(socket, &msg, MSG_NOSIGNAL | flags);
    while (sent < 0 && errno == EINTR);
    return sent;
}

/// Sends `n` bytes (one message on a SOCK_SEQPACKET socket) and, if `fd` >= 0, a copy of it.
/// Returns false when the peer is gone; never raises SIGPIPE.
inline bool send_with_fd(int socket, const void* data, std::size_t n, int fd = -1) noexcept {
    return send_some_with_fd(socket, data, n, fd) == static_cast<ssize_t>(n);
}

/// Receives one message of at most `n` bytes and the descriptor that came with it, if any
/// (close-on-exec). Returns the bytes received, 0 at end of stream, -1 with errno set.
inline ssize_t recv_with_fd(int socket, void* data, std::size_t n, UniqueFd* fd, bool nonblocking = false) noexcept {
    iovec iov{data, n};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got;
    do got = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC | (nonblocking ? MSG_DONTWAIT : 0));
    while (got < 0 && errno == EINTR);
    if (got < 0) return got;
    // One descriptor is kept (the first); any more that came (the control room has space for two
    // on 64-bit Linux) are closed, not left open and unowned.
    bool kept = false;
    for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
            int received = -1;
            std::memcpy(&received, CMSG_DATA(cmsg) + i * sizeof(int), sizeof received);
            UniqueFd owned(received);
            if (fd && !kept) *fd = std::move(owned);
            kept = true;
        }
    }
    return got;
}

}  // namespace mproc::detail
