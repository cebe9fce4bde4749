// mproc — the codecs of types mproc does not know: a type with a serialize member encodes as what
// that member writes; a trivially copyable struct, as its bytes.
#pragma once

#include <cstddef>
#include <type_traits>

#include "codec.hpp"

namespace mproc::detail {

template <class T>
concept has_serialize_member = (std::is_class_v<T> || std::is_union_v<T>)&&requires(T& value, Writer& writer,
                                                                                    Reader& reader) {
    value.serialize(writer);
    value.serialize(reader);
};

/// A type with a `template <class Archive> void serialize(Archive& ar)` member, which calls
/// ar(field, ...) and serves both directions.
template <class T> requires has_serialize_member<T> struct codec<T> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = 0;  // serialize() may write nothing
    static void write(auto& out, const T& value) {
        // One member serves both directions, so it is not const; writing does not modify.
        const_cast<T&>(value).serialize(out);
    }
    static void read(auto& in, T& value) { value.serialize(in); }
};

/// A trivially copyable struct without a serialize member: its bytes. (The std templates that are
/// trivially copyable, std::array or std::optional of a scalar say, have codecs of their own,
/// which are more specialised than this one and win.)
template <class T> requires(std::is_class_v<T> && std::is_trivially_copyable_v<T> && !has_serialize_member<T>)
struct codec<T> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = sizeof(T);
    static void write(auto& out, const T& value) { out.write_raw(&value, sizeof value); }
    static void read(auto& in, T& value) { in.read_raw(&value, sizeof value); }
};

}  // namespace mproc::detail
