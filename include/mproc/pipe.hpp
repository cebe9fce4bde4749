// mproc — Pipe: two connected ends that send and receive whole typed messages.
//
//     auto [parent_conn, child_conn] = mproc::Pipe<std::string>();        // duplex (two pipes)
//     auto [reader, writer] = mproc::Pipe<std::string>(/*duplex=*/false);  // simplex (one pipe)
//
// Messages are framed with a 64-bit length, so any size goes through. A send to a closed peer
// throws mproc::BrokenPipeError and never raises SIGPIPE. A duplex send that finds its pipe full
// keeps reading what the peer sends into memory meanwhile, so two ends that both send large
// messages before reading do not deadlock.
//
// A duplex connection is a pair of pipes, one each way, rather than a socketpair: a pipe's write
// and read cost about half what a Unix socket's do, and a small message's round trip is mostly
// those four calls.
#pragma once

#include <cerrno>
#include <cstddef>
#include <fcntl.h>
#include <optional>
#include <poll.h>
#include <span>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include "detail/clock.hpp"
#include "detail/framing.hpp"
#include "detail/io.hpp"
#include "detail/unique_fd.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

template <class T = std::vector<std::byte>> class Connection;
template <class T = std::vector<std::byte>> std::pair<Connection<T>, Connection<T>> Pipe(bool duplex = true);

namespace detail {
/// The descriptor a connection writes to (-1 on a read-only or closed end): fileno() gives the one
/// it reads from. For mproc's own tests, which write raw bytes past the framing.
template <class T> int write_fileno(const Connection<T>& connection) noexcept;
}  // namespace detail

/// One end of a Pipe. Move-only; not safe for two threads at once (use one end per thread).
template <class T>
class Connection {
    // The wording matches require_serializable, and the compiler names T in the instantiation note.
    static_assert(is_serializable_v<T>, "mproc::Connection<T>: T cannot be serialised (see the type in the "
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
        const int revents = detail::wait_for(in_fd_.get(), POLLIN, detail::deadline_after(timeout));
        if (revents < 0) detail::throw_errno("poll");
        return revents != 0;
    }

    /// Closes this end. Further use throws mproc::Error.
    void close() noexcept {
        in_fd_.reset();
        out_fd_.reset();
        in_.clear();
    }
    bool closed() const noexcept { return !in_fd_ && !out_fd_; }
    bool readable() const noexcept { return readable_; }
    bool writable() const noexcept { return writable_; }
    /// The descriptor to wait on for incoming messages (for select/poll alongside other fds); on
    /// the write-only end of a simplex pipe, the one it writes to. -1 once closed.
    int fileno() const noexcept { return in_fd_ ? in_fd_.get() : out_fd_.get(); }

private:
    friend std::pair<Connection<T>, Connection<T>> Pipe<T>(bool duplex);
    friend int detail::write_fileno<T>(const Connection<T>& connection) noexcept;
    static constexpr std::size_t copy_limit = std::size_t{64} * 1024;

    /// Takes ownership of `in` (read from) and `out` (written to); -1 for a direction it lacks.
    Connection(int in, int out) : in_fd_(in), out_fd_(out), readable_(in >= 0), writable_(out >= 0) {}

    void require_open(const char* op) const {
        if (closed()) throw Error(std::string(op) + " on a closed connection");
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
            const ssize_t got = in_.fill(in_fd_.get());
            if (got == 0) in_.throw_end_of_stream(op);
            if (got < 0) detail::throw_errno(op);
        }
    }

    void write_all(std::span<const std::byte> bytes) {
        bool peer_done_sending = false;
        while (!bytes.empty()) {
            const ssize_t put = detail::write_some(out_fd_.get(), bytes.data(), bytes.size(), /*is_socket=*/false);
            if (put >= 0) {
                bytes = bytes.subspan(static_cast<std::size_t>(put));
                continue;
            }
            if (errno == EPIPE) throw BrokenPipeError("send: the peer closed its end of the pipe");
            if (errno != EAGAIN && errno != EWOULDBLOCK) detail::throw_errno("send");
            // A duplex end's pipe is full (only its write end is non-blocking). Wait for room, and
            // buffer what the peer sends meanwhile so a peer that is itself blocked sending can
            // make progress.
            pollfd fds[2] = {{out_fd_.get(), POLLOUT, 0}, {in_fd_.get(), peer_done_sending ? short{0} : short{POLLIN}, 0}};
            if (detail::poll_all(fds, 2, std::nullopt) < 0) detail::throw_errno("send: poll");
            if ((fds[1].revents & (POLLIN | POLLHUP)) != 0 && !peer_done_sending) {
                // poll saw bytes (or the end): this read does not block.
                const ssize_t got = in_.fill(in_fd_.get());
                if (got == 0) peer_done_sending = true;
                else if (got < 0) detail::throw_errno("send: reading the peer's messages");
            }
        }
    }

    detail::UniqueFd in_fd_;
    detail::UniqueFd out_fd_;
    bool readable_ = false;
    bool writable_ = false;
    detail::FrameReader in_;
    Buffer out_;
};

template <class T> int detail::write_fileno(const Connection<T>& connection) noexcept {
    return connection.out_fd_.get();
}

/// Two connected ends. Duplex (the default): both send and receive, over two pipes, one each way.
/// Simplex: `first` only receives and `second` only sends, over one pipe.
template <class T>
std::pair<Connection<T>, Connection<T>> Pipe(bool duplex) {
    int forth[2];
    if (::pipe2(forth, O_CLOEXEC) != 0) detail::throw_errno("pipe2");
    detail::UniqueFd forth_in(forth[0]), forth_out(forth[1]);
    if (!duplex) return {Connection<T>(forth_in.release(), -1), Connection<T>(-1, forth_out.release())};
    int back[2];
    if (::pipe2(back, O_CLOEXEC) != 0) detail::throw_errno("pipe2");
    detail::UniqueFd back_in(back[0]), back_out(back[1]);
    // A duplex end that finds its pipe full reads the peer's messages while it waits (write_all):
    // its writes must not block. O_NONBLOCK belongs to the write end alone, which only this end uses.
    for (int fd : {forth[1], back[1]})
        if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) detail::throw_errno("fcntl(O_NONBLOCK)");
    return {Connection<T>(back_in.release(), forth_out.release()), Connection<T>(forth_in.release(), back_out.release())};
}

}  // namespace mproc
