// mproc — the codecs of std::pair and std::tuple (their parts in order), std::optional (a
// presence byte, then the value) and std::variant (a 32-bit index, then the alternative), and of
// std::monostate (nothing).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "codec.hpp"
#include "scalars.hpp"

namespace mproc::detail {

// The parts of a pair, tuple or variant are serialisable whatever their const: a map's elements
// are std::pair<const K, V>, and the key is decoded in place all the same.
template <class... Ts> inline constexpr bool parts_serializable_v = (codec<std::remove_cv_t<Ts>>::serializable && ...);

/// std::pair: first, then second.
template <class A, class B> struct codec<std::pair<A, B>> {
    static constexpr bool serializable = parts_serializable_v<A, B>;
    static constexpr std::size_t min_size = min_encoded_size<A>() + min_encoded_size<B>();
    static void write(auto& out, const std::pair<A, B>& value) {
        out.write(value.first);
        out.write(value.second);
    }
    static void read(auto& in, std::pair<A, B>& value) {
        // pair<const K, V> cannot be assigned in place; read each part on its own.
        in.read(const_cast<std::remove_const_t<A>&>(value.first));
        in.read(value.second);
    }
};

/// std::tuple: its parts in order.
template <class... Ts> struct codec<std::tuple<Ts...>> {
    static constexpr bool serializable = parts_serializable_v<Ts...>;
    static constexpr std::size_t min_size = (std::size_t{0} + ... + min_encoded_size<Ts>());
    static void write(auto& out, const std::tuple<Ts...>& value) {
        write_parts(out, value, std::index_sequence_for<Ts...>{});
    }
    static void read(auto& in, std::tuple<Ts...>& value) { read_parts(in, value, std::index_sequence_for<Ts...>{}); }

private:
    // Not std::apply with a lambda: the writer and reader stay arguments, not captures, which
    // spares clang a reload of each through the closure after every part.
    template <std::size_t... I>
    static void write_parts(auto& out, const std::tuple<Ts...>& value, std::index_sequence<I...>) {
        (out.write(std::get<I>(value)), ...);
    }
    template <std::size_t... I> static void read_parts(auto& in, std::tuple<Ts...>& value, std::index_sequence<I...>) {
        (in.read(std::get<I>(value)), ...);
    }
};

/// std::optional: a bool saying whether a value follows, then the value.
template <class T> struct codec<std::optional<T>> {
    static constexpr bool serializable = codec<T>::serializable;
    static constexpr std::size_t min_size = 1;
    static void write(auto& out, const std::optional<T>& value) {
        out.write(value.has_value());
        if (value) out.write(*value);
    }
    static void read(auto& in, std::optional<T>& value) {
        bool present = false;
        in.read(present);
        if (present) in.read(value.emplace());
        else value.reset();
    }
};

/// std::variant: the index of the alternative held, as 32 bits, then that alternative.
template <class... Ts> struct codec<std::variant<Ts...>> {
    using Variant = std::variant<Ts...>;
    static constexpr bool serializable = parts_serializable_v<Ts...>;
    static constexpr std::size_t min_size = 4;

    static void write(auto& out, const Variant& value) {
        const auto index = static_cast<std::uint32_t>(value.index());
        out.write_raw(&index, sizeof index);
        std::visit([&](const auto& alternative) { out.write(alternative); }, value);
    }

    static void read(auto& in, Variant& value) {
        std::uint32_t index = 0;
        in.read_raw(&index, sizeof index);
        if (index >= sizeof...(Ts)) in.fail("variant index " + std::to_string(index) + " out of range");
        // The index, not the type, picks the alternative: two alternatives may be one type.
        [&]<std::size_t... I>(std::index_sequence<I...>) {
            ((I == index ? (void)in.read(value.template emplace<I>()) : (void)0), ...);
        }(std::index_sequence_for<Ts...>{});
    }
};

/// std::monostate: nothing at all.
template <> struct codec<std::monostate> {
    static constexpr bool serializable = true;
    static constexpr std::size_t min_size = 0;
    static void write(auto&, const std::monostate&) {}
    static void read(auto&, std::monostate&) {}
};

}  // namespace mproc::detail
