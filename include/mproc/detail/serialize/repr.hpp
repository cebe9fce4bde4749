// mproc — printing values the way fmt prints them inside containers: strings quoted, numbers
// bare, sequences in [], maps in {k: v}, tuples in (). Used by SharedDict's formatter (so
// `fmt::format("{}", d)` reads `{"count": 15}`) and by its KeyError messages.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <fmt/core.h>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace mproc::detail {

// Which std template a type is, for the printed forms below.
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
template <class T> struct is_std_string : std::false_type {};
template <class C, class Tr, class A> struct is_std_string<std::basic_string<C, Tr, A>> : std::true_type {};
template <class T> struct is_std_map : std::false_type {};
template <class K, class V, class C, class A> struct is_std_map<std::map<K, V, C, A>> : std::true_type {};
template <class K, class V, class H, class E, class A>
struct is_std_map<std::unordered_map<K, V, H, E, A>> : std::true_type {};
template <class T> struct is_std_set : std::false_type {};
template <class K, class C, class A> struct is_std_set<std::set<K, C, A>> : std::true_type {};
template <class K, class H, class E, class A> struct is_std_set<std::unordered_set<K, H, E, A>> : std::true_type {};

inline void repr_string(std::string& out, std::string_view s) {
    out += '"';
    for (const char ch : s) {
        switch (ch) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f)
                    out += fmt::format("\\x{:02x}", static_cast<unsigned>(static_cast<unsigned char>(ch)));
                else out += ch;
        }
    }
    out += '"';
}

template <class T> void repr_into(std::string& out, const T& value);

template <class Range> void repr_sequence(std::string& out, const Range& range, char open, char close) {
    out += open;
    bool first = true;
    for (const auto& element : range) {
        if (!first) out += ", ";
        first = false;
        repr_into(out, element);
    }
    out += close;
}

template <class T> constexpr bool repr_supported() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool> || std::is_arithmetic_v<U> || is_std_string<U>::value ||
                  std::is_same_v<U, std::monostate>)
        return true;
    else if constexpr (is_std_optional<U>::value || is_std_vector<U>::value || is_std_array<U>::value ||
                       is_std_set<U>::value)
        return repr_supported<typename U::value_type>();
    else if constexpr (is_std_map<U>::value)
        return repr_supported<typename U::key_type>() && repr_supported<typename U::mapped_type>();
    else if constexpr (is_std_pair<U>::value || is_std_tuple<U>::value)
        return []<std::size_t... I>(std::index_sequence<I...>) {
            return (repr_supported<std::tuple_element_t<I, U>>() && ...);
        }(std::make_index_sequence<std::tuple_size_v<U>>{});
    else if constexpr (is_std_variant<U>::value)
        return []<class... A>(std::type_identity<std::variant<A...>>) {
            return (repr_supported<A>() && ...);
        }(std::type_identity<U>{});
    else return fmt::is_formattable<U>::value;
}

/// Appends the representation of `value` to `out`.
template <class T> void repr_into(std::string& out, const T& value) {
    static_assert(repr_supported<T>(), "mproc: this type has no printed form: give it a fmt::formatter");
    if constexpr (std::is_same_v<T, bool>) {
        out += value ? "true" : "false";
    } else if constexpr (std::is_same_v<T, char>) {
        out += '\'';
        out += value;
        out += '\'';
    } else if constexpr (std::is_arithmetic_v<T>) {
        out += fmt::format("{}", value);
    } else if constexpr (is_std_string<T>::value) {
        repr_string(out, value);
    } else if constexpr (std::is_same_v<T, std::monostate>) {
        out += "None";
    } else if constexpr (is_std_optional<T>::value) {
        if (value) repr_into(out, *value);
        else out += "None";
    } else if constexpr (is_std_vector<T>::value || is_std_array<T>::value) {
        repr_sequence(out, value, '[', ']');
    } else if constexpr (is_std_set<T>::value) {
        repr_sequence(out, value, '{', '}');
    } else if constexpr (is_std_map<T>::value) {
        out += '{';
        bool first = true;
        for (const auto& [k, v] : value) {
            if (!first) out += ", ";
            first = false;
            repr_into(out, k);
            out += ": ";
            repr_into(out, v);
        }
        out += '}';
    } else if constexpr (is_std_pair<T>::value || is_std_tuple<T>::value) {
        out += '(';
        std::apply(
            [&](const auto&... parts) {
                bool first = true;
                ((out += first ? "" : ", ", first = false, repr_into(out, parts)), ...);
            },
            value);
        out += ')';
    } else if constexpr (is_std_variant<T>::value) {
        std::visit([&](const auto& alternative) { repr_into(out, alternative); }, value);
    } else {
        out += fmt::format("{}", value);
    }
}

template <class T> std::string repr(const T& value) {
    std::string out;
    repr_into(out, value);
    return out;
}

}  // namespace mproc::detail
