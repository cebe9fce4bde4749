// mproc — the codecs of single values copied as their bytes: arithmetic types, enums, bool (one
// byte, checked when read) and std::chrono durations (their count).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "codec.hpp"

namespace mproc::detail {

/// Arithmetic types and enums: their bytes, in native order.
template <class T> requires std::is_arithmetic_v<T> || std::is_enum_v<T> struct codec<T> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = sizeof(T);
    static void write(auto& out, const T& value) { out.write_raw(&value, sizeof value); }
    static void read(auto& in, T& value) { in.read_raw(&value, sizeof value); }
};

/// bool: one byte, 0 or 1; any other byte is corrupt input.
template <> struct codec<bool> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = 1;
    static void write(auto& out, bool value) {
        const auto byte = static_cast<std::uint8_t>(value ? 1 : 0);
        out.write_raw(&byte, 1);
    }
    static void read(auto& in, bool& value) {
        std::uint8_t byte = 0;
        in.read_raw(&byte, 1);
        if (byte > 1) in.fail("invalid bool byte " + std::to_string(byte));
        value = byte == 1;
    }
};

// Element types whose encoding is their memory, so that a vector of them is copied as one block.
template <class T>
inline constexpr bool is_bulk_copyable_v = (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) || std::is_enum_v<T>;

/// std::chrono::duration: its count.
template <class Rep, class Period> struct codec<std::chrono::duration<Rep, Period>> {
    using Duration = std::chrono::duration<Rep, Period>;
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = sizeof(Rep);
    static void write(auto& out, const Duration& value) {
        const auto count = value.count();
        out.write_raw(&count, sizeof count);
    }
    static void read(auto& in, Duration& value) {
        Rep count{};
        in.read_raw(&count, sizeof count);
        value = Duration(count);
    }
};

}  // namespace mproc::detail
