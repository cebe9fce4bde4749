// mproc — the codec contract: each family of types says in one place whether it can be serialised,
// the fewest bytes it encodes to, and how it is written and read (as fmt's formatter<T> says how a
// type is printed). Writer::write and Reader::read look the codec up; no other part of
// serialisation lists types.
//
// A codec is a specialisation of detail::codec<T> with four members:
//
//     static constexpr bool serializable;          // false: encoding T is a compile-time error
//     static constexpr std::size_t min_size;       // the fewest bytes any value of T encodes to
//     static void write(auto& out, const T& value);  // out is a Writer
//     static void read(auto& in, T& value);          // in is a Reader; throws SerializationError
//
// min_size must never exceed a real encoding: decoding checks every length against it. A family
// whose parts have codecs of their own (a container, a tuple) writes and reads them through
// out.write / in.read, which check that they are serialisable too.
//
// The families: scalars.hpp (bool, arithmetic types, enums, durations), strings.hpp,
// containers.hpp (vectors, sets, maps, arrays), tuples.hpp (pair, tuple, optional, variant,
// monostate), user.hpp (types with a serialize member, trivially copyable structs). A type that no
// family claims is not serialisable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace mproc {

class Writer;
class Reader;

namespace detail {

// The memory a value of T occupies, or nothing for a type with no values (a reference, a function).
template <class T> constexpr std::size_t size_in_memory() {
    if constexpr (std::is_object_v<T> && !std::is_unbounded_array_v<T>) return sizeof(T);
    else return 0;
}

/// A type that no family claims: pointers, references, views, std::function, structs that are
/// neither trivially copyable nor have a serialize member. A codec names its type exactly, so a
/// const-qualified type has none either unless its family's condition holds for it (a scalar, a
/// trivially copyable struct): a container's element is decoded in place, which a const one cannot be.
template <class T> struct codec {
    static constexpr bool serializable = false;
    // Not the size of any encoding, yet it is used: a const part of a pair or tuple (the key of
    // std::pair<const std::string, V>) has no codec of its own, and has always been counted as its
    // size in memory. That decides whether a container of such pairs marks its elements, so it
    // stays, to keep the wire bytes as they are (it also overstates their fewest bytes, so that
    // some valid input fails to decode: see docs/design.md, "Serialisation").
    static constexpr std::size_t min_size = size_in_memory<T>();
};

// The fewest bytes a value of T can encode to: bounds how many elements a length may claim.
template <class T> constexpr std::size_t min_encoded_size() { return codec<T>::min_size; }

// An element type that may encode to no bytes at all (std::monostate, std::tuple<>, an empty
// std::array, a user type whose serialize() writes nothing) gives a container's length nothing to
// be checked against: such elements are each preceded by a one-byte marker, so that every element
// of every container costs at least one byte and a length can never claim more than the input holds.
template <class T> inline constexpr bool needs_element_marker_v = min_encoded_size<T>() == 0;
inline constexpr std::uint8_t element_marker = 0xE1;
// Decoding a container reserves memory for at most this many bytes per input byte left; beyond
// that it grows as elements really decode, so malformed input never allocates without bound.
inline constexpr std::size_t reserve_per_input_byte = 4;

}  // namespace detail
}  // namespace mproc
