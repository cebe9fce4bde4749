// mproc — the codec of std::string (a 64-bit length, then the bytes), and the refusal of string
// views, which point into memory the other process does not have.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "codec.hpp"
#include "containers.hpp"

namespace mproc::detail {

/// std::string: a length, then the characters. (Other std::basic_strings have no codec.)
template <> struct codec<std::string> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = 8;
    static void write(auto& out, const std::string& value) {
        out.write_length(value.size());
        out.write_raw(value.data(), value.size());
    }
    static void read(auto& in, std::string& value) {
        const std::size_t n = in.read_length(1);
        // Built from the input in one pass: resize() would zero the characters first (for a large
        // string, a pass over fresh pages) only for the copy to overwrite them.
        const std::span<const std::byte> chars = in.read_span(n);
        value.assign(reinterpret_cast<const char*>(chars.data()), n);
    }
};

template <> inline constexpr bool is_length_and_bytes_v<std::string> = true;

/// String views: never serialisable, though trivially copyable (which would make them structs).
template <class Char, class Traits> struct codec<std::basic_string_view<Char, Traits>> {
    static constexpr bool serializable = false;
    static constexpr std::size_t min_size = sizeof(std::basic_string_view<Char, Traits>);
};

}  // namespace mproc::detail
