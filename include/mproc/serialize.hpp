// mproc — serialisation: how values cross the process boundary.
//
// A value is written into a byte buffer by a Writer and read back by a Reader. Built in:
// arithmetic types, enums, std::string, std::vector, std::array, std::pair, std::tuple,
// std::optional, std::variant, std::map, std::unordered_map, std::set, std::unordered_set,
// std::chrono::duration, std::monostate, nested freely, and trivially copyable structs. A user type
// opts in with a member `template <class Archive> void serialize(Archive& ar) { ar(a, b, c); }`,
// which serves for both directions.
//
// The encoding is for processes of one program on one machine: native byte order, 64-bit lengths.
// Decoding trusts nothing: every length is checked against the bytes that remain, so corrupt input
// raises mproc::SerializationError instead of crashing or allocating without bound.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

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
        if (capacity > capacity_) [[unlikely]] grow(capacity);
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
        if (n >= size_) { size_ = 0; return; }
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

class Writer;
class Reader;

namespace detail {

template <class T> struct is_std_vector : std::false_type {};
template <class T, class A> struct is_std_vector<std::vector<T, A>> : std::true_type {};
template <class T> struct is_std_array : std::false_type {};
template <class T, std::size_t N> struct is_std_array<std::array<T, N>> : std::true_type {};
template <class T> struct is_std_pair : std::false_type {};
template <class A, class B> struct is_std_pair<std::pair<A, B>> : std::true_type {};
template <class T> struct is_std_tuple : std::false_type {};
template <class... Ts> struct is_std_tuple<std::tuple<Ts...>> : std::true_type {};
template <class T> struct is_std_optional : std::false_type {};
template <class T> struct is_std_optional<std::optional<T>> : std::true_type {};
template <class T> struct is_std_variant : std::false_type {};
template <class... Ts> struct is_std_variant<std::variant<Ts...>> : std::true_type {};
template <class T> struct is_std_duration : std::false_type {};
template <class R, class P> struct is_std_duration<std::chrono::duration<R, P>> : std::true_type {};
template <class T> struct is_std_string : std::false_type {};
template <class C, class Tr, class A> struct is_std_string<std::basic_string<C, Tr, A>> : std::true_type {};
template <class T> struct is_std_map : std::false_type {};
template <class K, class V, class C, class A> struct is_std_map<std::map<K, V, C, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_std_map<std::unordered_map<K, V, H, E, A>> : std::true_type {};
template <class T> struct is_std_set : std::false_type {};
template <class K, class C, class A> struct is_std_set<std::set<K, C, A>> : std::true_type {};
template <class K, class H, class E, class A>
struct is_std_set<std::unordered_set<K, H, E, A>> : std::true_type {};
// Views hold pointers into memory the other process does not have: never serialisable.
template <class T> struct is_view : std::false_type {};
template <class C, class Tr> struct is_view<std::basic_string_view<C, Tr>> : std::true_type {};
template <class T, std::size_t N> struct is_view<std::span<T, N>> : std::true_type {};

template <class T>
concept has_serialize_member = requires(T& value, Writer& writer, Reader& reader) {
    value.serialize(writer);
    value.serialize(reader);
};

template <class T> constexpr bool serializable_impl();

template <class Tuple, std::size_t... I>
constexpr bool all_serializable(std::index_sequence<I...>) {
    return (serializable_impl<std::remove_cv_t<std::tuple_element_t<I, Tuple>>>() && ...);
}
template <class... Ts> constexpr bool all_of_serializable() {
    return (serializable_impl<std::remove_cv_t<Ts>>() && ...);
}
template <class V> struct variant_alternatives_serializable;
template <class... Ts> struct variant_alternatives_serializable<std::variant<Ts...>> {
    static constexpr bool value = all_of_serializable<Ts...>();
};

template <class T> constexpr bool serializable_impl() {
    if constexpr (std::is_reference_v<T> || std::is_pointer_v<T> || std::is_member_pointer_v<T> ||
                  std::is_function_v<T> || std::is_void_v<T> || std::is_array_v<T> ||
                  is_view<T>::value || std::is_same_v<T, std::nullptr_t>)
        return false;
    else if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>)
        return true;
    else if constexpr (is_std_string<T>::value)
        return std::is_same_v<T, std::string>;
    else if constexpr (is_std_vector<T>::value || is_std_array<T>::value || is_std_optional<T>::value ||
                       is_std_set<T>::value)
        return serializable_impl<typename T::value_type>();
    else if constexpr (is_std_map<T>::value)
        return serializable_impl<typename T::key_type>() && serializable_impl<typename T::mapped_type>();
    else if constexpr (is_std_pair<T>::value || is_std_tuple<T>::value)
        return all_serializable<T>(std::make_index_sequence<std::tuple_size_v<T>>{});
    else if constexpr (is_std_variant<T>::value)
        return variant_alternatives_serializable<T>::value;
    else if constexpr (is_std_duration<T>::value || std::is_same_v<T, std::monostate>)
        return true;
    else if constexpr (has_serialize_member<T>)
        return true;
    else
        return std::is_trivially_copyable_v<T> && std::is_class_v<T>;
}

}  // namespace detail

/// True when T can cross a process boundary through mproc's serialisation.
template <class T>
inline constexpr bool is_serializable_v = detail::serializable_impl<std::remove_cv_t<T>>();

template <class T>
concept Serializable = is_serializable_v<T>;

/// Instantiated for every type mproc encodes or decodes: the compiler's note names T.
template <class T>
constexpr void require_serializable() {
    static_assert(is_serializable_v<T>,
                  "mproc: this type cannot be serialised (see the type in the instantiation note). "
                  "Raw pointers, references, views and std::function never can; for a struct, make it "
                  "trivially copyable or give it a `template <class Archive> void serialize(Archive& ar)` "
                  "member that calls ar(field, ...).");
}

namespace detail {
// The fewest bytes a value of T can encode to: bounds how many elements a length may claim.
template <class T> constexpr std::size_t min_encoded_size() {
    if constexpr (std::is_same_v<T, bool>) return 1;
    else if constexpr (std::is_arithmetic_v<T> || std::is_enum_v<T>) return sizeof(T);
    else if constexpr (is_std_string<T>::value || is_std_vector<T>::value || is_std_map<T>::value ||
                       is_std_set<T>::value) return 8;
    else if constexpr (is_std_optional<T>::value) return 1;
    else if constexpr (is_std_variant<T>::value) return 4;
    else if constexpr (is_std_duration<T>::value) return sizeof(typename T::rep);
    else if constexpr (std::is_same_v<T, std::monostate>) return 0;
    else if constexpr (is_std_array<T>::value)
        return std::tuple_size_v<T> * min_encoded_size<typename T::value_type>();
    else if constexpr (is_std_pair<T>::value)
        return min_encoded_size<typename T::first_type>() + min_encoded_size<typename T::second_type>();
    else if constexpr (is_std_tuple<T>::value)
        return []<std::size_t... I>(std::index_sequence<I...>) {
            return (std::size_t{0} + ... + min_encoded_size<std::tuple_element_t<I, T>>());
        }(std::make_index_sequence<std::tuple_size_v<T>>{});
    else if constexpr (has_serialize_member<T>) return 0;
    else return sizeof(T);
}
// An element type that may encode to no bytes at all (std::monostate, std::tuple<>, an empty
// std::array, a user type whose serialize() writes nothing) gives a container's length nothing to
// be checked against: such elements are each preceded by a one-byte marker, so that every element
// of every container costs at least one byte and a length can never claim more than the input holds.
template <class T> inline constexpr bool needs_element_marker_v = min_encoded_size<T>() == 0;
inline constexpr std::uint8_t element_marker = 0xE1;
// Decoding a container reserves memory for at most this many bytes per input byte left; beyond
// that it grows as elements really decode, so malformed input never allocates without bound.
inline constexpr std::size_t reserve_per_input_byte = 4;
template <class T> inline constexpr bool is_bulk_copyable_v =
    (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) || std::is_enum_v<T>;
// A vector whose elements are copied as one block of memory.
template <class T> struct is_bulk_vector : std::false_type {};
template <class T, class A>
struct is_bulk_vector<std::vector<T, A>> : std::bool_constant<is_bulk_copyable_v<T>> {};
}  // namespace detail

/// The output archive: appends encoded values to a Buffer.
class Writer {
public:
    explicit Writer(Buffer& out) noexcept : out_(&out) {}

    template <class... Ts> void operator()(const Ts&... values) { (write(values), ...); }

    template <class T> void write(const T& value);
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

private:
    template <class Range> void write_elements(const Range& range) {
        write_length(std::size(range));
        for (const auto& element : range) {
            if constexpr (detail::needs_element_marker_v<typename Range::value_type>) write_marker();
            write(element);
        }
    }
    void write_marker() { write_raw(&detail::element_marker, 1); }
    Buffer* out_;
};

/// The input archive: decodes values from a span of bytes, checking every length.
class Reader {
public:
    explicit Reader(std::span<const std::byte> in) noexcept : in_(in) {}

    template <class... Ts> void operator()(Ts&... values) { (read(values), ...); }

    template <class T> void read(T& value);
    void read_raw(void* dst, std::size_t n) {
        if (n > remaining()) [[unlikely]] fail_truncated(n);
        if (n != 0) std::memcpy(dst, in_.data() + pos_, n);
        pos_ += n;
    }
    /// Reads a length and checks that the rest of the input can hold that many elements.
    std::size_t read_length(std::size_t min_element_size) {
        std::uint64_t n = 0;
        read_raw(&n, sizeof n);
        const std::size_t per_element = min_element_size == 0 ? 1 : min_element_size;
        if (n > remaining() / per_element)
            fail("length " + std::to_string(n) + " exceeds the " + std::to_string(remaining()) +
                 " bytes left");
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
        if (n > remaining()) [[unlikely]] fail_truncated(n);
        const std::span<const std::byte> bytes = in_.subspan(pos_, n);
        pos_ += n;
        return bytes;
    }
    std::size_t remaining() const noexcept { return in_.size() - pos_; }
    [[noreturn]] static void fail(const std::string& why) {
        throw SerializationError("cannot decode: " + why);
    }

private:
    // Out of line and cold: building the message must not stop read_raw from inlining.
    [[noreturn, gnu::noinline, gnu::cold]] void fail_truncated(std::size_t n) const {
        fail("truncated input: need " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left");
    }
    template <class Variant, std::size_t... I>
    void read_variant(Variant& value, std::size_t index, std::index_sequence<I...>) {
        ((I == index ? (void)read(value.template emplace<I>()) : (void)0), ...);
    }
    std::span<const std::byte> in_;
    std::size_t pos_ = 0;
};

template <class T> void Writer::write(const T& value) {
    require_serializable<T>();
    using namespace detail;
    if constexpr (std::is_same_v<T, bool>) {
        const auto byte = static_cast<std::uint8_t>(value ? 1 : 0);
        write_raw(&byte, 1);
    } else if constexpr (is_bulk_copyable_v<T>) {
        write_raw(&value, sizeof value);
    } else if constexpr (is_std_string<T>::value) {
        write_length(value.size());
        write_raw(value.data(), value.size());
    } else if constexpr (is_bulk_vector<T>::value) {
        write_length(value.size());
        write_raw(value.data(), value.size() * sizeof(typename T::value_type));
    } else if constexpr (is_std_vector<T>::value || is_std_set<T>::value) {
        write_elements(value);
    } else if constexpr (is_std_map<T>::value) {
        write_length(value.size());
        for (const auto& [k, v] : value) {
            if constexpr (needs_element_marker_v<std::pair<typename T::key_type, typename T::mapped_type>>)
                write_marker();
            write(k);
            write(v);
        }
    } else if constexpr (is_std_array<T>::value) {
        for (const auto& element : value) write(element);
    } else if constexpr (is_std_pair<T>::value || is_std_tuple<T>::value) {
        std::apply([&](const auto&... parts) { (write(parts), ...); }, value);
    } else if constexpr (is_std_optional<T>::value) {
        write(value.has_value());
        if (value) write(*value);
    } else if constexpr (is_std_variant<T>::value) {
        const auto index = static_cast<std::uint32_t>(value.index());
        write_raw(&index, sizeof index);
        std::visit([&](const auto& alternative) { write(alternative); }, value);
    } else if constexpr (is_std_duration<T>::value) {
        const auto count = value.count();
        write_raw(&count, sizeof count);
    } else if constexpr (std::is_same_v<T, std::monostate>) {
    } else if constexpr (has_serialize_member<T>) {
        // One member serves both directions, so it is not const; writing does not modify.
        const_cast<T&>(value).serialize(*this);
    } else {
        write_raw(&value, sizeof value);
    }
}

template <class T> void Reader::read(T& value) {
    require_serializable<T>();
    using namespace detail;
    if constexpr (std::is_same_v<T, bool>) {
        std::uint8_t byte = 0;
        read_raw(&byte, 1);
        if (byte > 1) fail("invalid bool byte " + std::to_string(byte));
        value = byte == 1;
    } else if constexpr (is_bulk_copyable_v<T>) {
        read_raw(&value, sizeof value);
    } else if constexpr (is_std_string<T>::value) {
        const std::size_t n = read_length(1);
        value.resize(n);
        read_raw(value.data(), n);
    } else if constexpr (is_std_vector<T>::value) {
        using E = typename T::value_type;
        const std::size_t n = read_length(min_encoded_size<E>());
        if constexpr (is_bulk_copyable_v<E>) {
            if (n > remaining() / sizeof(E)) fail("vector length exceeds the input");
            value.resize(n);
            read_raw(value.data(), n * sizeof(E));
        } else {
            value.clear();
            // n is checked against the fewest bytes an element encodes to, but an element may be
            // far larger in memory than encoded (a user type counts as one byte): reserve only
            // what a small multiple of the input left can justify, and grow as elements decode.
            value.reserve(std::min(n, remaining() * reserve_per_input_byte / sizeof(E)));
            for (std::size_t i = 0; i < n; ++i) {
                read_marker<E>();
                if constexpr (std::is_same_v<E, bool>) {
                    bool b = false;
                    read(b);
                    value.push_back(b);
                } else {
                    read(value.emplace_back());
                }
            }
        }
    } else if constexpr (is_std_set<T>::value) {
        using E = typename T::value_type;
        const std::size_t n = read_length(min_encoded_size<E>());
        value.clear();
        for (std::size_t i = 0; i < n; ++i) {
            read_marker<E>();
            E element{};
            read(element);
            value.insert(std::move(element));
        }
    } else if constexpr (is_std_map<T>::value) {
        using K = typename T::key_type;
        using V = typename T::mapped_type;
        const std::size_t n = read_length(min_encoded_size<K>() + min_encoded_size<V>());
        value.clear();
        for (std::size_t i = 0; i < n; ++i) {
            read_marker<std::pair<K, V>>();
            K key{};
            read(key);
            V mapped{};
            read(mapped);
            value.insert_or_assign(std::move(key), std::move(mapped));
        }
    } else if constexpr (is_std_array<T>::value) {
        for (auto& element : value) read(element);
    } else if constexpr (is_std_pair<T>::value) {
        // pair<const K, V> cannot be assigned in place; read each part on its own.
        read(const_cast<std::remove_const_t<typename T::first_type>&>(value.first));
        read(value.second);
    } else if constexpr (is_std_tuple<T>::value) {
        std::apply([&](auto&... parts) { (read(parts), ...); }, value);
    } else if constexpr (is_std_optional<T>::value) {
        bool present = false;
        read(present);
        if (present) read(value.emplace());
        else value.reset();
    } else if constexpr (is_std_variant<T>::value) {
        std::uint32_t index = 0;
        read_raw(&index, sizeof index);
        if (index >= std::variant_size_v<T>) fail("variant index " + std::to_string(index) + " out of range");
        read_variant(value, index, std::make_index_sequence<std::variant_size_v<T>>{});
    } else if constexpr (is_std_duration<T>::value) {
        typename T::rep count{};
        read_raw(&count, sizeof count);
        value = T(count);
    } else if constexpr (std::is_same_v<T, std::monostate>) {
    } else if constexpr (has_serialize_member<T>) {
        value.serialize(*this);
    } else {
        read_raw(&value, sizeof value);
    }
}

/// Appends the encoding of `values` to `out`.
template <class... Ts> void encode_into(Buffer& out, const Ts&... values) {
    Writer writer(out);
    writer(values...);
}

/// Decodes one T from exactly `bytes`; leftover or missing bytes are a SerializationError.
template <class T> T decode(std::span<const std::byte> bytes) {
    static_assert(std::is_default_constructible_v<T>, "mproc: decoded types must be default-constructible");
    Reader reader(bytes);
    T value{};
    reader.read(value);
    if (reader.remaining() != 0)
        Reader::fail(std::to_string(reader.remaining()) + " unexpected bytes after the value");
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
