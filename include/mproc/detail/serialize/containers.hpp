// mproc — the codecs of containers: std::vector, std::set, std::unordered_set, std::map,
// std::unordered_map (a 64-bit length, then the elements) and std::array (the elements alone),
// and the refusal of std::span, which points into memory the other process does not have.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <iterator>
#include <map>
#include <set>
#include <span>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "codec.hpp"
#include "scalars.hpp"
#include "tuples.hpp"

namespace mproc::detail {

// A length, then each element, preceded by a marker if it may encode to no bytes.
template <class Range> void write_elements(auto& out, const Range& range) {
    out.write_length(std::size(range));
    for (const auto& element : range) {
        out.template write_marker<typename Range::value_type>();
        out.write(element);
    }
}

/// Whether T encodes as its length (8 bytes) then the bytes data() holds — a std::vector of numbers
/// here, a std::string in strings.hpp — so that an item can be sent from its own memory with no
/// encoding pass (Queue::put).
template <class T> inline constexpr bool is_length_and_bytes_v = false;
template <class T, class Alloc>
inline constexpr bool is_length_and_bytes_v<std::vector<T, Alloc>> = is_bulk_copyable_v<T>;

/// std::vector: a length, then the elements; arithmetic and enum elements as one block.
template <class T, class Alloc> struct codec<std::vector<T, Alloc>> {
    using Vector = std::vector<T, Alloc>;
    static constexpr bool serializable = codec<T>::serializable;
    static constexpr std::size_t min_size = 8;

    static void write(auto& out, const Vector& value) {
        if constexpr (is_bulk_copyable_v<T>) {
            out.write_length(value.size());
            out.write_raw(value.data(), value.size() * sizeof(T));
        } else {
            write_elements(out, value);
        }
    }

    static void read(auto& in, Vector& value) {
        const std::size_t n = in.read_length(min_encoded_size<T>());
        if constexpr (is_bulk_copyable_v<T>) {
            if (n > in.remaining() / sizeof(T)) in.fail("vector length exceeds the input");
            value.resize(n);
            in.read_raw(value.data(), n * sizeof(T));
        } else {
            value.clear();
            // n is checked against the fewest bytes an element encodes to, but an element may be
            // far larger in memory than encoded (a user type counts as one byte): reserve only
            // what a small multiple of the input left can justify, and grow as elements decode.
            value.reserve(std::min(n, in.remaining() * reserve_per_input_byte / sizeof(T)));
            for (std::size_t i = 0; i < n; ++i) {
                in.template read_marker<T>();
                if constexpr (std::is_same_v<T, bool>) {
                    bool b = false;
                    in.read(b);
                    value.push_back(b);
                } else {
                    in.read(value.emplace_back());
                }
            }
        }
    }
};

// std::set and std::unordered_set: a length, then the elements (written by write_elements). Each
// template has a codec of its own that calls these functions, rather than both sharing one codec
// constrained to the set templates: GCC 12 gives the members of such constrained specialisations
// internal linkage, and inlines them differently (see docs/design.md, "Serialisation").
template <class Set> void read_set(auto& in, Set& value) {
    using Element = typename Set::value_type;
    const std::size_t n = in.read_length(min_encoded_size<Element>());
    value.clear();
    for (std::size_t i = 0; i < n; ++i) {
        in.template read_marker<Element>();
        Element element{};
        in.read(element);
        value.insert(std::move(element));
    }
}

/// std::set: see read_set.
template <class Key, class Compare, class Alloc> struct codec<std::set<Key, Compare, Alloc>> {
    using Set = std::set<Key, Compare, Alloc>;
    static constexpr bool serializable = codec<Key>::serializable;
    static constexpr std::size_t min_size = 8;
    static void write(auto& out, const Set& value) { write_elements(out, value); }
    static void read(auto& in, Set& value) { read_set(in, value); }
};

/// std::unordered_set: see read_set.
template <class Key, class Hash, class Equal, class Alloc> struct codec<std::unordered_set<Key, Hash, Equal, Alloc>> {
    using Set = std::unordered_set<Key, Hash, Equal, Alloc>;
    static constexpr bool serializable = codec<Key>::serializable;
    static constexpr std::size_t min_size = 8;
    static void write(auto& out, const Set& value) { write_elements(out, value); }
    static void read(auto& in, Set& value) { read_set(in, value); }
};

// std::map and std::unordered_map: a length, then each key followed by its value (as for sets,
// one codec per template calls these).
template <class Map> void write_map(auto& out, const Map& value) {
    using Key = typename Map::key_type;
    using Mapped = typename Map::mapped_type;
    out.write_length(value.size());
    for (const auto& [key, mapped] : value) {
        out.template write_marker<std::pair<Key, Mapped>>();
        out.write(key);
        out.write(mapped);
    }
}

template <class Map> void read_map(auto& in, Map& value) {
    using Key = typename Map::key_type;
    using Mapped = typename Map::mapped_type;
    const std::size_t n = in.read_length(min_encoded_size<Key>() + min_encoded_size<Mapped>());
    value.clear();
    for (std::size_t i = 0; i < n; ++i) {
        in.template read_marker<std::pair<Key, Mapped>>();
        Key key{};
        in.read(key);
        Mapped mapped{};
        in.read(mapped);
        value.insert_or_assign(std::move(key), std::move(mapped));
    }
}

/// std::map: see write_map.
template <class Key, class T, class Compare, class Alloc> struct codec<std::map<Key, T, Compare, Alloc>> {
    using Map = std::map<Key, T, Compare, Alloc>;
    static constexpr bool serializable = codec<Key>::serializable && codec<T>::serializable;
    static constexpr std::size_t min_size = 8;
    static void write(auto& out, const Map& value) { write_map(out, value); }
    static void read(auto& in, Map& value) { read_map(in, value); }
};

/// std::unordered_map: see write_map.
template <class Key, class T, class Hash, class Equal, class Alloc>
struct codec<std::unordered_map<Key, T, Hash, Equal, Alloc>> {
    using Map = std::unordered_map<Key, T, Hash, Equal, Alloc>;
    static constexpr bool serializable = codec<Key>::serializable && codec<T>::serializable;
    static constexpr std::size_t min_size = 8;
    static void write(auto& out, const Map& value) { write_map(out, value); }
    static void read(auto& in, Map& value) { read_map(in, value); }
};

/// std::array: its elements, with no length (the type has it).
template <class T, std::size_t N> struct codec<std::array<T, N>> {
    static constexpr bool serializable = codec<T>::serializable;
    static constexpr std::size_t min_size = N * min_encoded_size<T>();
    static void write(auto& out, const std::array<T, N>& value) {
        for (const auto& element : value) out.write(element);
    }
    static void read(auto& in, std::array<T, N>& value) {
        for (auto& element : value) in.read(element);
    }
};

/// Spans: never serialisable, though trivially copyable (which would make them structs).
template <class T, std::size_t Extent> struct codec<std::span<T, Extent>> {
    static constexpr bool serializable = false;
    static constexpr std::size_t min_size = sizeof(std::span<T, Extent>);
};

}  // namespace mproc::detail
