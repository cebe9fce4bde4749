// Pool: never a wrong value. A result that fails to serialise, arguments that fail to decode in the
// worker, a result that fails to decode in the parent, and an input range that throws: each fails
// exactly the item it concerns, with an error that says what happened, and every other item of the
// same chunk is delivered right, in order.
#include "fragile.hpp"
#include "test_pool_common.hpp"

#include <mproc/progress.hpp>
#include <mproc/sync.hpp>

#include <cstdint>
#include <fstream>
#include <numeric>
#include <ranges>
#include <set>
#include <stdexcept>
#include <tuple>

using namespace std::chrono_literals;
using mproc_test::Fragile;
using pool_test::Watchdog;

namespace {

Fragile make(long n) { return Fragile{n * 1000 + 1, "value " + std::to_string(n)}; }
// make(x) for x with x * 1000 + 1 == 13 does not exist; so the failing item is chosen by the input:
Fragile make_raw(long n) { return Fragile{n, "value " + std::to_string(n)}; }
long twice_fragile(Fragile f) { return f.n * 2; }
Fragile echo_fragile(long n) { return Fragile{n, {}}; }
long add(long a, long b) { return a + b; }
Fragile make_pair_sum(long a, long b) { return make_raw(a + b); }

std::vector<long> inputs(long n) {
    std::vector<long> xs(static_cast<std::size_t>(n));
    std::iota(xs.begin(), xs.end(), 10L);  // 10, 11, 12, 13, 14, ...: item 3 is 13
    return xs;
}

/// True when `e` is the SerializationError of item 13's result.
void require_encoding_error(std::exception_ptr e) {
    REQUIRE(e);
    try {
        std::rethrow_exception(e);
    } catch (const mproc::SerializationError& error) {
        const std::string what = error.what();
        CHECK_THAT(what, Catch::Contains("Fragile"));
        CHECK_THAT(what, Catch::Contains("13 cannot be encoded"));
    } catch (...) {
        FAIL("expected mproc::SerializationError, got " << mproc::detail::describe_current_exception());
    }
}

}  // namespace

TEST_CASE("a result that fails to serialise: apply throws SerializationError naming the type and the cause") {
    Watchdog watchdog(120s, "apply of an unencodable result");
    mproc::Pool pool(2);
    try {
        const Fragile f = pool.apply(make_raw, 13L);
        FAIL("apply returned a value for a result that could not be encoded: n = " << f.n);
    } catch (const mproc::SerializationError& e) {
        CHECK_THAT(e.what(), Catch::Contains("Fragile"));
        CHECK_THAT(e.what(), Catch::Contains("13 cannot be encoded"));
    }
    // The pool goes on, on the same workers.
    CHECK(pool.apply(make_raw, 12L) == Fragile{12, "value 12"});
    CHECK(pool.apply(make, 2L) == Fragile{2001, "value 2"});
}

TEST_CASE("a result that fails to serialise: apply_async's error_callback receives the SerializationError") {
    Watchdog watchdog(120s, "apply_async of an unencodable result");
    mproc::Pool pool(2);
    std::exception_ptr seen;
    bool value_callback_ran = false;
    auto ar = pool.apply_async(
        make_raw, std::tuple{13L}, [&](const Fragile&) { value_callback_ran = true; },
        [&](std::exception_ptr e) { seen = e; });
    CHECK_THROWS_AS(ar.get(), mproc::SerializationError);
    CHECK_FALSE(ar.successful());
    CHECK_FALSE(value_callback_ran);
    require_encoding_error(seen);
}

TEST_CASE("a result that fails to serialise inside a chunk: map fails that item only, the others are right") {
    Watchdog watchdog(120s, "map with an unencodable result");
    mproc::Pool pool(2);
    const auto xs = inputs(8);  // item 3 is 13
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{4}, std::size_t{8}}) {
        INFO("chunksize " << chunksize);
        std::exception_ptr seen;
        std::vector<Fragile> delivered;
        auto am = pool.map_async(
            make_raw, xs, chunksize, [&](const std::vector<Fragile>& v) { delivered = v; },
            [&](std::exception_ptr e) { seen = e; });
        CHECK_THROWS_AS(am.get(), mproc::SerializationError);
        require_encoding_error(seen);
        CHECK(delivered.empty());
        // imap shows every item's own outcome: all right but item 3.
        std::size_t i = 0;
        auto results = pool.imap(make_raw, xs, chunksize);
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            if (xs[i] == 13) {
                CHECK_THROWS_AS(*it, mproc::SerializationError);
            } else {
                CHECK(*it == Fragile{xs[i], "value " + std::to_string(xs[i])});
            }
        }
        CHECK(i == xs.size());
    }
    CHECK(pool.map(make_raw, std::vector<long>{1, 2}) == std::vector<Fragile>{{1, "value 1"}, {2, "value 2"}});
}

TEST_CASE("a result that fails to serialise: imap_unordered and starmap fail that item only") {
    Watchdog watchdog(120s, "imap_unordered and starmap with an unencodable result");
    mproc::Pool pool(2);
    const auto xs = inputs(8);
    std::size_t values = 0, errors = 0;
    auto results = pool.imap_unordered(make_raw, xs, 4);
    for (auto it = results.begin(); it != results.end(); ++it) {
        try {
            const Fragile& f = *it;
            CHECK(f.text == "value " + std::to_string(f.n));
            CHECK(f.n != 13);
            ++values;
        } catch (const mproc::SerializationError&) {
            ++errors;
        }
    }
    CHECK(values == 7);
    CHECK(errors == 1);

    std::vector<std::tuple<long, long>> pairs = {{1, 2}, {6, 7}, {4, 4}};  // the second sums to 13
    CHECK_THROWS_AS(pool.starmap(make_pair_sum, pairs, 3), mproc::SerializationError);
    pairs[1] = {6, 6};
    CHECK(pool.starmap(make_pair_sum, pairs, 3) ==
          std::vector<Fragile>{{3, "value 3"}, {12, "value 12"}, {8, "value 8"}});
}

TEST_CASE("arguments that fail to decode in the worker fail that item with SerializationError; the chunk goes on") {
    Watchdog watchdog(120s, "undecodable arguments");
    mproc::Pool pool(2);
    std::vector<Fragile> xs;
    for (long i = 0; i < 10; ++i) xs.push_back(Fragile{i, {}});  // item 7 does not decode
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{5}, std::size_t{10}}) {
        INFO("chunksize " << chunksize);
        std::size_t i = 0;
        auto results = pool.imap(twice_fragile, xs, chunksize);
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            if (i == 7) {
                try {
                    (void)*it;
                    FAIL("item 7 returned a value");
                } catch (const mproc::SerializationError& e) {
                    CHECK_THAT(e.what(), Catch::Contains("Fragile"));
                    CHECK_THAT(e.what(), Catch::Contains("7 is refused on decoding"));
                }
            } else {
                CHECK(*it == static_cast<long>(i) * 2);
            }
        }
        CHECK(i == xs.size());
    }
    CHECK_THROWS_AS(pool.apply(twice_fragile, Fragile{7, {}}), mproc::SerializationError);
    CHECK(pool.apply(twice_fragile, Fragile{8, {}}) == 16);
}

TEST_CASE("a result that fails to decode in the parent fails that item only") {
    Watchdog watchdog(120s, "undecodable result in the parent");
    mproc::Pool pool(2);
    std::vector<long> xs = {5, 6, 7, 8, 9};
    std::size_t i = 0;
    auto results = pool.imap(echo_fragile, xs, 5);
    for (auto it = results.begin(); it != results.end(); ++it, ++i) {
        if (xs[i] == 7) {
            CHECK_THROWS_AS(*it, mproc::SerializationError);
        } else {
            CHECK(*it == Fragile{xs[i], {}});
        }
    }
    CHECK(i == xs.size());
    CHECK_THROWS_WITH(pool.map(echo_fragile, xs, 5), Catch::Contains("7 is refused on decoding"));
    CHECK(pool.apply(add, 2L, 3L) == 5);
}

// =================================================================================================
// an input that throws
// =================================================================================================

namespace {

long square_long(long x) { return x * x; }

/// 0, 1, ..., 999 that throws when asked for `fail_at` (through the element, or by advancing to it).
struct FailingInput : std::ranges::view_interface<FailingInput> {
    long fail_at = 0;
    bool on_advance = false;
    struct iterator {
        using value_type = long;
        using difference_type = std::ptrdiff_t;
        long i = 0;
        const FailingInput* input = nullptr;
        long operator*() const {
            if (!input->on_advance && i == input->fail_at) throw std::out_of_range("input item " + std::to_string(i));
            return i;
        }
        iterator& operator++() {
            if (input->on_advance && i + 1 == input->fail_at)
                throw std::out_of_range("input advance to " + std::to_string(i + 1));
            ++i;
            return *this;
        }
        void operator++(int) { ++*this; }
        bool operator==(std::default_sentinel_t) const { return i >= 1000; }
    };
    iterator begin() const { return iterator{0, this}; }
    std::default_sentinel_t end() const { return {}; }
};
static_assert(std::ranges::input_range<FailingInput>);

FailingInput failing_input(long fail_at, bool on_advance) {
    FailingInput in;
    in.fail_at = fail_at;
    in.on_advance = on_advance;
    return in;
}

}  // namespace

TEST_CASE("imap over an input that throws: the items before it, then its exception, then the end") {
    Watchdog watchdog(120s, "imap over a throwing input");
    mproc::Pool pool(2);
    for (bool on_advance : {false, true}) {
        for (std::size_t chunksize : {std::size_t{1}, std::size_t{2}, std::size_t{4}}) {
            INFO("chunksize " << chunksize << (on_advance ? ", failing advance" : ", failing element"));
            auto results = pool.imap(square_long, failing_input(3, on_advance), chunksize);
            std::vector<long> got;
            std::size_t errors = 0;
            auto it = results.begin();
            for (; it != results.end(); ++it) {
                try {
                    got.push_back(*it);
                } catch (const std::out_of_range& e) {
                    ++errors;
                    CHECK_THAT(e.what(), Catch::Contains("3"));
                    CHECK(got.size() == 3);  // in the position of the item that could not be read
                }
            }
            CHECK(got == std::vector<long>{0, 1, 4});
            CHECK(errors == 1);
            CHECK_THROWS_AS(results.begin(), mproc::Error);

            // A plain range-for stops at the input's exception, after yielding the items before it.
            std::vector<long> seen;
            CHECK_THROWS_AS(
                [&] {
                    for (long v : pool.imap(square_long, failing_input(3, on_advance), chunksize)) seen.push_back(v);
                }(),
                std::out_of_range);
            CHECK(seen == std::vector<long>{0, 1, 4});
        }
    }
    // imap_unordered: the three results in some order, then the exception.
    auto results = pool.imap_unordered(square_long, failing_input(3, false), 2);
    std::multiset<long> got;
    std::size_t errors = 0;
    for (auto it = results.begin(); it != results.end(); ++it) {
        try {
            got.insert(*it);
        } catch (const std::out_of_range&) {
            ++errors;
            CHECK(got.size() == 3);
        }
    }
    CHECK(got == std::multiset<long>{0, 1, 4});
    CHECK(errors == 1);
    // Failing at once: no value, the exception, the end.
    auto first = pool.imap(square_long, failing_input(0, false));
    auto it = first.begin();
    REQUIRE(it != first.end());
    CHECK_THROWS_AS(*it, std::out_of_range);
    ++it;
    CHECK(it == first.end());
    // Nothing is left pending: close and join return.
    pool.close();
    pool.join();
}

// ---- a map's input is read as the workers go ---------------------------------------------------
// map() encodes its input a window ahead of its results (detail/pool/feed.hpp), and map_async hands
// its first chunks to the workers before it has encoded the rest: an input that throws part-way
// then finds part of the call running, which must stop without a callback.

namespace {

mproc::Value<long>* squared_so_far = nullptr;  // made before the pool: its workers share it
long count_and_square(long x) {
    *squared_so_far += 1;
    return x * x;
}

}  // namespace

TEST_CASE("map reads its input a window ahead of its results and not all of it before the first task") {
    Watchdog watchdog(300s, "paced map");
    mproc::Value<long> squared(0);
    squared_so_far = &squared;
    mproc::Pool pool(2);
    constexpr long n = 1'000'000;
    long most_ahead = 0;  // items read from the input and not yet squared by a worker, at most
    auto input = std::views::iota(0L, n) | std::views::transform([&](long i) {
                     if (i % 1024 == 0) most_ahead = std::max(most_ahead, i - squared.load());
                     return i;
                 });
    const std::vector<long> r = pool.map(count_and_square, input);
    REQUIRE(r.size() == static_cast<std::size_t>(n));
    CHECK(r[12345] == 12345L * 12345L);
    CHECK(r[n - 1] == (n - 1) * (n - 1));
    // The window is 1 MiB of frames, 131,072 items of 8 bytes, plus the chunks being encoded and
    // handed over; encoding everything first reads all 1,000,000 before any is squared.
    INFO("most items read ahead of the results: " << most_ahead);
    CHECK(most_ahead < 400'000);
    squared_so_far = nullptr;
}

TEST_CASE("close() and join() while a map still reads its input: the map completes") {
    Watchdog watchdog(300s, "close during a paced map");
    mproc::Pool pool(2);
    constexpr long n = 1'000'000;
    // The input stops at item 300,000 (its first chunks long handed over) until another thread has
    // called close(); that thread then joins, which must wait for the rest of the map.
    pool_test::CloseMidInput closing(pool);
    auto input = std::views::iota(0L, n) | std::views::transform([&](long i) {
                     if (i == 300'000) closing.at_item();
                     return i;
                 });
    std::vector<long> r;
    CHECK_NOTHROW(r = pool.map(square_long, input));
    closing.join();
    REQUIRE(r.size() == static_cast<std::size_t>(n));
    CHECK(r[299'999] == 299'999L * 299'999L);
    CHECK(r[n - 1] == (n - 1) * (n - 1));
    CHECK_THROWS_AS(pool.map(square_long, std::vector<long>{1}), mproc::Error);  // a new call is refused
}

TEST_CASE("join() from a map's own input throws instead of waiting for that map") {
    Watchdog watchdog(300s, "join from a map's input");
    mproc::Pool pool(2);
    bool join_threw = false;
    auto input = std::views::iota(0L, 600'000L) | std::views::transform([&](long i) {
                     if (i == 300'000) {
                         pool.close();
                         try {
                             pool.join();
                         } catch (const mproc::Error& e) {
                             join_threw = std::string(e.what()).find("map's input") != std::string::npos;
                         }
                     }
                     return i;
                 });
    const std::vector<long> r = pool.map(square_long, input);
    CHECK(r.size() == 600'000);
    CHECK(join_threw);
    pool.join();  // now it returns
}

namespace {

/// Runs for a while, and counts how many of its kind run at once (the most in `most_at_once`).
mproc::Value<int>* running_now = nullptr;
mproc::Value<int>* most_at_once = nullptr;
std::size_t measure_overlap(std::vector<char> item) {
    const int now = (*running_now += 1);
    {
        std::lock_guard lock(most_at_once->get_lock());
        if (now > most_at_once->load()) most_at_once->store(now);
    }
    std::this_thread::sleep_for(100ms);
    *running_now -= 1;
    return item.size();
}

}  // namespace

TEST_CASE("a paced map of items larger than its window still runs them on every worker") {
    Watchdog watchdog(300s, "paced map of large items");
    mproc::Value<int> running(0), most(0);
    running_now = &running;
    most_at_once = &most;
    mproc::Pool pool(4);
    const std::vector<std::vector<char>> items(8, std::vector<char>(std::size_t{2} << 20, 'x'));
    const std::vector<std::size_t> sizes = pool.map(measure_overlap, items);
    CHECK(sizes == std::vector<std::size_t>(8, std::size_t{2} << 20));
    // Each item alone is 2 MiB of frame, past the 1 MiB window: a window of bytes alone would let
    // one task run at a time.
    CHECK(most.load() >= 2);
    running_now = most_at_once = nullptr;
}

TEST_CASE("a map whose input throws after its first chunks went out throws that and runs no callback") {
    Watchdog watchdog(300s, "map over an input that throws part-way");
    mproc::Pool pool(2);
    // 8 bytes an item: the first chunks are handed over long before item 500,000 is read.
    auto input = std::views::iota(0L, 600'000L) | std::views::transform([](long i) {
                     if (i == 500'000) throw std::out_of_range("input item 500000");
                     return i;
                 });
    CHECK_THROWS_WITH(pool.map(square_long, input), Catch::Contains("input item 500000"));
    CHECK_THROWS_WITH(pool.starmap([](long a, long b) { return a + b; },
                                   input | std::views::transform([](long i) { return std::tuple(i, i); })),
                      Catch::Contains("input item 500000"));
    std::atomic<int> callbacks{0};
    CHECK_THROWS_AS(pool.map_async(
                        square_long, input, 0, [&](const std::vector<long>&) { ++callbacks; },
                        [&](std::exception_ptr) { ++callbacks; }),
                    std::out_of_range);
    CHECK(pool.map(square_long, std::vector<long>{1, 2, 3}) == std::vector<long>{1, 4, 9});
    pool.close();
    pool.join();
    CHECK(callbacks == 0);
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- packed chunks ----------------------------------------------------------------------------
// A map whose argument and result are numbers sends a chunk's arguments as one array and gets its
// results back as one (detail::is_packed_task_v): the rules of every other map still hold.

namespace {

enum class Colour : std::uint8_t { red, green, blue };
long log_and_square_or_throw(long x) {
    pool_test::log_line(x);
    if (x % 50 == 17 || x == 0 || x == 999) throw std::invalid_argument("item " + std::to_string(x) + " refused");
    return x * x;
}
double halve(int x) { return x / 2.0; }
Colour next_colour(Colour c) { return static_cast<Colour>((static_cast<int>(c) + 1) % 3); }
std::string spell(long x) { return std::to_string(x); }
long add_pair(long a, long b) { return a + b; }
bool is_odd(long x) { return x % 2 != 0; }

}  // namespace

static_assert(mproc::detail::is_packed_task_v<long (*)(long), std::tuple<long>>);
static_assert(mproc::detail::is_packed_task_v<double (*)(int), std::tuple<int>>);
static_assert(mproc::detail::is_packed_task_v<Colour (*)(Colour), std::tuple<Colour>>);
static_assert(!mproc::detail::is_packed_task_v<std::string (*)(long), std::tuple<long>>);  // a string result
static_assert(!mproc::detail::is_packed_task_v<long (*)(long, long), std::tuple<long, long>>);  // two arguments
static_assert(!mproc::detail::is_packed_task_v<bool (*)(long), std::tuple<long>>);  // bool is checked when read
static_assert(!mproc::detail::is_packed_task_v<void (*)(long), std::tuple<long>>);

TEST_CASE(
    "packed chunks: an item that throws fails alone, the others in its chunk keep their values, none runs twice") {
    Watchdog watchdog(120s, "packed chunks with throwing items");
    pool_test::TaskLog log;
    mproc::Pool pool(2);
    std::vector<long> xs(1000);
    std::iota(xs.begin(), xs.end(), 0L);
    for (std::size_t chunksize : {std::size_t{1}, std::size_t{7}, std::size_t{100}, std::size_t{1000}}) {
        INFO("chunksize " << chunksize);
        auto results = pool.imap(log_and_square_or_throw, xs, chunksize);
        long i = 0;
        std::size_t errors = 0;
        for (auto it = results.begin(); it != results.end(); ++it, ++i) {
            if (i % 50 == 17 || i == 0 || i == 999) {
                try {
                    (void)*it;
                    FAIL("item " << i << " did not throw");
                } catch (const std::invalid_argument& e) {
                    CHECK_THAT(e.what(), Catch::Contains("item " + std::to_string(i) + " refused"));
                    ++errors;
                }
            } else {
                CHECK(*it == i * i);
            }
        }
        CHECK(i == 1000);
        CHECK(errors == 22);
        // Every item ran exactly once: the throw turned the chunk into one outcome per item without
        // running the items before it again.
        const auto ran = log.numbers();
        CHECK(ran.size() == 1000);
        for (long x = 0; x < 1000; ++x) CHECK(ran.count(x) == 1);
        std::ofstream(pool_test::g_log_path, std::ios::trunc).close();  // the next round starts a fresh log
    }
}

TEST_CASE("packed chunks: numbers of every width, enums, map, map_async, imap_unordered, starmap and apply agree") {
    Watchdog watchdog(120s, "packed chunks of many types");
    mproc::Pool pool(2);
    std::vector<int> ints(5000);
    std::iota(ints.begin(), ints.end(), -2500);
    const auto halves = pool.map(halve, ints);
    REQUIRE(halves.size() == ints.size());
    for (std::size_t i = 0; i < ints.size(); ++i) CHECK(halves[i] == ints[i] / 2.0);

    const std::vector<Colour> colours{Colour::red, Colour::green, Colour::blue, Colour::blue};
    CHECK(pool.map(next_colour, colours, 3) ==
          std::vector<Colour>{Colour::green, Colour::blue, Colour::red, Colour::red});

    std::vector<long> xs(3000);
    std::iota(xs.begin(), xs.end(), 0L);
    const auto squares = pool.map_async(square_long, xs).get();
    const auto unordered = [&] {
        std::multiset<long> got;
        for (long v : pool.imap_unordered(square_long, xs, 64)) got.insert(v);
        return got;
    }();
    std::multiset<long> expected;
    for (long x : xs) expected.insert(x * x);
    CHECK(std::multiset<long>(squares.begin(), squares.end()) == expected);
    CHECK(unordered == expected);
    // A one-element tuple is a packed starmap; two-element ones and other results take the general path.
    std::vector<std::tuple<long>> ones;
    for (long x : xs) ones.emplace_back(x);
    CHECK(pool.starmap(square_long, ones) == squares);
    CHECK(pool.starmap(add_pair, std::vector<std::pair<long, long>>{{1, 2}, {3, 4}}) == std::vector<long>{3, 7});
    CHECK(pool.map(spell, std::vector<long>{5, 12}) == std::vector<std::string>{"5", "12"});
    CHECK(pool.map(is_odd, std::vector<long>{5, 12}) == std::vector<bool>{true, false});
    CHECK(pool.apply(square_long, 9L) == 81);
}

namespace {
/// A task whose call operator is not const (a stateless functor that modifies nothing, declared so).
struct NonConstSquare {
    long operator()(long x) { return x * x; }
};
}  // namespace

TEST_CASE("packed chunks: a task whose call operator is not const (a functor, a mutable lambda) maps numbers") {
    Watchdog watchdog(60s, "packed chunks with non-const callables");
    mproc::Pool pool(2);
    std::vector<long> xs(500);
    std::iota(xs.begin(), xs.end(), 0L);
    std::vector<long> squares;
    for (long x : xs) squares.push_back(x * x);
    CHECK(pool.map(NonConstSquare{}, xs) == squares);
    CHECK(pool.map([](long x) mutable { return x * x; }, xs, 7) == squares);
    CHECK(pool.apply(NonConstSquare{}, 12L) == 144);
}
