// mproc — length-prefixed frames on a byte stream (pipe or stream socket).
//
// A frame is a 64-bit length followed by that many bytes. The reader buffers what the stream
// delivers and hands out whole frames; it grows its buffer only as bytes actually arrive, so a
// corrupt length cannot make it allocate more than twice what the peer really sent.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>

#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "io.hpp"

namespace mproc::detail {

inline constexpr std::size_t frame_header_size = sizeof(std::uint64_t);

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
    /// The next whole frame already buffered, if any; valid until consume().
    std::optional<std::span<const std::byte>> buffered_frame() const noexcept {
        const std::size_t have = size();
        if (have < frame_header_size) return std::nullopt;
        std::uint64_t length = 0;
        std::memcpy(&length, begin(), sizeof length);
        if (length > have - frame_header_size) return std::nullopt;
        return std::span<const std::byte>(begin() + frame_header_size, static_cast<std::size_t>(length));
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
        std::uint64_t length = 0;
        std::memcpy(&length, begin(), sizeof length);
        const std::uint64_t total = frame_header_size + length;
        return total > have ? static_cast<std::size_t>(std::min<std::uint64_t>(total - have, SIZE_MAX / 4)) : 1;
    }
    /// One read(2) into the buffer. Returns bytes read, 0 at end of stream, -1 with errno
    /// (EAGAIN when `nonblocking` and nothing is there).
    ssize_t fill(int fd, bool nonblocking = false) {
        make_room();
        const std::size_t room = room_for_next_read();
        std::byte* at = buffer_.extend(room);
        ssize_t got;
        if (nonblocking) {
            do got = ::recv(fd, at, room, MSG_DONTWAIT);
            while (got < 0 && errno == EINTR);
        } else {
            got = read_some(fd, at, room);
        }
        buffer_.resize(buffer_.size() - room + static_cast<std::size_t>(got > 0 ? got : 0));
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
    const std::byte* begin() const noexcept { return buffer_.data() + start_; }
    void make_room() {
        if (start_ != 0 && (start_ == buffer_.size() || start_ > buffer_.size() / 2)) {
            buffer_.consume_front(start_);
            start_ = 0;
        }
    }
    std::size_t room_for_next_read() const noexcept {
        // Read what the frame needs, but never more than the bytes already here (plus min_read)
        // on faith: the buffer doubles only when the peer keeps sending.
        std::size_t want = bytes_wanted();
        if (want < min_read) want = min_read;
        const std::size_t cap = size() + min_read;
        return want < cap ? want : cap;
    }
    Buffer buffer_;
    std::size_t start_ = 0;
};

}  // namespace mproc::detail
