// Pool: apply / apply_async / AsyncResult, map / starmap (and their _async forms), imap /
// imap_unordered, exceptions across the process boundary, and the pool's lifetime (close, join,
// terminate, the destructor). Worker deaths, timeouts and worker rotation: test_pool_failures.cpp.
// Callbacks and parent threads: test_pool_threads.cpp.
#include "test_pool_common.hpp"

#include <mproc/process.hpp>

#include <array>
#include <atomic>
#include <future>
#include <list>
#include <map>
#include <numeric>
#include <optional>
#include <ranges>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <typeinfo>
#include <variant>

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

// ---- tasks (function pointers and captureless lambdas: workers see no captures) ----------------

int square(int x) { return x * x; }
int add(int x, int y) { return x + y; }
long add3(int a, long b, short c) { return a + b + c; }
int worker_pid(int) { return static_cast<int>(::getpid()); }

std::string shout(std::string s) {
    for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return s + "!";
}
std::vector<int> count_to(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), 1);
    return v;
}
std::map<std::string, int> word_lengths(std::vector<std::string> words) {
    std::map<std::string, int> m;
    for (auto& w : words) m[w] = static_cast<int>(w.size());
    return m;
}
std::optional<int> half_if_even(int x) { return x % 2 == 0 ? std::optional<int>(x / 2) : std::nullopt; }
std::variant<int, std::string> int_or_text(int x) {
    if (x % 3 == 0) return std::string("fizz") + std::to_string(x);
    return x;
}

struct Point {
    int x = 0;
    double y = 0;
    std::string label;
    std::vector<int> tags;
    template <class Archive> void serialize(Archive& ar) { ar(x, y, label, tags); }
    bool operator==(const Point&) const = default;
};
Point shift(Point p, int dx) {
    p.x += dx;
    p.y *= 2;
    p.label += "+" + std::to_string(dx);
    p.tags.push_back(dx);
    return p;
}

struct Trivial {  // trivially copyable: serialised as bytes
    int a;
    double b;
    char c[8];
};
Trivial bump(Trivial t) {
    ++t.a;
    t.b += 0.5;
    t.c[0] = 'Z';
    return t;
}

std::string reversed(std::string s) {
    std::reverse(s.begin(), s.end());
    return s;
}
std::uint64_t checksum(std::string s) {
    std::uint64_t h = 1469598103934665603ull;
    for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    return h ^ s.size();
}
std::string big_string(int seed) {
    std::string s(8u << 20, '\0');
    for (std::size_t i = 0; i < s.size(); ++i)
        s[i] = static_cast<char>('a' + (i * 7 + static_cast<std::size_t>(seed)) % 26);
    return s;
}

// ---- exceptions ------------------------------------------------------------------------------

}  // namespace

namespace pooltest_ns {
struct CustomError : std::exception {
    const char* what() const noexcept override { return "custom failure 42"; }
};
struct DerivedRange : std::out_of_range {
    DerivedRange() : std::out_of_range("derived out of range") {}
};
struct DerivedRuntime : std::runtime_error {
    DerivedRuntime() : std::runtime_error("derived runtime") {}
};
}  // namespace pooltest_ns

namespace {

enum Thrown {
    t_out_of_range,
    t_invalid_argument,
    t_domain_error,
    t_length_error,
    t_overflow_error,
    t_underflow_error,
    t_range_error,
    t_logic_error,
    t_runtime_error,
    t_bad_alloc,
    t_custom,
    t_int,
    t_derived_range,
    t_derived_runtime,
    t_system_error,
    t_none
};

int throw_kind(int kind) {
    switch (kind) {
        case t_out_of_range: throw std::out_of_range("oor: index 7");
        case t_invalid_argument: throw std::invalid_argument("bad argument 'x'");
        case t_domain_error: throw std::domain_error("outside the domain");
        case t_length_error: throw std::length_error("too long");
        case t_overflow_error: throw std::overflow_error("overflowed");
        case t_underflow_error: throw std::underflow_error("underflowed");
        case t_range_error: throw std::range_error("out of range (range_error)");
        case t_logic_error: throw std::logic_error("illogical");
        case t_runtime_error: throw std::runtime_error("at run time");
        case t_bad_alloc: throw std::bad_alloc();
        case t_custom: throw pooltest_ns::CustomError();
        case t_int: throw 42;
        case t_derived_range: throw pooltest_ns::DerivedRange();
        case t_derived_runtime: throw pooltest_ns::DerivedRuntime();
        case t_system_error: throw std::system_error(std::make_error_code(std::errc::permission_denied), "opening");
        default: return kind;
    }
}

/// Runs `call` (which must throw) and checks the exception's exact dynamic type and what().
template <class Expected, class Call> void require_rethrown_as(Call&& call, const std::string& what) {
    try {
        call();
        FAIL("no exception was thrown");
    } catch (const std::exception& e) {
        INFO("caught " << mproc::detail::demangle(typeid(e).name()) << ": " << e.what());
        CHECK(typeid(e) == typeid(Expected));
        CHECK(std::string(e.what()) == what);
    }
}

template <class Range> std::vector<int> squares_of(const Range& xs) {
    std::vector<int> out;
    for (int x : xs) out.push_back(x * x);
    return out;
}

std::vector<int> iota_vec(int n, int from = 0) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), from);
    return v;
}

}  // namespace

// =================================================================================================
// apply, apply_async, AsyncResult
// =================================================================================================

TEST_CASE("apply runs the task in a worker and returns its result") {
    std::vector<pid_t> seen;
    {
        mproc::Pool pool(2);
        CHECK(pool.processes() == 2);
        CHECK(pool.apply(square, 7) == 49);
        CHECK(pool.apply(add, 2, 40) == 42);
        CHECK(pool.apply(add3, 1, 2L, static_cast<short>(3)) == 6);
        CHECK(pool.apply([](int a, int b) { return a * b; }, 6, 7) == 42);
        const int pid = pool.apply(worker_pid, 0);
        CHECK(pid != ::getpid());
        seen = pool_test::all_worker_pids(pool, 2);
        CHECK(std::find(seen.begin(), seen.end(), pid) != seen.end());
    }
    POOL_REQUIRE_NOTHING_LEFT(seen[0], seen[1]);
}

TEST_CASE("a default Pool has cpu_count() workers") {
    std::vector<pid_t> pids;
    {
        mproc::Pool pool;
        CHECK(pool.processes() == mproc::cpu_count());
        CHECK(pool.apply(square, 3) == 9);
        pids = pool_test::all_worker_pids(pool, mproc::cpu_count());
    }
    POOL_REQUIRE_NOTHING_LEFT();
    for (pid_t p : pids) CHECK(pool_test::gone(p));
}

TEST_CASE("apply_async: callback gets the value before get() returns") {
    std::vector<int> result_list;  // touched only by the callback
    {
        mproc::Pool pool(2);
        auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { result_list.push_back(v); });
        CHECK(ar.get() == 9);
        REQUIRE(result_list == std::vector<int>{9});
        CHECK(ar.ready());
        CHECK(ar.successful());
        CHECK(ar.get() == 9);  // get() again: the same value
        auto ar2 = pool.apply_async(add, std::tuple{4, 5});
        CHECK(ar2.get() == 9);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("apply_async: error_callback receives the exception as a std::exception_ptr") {
    mproc::Pool pool(2);
    bool callback_ran = false;
    std::string seen_type, seen_what;
    auto ar = pool.apply_async(
        throw_kind, std::tuple{int(t_invalid_argument)}, [&](int) { callback_ran = true; },
        [&](std::exception_ptr e) {
            try {
                std::rethrow_exception(e);
            } catch (const std::invalid_argument& x) {
                seen_type = "invalid_argument";
                seen_what = x.what();
            } catch (...) {
                seen_type = "other";
            }
        });
    REQUIRE(ar.wait(60s));
    CHECK_FALSE(ar.successful());
    CHECK_THROWS_AS(ar.get(), std::invalid_argument);
    CHECK_FALSE(callback_ran);
    CHECK(seen_type == "invalid_argument");
    CHECK(seen_what == "bad argument 'x'");

    // And a successful call does not run the error callback.
    bool error_ran = false;
    int value = 0;
    auto ok = pool.apply_async(
        throw_kind, std::tuple{int(t_none)}, [&](int v) { value = v; }, [&](std::exception_ptr) { error_ran = true; });
    CHECK(ok.get() == t_none);
    CHECK(value == t_none);
    CHECK_FALSE(error_ran);
}

TEST_CASE("AsyncResult: get(timeout) throws TimeoutError while the task runs; wait, ready, successful") {
    pool_test::Gate gate;  // before the pool: workers inherit it
    Watchdog dog(120s, "AsyncResult timeouts");
    mproc::Pool pool(2);
    auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 11});

    CHECK_THROWS_AS(ar.get(50ms), mproc::TimeoutError);
    CHECK_THROWS_AS(ar.get(mproc::Seconds{0.01}), mproc::TimeoutError);
    CHECK_FALSE(ar.wait(50ms));
    CHECK_FALSE(ar.wait(0s));
    CHECK_FALSE(ar.ready());
    CHECK_THROWS_AS(ar.successful(), mproc::Error);  // not ready yet
    CHECK(ar.valid());

    gate.open();
    REQUIRE(ar.wait(60s));
    CHECK(ar.ready());
    CHECK(ar.successful());
    CHECK(ar.get(1s) == 11);
    ar.wait();  // no timeout: returns at once when ready
    CHECK(ar.get() == 11);

    // A failed result: successful() is false, get() rethrows every time.
    auto bad = pool.apply_async(throw_kind, std::tuple{int(t_runtime_error)});
    bad.wait();
    CHECK(bad.ready());
    CHECK_FALSE(bad.successful());
    CHECK_THROWS_AS(bad.get(), std::runtime_error);
    CHECK_THROWS_WITH(bad.get(), "at run time");
}

TEST_CASE("AsyncResult: threads waiting on one result at once all wake when it comes; short waits time out") {
    pool_test::Gate gate;  // before the pool: workers inherit it
    Watchdog dog(120s, "several waiters on one result");  // a lost wake-up hangs: their sleep has no limit
    mproc::Pool pool(1);
    auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 5});
    std::atomic<int> waiting{0}, woken{0}, got_five{0}, timed_out{0};
    std::vector<std::thread> waiters;
    for (int i = 0; i < 6; ++i) {
        waiters.emplace_back([&, i] {  // (no Catch assertion off the main thread)
            ++waiting;
            if (i % 3 == 0) {
                ar.wait();
                if (ar.get() == 5) ++got_five;
                ++woken;
            } else if (i % 3 == 1) {
                if (ar.wait(60s)) ++woken;
            } else {
                if (!ar.wait(20ms)) ++timed_out;  // the gate is still shut
            }
        });
    }
    pool_test::wait_for([&] { return waiting.load() == 6 && timed_out.load() == 2; }, "the short waits to time out");
    std::this_thread::sleep_for(50ms);  // the others asleep by now (likely; either way they must wake)
    CHECK(woken.load() == 0);
    gate.open();
    for (auto& t : waiters) t.join();
    CHECK(woken.load() == 4);
    CHECK(got_five.load() == 2);
    CHECK(ar.get() == 5);
}

TEST_CASE("a default-constructed AsyncResult holds nothing: get and wait throw mproc::Error") {
    mproc::AsyncResult<int> empty;
    CHECK_FALSE(empty.valid());
    CHECK_FALSE(empty.ready());
    CHECK_THROWS_AS(empty.get(), mproc::Error);
    CHECK_THROWS_AS(empty.get(1s), mproc::Error);
    CHECK_THROWS_AS(empty.wait(), mproc::Error);
    CHECK_THROWS_AS(empty.successful(), mproc::Error);
    mproc::AsyncResult<void> empty_void;
    CHECK_THROWS_AS(empty_void.get(), mproc::Error);
}

TEST_CASE("AsyncResults move into a vector; a moved-from one is empty") {
    mproc::Pool pool(2);
    std::vector<mproc::AsyncResult<int>> results;
    for (int i = 0; i < 100; ++i) results.push_back(pool.apply_async(square, std::tuple{i}));
    results.reserve(1000);  // reallocation moves them again
    for (int i = 0; i < 100; ++i) CHECK(results[static_cast<std::size_t>(i)].get() == i * i);

    auto a = pool.apply_async(add, std::tuple{20, 22});
    mproc::AsyncResult<int> b = std::move(a);
    CHECK_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
    CHECK_THROWS_AS(a.get(), mproc::Error);
    mproc::AsyncResult<int> c;
    c = std::move(b);
    CHECK(c.get() == 42);
    CHECK(std::move(c).get() == 42);  // rvalue get moves the value out
}

TEST_CASE("destroying a pending AsyncResult does not wait for it; the pool goes on") {
    pool_test::Gate gate;
    pool_test::TaskLog log;
    Watchdog dog(120s, "destroying pending AsyncResults");
    mproc::Pool pool(2);
    {
        auto pending = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1});
        auto pending_map = pool.map_async(pool_test::gated_fd, std::vector<int>{gate.read_fd()}, 1);
        CHECK_FALSE(pending.ready());
    }  // both destroyed while their tasks are blocked: must not block (the watchdog would fire)
    gate.open(2);
    // The abandoned results arrive into nothing; later work is unaffected.
    CHECK(pool.map(square, iota_vec(50)) == squares_of(iota_vec(50)));
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

// =================================================================================================
// map, starmap, map_async, starmap_async
// =================================================================================================

TEST_CASE("map returns results in input order, whatever the chunksize") {
    mproc::Pool pool(2);
    const auto xs = iota_vec(1000, -300);
    const auto expected = squares_of(xs);
    CHECK(pool.map(square, xs) == expected);  // default chunksize (about len / (4 * processes))
    for (std::size_t chunksize :
         {std::size_t{1}, std::size_t{7}, std::size_t{64}, std::size_t{1000}, std::size_t{5000}}) {
        INFO("chunksize " << chunksize);
        CHECK(pool.map(square, xs, chunksize) == expected);
        CHECK(pool.map_async(square, xs, chunksize).get() == expected);
    }
    CHECK(pool.map(square, std::vector<int>{1, 2, 3, 4, 5}) == std::vector<int>{1, 4, 9, 16, 25});
    // Small inputs where the default chunk covers everything or less than one chunk per worker.
    CHECK(pool.map(square, std::vector<int>{5}) == std::vector<int>{25});
    CHECK(pool.map(square, iota_vec(3)) == squares_of(iota_vec(3)));
}

namespace {
/// Item 0 finishes last: its chunk's results arrive after every later chunk's.
long square_first_late(long x) {
    if (x == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return x * x;
}
std::string spell_first_late(long x) { return std::to_string(square_first_late(x)); }
bool odd_first_late(long x) { return square_first_late(x) % 2 != 0; }
}  // namespace

TEST_CASE("map's result is whole when the first chunk comes back last (numbers, strings, bools)") {
    mproc::Pool pool(2);
    std::vector<long> xs(2000);
    std::iota(xs.begin(), xs.end(), 0L);
    std::vector<long> squares;
    std::vector<std::string> spelled;
    std::vector<bool> odd;
    for (long x : xs) {
        squares.push_back(x * x);
        spelled.push_back(std::to_string(x * x));
        odd.push_back(x % 2 != 0);
    }
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{10}, std::size_t{0}}) {
        INFO("chunksize " << chunksize << " (0: the default)");
        const auto map = [&](auto f) { return chunksize == 0 ? pool.map(f, xs) : pool.map(f, xs, chunksize); };
        CHECK(map(square_first_late) == squares);  // packed chunks
        CHECK(map(spell_first_late) == spelled);   // one outcome per item
        CHECK(map(odd_first_late) == odd);
    }
}

TEST_CASE("map_async: result, callback with the whole vector, and error_callback") {
    mproc::Pool pool(2);
    const auto xs = iota_vec(200);
    std::vector<int> via_callback;
    auto am = pool.map_async(square, xs, 7, [&](const std::vector<int>& v) { via_callback = v; });
    CHECK(am.get() == squares_of(xs));
    CHECK(via_callback == squares_of(xs));

    std::exception_ptr error;
    bool callback_ran = false;
    std::vector<int> kinds = {int(t_none), int(t_none), int(t_domain_error), int(t_none)};
    auto bad = pool.map_async(
        throw_kind, kinds, 1, [&](const std::vector<int>&) { callback_ran = true; },
        [&](std::exception_ptr e) { error = e; });
    CHECK_THROWS_AS(bad.get(), std::domain_error);
    CHECK_FALSE(callback_ran);
    REQUIRE(error);
    CHECK_THROWS_AS(std::rethrow_exception(error), std::domain_error);
}

TEST_CASE("starmap and starmap_async unpack tuples and pairs, in order") {
    mproc::Pool pool(2);
    std::vector<std::tuple<int, int>> pairs = {{1, 1}, {2, 1}};
    CHECK(pool.starmap(add, pairs) == std::vector<int>{2, 3});

    std::vector<std::tuple<int, int>> many;
    std::vector<int> expected;
    for (int i = 0; i < 500; ++i) {
        many.emplace_back(i, 3 * i);
        expected.push_back(4 * i);
    }
    for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{64}}) {
        INFO("chunksize " << chunksize);
        CHECK(pool.starmap(add, many, chunksize) == expected);
        CHECK(pool.starmap_async(add, many, chunksize).get() == expected);
    }
    std::vector<std::pair<int, int>> as_pairs = {{10, 1}, {20, 2}, {30, 3}};
    CHECK(pool.starmap(add, as_pairs) == std::vector<int>{11, 22, 33});
    std::array<std::tuple<int, long, short>, 2> triples = {{{1, 2L, short{3}}, {4, 5L, short{6}}}};
    CHECK(pool.starmap(add3, triples) == std::vector<long>{6, 15});
    std::vector<std::tuple<std::string, int>> sargs = {{"a", 1}};
    CHECK(pool.starmap([](std::string s, int n) { return s + std::to_string(n); }, sargs) ==
          std::vector<std::string>{"a1"});
}

TEST_CASE("map, starmap and imap of an empty input") {
    mproc::Pool pool(2);
    const std::vector<int> none;
    CHECK(pool.map(square, none).empty());
    CHECK(pool.map(square, none, 5).empty());
    auto am = pool.map_async(square, none);
    CHECK(am.wait(60s));
    CHECK(am.get().empty());
    CHECK(pool.starmap(add, std::vector<std::tuple<int, int>>{}).empty());
    CHECK(pool.starmap_async(add, std::vector<std::tuple<int, int>>{}).get().empty());
    int n = 0;
    for (int v : pool.imap(square, none)) n += v + 1;
    for (int v : pool.imap_unordered(square, none)) n += v + 1;
    CHECK(n == 0);
    CHECK(pool.map(square, std::views::iota(0, 0)).empty());
    // The pool is fine afterwards.
    CHECK(pool.apply(square, 4) == 16);
}

TEST_CASE("map accepts any input range: list, array, iota, filter and single-pass views") {
    mproc::Pool pool(2);
    std::list<int> l = {3, 1, 4, 1, 5, 9, 2, 6};
    CHECK(pool.map(square, l) == std::vector<int>{9, 1, 16, 1, 25, 81, 4, 36});
    std::array<int, 5> a = {2, 4, 6, 8, 10};
    CHECK(pool.map(square, a) == std::vector<int>{4, 16, 36, 64, 100});
    CHECK(pool.map(square, std::views::iota(0, 300)) == squares_of(iota_vec(300)));
    CHECK(pool.map(square, std::views::iota(0, 300), 7) == squares_of(iota_vec(300)));
    auto evens = std::views::iota(0, 100) | std::views::filter([](int x) { return x % 2 == 0; });  // not sized
    std::vector<int> even_squares;
    for (int x : evens) even_squares.push_back(x * x);
    CHECK(pool.map(square, evens) == even_squares);
    std::istringstream text("5 6 7 8");
    auto words = std::views::istream<int>(text);  // single pass
    CHECK(pool.map(square, words) == std::vector<int>{25, 36, 49, 64});
    const std::vector<int> cv = {1, 2, 3};
    CHECK(pool.map(square, cv) == std::vector<int>{1, 4, 9});
    CHECK(pool.map(square, std::vector<int>{7, 8}) == std::vector<int>{49, 64});  // an rvalue range
    std::list<int> big(1000);
    std::iota(big.begin(), big.end(), 0);
    CHECK(pool.map(square, big, 13) == squares_of(iota_vec(1000)));
    for (int v : pool.imap(square, l)) CHECK(v >= 1);
    std::vector<int> from_array;
    for (int v : pool.imap(square, a, 2)) from_array.push_back(v);
    CHECK(from_array == std::vector<int>{4, 16, 36, 64, 100});
}

TEST_CASE("strings, vectors, maps, optionals, variants and structs cross as arguments and results") {
    mproc::Pool pool(2);
    CHECK(pool.apply(shout, std::string("hello")) == "HELLO!");
    CHECK(pool.map(shout, std::vector<std::string>{"a", "", "xyz"}) == std::vector<std::string>{"A!", "!", "XYZ!"});
    CHECK(pool.apply(count_to, 5) == std::vector<int>{1, 2, 3, 4, 5});
    CHECK(pool.map(count_to, std::vector<int>{0, 2}) == std::vector<std::vector<int>>{{}, {1, 2}});
    const std::map<std::string, int> lengths = {{"one", 3}, {"three", 5}};
    CHECK(pool.apply(word_lengths, std::vector<std::string>{"one", "three"}) == lengths);
    CHECK(pool.map(half_if_even, std::vector<int>{1, 2, 3, 4}) ==
          std::vector<std::optional<int>>{std::nullopt, 1, std::nullopt, 2});
    const auto v = pool.map(int_or_text, std::vector<int>{1, 3});
    REQUIRE(v.size() == 2);
    CHECK(std::get<int>(v[0]) == 1);
    CHECK(std::get<std::string>(v[1]) == "fizz3");

    const Point p{1, 1.5, "p", {7}};
    const Point expected{4, 3.0, "p+3", {7, 3}};
    CHECK(pool.apply(shift, p, 3) == expected);
    std::vector<std::tuple<Point, int>> jobs = {{p, 3}, {Point{0, 0, "", {}}, 1}};
    const auto shifted = pool.starmap(shift, jobs);
    REQUIRE(shifted.size() == 2);
    CHECK(shifted[0] == expected);
    CHECK(shifted[1] == Point{1, 0, "+1", {1}});

    Trivial t{1, 2.0, "abcdefg"};
    const Trivial r = pool.apply(bump, t);
    CHECK(r.a == 2);
    CHECK(r.b == 2.5);
    CHECK(std::string(r.c) == "Zbcdefg");
}

TEST_CASE("large arguments and results: 8 MiB strings") {
    mproc::Pool pool(2);
    const std::string big = big_string(1);
    CHECK(pool.apply(checksum, big) == checksum(big));
    std::vector<std::string> bigs;
    for (int i = 0; i < 3; ++i) bigs.push_back(big_string(i));
    const auto back = pool.map(reversed, bigs, 1);
    REQUIRE(back.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
        INFO("string " << i);
        CHECK(back[i].size() == bigs[i].size());
        CHECK(back[i] == reversed(bigs[i]));
    }
    // Large results from small arguments, through imap.
    std::vector<std::uint64_t> sums;
    for (const std::string& s : pool.imap(big_string, std::vector<int>{4, 5})) sums.push_back(checksum(s));
    CHECK(sums == std::vector<std::uint64_t>{checksum(big_string(4)), checksum(big_string(5))});
}

// =================================================================================================
// imap, imap_unordered
// =================================================================================================

TEST_CASE("An imap range read after its pool is destroyed fails its items and touches no freed pool") {
    // The range kept a pointer to the pool's engine and submitted through it: after the pool was
    // destroyed that was a use of freed memory (ASan: heap-use-after-free).
    Watchdog dog(120s, "imap after its pool");
    std::optional<mproc::Pool> pool(std::in_place, 2);
    const auto xs = iota_vec(100);
    auto range = pool->imap(square, xs);
    pool.reset();
    std::size_t values = 0;
    std::size_t errors = 0;
    for (auto it = range.begin(); it != range.end(); ++it) {
        try {
            (void)*it;
            ++values;
        } catch (const mproc::Error& e) {
            ++errors;
            CHECK(std::string(e.what()).find("destroyed") != std::string::npos);
        }
    }
    CHECK(values == 0);
    CHECK(errors == 1);  // the input's place: nothing of it was sent
}

namespace {
/// A result type whose move constructor throws once `moves_left` reaches 0 (-1: never).
std::atomic<int> moves_left{-1};
struct MovesOnce {
    int v = 0;
    MovesOnce() = default;
    explicit MovesOnce(int x) : v(x) {}
    MovesOnce(const MovesOnce&) = default;
    MovesOnce(MovesOnce&& other) : v(other.v) {
        if (moves_left.load() == 0) throw std::runtime_error("MovesOnce: no more moves");
        if (moves_left.load() > 0) --moves_left;
    }
    MovesOnce& operator=(const MovesOnce&) = default;
    MovesOnce& operator=(MovesOnce&&) = default;
    ~MovesOnce() = default;
    template <class Archive> void serialize(Archive& ar) { ar(v); }
};
MovesOnce moves_once(int x) { return MovesOnce(x); }
}  // namespace

TEST_CASE("A result whose move throws as it is published fails its call instead of never arriving") {
    // The collector moved the value into place with nothing to catch a throw: the call was never
    // published, and get() waited for ever.
    Watchdog dog(120s, "throwing result move");
    mproc::Pool pool(1);
    moves_left = 1;  // in this process only: the worker was forked before
    auto r = pool.apply_async(moves_once, std::tuple{5});
    CHECK_THROWS_WITH(r.get(60s), "MovesOnce: no more moves");
    moves_left = -1;
    CHECK(pool.apply(moves_once, 6).v == 6);
}

TEST_CASE("A callback run as its pool terminates that waits for another of its results fails, never hangs") {
    // terminate() fails the pending calls on the calling thread, one after another: a callback
    // that waited there for a later one waited for ever (only the collector thread was refused).
    Watchdog dog(120s, "waiting callback at terminate");
    mproc::Pool pool(1);
    std::optional<mproc::AsyncResult<long>> other;
    std::string seen;
    auto first = pool.apply_async(pool_test::sleep_then, std::tuple{30L}, {}, [&](const std::exception_ptr&) {
        try {
            (void)other->get();
            seen = "returned";
        } catch (const mproc::Error& e) {
            seen = e.what();
        }
    });
    other = pool.apply_async(pool_test::sleep_then, std::tuple{30L});
    pool.terminate();
    CHECK(seen.find("deadlock") != std::string::npos);
    CHECK_THROWS_AS(other->get(0s), mproc::Error);  // failed by the terminate, after the callback
}

TEST_CASE("imap with a chunksize so large that its window would wrap yields every result") {
    // The window (chunks in flight times chunksize) wrapped to 0: imap sent nothing and waited for ever.
    Watchdog dog(120s, "imap huge chunksize");
    mproc::Pool pool(2);
    const auto xs = iota_vec(50);
    std::vector<int> got;
    for (int v : pool.imap(square, xs, std::size_t{1} << 61)) got.push_back(v);
    CHECK(got.size() == xs.size());
    std::vector<int> unordered;
    for (int v : pool.imap_unordered(square, xs, SIZE_MAX)) unordered.push_back(v);
    CHECK(unordered.size() == xs.size());
}

TEST_CASE("imap yields results in input order; imap_unordered yields the same multiset") {
    mproc::Pool pool(2);
    const auto xs = iota_vec(500);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{64}}) {
        INFO("chunksize " << chunksize);
        std::vector<int> ordered;
        for (int v : pool.imap(square, xs, chunksize)) ordered.push_back(v);
        CHECK(ordered == squares_of(xs));

        std::vector<int> unordered;
        for (int v : pool.imap_unordered(square, xs, chunksize)) unordered.push_back(v);
        CHECK(unordered.size() == xs.size());
        std::multiset<int> a(unordered.begin(), unordered.end());
        const auto sq = squares_of(xs);
        std::multiset<int> b(sq.begin(), sq.end());
        CHECK(a == b);
    }
    std::vector<int> dflt;
    for (int v : pool.imap(square, xs)) dflt.push_back(v);
    CHECK(dflt == squares_of(xs));
}

namespace {
struct ReadCounter {
    std::atomic<long>* reads;
    int operator()(int x) const {
        reads->fetch_add(1, std::memory_order_relaxed);
        return x;
    }
};
}  // namespace

TEST_CASE("imap is lazy on its input: an endless input with a break reads a bounded window") {
    Watchdog dog(240s, "imap over an endless input");
    mproc::Pool pool(2);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{10}}) {
        INFO("chunksize " << chunksize);
        std::atomic<long> reads{0};
        // The transform runs in this process, once per element the pool reads from the input.
        auto endless = std::views::iota(0) | std::views::transform(ReadCounter{&reads});
        long taken = 0;
        bool in_order = true;
        for (int v : pool.imap(square, endless, chunksize)) {
            if (v != static_cast<int>(taken * taken)) in_order = false;
            if (++taken == 1000) break;
        }
        CHECK(taken == 1000);
        CHECK(in_order);
        // At most a window of chunks beyond what was consumed: the input was not slurped.
        CHECK(reads.load() >= 1000);
        CHECK(reads.load() <= 1000 + static_cast<long>(64 * chunksize));

        std::atomic<long> ureads{0};
        auto endless2 = std::views::iota(0) | std::views::transform(ReadCounter{&ureads});
        long utaken = 0;
        for (int v : pool.imap_unordered(square, endless2, chunksize)) {
            (void)v;
            if (++utaken == 1000) break;
        }
        CHECK(ureads.load() >= 1000);
        CHECK(ureads.load() <= 1000 + static_cast<long>(64 * chunksize));
    }
    // The abandoned iterations leave the pool usable.
    CHECK(pool.map(square, iota_vec(100)) == squares_of(iota_vec(100)));
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("imap: dereferencing a failed item rethrows its exception, and the iteration goes on") {
    mproc::Pool pool(2);
    std::vector<int> kinds;
    for (int i = 0; i < 60; ++i) kinds.push_back(i % 6 == 2 ? int(t_length_error) : 1000 + i);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}}) {
        INFO("chunksize " << chunksize);
        auto results = pool.imap(throw_kind, kinds, chunksize);
        std::size_t i = 0, errors = 0;
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            INFO("item " << i);
            if (kinds[i] == t_length_error) {
                CHECK_THROWS_AS(*it, std::length_error);
                CHECK_THROWS_WITH(*it, "too long");
                ++errors;
            } else {
                CHECK(*it == kinds[i]);
            }
        }
        CHECK(i == kinds.size());
        CHECK(errors == 10);

        std::size_t n = 0, unordered_errors = 0;
        std::multiset<int> values;
        auto un = pool.imap_unordered(throw_kind, kinds, chunksize);
        for (auto it = un.begin(); it != un.end(); ++it, ++n) {
            try {
                values.insert(*it);
            } catch (const std::length_error&) {
                ++unordered_errors;
            }
        }
        CHECK(n == kinds.size());
        CHECK(unordered_errors == 10);
        CHECK(values.size() == 50);
    }
}

// =================================================================================================
// exceptions
// =================================================================================================

TEST_CASE("a task's exception: get() rethrows it every time; an rvalue get() takes it for good") {
    mproc::Pool pool(2);
    auto ar = pool.apply_async(throw_kind, std::tuple{int(t_overflow_error)});
    REQUIRE(ar.wait(60s));
    CHECK_FALSE(ar.successful());
    require_rethrown_as<std::overflow_error>([&] { (void)ar.get(); }, "overflowed");
    require_rethrown_as<std::overflow_error>([&] { (void)ar.get(); }, "overflowed");  // still there
    require_rethrown_as<std::overflow_error>([&] { (void)std::move(ar).get(); }, "overflowed");
    // Taken: a later get() says so rather than rethrowing nothing, and the result stays unsuccessful.
    CHECK_FALSE(ar.successful());
    CHECK_THROWS_WITH(ar.get(), Catch::Contains("already taken"));
}

TEST_CASE("standard exceptions come back with their type and what()") {
    mproc::Pool pool(2);
    auto run = [&](int kind) { return [&pool, kind] { (void)pool.apply(throw_kind, kind); }; };
    require_rethrown_as<std::out_of_range>(run(t_out_of_range), "oor: index 7");
    require_rethrown_as<std::invalid_argument>(run(t_invalid_argument), "bad argument 'x'");
    require_rethrown_as<std::domain_error>(run(t_domain_error), "outside the domain");
    require_rethrown_as<std::length_error>(run(t_length_error), "too long");
    require_rethrown_as<std::overflow_error>(run(t_overflow_error), "overflowed");
    require_rethrown_as<std::underflow_error>(run(t_underflow_error), "underflowed");
    require_rethrown_as<std::range_error>(run(t_range_error), "out of range (range_error)");
    require_rethrown_as<std::logic_error>(run(t_logic_error), "illogical");
    require_rethrown_as<std::runtime_error>(run(t_runtime_error), "at run time");
    require_rethrown_as<std::bad_alloc>(run(t_bad_alloc), std::bad_alloc().what());
    // The most derived standard type the exception is.
    require_rethrown_as<std::out_of_range>(run(t_derived_range), "derived out of range");
    require_rethrown_as<std::runtime_error>(run(t_derived_runtime), "derived runtime");
    require_rethrown_as<std::runtime_error>(
        run(t_system_error), std::system_error(std::make_error_code(std::errc::permission_denied), "opening").what());

    // Through every way of getting a result.
    auto ar = pool.apply_async(throw_kind, std::tuple{int(t_overflow_error)});
    require_rethrown_as<std::overflow_error>([&] { (void)ar.get(); }, "overflowed");
    std::vector<int> kinds = {int(t_none), int(t_underflow_error)};
    require_rethrown_as<std::underflow_error>([&] { (void)pool.map(throw_kind, kinds); }, "underflowed");
    require_rethrown_as<std::underflow_error>([&] { (void)pool.map_async(throw_kind, kinds).get(); }, "underflowed");
    std::vector<std::tuple<int>> star = {{int(t_none)}, {int(t_logic_error)}};
    require_rethrown_as<std::logic_error>([&] { (void)pool.starmap(throw_kind, star); }, "illogical");
    // A failing task does not hurt the worker: the pool goes on.
    CHECK(pool.apply(square, 9) == 81);
}

namespace {
int throw_mproc_error(int kind) {
    switch (kind) {
        case 0: throw mproc::Error("plain");
        case 1: throw mproc::TimeoutError("timed out");
        case 2: throw mproc::EOFError("at the end");
        case 3: throw mproc::BrokenPipeError("pipe broken");
        case 4: throw mproc::Empty("nothing");
        case 5: throw mproc::Full("no room");
        case 6: throw mproc::KeyError("no such key");
        case 7: throw mproc::SerializationError("bad bytes");
        case 8: throw mproc::BrokenBarrierError("barrier broken");
        case 9: throw mproc::ShutDown("queue shut down");
        default: return kind;
    }
}
}  // namespace

TEST_CASE("mproc's own errors thrown by a task come back with their type and what()") {
    mproc::Pool pool(1);
    auto run = [&](int kind) { return [&pool, kind] { (void)pool.apply(throw_mproc_error, kind); }; };
    require_rethrown_as<mproc::Error>(run(0), "plain");
    require_rethrown_as<mproc::TimeoutError>(run(1), "timed out");
    require_rethrown_as<mproc::EOFError>(run(2), "at the end");
    require_rethrown_as<mproc::BrokenPipeError>(run(3), "pipe broken");
    require_rethrown_as<mproc::Empty>(run(4), "nothing");
    require_rethrown_as<mproc::Full>(run(5), "no room");
    require_rethrown_as<mproc::KeyError>(run(6), "no such key");
    require_rethrown_as<mproc::SerializationError>(run(7), "bad bytes");
    require_rethrown_as<mproc::BrokenBarrierError>(run(8), "barrier broken");
    require_rethrown_as<mproc::ShutDown>(run(9), "queue shut down");
}

TEST_CASE("map throws the exception of the lowest failing index") {
    mproc::Pool pool(2);
    std::vector<int> kinds(100, int(t_none));
    kinds[70] = t_invalid_argument;
    kinds[30] = t_domain_error;
    kinds[90] = t_runtime_error;
    for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{9}})
        CHECK_THROWS_AS(pool.map(throw_kind, kinds, chunksize), std::domain_error);
}

TEST_CASE("other exception types become mproc::RemoteError with the demangled type name and the message") {
    mproc::Pool pool(2);
    try {
        (void)pool.apply(throw_kind, int(t_custom));
        FAIL("no exception");
    } catch (const mproc::RemoteError& e) {
        CHECK(e.type_name() == "pooltest_ns::CustomError");
        CHECK(e.message() == "custom failure 42");
        CHECK_THAT(std::string(e.what()), Catch::Contains("pooltest_ns::CustomError"));
        CHECK_THAT(std::string(e.what()), Catch::Contains("custom failure 42"));
    }
    try {
        (void)pool.apply(throw_kind, int(t_int));
        FAIL("no exception");
    } catch (const mproc::RemoteError& e) {
        CHECK(e.type_name() == "int");
    }
    // RemoteError is an mproc::Error, and it reaches error callbacks as such.
    std::string type_seen;
    auto ar = pool.apply_async(throw_kind, std::tuple{int(t_custom)}, {}, [&](std::exception_ptr p) {
        try {
            std::rethrow_exception(p);
        } catch (const mproc::RemoteError& e) {
            type_seen = e.type_name();
        } catch (...) {}
    });
    CHECK_THROWS_AS(ar.get(), mproc::Error);
    CHECK(type_seen == "pooltest_ns::CustomError");
}

// =================================================================================================
// lifetime: close, join, terminate, the destructor, moves
// =================================================================================================

TEST_CASE("close: submitting afterwards throws mproc::Error; join waits for the queued work") {
    Watchdog dog(120s, "close and join");
    std::vector<pid_t> workers;
    {
        mproc::Pool pool(2);
        workers = pool_test::all_worker_pids(pool, 2);
        std::vector<mproc::AsyncResult<int>> queued;
        for (int i = 0; i < 200; ++i) queued.push_back(pool.apply_async(square, std::tuple{i}));
        auto am = pool.map_async(square, iota_vec(300), 3);
        pool.close();
        CHECK_THROWS_AS(pool.apply_async(square, std::tuple{1}), mproc::Error);
        CHECK_THROWS_AS(pool.apply(square, 1), mproc::Error);
        CHECK_THROWS_AS(pool.map(square, iota_vec(3)), mproc::Error);
        CHECK_THROWS_AS(pool.starmap(add, std::vector<std::tuple<int, int>>{{1, 2}}), mproc::Error);
        CHECK_THROWS_AS(
            [&] {
                for (int v : pool.imap(square, iota_vec(3))) (void)v;
            }(),
            mproc::Error);
        pool.close();  // twice is fine
        pool.join();
        for (int i = 0; i < 200; ++i) {
            CHECK(queued[static_cast<std::size_t>(i)].ready());
            CHECK(queued[static_cast<std::size_t>(i)].get() == i * i);
        }
        CHECK(am.ready());
        CHECK(am.get() == squares_of(iota_vec(300)));
        CHECK(pool.worker_pids().empty());  // "the live workers' pids": there are none after join
        POOL_REQUIRE_NOTHING_LEFT();  // join reaped the fork server and its workers
        for (pid_t p : workers) CHECK(pool_test::gone(p));
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("join before close throws mproc::Error") {
    mproc::Pool pool(2);
    CHECK_THROWS_AS(pool.join(), mproc::Error);
    CHECK(pool.apply(square, 5) == 25);  // and nothing is broken
    pool.close();
    pool.join();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("join(timeout): false while tasks run and the pool stays joinable; true once they are done") {
    pool_test::Gate gate;
    Watchdog dog(120s, "join with a timeout");
    mproc::Pool pool(2);
    auto held = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 3});
    CHECK_THROWS_AS((void)pool.join(mproc::Seconds{0.1}), mproc::Error);  // before close(), as join()
    pool.close();
    CHECK_FALSE(pool.join(mproc::Seconds{0.2}));
    CHECK_FALSE(pool.join(mproc::Seconds{0}));
    CHECK_FALSE(held.ready());
    CHECK(pool.worker_pids().size() == 2);  // nothing was torn down
    gate.open();
    CHECK(pool.join(mproc::Seconds{60}));
    CHECK(held.get() == 3);
    CHECK(pool.worker_pids().empty());
    POOL_REQUIRE_NOTHING_LEFT();
    CHECK(pool.join(mproc::Seconds{0}));  // joined already: true at once
    pool.join();
}

TEST_CASE("join(timeout) that gave up, then terminate(): pending work fails, nothing is left") {
    pool_test::Gate gate;
    Watchdog dog(120s, "terminate after a join that timed out");
    mproc::Pool pool(2);
    auto held = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1});
    pool.close();
    CHECK_FALSE(pool.join(mproc::Seconds{0.1}));
    pool.terminate();
    REQUIRE(held.wait(60s));
    CHECK_THROWS_AS(held.get(), mproc::Error);
    CHECK(pool.join(mproc::Seconds{60}));
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("terminate: pending results fail with mproc::Error; no process is left") {
    pool_test::Gate gate;
    Watchdog dog(120s, "terminate");
    mproc::Pool pool(2);
    std::vector<mproc::AsyncResult<int>> pending;
    for (int i = 0; i < 10; ++i) pending.push_back(pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), i}));
    auto pending_map = pool.map_async(pool_test::gated_fd, std::vector<int>(5, gate.read_fd()), 1);
    int error_callbacks = 0;
    auto with_cb = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 99}, {},
                                    [&](std::exception_ptr) { ++error_callbacks; });
    const auto workers = pool_test::all_worker_pids(pool, 2);

    pool.terminate();
    POOL_REQUIRE_NOTHING_LEFT(workers[0], workers[1]);  // immediately: terminate reaps synchronously
    for (auto& r : pending) {
        REQUIRE(r.wait(60s));
        CHECK_FALSE(r.successful());
        CHECK_THROWS_AS(r.get(), mproc::Error);
    }
    REQUIRE(pending_map.wait(60s));
    CHECK_THROWS_AS(pending_map.get(), mproc::Error);
    CHECK_THROWS_AS(with_cb.get(), mproc::Error);
    CHECK(error_callbacks == 1);

    CHECK_THROWS_AS(pool.apply_async(square, std::tuple{1}), mproc::Error);
    CHECK(pool.worker_pids().empty());
    pool.terminate();  // twice is fine
    pool.join();       // join after terminate returns
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("a Pool destroyed with pending work returns promptly; its results fail with mproc::Error") {
    pool_test::Gate gate;
    Watchdog dog(120s, "~Pool with pending work");
    std::vector<mproc::AsyncResult<int>> outliving;
    std::vector<pid_t> workers;
    {
        mproc::Pool pool(2);
        for (int i = 0; i < 20; ++i)
            outliving.push_back(pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), i}));
        workers = pool_test::all_worker_pids(pool, 2);
        auto running = pool.imap(pool_test::gated_fd, std::vector<int>(3, gate.read_fd()));
        (void)running;
    }  // the tasks never finish by themselves: the destructor must not wait for them
    POOL_REQUIRE_NOTHING_LEFT(workers[0], workers[1]);
    for (auto& r : outliving) {
        REQUIRE(r.wait(60s));
        CHECK_THROWS_AS(r.get(), mproc::Error);
    }
}

TEST_CASE("an idle Pool's destructor leaves nothing behind; so does a pool that was never used") {
    std::vector<pid_t> workers;
    {
        mproc::Pool unused(3);
        workers = pool_test::all_worker_pids(unused, 3);
    }
    POOL_REQUIRE_NOTHING_LEFT();
    for (pid_t p : workers) CHECK(pool_test::gone(p));
    for (int i = 0; i < 5; ++i) {
        mproc::Pool pool(2);
        CHECK(pool.apply(square, i) == i * i);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("Pool is a move-only owner") {
    static_assert(!std::is_copy_constructible_v<mproc::Pool>);
    static_assert(std::is_nothrow_move_constructible_v<mproc::Pool>);
    mproc::Pool a(2);
    mproc::Pool b = std::move(a);
    CHECK(b.apply(square, 6) == 36);
    CHECK_THROWS_AS(a.apply(square, 6), mproc::Error);  // NOLINT(bugprone-use-after-move)
    std::vector<mproc::Pool> pools;
    pools.push_back(std::move(b));
    pools.emplace_back(1u);
    CHECK(pools[1].apply(square, 2) == 4);
    CHECK(pools[0].map(square, iota_vec(10)) == squares_of(iota_vec(10)));
    pools.clear();
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("a Pool cannot be used from a child process of its owner") {
    mproc::Pool pool(1);
    mproc_test::ReadySignal done;
    mproc::Process child([&] {
        try {
            (void)pool.apply(square, 2);
        } catch (const mproc::Error&) {
            done.notify();
        }
    });
    child.start();
    CHECK(done.wait());
    REQUIRE(child.join(60s));
    CHECK(pool.apply(square, 3) == 9);
}
