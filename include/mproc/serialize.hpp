// mproc — serialisation: how values cross the process boundary.
//
// A value is written into a byte buffer by a Writer and read back by a Reader. Built in:
// arithmetic types, enums, std::string, std::vector, std::array, std::pair, std::tuple,
// std::optional, std::variant, std::map, std::unordered_map, std::set, std::unordered_set,
// std::chrono::duration, std::monostate, nested freely, and trivially copyable structs. A user type
// opts in with a member `template <class Archive> void serialize(Archive& ar) { ar(a, b, c); }`,
// which serves for both directions.
//
// Each family of types has one codec, in detail/serialize/ (see codec.hpp): whether it can be
// serialised, the fewest bytes it encodes to, how it is written and read. Writer::write and
// Reader::read dispatch to the codec; a new built-in type is one more codec specialisation.
//
// The encoding is for processes of one program on one machine: native byte order, 64-bit lengths.
// Decoding trusts nothing: every length is checked against the bytes that remain, so corrupt input
// raises mproc::SerializationError instead of crashing or allocating without bound.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/serialize/codec.hpp"
#include "detail/serialize/containers.hpp"
#include "detail/serialize/decode_scope.hpp"
#include "detail/serialize/scalars.hpp"
#include "detail/serialize/strings.hpp"
#include "detail/serialize/tuples.hpp"
#include "detail/serialize/user.hpp"
#include "errors.hpp"

namespace mproc {

/// A growable byte buffer that does not zero what it is about to overwrite.
class Buffer {
public:
    Buffer() = default;
    explicit Buffer(std::size_t capacity) { reserve(capacity); }
    // A moved-from Buffer is empty and reusable: the defaulted moves would leave its size and
    // capacity behind with a null pointer, so the next append wrote through that null pointer.
    Buffer(Buffer&& other) noexcept
        : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)),
          capacity_(std::exchange(other.capacity_, 0)) {}
    Buffer& operator=(Buffer&& other) noexcept {
        if (this != &other) {
            data_ = std::move(other.data_);
            size_ = std::exchange(other.size_, 0);
            capacity_ = std::exchange(other.capacity_, 0);
        }
        return *this;
    }

    std::byte* data() noexcept { return data_.get(); }
    const std::byte* data() const noexcept { return data_.get(); }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }
    std::span<const std::byte> bytes() const noexcept { return {data_.get(), size_}; }
    void clear() noexcept { size_ = 0; }

    void reserve(std::size_t capacity) {
        if (capacity > capacity_) [[unlikely]]
            grow(capacity);
    }
    /// Grows by n bytes and returns where they start; the caller fills them.
    std::byte* extend(std::size_t n) {
        reserve(size_ + n);
        std::byte* at = data_.get() + size_;
        size_ += n;
        return at;
    }
    void append(const void* src, std::size_t n) {
        if (n != 0) std::memcpy(extend(n), src, n);
    }
    /// Drops the first n bytes (used by stream readers that consume from the front).
    void consume_front(std::size_t n) noexcept {
        if (n >= size_) {
            size_ = 0;
            return;
        }
        std::memmove(data_.get(), data_.get() + n, size_ - n);
        size_ -= n;
    }
    void resize(std::size_t n) {
        reserve(n);
        size_ = n;
    }

private:
    // Out of line, so the common path of append (room enough) inlines to a compare and a copy.
    [[gnu::noinline]] void grow(std::size_t capacity) {
        std::size_t grown = capacity_ < 64 ? 64 : capacity_ * 2;
        if (grown < capacity) grown = capacity;
        auto fresh = std::make_unique_for_overwrite<std::byte[]>(grown);
        if (size_ != 0) std::memcpy(fresh.get(), data_.get(), size_);
        data_ = std::move(fresh);
        capacity_ = grown;
    }

    std::unique_ptr<std::byte[]> data_;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

/// True when T can cross a process boundary through mproc's serialisation.
template <class T> inline constexpr bool is_serializable_v = detail::codec<std::remove_cv_t<T>>::serializable;

template <class T>
concept Serializable = is_serializable_v<T>;

/// Instantiated for every type mproc encodes or decodes: the compiler's note names T.
template <class T> constexpr void require_serializable() {
    static_assert(is_serializable_v<T>,
                  "mproc: this type cannot be serialised (see the type in the instantiation note). "
                  "Raw pointers, references, views and std::function never can; for a struct, make it "
                  "trivially copyable or give it a `template <class Archive> void serialize(Archive& ar)` "
                  "member that calls ar(field, ...).");
}

/// The output archive: appends encoded values to a Buffer.
class Writer {
public:
    explicit Writer(Buffer& out) noexcept : out_(&out) {}

    template <class... Ts> void operator()(const Ts&... values) { (write(values), ...); }

    /// Appends the encoding of `value` (its codec's).
    template <class T> void write(const T& value) {
        require_serializable<T>();
        if constexpr (is_serializable_v<T>) detail::codec<T>::write(*this, value);
    }
    void write_raw(const void* src, std::size_t n) { out_->append(src, n); }
    void write_length(std::size_t n) {
        const auto len = static_cast<std::uint64_t>(n);
        write_raw(&len, sizeof len);
    }
    /// How many bytes the output holds: a mark that rewind() can go back to.
    std::size_t position() const noexcept { return out_->size(); }
    /// Drops everything written after `mark` (a position() of this writer).
    void rewind(std::size_t mark) noexcept {
        if (mark < out_->size()) out_->resize(mark);
    }
    /// The output buffer (for a caller that patches bytes it wrote earlier).
    Buffer& buffer() noexcept { return *out_; }

    /// Writes the marker that precedes each element of type E, if E may encode to no bytes.
    template <class E> void write_marker() {
        if constexpr (detail::needs_element_marker_v<E>) write_raw(&detail::element_marker, 1);
    }

private:
    Buffer* out_;
};

/// The input archive: decodes values from a span of bytes, checking every length.
class Reader {
public:
    explicit Reader(std::span<const std::byte> in) noexcept : in_(in) {}

    template <class... Ts> void operator()(Ts&... values) { (read(values), ...); }

    /// Decodes a value into `value` (by its codec), replacing what it held.
    template <class T> void read(T& value) {
        require_serializable<T>();
        if constexpr (is_serializable_v<T>) detail::codec<T>::read(*this, value);
    }
    void read_raw(void* dst, std::size_t n) {
        if (n > remaining()) [[unlikely]]
            fail_truncated(n);
        if (n != 0) std::memcpy(dst, in_.data() + pos_, n);
        pos_ += n;
    }
    /// Reads a length and checks that the rest of the input can hold that many elements.
    std::size_t read_length(std::size_t min_element_size) {
        std::uint64_t n = 0;
        read_raw(&n, sizeof n);
        const std::size_t per_element = min_element_size == 0 ? 1 : min_element_size;
        if (n > remaining() / per_element)
            fail("length " + std::to_string(n) + " exceeds the " + std::to_string(remaining()) + " bytes left");
        return static_cast<std::size_t>(n);
    }
    /// Checks the marker that precedes each element that may encode to no bytes.
    template <class E> void read_marker() {
        if constexpr (detail::needs_element_marker_v<E>) {
            std::uint8_t marker = 0;
            read_raw(&marker, 1);
            if (marker != detail::element_marker) fail("invalid element marker " + std::to_string(marker));
        }
    }
    /// The next `n` bytes, undecoded; the reader moves past them.
    std::span<const std::byte> read_span(std::size_t n) {
        if (n > remaining()) [[unlikely]]
            fail_truncated(n);
        const std::span<const std::byte> bytes = in_.subspan(pos_, n);
        pos_ += n;
        return bytes;
    }
    std::size_t remaining() const noexcept { return in_.size() - pos_; }
    [[noreturn]] static void fail(const std::string& why) { throw SerializationError("cannot decode: " + why); }

private:
    // Out of line and cold: building the message must not stop read_raw from inlining.
    [[noreturn, gnu::noinline, gnu::cold]] void fail_truncated(std::size_t n) const {
        fail("truncated input: need " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left");
    }
    std::span<const std::byte> in_;
    std::size_t pos_ = 0;
};

/// Appends the encoding of `values` to `out`.
template <class... Ts> void encode_into(Buffer& out, const Ts&... values) {
    Writer writer(out);
    writer(values...);
}

/// Decodes one T from exactly `bytes`; leftover or missing bytes are a SerializationError.
/// Shared-object handles in T are default-constructed empty before they are read (not as new
/// shared objects thrown away at once: detail::HandleDecodeScope).
template <class T> T decode(std::span<const std::byte> bytes) {
    static_assert(std::is_default_constructible_v<T>, "mproc: decoded types must be default-constructible");
    detail::HandleDecodeScope decoding;
    Reader reader(bytes);
    T value{};
    reader.read(value);
    if (reader.remaining() != 0) Reader::fail(std::to_string(reader.remaining()) + " unexpected bytes after the value");
    return value;
}

/// The encoding of `value` as a byte vector.
template <class T> std::vector<std::byte> to_bytes(const T& value) {
    Buffer buffer;
    encode_into(buffer, value);
    return {buffer.data(), buffer.data() + buffer.size()};
}

/// The value encoded in `bytes` (see decode).
template <class T> T from_bytes(std::span<const std::byte> bytes) { return decode<T>(bytes); }

}  // namespace mproc
