// The value types fuzz_decode decodes, shared with make_corpus (which writes their seeds).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

namespace mproc_fuzz {

enum class Colour : std::uint8_t { red, green, blue };

struct Point {
    std::string label;
    std::vector<double> xs;
    std::optional<std::int32_t> id;
    template <class Archive> void serialize(Archive& ar) { ar(label, xs, id); }
    bool operator==(const Point&) const = default;
};

struct Plain {  // trivially copyable: copied as raw bytes
    std::int32_t a;
    std::uint16_t b;
    char c[6];
    bool operator==(const Plain&) const = default;
};

struct Empty {  // a user type that encodes to nothing: its container elements carry markers
    template <class Archive> void serialize(Archive&) {}
    bool operator==(const Empty&) const = default;
};

// Every type here is compared by value after a round trip; floating-point types are compared by
// their encodings only (NaN != NaN).
using Types = std::tuple<
    std::int64_t, bool, Colour, std::string, std::vector<std::int32_t>, std::vector<bool>, std::vector<std::string>,
    std::vector<std::vector<std::uint8_t>>, std::map<std::string, std::vector<std::int64_t>>, std::set<std::int32_t>,
    std::unordered_map<std::int32_t, std::string>, std::unordered_set<std::string>,
    std::pair<std::string, std::optional<std::uint16_t>>,
    std::tuple<std::int8_t, std::string, std::array<std::uint16_t, 3>>,
    std::variant<std::monostate, std::int32_t, std::string, std::vector<std::string>>,
    std::optional<std::vector<std::optional<std::string>>>, std::chrono::duration<std::int64_t, std::milli>,
    std::vector<std::monostate>, std::vector<Empty>, std::map<std::int32_t, std::tuple<>>,
    std::array<std::monostate, 4>, Plain, std::vector<Plain>, Point, std::vector<Point>,
    std::map<std::string, std::variant<std::int64_t, double, std::string>>>;
constexpr std::size_t type_count = std::tuple_size_v<Types>;

}  // namespace mproc_fuzz
