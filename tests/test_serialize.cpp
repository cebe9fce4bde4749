// Serialisation: round trips of every supported type, and decoding that never trusts its input.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>
#include <mproc/serialize.hpp>

#include <sys/resource.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

namespace {

using Bytes = std::vector<std::byte>;

template <class T> T round_trip(const T& value) { return mproc::from_bytes<T>(mproc::to_bytes(value)); }

template <class T> void check_round_trip(const T& value) {
    INFO("round trip of " << Catch::Detail::stringify(value));
    CHECK(round_trip(value) == value);
}

/// The encoding of a 64-bit length, as a Writer writes it.
Bytes length_bytes(std::uint64_t n) {
    Bytes out(sizeof n);
    std::memcpy(out.data(), &n, sizeof n);
    return out;
}
Bytes operator+(Bytes a, const Bytes& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

/// Decoding `bytes` as T either succeeds or throws mproc::SerializationError: nothing else.
/// Returns true when it threw.
template <class T> bool decode_fails_cleanly(std::span<const std::byte> bytes) {
    try {
        (void)mproc::from_bytes<T>(bytes);
        return false;
    } catch (const mproc::SerializationError&) {
        return true;
    } catch (const std::exception& e) {
        FAIL("decoding threw " << typeid(e).name() << " instead of mproc::SerializationError: " << e.what());
    } catch (...) {
        FAIL("decoding threw a non-std exception instead of mproc::SerializationError");
    }
    return false;
}

/// Every strict prefix of `value`'s encoding is an error, and so is the encoding with bytes added.
template <class T> void check_truncation_and_trailing(const T& value) {
    const Bytes full = mproc::to_bytes(value);
    REQUIRE(mproc::from_bytes<T>(full) == value);
    for (std::size_t n = 0; n < full.size(); ++n) {
        INFO("prefix of " << n << " of " << full.size() << " bytes");
        CHECK_THROWS_AS(mproc::from_bytes<T>(std::span<const std::byte>(full.data(), n)), mproc::SerializationError);
    }
    for (std::size_t extra : {1, 3, 8, 100}) {
        Bytes longer = full;
        longer.resize(full.size() + extra, std::byte{0});
        INFO(extra << " trailing bytes");
        CHECK_THROWS_AS(mproc::from_bytes<T>(longer), mproc::SerializationError);
    }
}

enum class Colour : std::uint8_t { red = 1, green = 2, blue = 200 };
enum Plain { plain_a, plain_b = 1000000 };
enum class Wide : std::int64_t { low = std::numeric_limits<std::int64_t>::min(), high = 1 };

struct Trivial {
    int a;
    double b;
    char c[5];
    bool operator==(const Trivial& o) const { return a == o.a && b == o.b && std::memcmp(c, o.c, sizeof c) == 0; }
};
static_assert(std::is_trivially_copyable_v<Trivial>);

struct Point {
    std::string label;
    std::vector<double> xs;
    template <class Archive> void serialize(Archive& ar) { ar(label, xs); }
    bool operator==(const Point&) const = default;
};

struct Shape {
    std::string name;
    std::vector<Point> points;
    std::map<std::string, Point> anchors;
    std::optional<Point> centre;
    std::variant<std::monostate, int, Point> tag;
    template <class Archive> void serialize(Archive& ar) { ar(name, points, anchors, centre, tag); }
    bool operator==(const Shape&) const = default;
};

/// A user type that encodes to no bytes at all.
struct Nothing {
    template <class Archive> void serialize(Archive&) {}
    bool operator==(const Nothing&) const = default;
    bool operator<(const Nothing&) const { return false; }
};

std::ostream& operator<<(std::ostream& os, const Point& p) { return os << "Point{" << p.label << "}"; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// What is and is not serialisable (the compile-fail tests prove the rejection is a hard error).

TEST_CASE("is_serializable_v accepts the built-in types and rejects pointers, references and views") {
    STATIC_REQUIRE(mproc::is_serializable_v<int>);
    STATIC_REQUIRE(mproc::is_serializable_v<const double>);
    STATIC_REQUIRE(mproc::is_serializable_v<Colour>);
    STATIC_REQUIRE(mproc::is_serializable_v<std::string>);
    STATIC_REQUIRE(mproc::is_serializable_v<std::vector<std::map<std::string, std::set<int>>>>);
    STATIC_REQUIRE(mproc::is_serializable_v<std::variant<std::monostate, std::tuple<int, std::string>>>);
    STATIC_REQUIRE(mproc::is_serializable_v<std::chrono::milliseconds>);
    STATIC_REQUIRE(mproc::is_serializable_v<Trivial>);
    STATIC_REQUIRE(mproc::is_serializable_v<Point>);
    STATIC_REQUIRE(mproc::is_serializable_v<Shape>);

    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<int*>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<const char*>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<int&>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::string_view>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::span<int>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::wstring>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::vector<int*>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::map<std::string, std::string_view>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::optional<std::vector<void*>>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::variant<int, int*>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::tuple<int, std::string_view>>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::unique_ptr<int>>);
    struct NotTrivial {
        std::string s;
    };
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<NotTrivial>);
    STATIC_REQUIRE_FALSE(mproc::is_serializable_v<std::vector<NotTrivial>>);
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_CASE("arithmetic values round trip, extremes included") {
    check_round_trip(true);
    check_round_trip(false);
    check_round_trip('x');
    check_round_trip(static_cast<signed char>(-128));
    check_round_trip(static_cast<unsigned char>(255));
    check_round_trip(L'\x263a');
    check_round_trip(u8'z');
    check_round_trip(u'\xffff');
    check_round_trip(U'\x10ffff');
    check_round_trip(std::numeric_limits<std::int8_t>::min());
    check_round_trip(std::numeric_limits<std::int16_t>::min());
    check_round_trip(std::numeric_limits<std::int32_t>::min());
    check_round_trip(std::numeric_limits<std::int64_t>::min());
    check_round_trip(std::numeric_limits<std::uint64_t>::max());
    check_round_trip(std::numeric_limits<std::uint16_t>::max());
    check_round_trip(3.5f);
    check_round_trip(-2.25);
    check_round_trip(std::numeric_limits<double>::max());
    check_round_trip(std::numeric_limits<double>::denorm_min());
    check_round_trip(std::numeric_limits<double>::infinity());
    check_round_trip(-std::numeric_limits<float>::infinity());
    check_round_trip(1.0L / 3.0L);

    const double nan = round_trip(std::numeric_limits<double>::quiet_NaN());
    CHECK(std::isnan(nan));
    const double negative_zero = round_trip(-0.0);
    CHECK(negative_zero == 0.0);
    CHECK(std::signbit(negative_zero));

    CHECK(mproc::to_bytes(std::int32_t{7}).size() == 4);
    CHECK(mproc::to_bytes(true).size() == 1);
}

TEST_CASE("enums round trip with their underlying values") {
    check_round_trip(Colour::red);
    check_round_trip(Colour::blue);
    check_round_trip(plain_b);
    check_round_trip(Wide::low);
    CHECK(mproc::to_bytes(Colour::blue).size() == 1);
    CHECK(mproc::to_bytes(Wide::high).size() == 8);
    check_round_trip(std::vector<Colour>{Colour::green, Colour::red, Colour::blue});
}

TEST_CASE("strings round trip, embedded zeros and every byte value included") {
    check_round_trip(std::string());
    check_round_trip(std::string("hello"));
    check_round_trip(std::string("a\0b\0c", 5));
    std::string all;
    for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
    check_round_trip(all);
    check_round_trip(std::string(100000, 'q'));
    CHECK(mproc::to_bytes(std::string()).size() == 8);
}

TEST_CASE("vectors round trip: arithmetic, bool, strings, nested and empty") {
    check_round_trip(std::vector<int>{});
    check_round_trip(std::vector<int>{1, -2, 3});
    check_round_trip(std::vector<double>{0.5, -1e300, 1e-300});
    check_round_trip(std::vector<std::byte>{std::byte{0}, std::byte{255}});
    check_round_trip(std::vector<bool>{});
    check_round_trip(std::vector<bool>{true, false, true, true, false, false, false, true, true});
    std::vector<bool> many_bools(1001);
    for (std::size_t i = 0; i < many_bools.size(); ++i) many_bools[i] = (i * 7919) % 3 == 0;
    check_round_trip(many_bools);
    check_round_trip(std::vector<std::string>{});
    check_round_trip(std::vector<std::string>{"", "one", std::string(1000, 'x'), ""});
    check_round_trip(std::vector<std::vector<int>>{{}, {1}, {}, {2, 3, 4}});
    check_round_trip(std::vector<std::vector<std::string>>{{"a", ""}, {}, {"b"}});
    check_round_trip(std::vector<Trivial>{{1, 2.5, "abcd"}, {-1, 0.0, ""}});
}

TEST_CASE("arrays, pairs and tuples round trip") {
    check_round_trip(std::array<int, 4>{1, 2, 3, 4});
    check_round_trip(std::array<int, 0>{});
    check_round_trip(std::array<std::string, 3>{"x", "", "zz"});
    check_round_trip(std::array<bool, 3>{true, false, true});
    check_round_trip(std::pair<int, std::string>{5, "five"});
    check_round_trip(std::pair<std::string, std::vector<int>>{"", {}});
    check_round_trip(std::tuple<>{});
    check_round_trip(std::tuple<int>{9});
    check_round_trip(std::tuple<int, double, std::string, bool, Colour>{1, 2.0, "three", true, Colour::green});
    check_round_trip(
        std::tuple<std::tuple<int, std::tuple<std::string>>, std::pair<char, char>>{{1, {"x"}}, {'a', 'b'}});
}

TEST_CASE("optionals and variants round trip, empty and monostate included") {
    check_round_trip(std::optional<int>{});
    check_round_trip(std::optional<int>{0});
    check_round_trip(std::optional<std::string>{""});
    check_round_trip(std::optional<std::optional<int>>{std::optional<int>{}});
    check_round_trip(std::optional<std::optional<int>>{std::nullopt});
    check_round_trip(std::optional<std::vector<std::string>>{{"a", "b"}});

    using V = std::variant<std::monostate, int, std::string, std::vector<double>>;
    check_round_trip(V{});
    check_round_trip(V{42});
    check_round_trip(V{std::string("str")});
    check_round_trip(V{std::vector<double>{1.5}});
    check_round_trip(std::monostate{});
    CHECK(mproc::to_bytes(std::monostate{}).empty());

    // Two alternatives of one type: the index, not the type, picks the alternative.
    using Twins = std::variant<int, int>;
    const auto second = round_trip(Twins{std::in_place_index<1>, 7});
    CHECK(second.index() == 1);
    CHECK(std::get<1>(second) == 7);
}

TEST_CASE("maps and sets round trip, ordered and unordered") {
    check_round_trip(std::map<int, int>{});
    check_round_trip(std::map<std::string, int>{{"a", 1}, {"", 0}, {"long key", -7}});
    check_round_trip(std::map<int, std::vector<std::string>>{{1, {"x"}}, {2, {}}});
    check_round_trip(std::unordered_map<std::string, std::string>{});
    check_round_trip(std::unordered_map<std::string, std::string>{{"k", "v"}, {"", ""}, {"x", std::string(500, 'y')}});
    check_round_trip(std::unordered_map<int, std::map<std::string, double>>{{1, {{"a", 1.0}}}, {2, {}}});
    check_round_trip(std::set<int>{});
    check_round_trip(std::set<std::string>{"b", "a", ""});
    check_round_trip(std::set<std::vector<int>>{{}, {1}, {1, 2}});
    check_round_trip(std::unordered_set<int>{});
    check_round_trip(std::unordered_set<Colour>{Colour::red, Colour::blue});
    check_round_trip(std::unordered_set<std::string>{"one", "two", "three"});
    std::map<int, int> big;
    for (int i = 0; i < 10000; ++i) big[i * 3] = -i;
    check_round_trip(big);
}

TEST_CASE("chrono durations round trip with their representation") {
    using namespace std::chrono_literals;
    check_round_trip(std::chrono::nanoseconds{-123456789});
    check_round_trip(std::chrono::milliseconds{0});
    check_round_trip(std::chrono::seconds{86400});
    check_round_trip(std::chrono::hours{-3});
    check_round_trip(std::chrono::duration<double>{0.25});
    check_round_trip(std::chrono::duration<float, std::milli>{1.5f});
    check_round_trip(std::vector<std::chrono::microseconds>{1us, 2us});
    check_round_trip(std::optional<std::chrono::seconds>{5s});
}

TEST_CASE("trivially copyable structs round trip byte for byte") {
    check_round_trip(Trivial{-5, 3.25, "hi"});
    check_round_trip(std::map<int, Trivial>{{1, {1, 1.0, "a"}}, {2, {2, 2.0, "b"}}});
    check_round_trip(std::optional<Trivial>{Trivial{0, 0.0, ""}});
}

TEST_CASE("user types round trip through their serialize member") {
    check_round_trip(Point{});
    check_round_trip(Point{"origin", {0.0, 0.0}});
    Shape shape{"tri",
                {{"a", {0, 0}}, {"b", {1, 0}}, {"c", {0, 1}}},
                {{"first", {"a", {0, 0}}}, {"", {}}},
                Point{"mid", {0.3, 0.3}},
                Point{"tagged", {9}}};
    check_round_trip(shape);
    check_round_trip(Shape{});
    check_round_trip(std::vector<Shape>{shape, Shape{}, shape});
    check_round_trip(std::map<std::string, std::vector<Point>>{{"p", {{"x", {1}}}}, {"empty", {}}});
}

TEST_CASE("types that encode to no bytes round trip inside containers") {
    check_round_trip(std::vector<std::monostate>(3));
    check_round_trip(std::vector<std::tuple<>>(5));
    check_round_trip(std::vector<Nothing>(7));
    check_round_trip(std::vector<std::array<int, 0>>(2));
    check_round_trip(std::set<std::monostate>{std::monostate{}});
    check_round_trip(std::map<std::monostate, std::monostate>{{std::monostate{}, std::monostate{}}});
    check_round_trip(std::map<int, std::monostate>{{1, {}}, {2, {}}});
    check_round_trip(std::pair<std::vector<Nothing>, int>{std::vector<Nothing>(4), 9});
    check_round_trip(std::vector<std::monostate>{});
}

TEST_CASE("deeply nested values round trip") {
    using Leaf = std::variant<int, std::string, std::vector<std::pair<int, std::set<std::string>>>>;
    using Deep = std::map<std::string, std::vector<std::optional<Leaf>>>;
    Deep deep{
        {"ints", {Leaf{1}, std::nullopt, Leaf{-1}}},
        {"strings", {Leaf{std::string("s")}, Leaf{std::string()}}},
        {"pairs", {Leaf{std::vector<std::pair<int, std::set<std::string>>>{{1, {"a", "b"}}, {2, {}}}}}},
        {"", {}},
    };
    check_round_trip(deep);
    check_truncation_and_trailing(deep);

    // Eight levels of vectors, each with an empty sibling.
    using V1 = std::vector<int>;
    using V2 = std::vector<V1>;
    using V3 = std::vector<V2>;
    using V4 = std::vector<V3>;
    using V5 = std::vector<V4>;
    using V6 = std::vector<V5>;
    using V7 = std::vector<V6>;
    using V8 = std::vector<V7>;
    V8 nest(2);
    nest[0].resize(2);
    nest[0][1].resize(1);
    nest[0][1][0].resize(3);
    nest[0][1][0][2].resize(1);
    nest[0][1][0][2][0].resize(1);
    nest[0][1][0][2][0][0].resize(2);
    nest[0][1][0][2][0][0][1] = {1, 2, 3};
    check_round_trip(nest);
    check_truncation_and_trailing(nest);
}

TEST_CASE("a reader decodes values written one after another") {
    mproc::Buffer buffer;
    mproc::encode_into(buffer, 1, std::string("two"), std::vector<int>{3}, Point{"four", {4.0}});
    mproc::Reader reader(buffer.bytes());
    int one = 0;
    std::string two;
    std::vector<int> three;
    Point four;
    reader(one, two, three, four);
    CHECK(one == 1);
    CHECK(two == "two");
    CHECK(three == std::vector<int>{3});
    CHECK(four == Point{"four", {4.0}});
    CHECK(reader.remaining() == 0);
    int more = 0;
    CHECK_THROWS_AS(reader(more), mproc::SerializationError);
}

TEST_CASE("decoding replaces what the target held") {
    const Bytes bytes = mproc::to_bytes(std::map<int, int>{{1, 1}});
    mproc::Reader reader(bytes);
    std::map<int, int> held{{7, 7}, {8, 8}};
    reader(held);
    CHECK(held == std::map<int, int>{{1, 1}});
}

TEST_CASE("a moved-from Buffer is empty and usable") {
    mproc::Buffer a;
    a.append("abc", 3);
    mproc::Buffer b(std::move(a));
    CHECK(b.size() == 3);
    CHECK(a.size() == 0);  // NOLINT(bugprone-use-after-move): the state after a move is the point
    a.append("xy", 2);
    CHECK(a.size() == 2);
    CHECK(std::memcmp(a.data(), "xy", 2) == 0);
    mproc::Buffer c;
    c.append("long enough to allocate", 23);
    c = std::move(b);
    CHECK(c.size() == 3);
    CHECK(std::memcmp(c.data(), "abc", 3) == 0);
    CHECK(b.size() == 0);  // NOLINT(bugprone-use-after-move)
    b.append("z", 1);
    CHECK(b.size() == 1);
}

TEST_CASE("64 MiB values round trip") {
    constexpr std::size_t size = 64u << 20;
    SECTION("a string") {
        std::string text(size, '\0');
        for (std::size_t i = 0; i < size; ++i) text[i] = static_cast<char>((i * 2654435761u) >> 13);
        const Bytes bytes = mproc::to_bytes(text);
        CHECK(bytes.size() == size + 8);
        CHECK(mproc::from_bytes<std::string>(bytes) == text);
    }
    SECTION("a vector") {
        std::vector<std::uint32_t> numbers(size / sizeof(std::uint32_t));
        for (std::size_t i = 0; i < numbers.size(); ++i) numbers[i] = static_cast<std::uint32_t>(i * 2654435761u);
        const Bytes bytes = mproc::to_bytes(numbers);
        CHECK(bytes.size() == size + 8);
        CHECK(mproc::from_bytes<std::vector<std::uint32_t>>(bytes) == numbers);
    }
}

// ---------------------------------------------------------------------------------------------
// Untrusted input

TEST_CASE("every truncation of an encoding and every trailing byte is a SerializationError") {
    check_truncation_and_trailing(std::int64_t{-1});
    check_truncation_and_trailing(true);
    check_truncation_and_trailing(std::string("hello"));
    check_truncation_and_trailing(std::vector<int>{1, 2, 3});
    check_truncation_and_trailing(std::vector<bool>{true, false, true});
    check_truncation_and_trailing(std::vector<std::string>{"ab", "", "c"});
    check_truncation_and_trailing(std::array<std::int16_t, 3>{1, 2, 3});
    check_truncation_and_trailing(std::pair<int, std::string>{1, "x"});
    check_truncation_and_trailing(std::tuple<char, double, std::string>{'c', 1.0, "s"});
    check_truncation_and_trailing(std::optional<std::string>{"opt"});
    check_truncation_and_trailing(std::variant<int, std::string>{std::string("v")});
    check_truncation_and_trailing(std::map<std::string, int>{{"a", 1}, {"b", 2}});
    check_truncation_and_trailing(std::unordered_map<int, std::string>{{1, "one"}});
    check_truncation_and_trailing(std::set<int>{5, 6});
    check_truncation_and_trailing(std::unordered_set<std::string>{"u"});
    check_truncation_and_trailing(std::chrono::milliseconds{5});
    check_truncation_and_trailing(Trivial{1, 2.0, "x"});
    check_truncation_and_trailing(Point{"p", {1.0, 2.0}});
    check_truncation_and_trailing(Shape{"s", {{"a", {1}}}, {{"k", {}}}, Point{}, 3});
    check_truncation_and_trailing(std::vector<std::monostate>(3));
    check_truncation_and_trailing(std::vector<Nothing>(2));
}

TEST_CASE("an empty input is not a value") {
    const Bytes none;
    CHECK_THROWS_AS(mproc::from_bytes<int>(none), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<std::string>(none), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<Point>(none), mproc::SerializationError);
    // The types that encode to nothing decode from nothing.
    CHECK_NOTHROW(mproc::from_bytes<std::monostate>(none));
    CHECK_NOTHROW(mproc::from_bytes<std::tuple<>>(none));
}

TEST_CASE("invalid tags are SerializationErrors") {
    CHECK_THROWS_AS(mproc::from_bytes<bool>(Bytes{std::byte{2}}), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<std::vector<bool>>(length_bytes(1) + Bytes{std::byte{0xff}}),
                    mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<std::optional<int>>(
                        Bytes{std::byte{7}, std::byte{0}, std::byte{0}, std::byte{0}, std::byte{0}}),
                    mproc::SerializationError);
    // Variant index 2 of a two-alternative variant, and the largest index there is.
    for (std::uint32_t index : {2u, 0xffffffffu}) {
        Bytes bytes(4 + 4, std::byte{0});
        std::memcpy(bytes.data(), &index, 4);
        CHECK_THROWS_AS((mproc::from_bytes<std::variant<int, float>>(bytes)), mproc::SerializationError);
    }
    // Elements that encode to nothing carry a marker; a wrong one is corrupt input.
    Bytes empties = mproc::to_bytes(std::vector<std::monostate>(2));
    REQUIRE(empties.size() > 8);
    empties.back() = ~empties.back();
    CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::monostate>>(empties), mproc::SerializationError);
    try {
        (void)mproc::from_bytes<bool>(Bytes{std::byte{9}});
        FAIL("an invalid bool decoded");
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("bool"));
        CHECK(std::string(e.what()).find('\n') == std::string::npos);
    }
}

TEST_CASE("a length larger than the input is a SerializationError, never an allocation") {
    for (std::uint64_t huge : {std::uint64_t{1} << 62, std::uint64_t{1} << 63, ~std::uint64_t{0},
                               std::uint64_t{1} << 32, std::uint64_t{1} << 40, std::uint64_t{1000}}) {
        INFO("length " << huge);
        for (const Bytes& tail : {Bytes{}, Bytes(16, std::byte{1})}) {
            const Bytes bytes = length_bytes(huge) + tail;
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<int>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<char>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<bool>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::string>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS((mproc::from_bytes<std::map<int, int>>(bytes)), mproc::SerializationError);
            CHECK_THROWS_AS((mproc::from_bytes<std::unordered_map<std::string, int>>(bytes)),
                            mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::set<std::string>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::vector<int>>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::string>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<Point>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::monostate>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<Nothing>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::tuple<>>>(bytes), mproc::SerializationError);
            CHECK_THROWS_AS(mproc::from_bytes<std::vector<Trivial>>(bytes), mproc::SerializationError);
        }
        // The huge length one level down, inside a well-formed outer value.
        const Bytes inner = length_bytes(1) + length_bytes(huge) + Bytes(12, std::byte{0});
        CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::vector<int>>>(inner), mproc::SerializationError);
        CHECK_THROWS_AS(mproc::from_bytes<std::vector<std::string>>(inner), mproc::SerializationError);
        const Bytes in_map = length_bytes(1) + Bytes(4, std::byte{0}) + length_bytes(huge);
        CHECK_THROWS_AS((mproc::from_bytes<std::map<int, std::string>>(in_map)), mproc::SerializationError);
        CHECK_THROWS_AS((mproc::from_bytes<std::map<int, std::vector<std::string>>>(in_map)),
                        mproc::SerializationError);
    }
}

namespace {

/// A user type far larger in memory (1 MiB) than the fewest bytes it may claim encoded (none: a
/// one-byte element marker stands for it inside a container).
struct BigRecord {
    std::array<double, 131072> samples{};
    template <class Archive> void serialize(Archive& ar) { ar(samples); }
};

/// This process's address space, in bytes (VmSize in /proc/self/status).
std::size_t address_space_bytes() {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
        if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;
    return 0;
}

/// Runs `decode` in a child whose address space may grow by 256 MiB at most, and returns how the
/// decode ended there: "SerializationError", "bad_alloc", "no error", "other: ...", or how the child died.
template <class Decode> std::string decode_in_small_address_space(Decode decode) {
    auto [from_child, to_parent] = mproc::Pipe<std::string>(false);
    mproc::Process child([&] {
        const std::size_t limit = address_space_bytes() + (std::size_t{256} << 20);
        const rlimit lowered{limit, limit};
        if (::setrlimit(RLIMIT_AS, &lowered) != 0) {
            to_parent.send("setrlimit failed");
            return;
        }
        std::string outcome;
        try {
            decode();
            outcome = "no error";
        } catch (const mproc::SerializationError&) {
            outcome = "SerializationError";
        } catch (const std::bad_alloc&) {
            outcome = "bad_alloc";
        } catch (const std::exception& e) {
            outcome = std::string("other: ") + e.what();
        }
        to_parent.send(outcome);
    });
    child.start();
    to_parent.close();
    std::string outcome;
    try {
        outcome = from_child.recv();
    } catch (const mproc::Error&) {
        outcome = "no report";
    }
    REQUIRE(child.join(std::chrono::seconds(120)));
    if (child.exitcode() != 0) outcome += " (child exit code " + std::to_string(*child.exitcode()) + ")";
    return outcome;
}

}  // namespace

TEST_CASE("a length of elements small when encoded but large in memory reserves only what the input can hold") {
    // 64 KiB of element markers claiming 65536 BigRecords: reserving them would take 64 GiB. Each
    // element needs 1 MiB of input to decode, so the first one runs out of bytes.
    const Bytes records = length_bytes(65536) + Bytes(65536, std::byte{0xE1});
    CHECK(decode_in_small_address_space([&] { (void)mproc::from_bytes<std::vector<BigRecord>>(records); }) ==
          "SerializationError");
    // The same inside a well-formed outer value, and as a map's values.
    const Bytes nested = length_bytes(1) + records;
    CHECK(decode_in_small_address_space(
              [&] { (void)mproc::from_bytes<std::vector<std::vector<BigRecord>>>(nested); }) == "SerializationError");

    // Through a Pipe: 60,000 bytes claiming 60,000 optional<array<double, 4096>> (32 KiB each,
    // 1.8 GiB in all) whose first presence byte is invalid. (Small enough for the pipe's buffer:
    // the child writes before it reads.)
    using Optionals = std::vector<std::optional<std::array<double, 4096>>>;
    const Bytes optionals = length_bytes(60000) + Bytes(60000, std::byte{2});
    CHECK(decode_in_small_address_space([&] {
              auto [reader, writer] = mproc::Pipe<Optionals>(false);
              writer.send_bytes(optionals);
              (void)reader.recv();
          }) == "SerializationError");

    // Valid input of the same shape still decodes: absent optionals, one byte each.
    const Bytes absent = length_bytes(64) + Bytes(64, std::byte{0});
    CHECK(mproc::from_bytes<Optionals>(absent).size() == 64);
    // And so does a real vector of BigRecords.
    std::vector<BigRecord> two(2);
    two[1].samples[7] = 3.5;
    CHECK(mproc::from_bytes<std::vector<BigRecord>>(mproc::to_bytes(two))[1].samples[7] == 3.5);
}

namespace {

Bytes random_bytes(std::mt19937_64& rng, std::size_t n) {
    Bytes out(n);
    for (auto& b : out) b = static_cast<std::byte>(rng() & 0xff);
    return out;
}

/// Random input of random length, and valid encodings with random bytes changed or cut off: the
/// decoder must throw SerializationError or produce a value, and never crash or throw anything else.
template <class T> void fuzz_decode(const std::vector<T>& seeds_values, int seeds) {
    std::vector<Bytes> valid;
    for (const T& v : seeds_values) valid.push_back(mproc::to_bytes(v));
    std::size_t failures = 0, attempts = 0;
    for (int seed = 0; seed < seeds; ++seed) {
        std::mt19937_64 rng(static_cast<std::uint64_t>(seed) * 0x9e3779b97f4a7c15ull + 1);
        // Pure noise, including lengths that land on small plausible counts.
        const Bytes noise = random_bytes(rng, rng() % 96);
        failures += decode_fails_cleanly<T>(noise);
        ++attempts;
        // A valid encoding with 1-4 bytes overwritten.
        for (const Bytes& base : valid) {
            if (base.empty()) continue;
            Bytes mutated = base;
            const int edits = 1 + static_cast<int>(rng() % 4);
            for (int e = 0; e < edits; ++e) mutated[rng() % mutated.size()] = static_cast<std::byte>(rng() & 0xff);
            failures += decode_fails_cleanly<T>(mutated);
            // ...cut at a random point, or with noise appended.
            const Bytes cut(mutated.begin(), mutated.begin() + static_cast<std::ptrdiff_t>(rng() % mutated.size()));
            failures += decode_fails_cleanly<T>(cut);
            failures += decode_fails_cleanly<T>(base + random_bytes(rng, 1 + rng() % 8));
            attempts += 3;
        }
    }
    // The input was mostly garbage: most of it must have been rejected.
    CHECK(failures > attempts / 2);
}

}  // namespace

TEST_CASE("random and corrupted bytes never crash the decoder") {
    constexpr int seeds = 300;
    fuzz_decode<int>({1}, seeds);
    fuzz_decode<bool>({true}, seeds);
    fuzz_decode<std::string>({"hello", ""}, seeds);
    fuzz_decode<std::vector<int>>({{1, 2, 3}, {}}, seeds);
    fuzz_decode<std::vector<bool>>({{true, false}}, seeds);
    fuzz_decode<std::vector<std::string>>({{"a", "bc", ""}}, seeds);
    fuzz_decode<std::vector<std::vector<int>>>({{{1}, {}, {2, 3}}}, seeds);
    fuzz_decode<std::vector<std::vector<std::vector<std::string>>>>({{{{"x"}, {}}, {{"y", "z"}}}}, seeds);
    fuzz_decode<std::map<std::string, std::vector<int>>>({{{"k", {1}}, {"", {}}}}, seeds);
    fuzz_decode<std::unordered_map<int, std::string>>({{{1, "one"}, {2, "two"}}}, seeds);
    fuzz_decode<std::set<std::string>>({{"a", "b"}}, seeds);
    fuzz_decode<std::unordered_set<std::int64_t>>({{1, 2, 3}}, seeds);
    fuzz_decode<std::optional<std::string>>({std::string("x"), std::nullopt}, seeds);
    fuzz_decode<std::variant<std::monostate, int, std::string, std::vector<double>>>(
        {std::monostate{}, 5, std::string("s"), std::vector<double>{1.0}}, seeds);
    fuzz_decode<std::tuple<int, std::string, std::optional<std::vector<std::string>>>>(
        {{1, "a", std::vector<std::string>{"b"}}}, seeds);
    fuzz_decode<std::array<std::string, 3>>({{"a", "b", "c"}}, seeds);
    fuzz_decode<std::chrono::milliseconds>({std::chrono::milliseconds{3}}, seeds);
    fuzz_decode<Point>({Point{"p", {1.0}}}, seeds);
    fuzz_decode<Shape>({Shape{"s", {{"a", {1}}}, {{"k", {}}}, Point{}, 3}}, seeds);
    fuzz_decode<std::vector<std::monostate>>({std::vector<std::monostate>(3)}, seeds);
    fuzz_decode<std::vector<Nothing>>({std::vector<Nothing>(3)}, seeds);
}

TEST_CASE("decoded values that re-encode are canonical: a successful decode re-encodes to the same bytes") {
    // For types whose encoding is one-to-one, whatever decodes must encode back to the input.
    std::size_t decoded = 0;
    for (int seed = 0; seed < 2000; ++seed) {
        std::mt19937_64 rng(static_cast<std::uint64_t>(seed) + 77);
        const auto base = mproc::to_bytes(
            std::tuple<std::vector<std::uint8_t>, bool, std::optional<std::int16_t>>{{1, 2}, true, std::int16_t{3}});
        Bytes mutated = base;
        mutated[rng() % mutated.size()] = static_cast<std::byte>(rng() & 0xff);
        using T = std::tuple<std::vector<std::uint8_t>, bool, std::optional<std::int16_t>>;
        try {
            const T value = mproc::from_bytes<T>(mutated);
            ++decoded;
            CHECK(mproc::to_bytes(value) == mutated);
        } catch (const mproc::SerializationError&) {}
    }
    CHECK(decoded > 0);
}
