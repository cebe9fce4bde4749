// Test helper: a value whose serialisation fails on purpose, for the tests that a failure to encode
// or decode fails exactly its own item (the local Pool's and the MPI Pool's).
#pragma once

#include <mproc/serialize.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace mproc_test {

/// Encoding throws half-way when `n` is 13 (its first field is already written); decoding throws
/// when `n` is 7.
struct Fragile {
    long n = 0;
    std::string text;
    template <class Archive> void serialize(Archive& ar) {
        ar(n);
        if constexpr (std::is_same_v<Archive, mproc::Writer>)
            if (n == 13) throw std::runtime_error("13 cannot be encoded");
        if constexpr (std::is_same_v<Archive, mproc::Reader>)
            if (n == 7) throw std::invalid_argument("7 is refused on decoding");
        ar(text);
    }
    bool operator==(const Fragile&) const = default;
};

}  // namespace mproc_test
