// mproc — length-prefixed frames on a byte stream (pipe or stream socket).
//
// A frame is a 64-bit length followed by that many bytes. The reader buffers what the stream
// delivers and hands out whole frames; it grows its buffer only as bytes actually arrive, so a
// corrupt length cannot make it allocate more than twice what the peer really sent.
//
// A descriptor frame is a header alone whose top bit is set (descriptor_frame): over a Unix
// socket it is sent with one descriptor attached (SCM_RIGHTS), which the reader, filling with a
// descriptor queue, keeps in arrival order; frames and descriptors thus pair up in order.
//
// A bulk frame (a simplex Pipe's large message) is a header with bit 62 set and the payload's
// length in the bits below, and an 8-byte tag: the payload travels by the connection's bulk
// lane, a socket beside the pipe, between two copies of the same tag, in the order of the bulk frames (see
// Connection in pipe.hpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <sys/socket.h>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "io.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

inline constexpr std::size_t frame_header_size = sizeof(std::uint64_t);
/// The header of a descriptor frame (no payload; a descriptor travels with it).
inline constexpr std::uint64_t descriptor_frame = std::uint64_t{1} << 63;

/// The flag of a bulk frame's header: its payload (the length in the bits below) comes by the
/// lane; in the stream, the frame carries only its tag.
inline constexpr std::uint64_t bulk_frame = std::uint64_t{1} << 62;
inline constexpr std::size_t bulk_tag_size = sizeof(std::uint64_t);
/// The header of a bulk frame of `length` payload bytes.
constexpr std::uint64_t bulk_header(std::uint64_t length) noexcept { return bulk_frame | length; }

/// Descriptors received with a stream's bytes, oldest first.
/// Descriptors received with a stream's bytes, oldest first. A vector and the index of its front,
/// not a std::deque, whose move allocates: what holds one (a Connection) moves without failing.
class DescriptorQueue {
public:
    DescriptorQueue() = default;
    DescriptorQueue(DescriptorQueue&& other) noexcept
        : fds_(std::move(other.fds_)), front_(std::exchange(other.front_, 0)) {
        other.fds_.clear();
    }
    DescriptorQueue& operator=(DescriptorQueue&& other) noexcept {
        fds_ = std::move(other.fds_);
        front_ = std::exchange(other.front_, 0);
        other.fds_.clear();
        return *this;
    }

    bool empty() const noexcept { return front_ == fds_.size(); }
    UniqueFd& front() noexcept { return fds_[front_]; }
    void pop_front() noexcept {
        fds_[front_++].reset();
        if (empty()) clear();  // the vector keeps its memory for the next ones
    }
    void clear() noexcept {
        fds_.clear();
        front_ = 0;
    }
    /// Room for `n` more, so that as many pushes cannot fail (std::bad_alloc here, with nothing
    /// changed). The slots of those already taken are let go first.
    void reserve_more(std::size_t n) {
        if (front_ != 0) {
            fds_.erase(fds_.begin(), fds_.begin() + static_cast<std::ptrdiff_t>(front_));  // moves: no throw
            front_ = 0;
        }
        if (fds_.capacity() - fds_.size() < n) fds_.reserve(fds_.size() + n);
    }
    void push_back(UniqueFd fd) { fds_.push_back(std::move(fd)); }  // within reserve_more's room: no throw

private:
    std::vector<UniqueFd> fds_;
    std::size_t front_ = 0;
};

/// Starts a frame in `out`: reserves the header that finish_frame fills in.
inline void begin_frame(Buffer& out) {
    out.clear();
    out.extend(frame_header_size);
}
inline void finish_frame(Buffer& out) {
    const std::uint64_t length = out.size() - frame_header_size;
    std::memcpy(out.data(), &length, sizeof length);
}

/// The receiving side of a framed stream.
class FrameReader {
public:
    /// The next whole frame already buffered, if any; valid until consume(). A descriptor frame
    /// is an empty frame here (see next_is_descriptor()).
    std::optional<std::span<const std::byte>> buffered_frame() const noexcept {
        const std::size_t have = size();
        if (have < frame_header_size) return std::nullopt;
        const std::uint64_t length = payload_length();
        if (length > have - frame_header_size) return std::nullopt;
        return std::span<const std::byte>(begin() + frame_header_size, static_cast<std::size_t>(length));
    }
    /// Whether the next frame (its header buffered) is a descriptor frame.
    bool next_is_descriptor() const noexcept {
        if (size() < frame_header_size) return false;
        std::uint64_t length = 0;
        std::memcpy(&length, begin(), sizeof length);
        return length == descriptor_frame;
    }
    /// The payload length of the next frame, if its header is buffered and it is a bulk frame
    /// (its payload comes by the bulk lane; in the stream the frame is its tag).
    std::optional<std::uint64_t> next_bulk_length() const noexcept {
        if (size() < frame_header_size) return std::nullopt;
        std::uint64_t header = 0;
        std::memcpy(&header, begin(), sizeof header);
        if (!is_bulk(header)) return std::nullopt;
        return header & ~bulk_frame;
    }
    /// Drops the frame buffered_frame() returned.
    void consume(std::span<const std::byte> frame) noexcept {
        start_ += frame_header_size + frame.size();
        if (start_ == buffer_.size()) {
            buffer_.clear();
            start_ = 0;
        }
    }
    /// Bytes the current (incomplete) frame still needs, at least 1.
    std::size_t bytes_wanted() const noexcept {
        const std::size_t have = size();
        if (have < frame_header_size) return frame_header_size - have;
        const std::uint64_t length = payload_length();
        if (length > UINT64_MAX - frame_header_size) return SIZE_MAX / 4;
        const std::uint64_t total = frame_header_size + length;
        return total > have ? static_cast<std::size_t>(std::min<std::uint64_t>(total - have, SIZE_MAX / 4)) : 1;
    }
    /// The payload length of the next frame when its header is here, it carries bytes, it is at
    /// most `at_most` bytes long and at least `at_least` of them are still to come: a frame worth
    /// reading the rest of straight into its destination (take_partial, then read_into). A frame
    /// that lacks only a few bytes is left to fill(), whose read takes the next frames with them.
    std::optional<std::size_t> partial_payload(std::size_t at_least, std::size_t at_most) const noexcept {
        if (size() < frame_header_size || next_is_descriptor()) return std::nullopt;
        const std::uint64_t length = payload_length();
        const std::size_t here = size() - frame_header_size;
        if (length > at_most || length <= here || length - here < at_least) return std::nullopt;
        return static_cast<std::size_t>(length);
    }
    /// Copies the part of the next frame's payload that is here to `dst` and drops the frame's
    /// header: nothing is left buffered (a frame not all here is the last thing buffered).
    /// Returns the bytes copied.
    std::size_t take_partial(std::byte* dst) noexcept {
        const std::size_t have = size() - frame_header_size;
        if (have != 0) std::memcpy(dst, begin() + frame_header_size, have);
        clear();
        return have;
    }
    /// Room for a whole frame of `length` payload bytes (so that restore_partial cannot fail).
    void reserve_frame(std::size_t length) { buffer_.reserve(start_ + frame_header_size + length); }
    /// Undoes take_partial after `have` bytes of the frame's `length` reached `dst`: the frame's
    /// header and those bytes are buffered again. reserve_frame(length) came first: no allocation.
    void restore_partial(std::size_t length, const std::byte* dst, std::size_t have) noexcept {
        clear();
        const std::uint64_t header = length;
        std::memcpy(buffer_.extend(frame_header_size), &header, sizeof header);
        if (have != 0) std::memcpy(buffer_.extend(have), dst, have);
    }
    /// One read(2) (with `descriptors`, recvmsg) of at most n bytes straight into `dst`, past the
    /// buffer. Returns as fill() does.
    static ssize_t read_into(int fd, std::byte* dst, std::size_t n, DescriptorQueue* descriptors) {
        if (descriptors) return receive_with_descriptors(fd, dst, n, false, *descriptors);
        return read_some(fd, dst, n);
    }

    /// One read(2) into the buffer. Returns bytes read, 0 at end of stream, -1 with errno
    /// (EAGAIN when `nonblocking` and nothing is there). With `descriptors` (a Unix socket), reads
    /// with recvmsg and appends the descriptors that came with the bytes (close-on-exec).
    ssize_t fill(int fd, bool nonblocking = false, DescriptorQueue* descriptors = nullptr) {
        if (descriptors) descriptors->reserve_more(max_descriptors);  // may throw: before anything changes
        make_room();
        const std::size_t room = room_for_next_read();
        // The read goes past the buffer's end, which moves only once bytes came: a child forked
        // while a thread waits here copies the buffer as it is, not with `room` bytes never read.
        buffer_.reserve(buffer_.size() + room);
        std::byte* at = buffer_.data() + buffer_.size();
        ssize_t got;
        if (descriptors) {
            got = receive_with_descriptors(fd, at, room, nonblocking, *descriptors);
        } else if (nonblocking) {
            do got = ::recv(fd, at, room, MSG_DONTWAIT);
            while (got < 0 && errno == EINTR);
        } else {
            got = read_some(fd, at, room);
        }
        if (got > 0) buffer_.resize(buffer_.size() + static_cast<std::size_t>(got));
        return got;
    }
    std::size_t size() const noexcept { return buffer_.size() - start_; }
    bool empty() const noexcept { return size() == 0; }
    void clear() noexcept {
        buffer_.clear();
        start_ = 0;
    }

    /// The error for a stream that ended: EOFError between frames, SerializationError inside one.
    /// The partial frame is dropped with its error, so the next read reports the end of stream.
    [[noreturn]] void throw_end_of_stream(const std::string& who) {
        if (empty()) throw EOFError(who + ": peer closed the connection and nothing is left to read");
        SerializationError error(who + ": truncated frame: the peer closed after " + std::to_string(size()) +
                                 " bytes of a " + std::to_string(size() + bytes_wanted()) + "-byte frame");
        clear();
        throw error;
    }

private:
    static constexpr std::size_t min_read = std::size_t{64} * 1024;
    static constexpr std::size_t trusted = std::size_t{1} << 20;
    /// The most descriptors one message can carry (the kernel's SCM_MAX_FD).
    static constexpr std::size_t max_descriptors = 253;

    const std::byte* begin() const noexcept { return buffer_.data() + start_; }
    static constexpr bool is_bulk(std::uint64_t header) noexcept {
        return (header & (descriptor_frame | bulk_frame)) == bulk_frame;
    }
    /// The payload length in the stream of the frame whose header is buffered (0 for a descriptor
    /// frame, the tag's for a bulk frame).
    std::uint64_t payload_length() const noexcept {
        std::uint64_t length = 0;
        std::memcpy(&length, begin(), sizeof length);
        if (length == descriptor_frame) return 0;
        return is_bulk(length) ? bulk_tag_size : length;
    }

    /// recvmsg, retried on EINTR; every descriptor received is queued, close-on-exec. The room
    /// for them is found first: with no memory, std::bad_alloc and nothing is received (a
    /// descriptor dropped for want of room would pair each later descriptor frame with the
    /// descriptor of the next).
    static ssize_t receive_with_descriptors(int fd, std::byte* at, std::size_t room, bool nonblocking,
                                            DescriptorQueue& descriptors) {
        descriptors.reserve_more(max_descriptors);
        iovec iov{at, room};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_descriptors)];
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t got;
        do got = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | (nonblocking ? MSG_DONTWAIT : 0));
        while (got < 0 && errno == EINTR);
        if (got < 0) return got;
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int received = -1;
                std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
                descriptors.push_back(UniqueFd(received));  // room was made above
            }
        }
        return got;
    }

    void make_room() {
        if (start_ != 0 && (start_ == buffer_.size() || start_ > buffer_.size() / 2)) {
            buffer_.consume_front(start_);
            start_ = 0;
        }
    }
    std::size_t room_for_next_read() const noexcept {
        // Read what the frame needs in one go, but past `trusted` bytes never more than the bytes
        // already here (plus min_read) on faith: a length that lies costs at most that much
        // memory, and the buffer doubles only when the peer keeps sending.
        std::size_t want = bytes_wanted();
        if (want < min_read) want = min_read;
        const std::size_t cap = (size() > trusted ? size() : trusted) + min_read;
        return want < cap ? want : cap;
    }
    Buffer buffer_;
    std::size_t start_ = 0;
};

}  // namespace mproc::detail
