// libFuzzer target: mproc's decoder and the channel framing, fed arbitrary bytes.
//
// The first input byte picks what the rest is: one of a set of value types to decode, or a byte
// stream to push through detail::FrameReader in chunks. Properties checked:
//   - decoding anything either yields a value or throws mproc::SerializationError — no crash, no
//     other exception, no unbounded allocation (libFuzzer's -malloc_limit_mb catches those);
//   - a decoded value re-encodes to bytes that decode again, to an equal value, and re-encode to
//     the same bytes (the encoding is canonical once decoded);
//   - FrameReader, given the stream in arbitrary chunks, hands out exactly the frames a plain
//     reference parser finds in the same bytes, and at end of stream throws EOFError between frames
//     and SerializationError inside one.
#include <mproc/detail/os/framing.hpp>
#include <mproc/errors.hpp>
#include <mproc/serialize.hpp>

#include "fuzz_types.hpp"

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <sys/socket.h>
#include <tuple>
#include <unistd.h>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace {

using namespace mproc_fuzz;

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "fuzz_decode: property violated: %s\n", what);
    std::abort();
}

template <class T> constexpr bool has_floating_point() {
    return std::is_same_v<T, Point> || std::is_same_v<T, std::vector<Point>> ||
           std::is_same_v<T, std::map<std::string, std::variant<std::int64_t, double, std::string>>>;
}
template <class T> constexpr bool unordered() {
    return std::is_same_v<T, std::unordered_map<std::int32_t, std::string>> ||
           std::is_same_v<T, std::unordered_set<std::string>>;
}

template <class T> std::vector<std::byte> encode(const T& value) { return mproc::to_bytes(value); }

template <class T> void decode_one(std::span<const std::byte> bytes) {
    T value;
    try {
        value = mproc::decode<T>(bytes);
    } catch (const mproc::SerializationError&) {
        return;  // the one acceptable failure
    }
    const std::vector<std::byte> first = encode(value);
    T again;
    try {
        again = mproc::decode<T>(first);
    } catch (const mproc::SerializationError& e) {
        std::fprintf(stderr, "re-decode failed: %s\n", e.what());
        fail("a decoded value's own encoding does not decode");
    }
    if constexpr (!has_floating_point<T>())
        if (!(again == value)) fail("a value changed across encode/decode");
    const std::vector<std::byte> second = encode(again);
    if constexpr (unordered<T>()) {
        if (first.size() != second.size()) fail("re-encoding changed the size");
    } else {
        if (first != second) fail("re-encoding is not stable");
    }
    // A canonical encoding also decodes with a byte missing or one too many as an error.
    if (!first.empty()) {
        try {
            (void)mproc::decode<T>(std::span<const std::byte>(first).first(first.size() - 1));
            fail("a truncated encoding decoded");
        } catch (const mproc::SerializationError&) {}
    }
    std::vector<std::byte> longer = first;
    longer.push_back(std::byte{0});
    try {
        (void)mproc::decode<T>(longer);
        fail("an encoding with a trailing byte decoded");
    } catch (const mproc::SerializationError&) {}
}

template <std::size_t... I>
void decode_as(std::size_t which, std::span<const std::byte> bytes, std::index_sequence<I...>) {
    ((I == which ? decode_one<std::tuple_element_t<I, Types>>(bytes) : void()), ...);
}

/// Frames a plain parser finds in `stream`; `tail` is the length of an incomplete last frame. A
/// descriptor frame's header (its descriptor, over a socket, travels beside the bytes) is an empty
/// frame; a bulk frame (bit 62 set, bit 63 clear: its payload travels by a simplex pipe's lane) is
/// its 8-byte tag.
std::vector<std::span<const std::byte>> reference_frames(std::span<const std::byte> stream, std::size_t& tail) {
    std::vector<std::span<const std::byte>> frames;
    std::size_t at = 0;
    for (;;) {
        const std::size_t left = stream.size() - at;
        if (left < sizeof(std::uint64_t)) break;
        std::uint64_t length = 0;
        std::memcpy(&length, stream.data() + at, sizeof length);
        if (length == mproc::detail::descriptor_frame) length = 0;  // a descriptor frame: its header alone
        else if ((length >> 62) == 1) length = 8;                    // a bulk frame: its tag
        if (length > left - sizeof length) break;
        frames.push_back(stream.subspan(at + sizeof length, static_cast<std::size_t>(length)));
        at += sizeof length + static_cast<std::size_t>(length);
    }
    tail = stream.size() - at;
    return frames;
}

void write_all(int fd, const std::byte* data, std::size_t n) {
    while (n > 0) {
        const ssize_t put = ::send(fd, data, n, MSG_NOSIGNAL);
        if (put < 0 && errno == EINTR) continue;
        if (put <= 0) fail("socketpair write failed");
        data += put;
        n -= static_cast<std::size_t>(put);
    }
}

/// Pushes `stream` through a socketpair into a FrameReader, `chunk_seed` choosing chunk sizes.
void frame_stream(std::uint8_t chunk_seed, std::span<const std::byte> stream) {
    std::size_t tail = 0;
    const auto expected = reference_frames(stream, tail);

    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) fail("socketpair failed");
    mproc::detail::FrameReader reader;
    std::size_t next = 0;  // index into expected
    auto take_frames = [&] {
        while (auto frame = reader.buffered_frame()) {
            if (next >= expected.size()) fail("FrameReader produced a frame the reference did not");
            const auto& want = expected[next++];
            if (frame->size() != want.size() ||
                (want.size() != 0 && std::memcmp(frame->data(), want.data(), want.size()) != 0))
                fail("FrameReader's frame differs from the reference");
            // Frames are what channels decode: a string, or anything that fails cleanly.
            try {
                (void)mproc::decode<std::string>(*frame);
            } catch (const mproc::SerializationError&) {}
            reader.consume(*frame);
        }
        if (reader.bytes_wanted() < 1) fail("bytes_wanted() is 0");
    };
    std::uint32_t state = chunk_seed * 2654435761u + 1;
    std::size_t at = 0;
    while (at < stream.size()) {
        state = state * 1103515245u + 12345u;
        std::size_t chunk = 1 + (state >> 8) % 3000;
        if (chunk > stream.size() - at) chunk = stream.size() - at;
        write_all(fds[1], stream.data() + at, chunk);
        at += chunk;
        for (;;) {
            const ssize_t got = reader.fill(fds[0], /*nonblocking=*/true);
            if (got > 0) continue;
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            std::fprintf(stderr, "fill() returned %zd, errno %d (%s)\n", got, errno, std::strerror(errno));
            fail("fill() failed before end of stream");
        }
        take_frames();
    }
    ::close(fds[1]);
    // Read to the end blocking, as a channel does: the end of stream is the one 0 fill() returns,
    // after whatever bytes the kernel still hands over (never assumed to be none).
    for (;;) {
        const ssize_t got = reader.fill(fds[0]);
        if (got == 0) break;
        if (got < 0) {
            std::fprintf(stderr, "fill() returned %zd, errno %d (%s)\n", got, errno, std::strerror(errno));
            fail("fill() did not see end of stream");
        }
        take_frames();
    }
    take_frames();
    ::close(fds[0]);
    if (next != expected.size()) fail("FrameReader missed frames");
    if (reader.size() != tail) fail("FrameReader holds a different tail than the reference");
    try {
        reader.throw_end_of_stream("fuzz");
    } catch (const mproc::EOFError&) {
        if (tail != 0) fail("EOFError inside a frame");
    } catch (const mproc::SerializationError&) {
        if (tail == 0) fail("SerializationError between frames");
        // The cut frame was dropped with its error: what follows is the plain end of stream.
        if (!reader.empty()) fail("a truncated frame stayed buffered after its error");
        try {
            reader.throw_end_of_stream("fuzz");
        } catch (const mproc::EOFError&) {
        } catch (const mproc::SerializationError&) {
            fail("the same truncated frame was reported twice");
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) return 0;
    const std::span<const std::byte> rest(reinterpret_cast<const std::byte*>(data + 1), size - 1);
    const std::size_t selector = data[0];
    if (selector < 0xF0) {
        decode_as(selector % type_count, rest, std::make_index_sequence<type_count>{});
    } else {
        if (rest.empty()) return 0;
        frame_stream(static_cast<std::uint8_t>(rest[0]), rest.subspan(1));
    }
    return 0;
}
