// mproc — Pipe: two connected ends that send and receive whole typed messages.
//
//     auto [parent_conn, child_conn] = mproc::Pipe<std::string>();        // duplex (socketpair)
//     auto [reader, writer] = mproc::Pipe<std::string>(/*duplex=*/false);  // simplex (a pipe, and a lane)
//
// Messages are framed with a 64-bit length, so any size goes through. A send to a closed peer
// throws mproc::BrokenPipeError and never raises SIGPIPE. A duplex send that finds the socket full
// keeps reading what the peer sends into memory meanwhile, so two ends that both send large
// messages before reading do not deadlock. A duplex connection also carries file descriptors
// (send_fd / recv_fd, SCM_RIGHTS), each as a message of its own, in order with the others.
//
// A simplex pipe has a *bulk lane* beside it: a Unix socket, one way, that carries the bytes of its
// large messages (lane_min and up) while the pipe carries a bulk frame in their place — the
// message's turn, length and tag (framing.hpp). A pipe moves large messages at half a socket's
// speed (its pages are allocated and freed 4 KiB at a time), and a socket's small ones take longer
// than a pipe's; the lane gives a simplex end both, and the pipe never has to be enlarged. The
// bytes in the lane sit between two copies of the same tag, which the reader checks: a writer that
// died half-way through a message, while another process kept the same end and sent on, leaves
// bytes in the lane that no frame claims, and the reader says so (SerializationError) instead of
// handing them out, or a mix of them and the next message's, as a message.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <optional>
#include <poll.h>
#include <sched.h>
#include <span>
#include <string>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/os/cpu.hpp"
#include "detail/os/end_turns.hpp"
#include "detail/os/fd_passing.hpp"
#include "detail/os/framing.hpp"
#include "detail/os/io.hpp"
#include "detail/os/random.hpp"
#include "detail/os/unique_fd.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

/// An owned file descriptor, closed once (what Connection::recv_fd returns). Move-only:
/// get(), release(), reset(fd), and `if (fd)` for "holds one".
using UniqueFd = detail::UniqueFd;

/// recv_bytes_into: the next message is longer than the room the buffer has past the offset.
/// Nothing is received: the message stays first in the connection, for a larger buffer or for
/// recv_bytes(). (Python's BufferTooShort carries the message instead, having consumed it.)
class BufferTooShort : public Error {
public:
    BufferTooShort(std::size_t message_size, std::size_t room)
        : Error("recv_bytes_into: the next message has " + std::to_string(message_size) +
                " bytes and the buffer has room for " + std::to_string(room) + "; the message stays in the connection"),
          message_size_(message_size) {}
    /// The size of the message that did not fit.
    std::size_t message_size() const noexcept { return message_size_; }

private:
    std::size_t message_size_;
};

class Waitable;
template <class T = std::vector<std::byte>> class Connection;
template <class T = std::vector<std::byte>> std::pair<Connection<T>, Connection<T>> Pipe(bool duplex = true);

/// One end of a Pipe. Move-only. Every call is safe from any thread (a move or the destructor, with
/// no thread inside a call): threads that share an end take turns a whole message at a time (sends
/// among sends, receives among receives), and close() from another thread ends it for every later
/// call (detail/os/end_turns.hpp).
template <class T> class Connection {
    // The wording matches require_serializable, and the compiler names T in the instantiation note.
    static_assert(is_serializable_v<T>,
                  "mproc::Connection<T>: T cannot be serialised (see the type in the "
                  "instantiation note)");

public:
    Connection() = default;
    // Noexcept because every member's move is (test_pipe checks them): none allocates as it moves.
    Connection(Connection&&) noexcept = default;
    Connection& operator=(Connection&&) noexcept = default;

    /// Sends one message. Serialisation errors surface here, before anything is written.
    void send(const T& value) {
        require_writable("send");
        const Turn turn(*this, Side::send, "send");
        detail::begin_frame(out_);
        encode_into(out_, value);
        const std::size_t length = out_.size() - detail::frame_header_size;
        if (by_lane(length)) return send_by_lane(out_.bytes().subspan(detail::frame_header_size));
        detail::finish_frame(out_);
        write_all(out_.bytes());
    }

    /// Receives one message; blocks until it has arrived whole.
    /// Throws EOFError when the peers are closed and nothing is left, SerializationError when the
    /// bytes do not decode (the message is dropped and the stream stays usable).
    T recv() {
        require_readable("recv");
        const Turn turn(*this, Side::receive, "recv");
        const auto frame = next_data_frame("recv");
        if (const auto length = in_.next_bulk_length()) {
            // The message is taken before it is decoded: one that does not decode is dropped.
            Buffer bytes;
            read_lane_into(bytes, *length, frame, "recv");
            return decode<T>(bytes.bytes());
        }
        try {
            T value = decode<T>(frame);
            in_.consume(frame);
            return value;
        } catch (...) {
            in_.consume(frame);  // a message that does not decode is dropped; the stream stays usable
            throw;
        }
    }

    /// Sends `size` bytes of `bytes` from `offset` (all the rest by default) as one message, as
    /// Python's send_bytes(buf, offset, size) does. A range past the end of `bytes` throws
    /// mproc::Error and sends nothing.
    void send_bytes(std::span<const std::byte> bytes, std::size_t offset, std::optional<std::size_t> size = {}) {
        if (offset > bytes.size())
            throw Error("send_bytes: offset " + std::to_string(offset) + " is past the end of a " +
                        std::to_string(bytes.size()) + "-byte buffer");
        const std::size_t left = bytes.size() - offset;
        if (size && *size > left)
            throw Error("send_bytes: " + std::to_string(*size) + " bytes from offset " + std::to_string(offset) +
                        " run past the end of a " + std::to_string(bytes.size()) + "-byte buffer");
        send_bytes(bytes.subspan(offset, size.value_or(left)));
    }

    /// Sends raw bytes as one message, read back whole by recv_bytes(). The bytes go out in
    /// place, behind the frame's header, in one system call (no copy).
    void send_bytes(std::span<const std::byte> bytes) {
        require_writable("send_bytes");
        const Turn turn(*this, Side::send, "send_bytes");
        if (by_lane(bytes.size())) return send_by_lane(bytes);
        std::byte header[detail::frame_header_size];
        const std::uint64_t length = bytes.size();
        std::memcpy(header, &length, sizeof length);
        write_all(header, bytes);
    }

    /// Receives one message sent with send_bytes() (or send()) as raw bytes.
    std::vector<std::byte> recv_bytes() {
        require_readable("recv_bytes");
        const Turn turn(*this, Side::receive, "recv_bytes");
        for (;;) {
            if (in_.buffered_frame()) break;
            if (const auto length = in_.partial_payload(direct_read_min, direct_read_max)) {
                // A large message whose header is here: the rest of it is read straight into the
                // value (one copy, and no read that takes the next messages with it).
                std::vector<std::byte> bytes(*length);
                read_rest_into(bytes.data(), *length, "recv_bytes");
                return bytes;
            }
            fill_once("recv_bytes");
        }
        const auto frame = next_data_frame("recv_bytes");
        if (const auto length = in_.next_bulk_length()) {
            std::vector<std::byte> bytes;
            read_lane_into(bytes, *length, frame, "recv_bytes");
            return bytes;
        }
        std::vector<std::byte> bytes(frame.begin(), frame.end());
        in_.consume(frame);
        return bytes;
    }

    /// Receives one message into `buffer` from `offset` on, as Python's recv_bytes_into does, and
    /// returns its size. A message longer than the room left throws mproc::BufferTooShort and
    /// stays in the connection (nothing is received); an offset past the end throws mproc::Error
    /// before anything is read.
    std::size_t recv_bytes_into(std::span<std::byte> buffer, std::size_t offset = 0) {
        require_readable("recv_bytes_into");
        if (offset > buffer.size())
            throw Error("recv_bytes_into: offset " + std::to_string(offset) + " is past the end of a " +
                        std::to_string(buffer.size()) + "-byte buffer");
        const Turn turn(*this, Side::receive, "recv_bytes_into");
        const auto frame = next_data_frame("recv_bytes_into");
        const std::size_t room = buffer.size() - offset;
        if (const auto length = in_.next_bulk_length()) {
            // A frame no lane can serve (none, or out of step) is an error below, whatever its size.
            const bool fits = *length <= room;
            if (!fits && lane_ && !lane_out_of_step_) throw BufferTooShort(static_cast<std::size_t>(*length), room);
            struct Into {  // the caller's room, already the message's size
                std::span<std::byte> room;
                std::byte* data() const noexcept { return room.data(); }
                std::size_t size() const noexcept { return room.size(); }
                void resize(std::size_t) const noexcept {}
            } into{fits ? buffer.subspan(offset, static_cast<std::size_t>(*length)) : std::span<std::byte>()};
            read_lane_into(into, *length, frame, "recv_bytes_into");
            return into.size();
        }
        if (frame.size() > room) throw BufferTooShort(frame.size(), room);
        if (!frame.empty()) std::memcpy(buffer.data() + offset, frame.data(), frame.size());
        in_.consume(frame);
        return frame.size();
    }

    /// Sends a copy of the open descriptor `descriptor` (SCM_RIGHTS), as one message that the
    /// peer receives with recv_fd(); `descriptor` stays open here. Python's
    /// reduction.send_handle. Only over a duplex Pipe (a Unix socket): on a simplex pipe's end,
    /// or with a descriptor that is not open, it throws mproc::Error and sends nothing; to a
    /// closed peer, BrokenPipeError (never SIGPIPE).
    void send_fd(int descriptor) {
        require_writable("send_fd");
        require_socket("send_fd");
        if (descriptor < 0 || ::fcntl(descriptor, F_GETFD) < 0)
            throw Error("send_fd: " + std::to_string(descriptor) + " is not an open descriptor");
        const Turn turn(*this, Side::send, "send_fd");
        std::byte header[detail::frame_header_size];
        std::memcpy(header, &detail::descriptor_frame, sizeof header);
        RoomWait room;
        for (;;) {
            const ssize_t put = detail::send_some_with_fd(fd_.get(), header, sizeof header, descriptor, MSG_DONTWAIT);
            if (put >= 0) {  // the descriptor went with the first byte; the rest is plain bytes
                write_all(std::span<const std::byte>(header).subspan(static_cast<std::size_t>(put)));
                return;
            }
            if (errno == EPIPE || errno == ECONNRESET)
                throw BrokenPipeError("send_fd: the peer closed its end of the pipe");
            if (errno != EAGAIN && errno != EWOULDBLOCK) detail::throw_errno("send_fd");
            wait_for_room(room);
        }
    }

    /// Receives a descriptor sent with send_fd(): a new descriptor (close-on-exec) for the same
    /// open file, owned by the caller. Python's reduction.recv_handle. Blocks until it arrives;
    /// EOFError when the peers are closed and nothing is left. The next message must be a
    /// descriptor: one sent with send() or send_bytes() throws mproc::Error and stays there
    /// (and recv() of a descriptor's message likewise). Only over a duplex Pipe.
    UniqueFd recv_fd() {
        require_readable("recv_fd");
        require_socket("recv_fd");
        const Turn turn(*this, Side::receive, "recv_fd");
        const auto frame = next_frame("recv_fd");
        if (!in_.next_is_descriptor())
            throw Error("recv_fd: the next message is not a descriptor (it was sent with send or send_bytes)");
        in_.consume(frame);
        if (descriptors_.empty()) throw Error("recv_fd: a descriptor message arrived without its descriptor");
        UniqueFd received = std::move(descriptors_.front());
        descriptors_.pop_front();
        return received;
    }

    /// Whether there is something to read. Without a timeout it does not wait (like Python's poll);
    /// with one it waits up to that long. End of stream counts as readable (recv will throw).
    /// While another thread receives from this end, poll waits for its turn within the timeout,
    /// and says false if it does not come.
    bool poll(std::optional<Seconds> timeout = Seconds{0}) {
        require_readable("poll");
        detail::check_timeout(timeout);
        const detail::Deadline deadline = detail::deadline_after(timeout);
        const Turn turn(*this, Side::receive, "poll", deadline);
        if (!turn.held()) return false;
        if (in_.buffered_frame()) return true;
        const int revents = detail::wait_for(fd_.get(), POLLIN, deadline);
        if (revents < 0) detail::throw_errno("poll");
        return revents != 0;
    }

    /// Closes this end (and any descriptor received but not yet taken with recv_fd). Further use
    /// throws mproc::Error. A call of another thread waiting for its turn fails at once; one in its
    /// turn goes on to its end (a receive waiting for a message is not woken), and the last call to
    /// leave releases the descriptors.
    void close() noexcept {
        if (turns_.close()) release();
    }
    bool closed() const noexcept { return turns_.closed(); }
    bool readable() const noexcept { return readable_; }
    bool writable() const noexcept { return writable_; }
    /// The underlying descriptor (for select/poll alongside other fds); -1 once closed.
    int fileno() const noexcept { return turns_.descriptor(); }

private:
    friend std::pair<Connection<T>, Connection<T>> Pipe<T>(bool duplex);
    friend class Waitable;

    Connection(detail::UniqueFd fd, bool readable, bool writable, bool is_socket, detail::UniqueFd lane = {})
        : fd_(std::move(fd)), lane_(std::move(lane)), turns_(fd_.get()), readable_(readable), writable_(writable),
          is_socket_(is_socket) {}

    using Side = detail::EndTurns::Side;
    /// A send or a receive (or a poll) for its whole length: counted inside the end, so that
    /// close() from another thread leaves the descriptors to the last call inside to release, and
    /// holding its direction's turn. Throws if the end is closed, also while it waits for its turn;
    /// with a `deadline`, a turn that does not come by then leaves it not held().
    class Turn {
    public:
        Turn(Connection& end, Side side, const char* op, const detail::Deadline& deadline = std::nullopt)
            : end_(end), side_(side) {
            switch (end.turns_.enter(side, deadline)) {
                case detail::EndTurns::Entry::in: held_ = true; return;
                case detail::EndTurns::Entry::timed_out: return;
                case detail::EndTurns::Entry::closed_last: end.release(); [[fallthrough]];
                case detail::EndTurns::Entry::closed: break;
            }
            throw_closed(op);
        }
        ~Turn() {
            if (held_ && end_.turns_.leave(side_)) end_.release();
        }
        Turn(const Turn&) = delete;
        Turn& operator=(const Turn&) = delete;
        bool held() const noexcept { return held_; }

    private:
        Connection& end_;
        Side side_;
        bool held_ = false;
    };
    /// Lets go of the descriptors: once closed, with no call inside.
    void release() noexcept {
        fd_.reset();
        lane_.reset();
        in_.clear();
        descriptors_.clear();
    }
    /// Whether a whole message is buffered, for mproc::wait: false while another thread receives.
    bool buffered_now() noexcept {
        if (!turns_.enter()) return false;
        bool buffered = false;
        if (turns_.try_take(Side::receive)) {
            buffered = !turns_.closed() && in_.buffered_frame().has_value();
            turns_.give_back(Side::receive);
        }
        if (turns_.leave()) release();
        return buffered;
    }
    /// mproc::wait's hold on this end for the length of its wait (Waitable::hold): counted inside,
    /// so that close() from another thread leaves the descriptor open until leave_wait().
    int enter_wait() {
        require_readable("wait");
        if (!turns_.enter()) throw_closed("wait");
        return fd_.get();
    }
    void leave_wait() noexcept {
        if (turns_.leave()) release();
    }
    [[noreturn]] static void throw_closed(const char* op) { throw Error(std::string(op) + " on a closed connection"); }

    void require_open(const char* op) const {
        if (turns_.closed()) throw_closed(op);
    }
    void require_writable(const char* op) const {
        require_open(op);
        if (!writable_) throw Error(std::string(op) + " on the read-only end of a simplex pipe");
    }
    void require_readable(const char* op) const {
        require_open(op);
        if (!readable_) throw Error(std::string(op) + " on the write-only end of a simplex pipe");
    }
    void require_socket(const char* op) const {
        if (!is_socket_)
            throw Error(std::string(op) +
                        ": descriptors travel only over a duplex Pipe (a Unix socket), and this end is a simplex pipe");
    }

    std::span<const std::byte> next_frame(const char* op) {
        for (;;) {
            if (auto frame = in_.buffered_frame()) return *frame;
            fill_once(op);
        }
    }
    /// One read into the frame reader; the end of the stream throws. While the peer streams, the
    /// next bytes are awaited awake first (see watch_for_bytes).
    void fill_once(const char* op) {
        const std::int64_t since = detail::monotonic_ns();
        const bool one_cpu = detail::on_one_cpu(since);
        const bool watched = watch_ && !one_cpu;
        const bool caught = watched && watch_for_bytes(fd_.get());
        check_read(in_.fill(fd_.get(), false, is_socket_ ? &descriptors_ : nullptr), op);
        // On one CPU there is no watch, and how long the wait took does not matter: one clock
        // read a receive (each costs tens of nanoseconds in a virtual machine, three did before).
        if (one_cpu) return;
        // Watch next time if the bytes came while watching, or, with no watch, soon enough that
        // one would have caught them. A watch that missed is not tried again until then: a peer
        // that sends now and then is waited for asleep, and costs at most every other watch.
        watch_ = caught ||
                 (!watched && detail::monotonic_ns() - since <= 2 * std::chrono::nanoseconds(watch_budget).count());
    }
    /// A read's result: the end of the stream (EOFError, or a truncated frame's SerializationError)
    /// and errors throw, with what is buffered dropped at the end and kept otherwise.
    void check_read(ssize_t got, const char* op) {
        if (got == 0 || (got < 0 && errno == ECONNRESET)) in_.throw_end_of_stream(op);
        if (got < 0) detail::throw_errno(op);
    }
    /// Whether the next wait for bytes watches first (see watch_for_bytes). On a thread pinned to
    /// one CPU (and so, most likely, the peer with it), never (detail::on_one_cpu).
    bool watching() noexcept { return watch_ && !detail::on_one_cpu(); }
    /// A reader that sleeps in read(2) while its peer streams is woken for each write, and the
    /// kernel then runs both on one core, taking turns (a pipe's wake-up pulls the reader to the
    /// writer's core): 4 KiB messages moved at half the speed of two busy cores. So, while the
    /// last wait was short, the reader watches the descriptor (poll, no wait) for up to
    /// watch_budget before it sleeps, yielding between looks: a peer on the same core runs in
    /// those yields, one on another core is caught as it writes. Returns whether the bytes came.
    bool watch_for_bytes(int fd) noexcept {
        const std::int64_t until = detail::monotonic_ns() + std::chrono::nanoseconds(watch_budget).count();
        for (;;) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, 0) != 0) return true;
            if (detail::monotonic_ns() >= until) return false;
            ::sched_yield();
        }
    }
    /// The next frame's header is buffered, its payload `length` bytes and partly here: moves that
    /// part to `dst`, then reads the rest straight after it. A read that fails puts the frame back
    /// in the frame reader as far as it came, which then reports it as fill_once does: the end of
    /// the stream half-way is a truncated frame, and after any other error (EAGAIN on a descriptor
    /// made non-blocking, say) the next receive goes on with it.
    void read_rest_into(std::byte* dst, std::size_t length, const char* op) {
        in_.reserve_frame(length);  // room to put it back: taken before anything moves
        std::size_t have = in_.take_partial(dst);
        bool again = false;
        while (have < length) {
            if (again && watching()) (void)watch_for_bytes(fd_.get());  // a socket's message comes in pieces
            const ssize_t got = detail::FrameReader::read_into(fd_.get(), dst + have, length - have,
                                                               is_socket_ ? &descriptors_ : nullptr);
            if (got <= 0) {
                const int error = errno;
                in_.restore_partial(length, dst, have);
                errno = error;
                check_read(got, op);
            }
            have += static_cast<std::size_t>(got);
            again = true;
        }
    }
    /// The next frame, which must carry bytes: a descriptor's is left for recv_fd.
    std::span<const std::byte> next_data_frame(const char* op) {
        const auto frame = next_frame(op);
        if (in_.next_is_descriptor())
            throw Error(std::string(op) +
                        ": the next message is a descriptor (sent with send_fd); receive it with recv_fd");
        return frame;
    }

    /// Whether a message of `bytes` goes by the bulk lane: a simplex pipe's large ones.
    bool by_lane(std::size_t bytes) const noexcept { return lane_ && bytes >= lane_min; }

    /// Sends `payload` by the bulk lane between two copies of a fresh tag, and its bulk frame by
    /// the pipe. What the lane takes at once goes first, so that the reader, woken by the frame,
    /// finds the bytes there (frame first would wake it twice); the rest follows as the reader
    /// drains the lane. The tag is this process's id and a count: a writer that dies (or fails)
    /// between its first bytes and its last leaves bytes that the reader finds under no tag of its
    /// frames — before its frame, where the next message's first tag should be; after it, where
    /// its own last tag should be. The count starts at a random number in each process that sends
    /// (a forked child inherits its parent's count): a writer given the id of a dead one, which
    /// inherited the same count from the same parent, does not repeat its tags.
    void send_by_lane(std::span<const std::byte> payload) {
        if (payload.size() > grown_for_ && !kernel_buffer_at_limit_) grow_kernel_buffer(payload.size());
        const auto pid = static_cast<std::uint32_t>(::getpid());
        if (pid != lane_pid_) {
            lane_pid_ = pid;
            lane_count_ = static_cast<std::uint32_t>(detail::random_u64());
        }
        const std::uint64_t tag = (std::uint64_t{pid} << 32) | ++lane_count_;
        std::byte tag_bytes[detail::bulk_tag_size];
        std::memcpy(tag_bytes, &tag, sizeof tag);
        const std::array parts{std::span<const std::byte>(tag_bytes), payload, std::span<const std::byte>(tag_bytes)};
        const std::size_t sent = write_parts(lane_.get(), parts, 0, /*once=*/true);
        std::byte frame[detail::frame_header_size + detail::bulk_tag_size];
        const std::uint64_t header = detail::bulk_header(payload.size());
        std::memcpy(frame, &header, sizeof header);
        std::memcpy(frame + sizeof header, &tag, sizeof tag);
        write_all(frame);
        write_parts(lane_.get(), parts, sent);
    }

    /// The next frame (`frame`, in the stream: its tag) is a bulk frame of `length` bytes: drops
    /// it and reads its bytes from the lane, between their two tags, into `out` (resized to them).
    /// Room for up to lane_trusted bytes is found before the frame is dropped, so a receive that
    /// cannot allocate it leaves the message where it was; past that, room grows only as the
    /// bytes arrive, so a length that lies costs at most that much memory (and a message larger
    /// than that whose room cannot be found is dropped, with the error). A lane that ends first
    /// (the writer died in the middle of the message) is a truncated frame. A tag that is not the
    /// frame's means bytes no frame claims are in the lane: the message is not handed out, the
    /// lane is out of step for good (shut for reading, so writers get BrokenPipeError rather than
    /// fill it), and this and every later large message throw SerializationError (small ones
    /// still arrive). A receive that fails half-way otherwise drains the rest of the message.
    template <class Bytes>
    void read_lane_into(Bytes& out, std::uint64_t length, std::span<const std::byte> frame, const char* op) {
        if (!lane_ || lane_out_of_step_) {
            in_.consume(frame);
            throw SerializationError(
                std::string(op) + (lane_ ? lane_out_of_step : ": a bulk frame on a connection that has no bulk lane"));
        }
        std::byte expected[detail::bulk_tag_size];
        std::memcpy(expected, frame.data(), sizeof expected);
        out.resize(static_cast<std::size_t>(std::min<std::uint64_t>(length, lane_trusted)));
        in_.consume(frame);
        std::byte first[detail::bulk_tag_size], last[detail::bulk_tag_size];
        std::size_t first_have = 0, last_have = 0;
        std::uint64_t have = 0;
        const auto out_of_step = [&] {
            mark_lane_out_of_step();
            throw SerializationError(std::string(op) + lane_out_of_step);
        };
        try {
            bool again = false;
            while (last_have < sizeof last) {
                if (have == out.size() && have < length)
                    out.resize(static_cast<std::size_t>(std::min<std::uint64_t>(length, 2 * have)));
                if (again && watching()) (void)watch_for_bytes(lane_.get());
                iovec pieces[3];
                int count = 0;
                if (first_have < sizeof first) pieces[count++] = {first + first_have, sizeof first - first_have};
                if (have < out.size())
                    pieces[count++] = {out.data() + have, static_cast<std::size_t>(out.size() - have)};
                if (out.size() == length) pieces[count++] = {last + last_have, sizeof last - last_have};
                ssize_t got;
                do got = ::readv(lane_.get(), pieces, count);
                while (got < 0 && errno == EINTR);
                if (got == 0 || (got < 0 && errno == ECONNRESET))
                    throw SerializationError(std::string(op) + ": truncated frame: the peer closed after " +
                                             std::to_string(have) + " bytes of a " + std::to_string(length) +
                                             "-byte message");
                if (got < 0) detail::throw_errno(op);
                auto done = static_cast<std::size_t>(got);
                if (first_have < sizeof first) {
                    const std::size_t n = std::min(done, sizeof first - first_have);
                    first_have += n;
                    done -= n;
                    if (first_have == sizeof first && std::memcmp(first, expected, sizeof first) != 0) out_of_step();
                }
                const auto to_payload = static_cast<std::size_t>(std::min<std::uint64_t>(done, out.size() - have));
                have += to_payload;
                last_have += done - to_payload;
                again = true;
            }
            if (std::memcmp(last, expected, sizeof last) != 0) out_of_step();
        } catch (const SerializationError&) {
            throw;  // the lane is at its end, or out of step: nothing to drain
        } catch (...) {
            if (!lane_out_of_step_ &&
                !drain_lane(sizeof first - first_have + (length - have) + (sizeof last - last_have)))
                mark_lane_out_of_step();
            throw;
        }
    }
    /// The lane holds bytes no frame claims, or may: no large message is read from it any more,
    /// and it is shut for reading, so writers' large sends throw BrokenPipeError rather than wait
    /// for room nobody will make.
    void mark_lane_out_of_step() noexcept {
        lane_out_of_step_ = true;
        (void)::shutdown(lane_.get(), SHUT_RD);
    }
    /// Reads `left` bytes from the lane and drops them; false if the lane failed first.
    bool drain_lane(std::uint64_t left) noexcept {
        std::byte sink[4096];
        while (left > 0) {
            const ssize_t got = detail::read_some(lane_.get(), sink,
                                                  static_cast<std::size_t>(std::min<std::uint64_t>(left, sizeof sink)));
            if (got <= 0) return false;
            left -= static_cast<std::uint64_t>(got);
        }
        return true;
    }
    static constexpr const char* lane_out_of_step =
        ": the bulk lane holds bytes no message claims (a writer died, or failed, in the middle of a large "
        "message while another process kept the same end): large messages cannot be received from this "
        "connection any more";

    /// Writes `head` then `body` whole by this end's descriptor. A socket's send buffer is first
    /// grown for a large message (grow_kernel_buffer); a pipe carries only small frames.
    void write_all(std::span<const std::byte> head, std::span<const std::byte> body = {}) {
        const std::size_t total = head.size() + body.size();
        if (is_socket_ && total > grown_for_ && !kernel_buffer_at_limit_) grow_kernel_buffer(total);
        write_parts(fd_.get(), std::array{head, body});
    }

    /// Sends `parts` by `fd` (this end's descriptor, or its lane) from `done` bytes into them, one
    /// writev/sendmsg at a time, and returns how many of their bytes are sent. With `once`, sends
    /// what `fd` takes without waiting, and returns. Otherwise sends them all: a duplex end that
    /// also receives waits for room while buffering what its peer sends (wait_for_room), so two
    /// ends that both send before reading do not deadlock; any other blocks in its write.
    template <std::size_t N>
    std::size_t write_parts(int fd, const std::array<std::span<const std::byte>, N>& parts, std::size_t done = 0,
                            bool once = false) {
        const bool on_lane = fd != fd_.get();
        const bool is_socket = on_lane || is_socket_;
        const bool drain_peer = !on_lane && is_socket_ && readable_;
        iovec pieces[N];
        int count = 0;
        for (const std::span<const std::byte> part : parts)
            if (!part.empty()) pieces[count++] = {const_cast<std::byte*>(part.data()), part.size()};
        iovec* left = pieces;
        const auto skip = [&](std::size_t n) {  // the first n bytes of what is left are sent
            for (; n > 0; ++left, --count) {
                if (n < left->iov_len) {
                    left->iov_base = static_cast<std::byte*>(left->iov_base) + n;
                    left->iov_len -= n;
                    return;
                }
                n -= left->iov_len;
            }
        };
        skip(done);
        RoomWait room;
        while (count > 0) {
            const ssize_t put = detail::write_some(fd, left, count, is_socket, once || drain_peer);
            if (put >= 0) {
                done += static_cast<std::size_t>(put);
                skip(static_cast<std::size_t>(put));
                if (once) break;
                continue;
            }
            if (errno == EPIPE || errno == ECONNRESET)
                throw BrokenPipeError("send: the peer closed its end of the pipe");
            if (errno != EAGAIN && errno != EWOULDBLOCK) detail::throw_errno("send");
            if (once) break;
            if (on_lane) detail::throw_errno("send (bulk lane)");  // it blocks: room is not waited for here
            wait_for_room(room);
        }
        return done;
    }

    /// A message of `bytes` is larger than the kernel holds for this end: grows the send buffer
    /// of its socket (a simplex end's lane) so that a few are in flight (detail::grow_socket_buffer),
    /// which takes most of the system calls and wake-ups out of moving large messages. Sized by
    /// the messages actually sent, so small-message connections keep the kernel's defaults.
    void grow_kernel_buffer(std::size_t bytes) noexcept {
        // What the buffer now holds is what it was sized for: messages up to that size do not ask again.
        const std::size_t want = std::min(bytes * 4, detail::largest_socket_buffer);
        const std::size_t now = detail::grow_socket_buffer(lane_ ? lane_.get() : fd_.get(), bytes);
        kernel_buffer_at_limit_ = now < want;
        grown_for_ = std::max(bytes, now / 4);
    }

    /// A send's wait for room in a full socket (wait_for_room), across its turns.
    struct RoomWait {
        bool peer_done_sending = false;  // the peer's end of the stream was read: room is all there is to wait for
        bool reader_busy = false;        // another thread held the receive turn when the peer's bytes came
    };
    /// The socket is full: waits for room, and buffers what the peer sends meanwhile (and the
    /// descriptors that come with it) so a peer that is itself blocked sending can make progress.
    /// The wait holds no turn. The peer's bytes are read only in this end's receive turn, taken
    /// at once and held for that read alone: a thread that receives is never kept waiting by a
    /// send, and while one holds the turn (it reads them itself), this one waits for room alone,
    /// in slices, looking again for the peer's bytes after each.
    void wait_for_room(RoomWait& wait) {
        const bool busy = std::exchange(wait.reader_busy, false);
        const bool watch_input = !wait.peer_done_sending && !busy;
        const int revents = detail::wait_for(fd_.get(), watch_input ? POLLOUT | POLLIN : POLLOUT,
                                             busy ? detail::deadline_after(room_slice) : detail::Deadline{});
        if (revents < 0) detail::throw_errno("send: poll");
        if (!(revents & POLLIN) || !watch_input) return;
        if (!turns_.try_take(Side::receive)) {
            wait.reader_busy = true;
            return;
        }
        struct GiveBack {
            detail::EndTurns& turns;
            ~GiveBack() { turns.give_back(Side::receive); }
        } const give_back{turns_};
        if (in_.fill(fd_.get(), /*nonblocking=*/true, &descriptors_) == 0) wait.peer_done_sending = true;
    }

    // Messages of up to a megabyte whose header has arrived and a page or more of the rest has not
    // are read straight into their destination (read_rest_into); the others come through the
    // frame reader: small ones many to a read, larger ones as the bytes arrive.
    static constexpr std::size_t direct_read_min = 4096;
    static constexpr std::size_t direct_read_max = std::size_t{1} << 20;
    static constexpr std::chrono::microseconds watch_budget{30};  // see watch_for_bytes
    static constexpr std::chrono::milliseconds room_slice{10};     // see wait_for_room
    // A simplex pipe's messages of lane_min bytes and more go by its bulk lane; a reader finds
    // room for up to lane_trusted bytes of one at once (read_lane_into).
    static constexpr std::size_t lane_min = std::size_t{16} << 10;
    static constexpr std::size_t lane_trusted = std::size_t{64} << 20;

    detail::UniqueFd fd_;
    detail::UniqueFd lane_;  // a simplex pipe's bulk lane: a socket, this end's direction only
    detail::EndTurns turns_;  // which threads are inside, and whose turn it is to send and to receive
    std::uint32_t lane_pid_ = 0;     // the process that counts in lane_count_ (0: none yet)
    std::uint32_t lane_count_ = 0;   // its messages sent by the lane, from a random start (their tags' low half)
    bool lane_out_of_step_ = false;  // the reader found bytes in the lane no frame claims
    bool readable_ = false;
    bool writable_ = false;
    bool is_socket_ = false;
    detail::FrameReader in_;
    detail::DescriptorQueue descriptors_;  // received with the stream's bytes, for recv_fd
    Buffer out_;
    // The largest message the send buffer of this end's socket (its own, or its lane's) was sized
    // for; a buffer that cannot grow further (its limit, or the kernel refused) is not asked again.
    std::size_t grown_for_ = detail::default_pipe_capacity;
    bool kernel_buffer_at_limit_ = false;
    bool watch_ = true;  // the next fill watches for bytes before it sleeps (fill_once)
};

/// Two connected ends. Duplex (the default): both send and receive, over a Unix socketpair.
/// Simplex: `first` only receives and `second` only sends, over a pipe, with a bulk lane beside it
/// for large messages (a socketpair, each end shut down the other way): four descriptors.
template <class T> std::pair<Connection<T>, Connection<T>> Pipe(bool duplex) {
    int fds[2];
    if (duplex) {
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) detail::throw_errno("socketpair");
        detail::UniqueFd one(fds[0]), other(fds[1]);  // owned before a Connection may fail to be made
        return {Connection<T>(std::move(one), true, true, true), Connection<T>(std::move(other), true, true, true)};
    }
    if (::pipe2(fds, O_CLOEXEC) != 0) detail::throw_errno("pipe2");
    detail::UniqueFd read_end(fds[0]), write_end(fds[1]);
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) detail::throw_errno("socketpair");
    detail::UniqueFd lane_in(fds[0]), lane_out(fds[1]);
    (void)::shutdown(lane_in.get(), SHUT_WR);
    (void)::shutdown(lane_out.get(), SHUT_RD);
    return {Connection<T>(std::move(read_end), true, false, false, std::move(lane_in)),
            Connection<T>(std::move(write_end), false, true, false, std::move(lane_out))};
}

}  // namespace mproc
