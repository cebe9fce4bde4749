// mproc — Pipe: two connected ends that send and receive whole typed messages.
//
//     auto [parent_conn, child_conn] = mproc::Pipe<std::string>();        // duplex (socketpair)
//     auto [reader, writer] = mproc::Pipe<std::string>(/*duplex=*/false);  // simplex (pipe)
//
// Messages are framed with a 64-bit length, so any size goes through. A send to a closed peer
// throws mproc::BrokenPipeError and never raises SIGPIPE. A duplex send that finds the socket full
// keeps reading what the peer sends into memory meanwhile, so two ends that both send large
// messages before reading do not deadlock.
#pragma once

#include <cerrno>
#include <cstddef>
#include <fcntl.h>
#include <optional>
#include <poll.h>
#include <span>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/os/framing.hpp"
#include "detail/os/io.hpp"
#include "detail/os/unique_fd.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

template <class T = std::vector<std::byte>> class Connection;
template <class T = std::vector<std::byte>> std::pair<Connection<T>, Connection<T>> Pipe(bool duplex = true);

/// One end of a Pipe. Move-only; not safe for two threads at once (use one end per thread).
template <class T> class Connection {
    // The wording matches require_serializable, and the compiler names T in the instantiation note.
    static_assert(is_serializable_v<T>,
                  "mproc::Connection<T>: T cannot be serialised (see the type in the "
                  "instantiation note)");

public:
    Connection() = default;
    Connection(Connection&&) noexcept = default;
    Connection& operator=(Connection&&) noexcept = default;

    /// Sends one message. Serialisation errors surface here, before anything is written.
    void send(const T& value) {
        require_writable("send");
        detail::begin_frame(out_);
        encode_into(out_, value);
        detail::finish_frame(out_);
        write_all(out_.bytes());
    }

    /// Receives one message; blocks until it has arrived whole.
    /// Throws EOFError when the peers are closed and nothing is left, SerializationError when the
    /// bytes do not decode (the message is dropped and the stream stays usable).
    T recv() {
        const auto frame = next_frame("recv");
        try {
            T value = decode<T>(frame);
            in_.consume(frame);
            return value;
        } catch (...) {
            in_.consume(frame);  // a message that does not decode is dropped; the stream stays usable
            throw;
        }
    }

    /// Sends raw bytes as one message, read back whole by recv_bytes().
    void send_bytes(std::span<const std::byte> bytes) {
        require_writable("send_bytes");
        detail::begin_frame(out_);
        if (bytes.size() <= copy_limit) {
            out_.append(bytes.data(), bytes.size());
            detail::finish_frame(out_);
            write_all(out_.bytes());
        } else {  // large payloads go out in place rather than through a copy
            const std::uint64_t length = bytes.size();
            std::memcpy(out_.data(), &length, sizeof length);
            write_all(out_.bytes());
            write_all(bytes);
        }
    }

    /// Receives one message sent with send_bytes() (or send()) as raw bytes.
    std::vector<std::byte> recv_bytes() {
        const auto frame = next_frame("recv_bytes");
        std::vector<std::byte> bytes(frame.begin(), frame.end());
        in_.consume(frame);
        return bytes;
    }

    /// Whether there is something to read. Without a timeout it does not wait (like Python's poll);
    /// with one it waits up to that long. End of stream counts as readable (recv will throw).
    bool poll(std::optional<Seconds> timeout = Seconds{0}) {
        require_readable("poll");
        if (in_.buffered_frame()) return true;
        const int revents = detail::wait_for(fd_.get(), POLLIN, detail::deadline_after(timeout));
        if (revents < 0) detail::throw_errno("poll");
        return revents != 0;
    }

    /// Closes this end. Further use throws mproc::Error.
    void close() noexcept {
        fd_.reset();
        in_.clear();
    }
    bool closed() const noexcept { return !fd_; }
    bool readable() const noexcept { return readable_; }
    bool writable() const noexcept { return writable_; }
    /// The underlying descriptor (for select/poll alongside other fds).
    int fileno() const noexcept { return fd_.get(); }

private:
    friend std::pair<Connection<T>, Connection<T>> Pipe<T>(bool duplex);
    static constexpr std::size_t copy_limit = std::size_t{64} * 1024;

    Connection(int fd, bool readable, bool writable, bool is_socket)
        : fd_(fd), readable_(readable), writable_(writable), is_socket_(is_socket) {}

    void require_open(const char* op) const {
        if (!fd_) throw Error(std::string(op) + " on a closed connection");
    }
    void require_writable(const char* op) const {
        require_open(op);
        if (!writable_) throw Error(std::string(op) + " on the read-only end of a simplex pipe");
    }
    void require_readable(const char* op) const {
        require_open(op);
        if (!readable_) throw Error(std::string(op) + " on the write-only end of a simplex pipe");
    }

    std::span<const std::byte> next_frame(const char* op) {
        require_readable(op);
        for (;;) {
            if (auto frame = in_.buffered_frame()) return *frame;
            const ssize_t got = in_.fill(fd_.get());
            if (got == 0 || (got < 0 && errno == ECONNRESET)) in_.throw_end_of_stream(op);
            if (got < 0) detail::throw_errno(op);
        }
    }

    void write_all(std::span<const std::byte> bytes) {
        const bool drain_peer = is_socket_ && readable_;
        bool peer_done_sending = false;
        while (!bytes.empty()) {
            const ssize_t put = detail::write_some(fd_.get(), bytes.data(), bytes.size(), is_socket_, drain_peer);
            if (put >= 0) {
                bytes = bytes.subspan(static_cast<std::size_t>(put));
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET)
                throw BrokenPipeError("send: the peer closed its end of the pipe");
            if (errno != EAGAIN && errno != EWOULDBLOCK) detail::throw_errno("send");
            // The socket is full. Wait for room, and buffer what the peer sends meanwhile so a
            // peer that is itself blocked sending can make progress.
            const short events = peer_done_sending ? POLLOUT : POLLOUT | POLLIN;
            const int revents = detail::wait_for(fd_.get(), events, std::nullopt);
            if (revents < 0) detail::throw_errno("send: poll");
            if ((revents & POLLIN) && !peer_done_sending) {
                const ssize_t got = in_.fill(fd_.get(), /*nonblocking=*/true);
                if (got == 0) peer_done_sending = true;
            }
        }
    }

    detail::UniqueFd fd_;
    bool readable_ = false;
    bool writable_ = false;
    bool is_socket_ = false;
    detail::FrameReader in_;
    Buffer out_;
};

/// Two connected ends. Duplex (the default): both send and receive, over a Unix socketpair.
/// Simplex: `first` only receives and `second` only sends, over a pipe.
template <class T> std::pair<Connection<T>, Connection<T>> Pipe(bool duplex) {
    int fds[2];
    if (duplex) {
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) detail::throw_errno("socketpair");
        return {Connection<T>(fds[0], true, true, true), Connection<T>(fds[1], true, true, true)};
    }
    if (::pipe2(fds, O_CLOEXEC) != 0) detail::throw_errno("pipe2");
    return {Connection<T>(fds[0], true, false, false), Connection<T>(fds[1], false, true, false)};
}

}  // namespace mproc
