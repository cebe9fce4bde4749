// SharedList across processes and threads: Python's list semantics, atomic updates, growth and
// the size limit, printing, snapshots, nested handles, and processes killed by SIGKILL in the
// middle of appends and inserts.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/shared_list.hpp>
#include <mproc/sync.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;
using mproc_test::eventually;

namespace {
std::size_t mappings_of(const std::string& name) { return mproc_test::memfd_mappings(::getpid(), name).size(); }
}  // namespace

TEST_CASE("SharedList: append, extend, insert, pop, at, size, index, remove, count, clear, as Python's list") {
    mproc::SharedList<int> l;
    CHECK(l.empty());
    l.append(1);
    l.extend({2, 3});
    l.extend(std::vector<int>{4, 5});
    CHECK(l.to_vector() == std::vector<int>{1, 2, 3, 4, 5});
    CHECK(l.size() == 5);
    l.insert(0, 0);     // [0, 1, 2, 3, 4, 5]
    l.insert(3, 9);     // [0, 1, 2, 9, 3, 4, 5]
    l.insert(-1, 8);    // before the last: [0, 1, 2, 9, 3, 4, 8, 5]
    l.insert(100, 7);   // past the end: appended
    l.insert(-100, 6);  // before the start: at 0
    CHECK(l.to_vector() == std::vector<int>{6, 0, 1, 2, 9, 3, 4, 8, 5, 7});
    CHECK(l.at(0) == 6);
    CHECK(l.at(-1) == 7);
    CHECK(l.at(-10) == 6);
    CHECK(l.pop() == 7);
    CHECK(l.pop(0) == 6);
    CHECK(l.pop(-2) == 8);
    CHECK(l.pop(3) == 9);
    CHECK(l.to_vector() == std::vector<int>{0, 1, 2, 3, 4, 5});
    l.append(3);
    CHECK(l.index(3) == 3);
    CHECK(l.count(3) == 2);
    CHECK(l.count(42) == 0);
    CHECK(l.contains(5));
    CHECK_FALSE(l.contains(42));
    l.remove(3);  // the first 3 only
    CHECK(l.to_vector() == std::vector<int>{0, 1, 2, 4, 5, 3});
    CHECK(l.index(3) == 5);
    l.clear();
    CHECK(l.size() == 0);
    CHECK(l.to_vector().empty());
    l.append(11);
    CHECK(l.to_vector() == std::vector<int>{11});
    mproc::SharedList<std::string> s{"a", "b", "a"};
    CHECK(s.size() == 3);
    CHECK(s.index("a") == 0);
    s.remove("a");
    CHECK(s.to_vector() == std::vector<std::string>{"b", "a"});
}

TEST_CASE("SharedList: l[i] reads, assigns, and +=, -=, *=, /=, ++, -- in place; negative indexes count from the end") {
    mproc::SharedList<long> l{10, 20, 30};
    long x = l[1];
    CHECK(x == 20);
    CHECK(l[-1] == 30);
    l[0] = 5;
    CHECK((l[0] += 4) == 9);
    CHECK((l[0] -= 2) == 7);
    CHECK((l[1] *= 3) == 60);
    CHECK((l[1] /= 4) == 15);
    CHECK(++l[2] == 31);
    CHECK(--l[-1] == 30);
    l[2] = l[0];  // the value, not the proxy
    CHECK(l.to_vector() == std::vector<long>{7, 15, 7});
    l.set(-2, 1);
    CHECK(l.at(1) == 1);
    mproc::SharedList<std::string> s{"ab"};
    s[0] += "cd";
    CHECK(s.at(0) == "abcd");
}

TEST_CASE(
    "SharedList: an index out of range is an IndexError, a value not there a KeyError, and neither changes "
    "anything") {
    mproc::SharedList<int> l;
    CHECK_THROWS_AS(l.pop(), mproc::IndexError);
    CHECK_THROWS_WITH(l.pop(), Catch::Contains("pop from an empty list"));
    l.extend({1, 2, 3});
    CHECK_THROWS_AS(l.at(3), mproc::IndexError);
    CHECK_THROWS_AS(l.at(-4), mproc::IndexError);
    CHECK_THROWS_AS(l.pop(3), mproc::IndexError);
    CHECK_THROWS_AS(l.pop(-4), mproc::IndexError);
    CHECK_THROWS_AS(l.set(3, 0), mproc::IndexError);
    CHECK_THROWS_AS(l[5] = 0, mproc::IndexError);
    CHECK_THROWS_AS(l[5] += 1, mproc::IndexError);
    CHECK_THROWS_AS(++l[-4], mproc::IndexError);
    CHECK_THROWS_AS(static_cast<int>(l[3]), mproc::IndexError);
    CHECK_THROWS_WITH(l.at(7), Catch::Contains("index 7 out of range"));
    CHECK_THROWS_AS(l.index(9), mproc::KeyError);
    CHECK_THROWS_AS(l.remove(9), mproc::KeyError);
    CHECK_THROWS_WITH(l.remove(9), Catch::Contains("9 is not in the list"));
    // An IndexError is a KeyError (both are Python LookupErrors), and both are mproc::Errors.
    CHECK_THROWS_AS(l.at(10), mproc::KeyError);
    CHECK_THROWS_AS(l.at(10), mproc::Error);
    CHECK(l.to_vector() == std::vector<int>{1, 2, 3});
}

TEST_CASE("fmt prints a SharedList like Python's list: strings quoted, numbers bare") {
    mproc::SharedList<int> l;
    CHECK(fmt::format("{}", l) == "[]");
    l.extend({1, 2, 3});
    CHECK(fmt::format("l={}", l) == "l=[1, 2, 3]");
    mproc::SharedList<std::string> s{"a", "b\"c"};
    CHECK(fmt::format("{}", s) == "[\"a\", \"b\\\"c\"]");
    mproc::SharedList<std::vector<double>> v{{1.5}, {}};
    CHECK(fmt::format("{}", v) == "[[1.5], []]");
}

TEST_CASE("4 processes x 100,000 l[0] += 1 end at exactly 400,000") {
    mproc::SharedList<long> l{0, 0};
    std::vector<mproc::Process> ps;
    for (int i = 0; i < 4; ++i)
        ps.emplace_back([&] {
            for (int j = 0; j < 100000; ++j) l[0] += 1;
            for (int j = 0; j < 10000; ++j) ++l[-1];
        });
    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        REQUIRE(p.join(300s));
        CHECK(p.exitcode() == 0);
    }
    CHECK(l.to_vector() == std::vector<long>{400000, 40000});
    CHECK(child_count() == 0);
}

TEST_CASE("Processes and threads appending at once: every element lands once, each producer's in its order") {
    using Entry = std::pair<int, int>;  // (producer, sequence)
    mproc::SharedList<Entry> l;
    constexpr int processes = 4, threads = 4, per = 3000;
    std::vector<mproc::Process> ps;
    for (int p = 0; p < processes; ++p)
        ps.emplace_back([&, p] {
            for (int i = 0; i < per; ++i) {
                if (i % 10 == 9) l.extend({Entry{p, i}});
                else l.append({p, i});
            }
        });
    for (auto& p : ps) p.start();  // forked before any thread starts
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            for (int i = 0; i < per; ++i) l.append({processes + t, i});
        });
    for (auto& t : ts) t.join();
    for (auto& p : ps) {
        REQUIRE(p.join(300s));
        CHECK(p.exitcode() == 0);
    }
    const auto all = l.to_vector();
    REQUIRE(all.size() == static_cast<std::size_t>((processes + threads) * per));
    std::map<int, int> next;
    bool in_order = true;
    for (const auto& [who, seq] : all) in_order = in_order && seq == next[who]++;
    CHECK(in_order);
    for (int who = 0; who < processes + threads; ++who) CHECK(next[who] == per);
    CHECK(child_count() == 0);
}

TEST_CASE("to_vector() is a consistent snapshot while another process extends, clears and pops") {
    // The writer fills the list from 0 up, 50 consecutive numbers per extend, and clears it, over
    // and over; then fills it once more and pops it empty from the front. Every consistent
    // snapshot is a run of consecutive integers, whose length is a multiple of 50 while it grows.
    constexpr int chunk = 50, total = 2000, cycles = 300;
    mproc::SharedList<int> l;
    mproc::Process writer([&] {
        std::vector<int> next(chunk);
        for (int c = 0; c <= cycles; ++c) {
            l.clear();
            for (int i = 0; i < total; i += chunk) {
                for (int j = 0; j < chunk; ++j) next[static_cast<std::size_t>(j)] = i + j;
                l.extend(next);
            }
        }
        for (int i = 0; i < total; ++i) l.pop(0);
    });
    writer.start();
    int torn = 0, snapshots = 0;
    bool shrinking = false;
    while (!writer.join(0s)) {
        const auto v = l.to_vector();
        ++snapshots;
        if (!v.empty() && v.front() != 0) shrinking = true;
        if (!shrinking && v.size() % chunk != 0) ++torn;
        for (std::size_t i = 1; i < v.size(); ++i)
            if (v[i] != v[i - 1] + 1) ++torn;
    }
    CHECK(torn == 0);
    CHECK(snapshots > 0);
    CHECK(l.empty());
    CHECK(child_count() == 0);
}

TEST_CASE("A SharedList grows as it fills; past max_bytes a change throws Full and leaves it unchanged") {
    {
        mproc::SharedList<long> big;
        const std::size_t before = big.memory_in_use();
        std::vector<long> expected;
        for (long i = 0; i < 100000; ++i) {
            big.append(i);
            expected.push_back(i);
        }
        for (long i = 0; i < 1000; ++i) {
            big.insert(500, -i);
            expected.insert(expected.begin() + 500, -i);
        }
        CHECK(big.to_vector() == expected);
        CHECK(big.memory_in_use() > before);
        const std::string long_text(1 << 20, 'x');
        mproc::SharedList<std::string> texts{long_text, "short"};
        CHECK(texts.at(0) == long_text);
    }
    mproc::SharedList<std::string> small({.max_bytes = 1 << 20});
    CHECK(small.max_bytes() == std::size_t{1} << 20);
    const std::string item(10'000, 'x');
    std::size_t n = 0;
    CHECK_THROWS_AS(
        [&] {
            for (;; ++n) small.append(item);
        }(),
        mproc::Full);
    CHECK(small.size() == n);
    CHECK(n > 50);
    const auto full = small.to_vector();
    CHECK_THROWS_AS(small.insert(0, item), mproc::Full);
    CHECK_THROWS_AS(small.extend(std::vector<std::string>{"a", item, item}), mproc::Full);  // none of them
    CHECK_THROWS_AS(small.set(0, item + item), mproc::Full);
    CHECK(small.to_vector() == full);
    // Room freed is reused.
    for (int i = 0; i < 10; ++i) small.pop();
    for (int i = 0; i < 10; ++i) small.append(item);
    CHECK(small.size() == n);
    small.clear();
    for (std::size_t i = 0; i < n; ++i) small.append(item);
    CHECK(small.size() == n);
}

namespace {
/// Walks the list's arena block by block (its blocks tile [begin, top)) and counts those marked in
/// use. In a whole list that is exactly its entries plus its item array: a block in use that the
/// array does not reach is half-done work of a writer that died.
std::size_t blocks_in_use(const mproc::detail::ListHeader& h) {
    const auto* base = reinterpret_cast<const std::byte*>(&h);  // the list starts its segment
    std::size_t used = 0;
    for (std::uint64_t at = h.arena.begin; at < h.arena.top;) {
        const auto* block = reinterpret_cast<const mproc::detail::ArenaBlock*>(base + at);
        if (block->cls >= mproc::detail::arena_classes) return ~std::size_t{0};
        if (block->state == mproc::detail::Arena::used_state) ++used;
        at += mproc::detail::arena_class_size(block->cls);
    }
    return used;
}

/// The victim's i-th operation, on the shared list or on the parent's model of it: appends,
/// inserts at the front and in the middle (a new item array each), a pop from the front and an
/// increment; the list grows by about half an element per operation.
template <class List> void victim_op(List& l, std::size_t size, long i) {
    switch (i % 6) {
        case 0: l.append(i); break;
        case 1: l.insert(0, i); break;
        case 2: l.insert(static_cast<std::ptrdiff_t>(size / 2), i); break;
        case 3:
            if (size > 0) l.pop(0);
            break;
        case 4:
            if (size > 0) l[static_cast<std::ptrdiff_t>(size / 3)] += 1000000;
            break;
        default: l.append(-i); break;
    }
}

/// The same operations on a std::vector.
struct Model {
    std::vector<long> v;
    void append(long x) { v.push_back(x); }
    void insert(std::ptrdiff_t at, long x) { v.insert(v.begin() + at, x); }
    void pop(std::ptrdiff_t at) { v.erase(v.begin() + at); }
    long& operator[](std::ptrdiff_t at) { return v[static_cast<std::size_t>(at)]; }
};
}  // namespace

TEST_CASE(
    "Processes killed mid-append and mid-insert: the next locker repairs the list, and it holds exactly the "
    "operations that returned, plus at most the one in flight") {
    // A process in a tight loop of appends, inserts, pops and increments is killed at a random
    // point; many kills land while it holds the list's lock (the kernel marks the lock's owner
    // dead, which the test reads). Rounds go on until 20 such kills; a hang guard caps them.
    mproc::SharedList<long> l{0};
    auto* header = reinterpret_cast<mproc::detail::ListHeader*>(mproc_test::object_address(l));
    mproc::Value<long> started(0), done(0);
    Model model{{0}};
    std::mt19937 rng(91);
    int in_lock = 0, rounds = 0;
    for (; in_lock < 20 && rounds < 2000; ++rounds) {
        started.store(0);
        done.store(0);
        mproc::Process victim([&] {
            for (long i = 0;; ++i) {
                started.store(i + 1);
                victim_op(l, l.size(), i);
                done.store(i + 1);
            }
        });
        victim.start();
        const long target = 1 + static_cast<long>(rng() % 400);
        REQUIRE(eventually([&] { return started.load() >= target; }));
        victim.kill();
        REQUIRE(victim.join(60s));
        if (mproc_test::died_holding(header->mutex)) ++in_lock;
        const auto now = l.to_vector();  // this lock does the repair
        REQUIRE(blocks_in_use(*header) == now.size() + 1);  // nothing half-built or half-freed is left
        // Replay what returned on the model; the operation in flight landed whole or not at all.
        const long returned = done.load(), begun = started.load();
        for (long i = 0; i < returned; ++i) victim_op(model, model.v.size(), i);
        if (now != model.v && begun > returned) victim_op(model, model.v.size(), returned);
        INFO("round " << rounds << ": " << returned << " operations returned, " << begun << " begun");
        REQUIRE(now == model.v);
    }
    INFO(rounds << " rounds");
    CHECK(in_lock >= 20);
    CHECK_FALSE(mproc_test::died_holding(header->mutex));
    // The list keeps working.
    const auto before = l.to_vector();
    for (long i = 0; i < 1000; ++i) l.insert(0, i);
    for (long i = 0; i < 1000; ++i) l.pop(0);
    CHECK(l.to_vector() == before);
    CHECK(child_count() == 0);
}

TEST_CASE("A writer killed while it holds the list's lock with handles half counted leaves it usable and whole") {
    const std::size_t queues = mappings_of("mproc-queue");
    mproc::SharedList<mproc::Queue<int>> l;
    l.append(mproc::Queue<int>({.buffer_bytes = 1 << 16}));
    l.append(mproc::Queue<int>({.buffer_bytes = 1 << 16}));
    CHECK(mappings_of("mproc-queue") == queues + 2);
    const auto [q_id, q_offset] = mproc::from_bytes<std::tuple<std::uint64_t, std::uint64_t>>(mproc::to_bytes(l.at(0)));
    (void)q_offset;
    mproc::Event inside;
    mproc::Process writer([&] {
        // What a writer killed between two steps of a change leaves: the list's lock held, the
        // table of counts marked as changing, and a count that no element backs.
        auto* h = reinterpret_cast<mproc::detail::ListHeader*>(mproc_test::object_address(l));
        h->mutex.lock();
        mproc::detail::RefCounts counts(
            reinterpret_cast<mproc::detail::RefTable*>(reinterpret_cast<std::byte*>(h) + h->refs));
        counts.begin();
        const std::uint64_t stray[] = {q_id, q_id};
        counts.add(stray);
        inside.set();
        while (true) ::pause();
    });
    writer.start();
    REQUIRE(inside.wait(60s));
    writer.kill();
    REQUIRE(writer.join(60s));
    CHECK(l.size() == 2);  // the next locker repairs: the counts are what the elements hold again
    l.pop(0);
    CHECK(mappings_of("mproc-queue") == queues + 1);
    l.pop();
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

namespace {
using List = mproc::SharedList<int>;
using Lists = mproc::SharedDict<std::string, List>;
void append_to(List l, int v) { l.append(v); }
void bump_first(List l) { l[0] += 1; }
int pop_absent(List l) { return l.pop(100); }
void append_stored(Lists d, int v) { d.at("l").append(v); }
}  // namespace

TEST_CASE("A SharedList passed to Pool tasks, and one stored only inside a SharedDict, is the same list everywhere") {
    const std::size_t lists = mappings_of("mproc-list");
    {
        List direct{0};
        Lists d;
        d["l"] = List();  // the dict holds the only handle
        CHECK(mappings_of("mproc-list") == lists + 2);
        d.at("l").append(1);
        // A child forked now maps it through the dict.
        mproc::Process child([&] { d.at("l").append(2); });
        child.start();
        REQUIRE(child.join(60s));
        CHECK(child.exitcode() == 0);
        {
            mproc::Pool pool(2);
            pool.starmap(append_stored, std::vector<std::tuple<Lists, int>>{{d, 3}, {d, 4}, {d, 5}});
            pool.apply(append_to, direct, 1);
            pool.apply(append_to, direct, 2);
            std::vector<std::tuple<List>> bumps(1000, {direct});
            pool.starmap(bump_first, bumps, 1);
            // mproc's errors come back as what they are: an IndexError crosses as a KeyError.
            CHECK_THROWS_AS(pool.apply(pop_absent, direct), mproc::KeyError);
            CHECK_THROWS_WITH(pool.apply(pop_absent, direct), Catch::Contains("out of range"));
            // A list made after the pool reaches its workers too: the pool sends them its memory.
            List late;
            pool.apply(append_to, late, 1);
            CHECK(late.to_vector() == std::vector<int>{1});
            pool.close();
            pool.join();
        }
        auto stored = d.at("l").to_vector();
        std::sort(stored.begin() + 2, stored.end());
        CHECK(stored == std::vector<int>{1, 2, 3, 4, 5});
        CHECK(fmt::format("{}", direct) == "[1000, 1, 2]");
        d.erase("l");  // its last copy: it goes
        CHECK(mappings_of("mproc-list") == lists + 1);
    }
    CHECK(mappings_of("mproc-list") == lists);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Handles stored only in a SharedList stay usable, and go with their last stored copy; nothing is left "
    "mapped or in /dev/shm") {
    const auto shm_before = mproc_test::dev_shm_names();
    const std::size_t lists = mappings_of("mproc-list"), queues = mappings_of("mproc-queue");
    {
        mproc::SharedList<mproc::Queue<int>> l;
        l.append(mproc::Queue<int>({.buffer_bytes = 1 << 16}));
        l.insert(0, mproc::Queue<int>({.buffer_bytes = 1 << 16}));
        l.extend(std::vector<mproc::Queue<int>>(2, mproc::Queue<int>({.buffer_bytes = 1 << 16})));  // one queue, twice
        CHECK(mappings_of("mproc-queue") == queues + 3);
        l.at(0).put(456);
        CHECK(l.at(0).get() == 456);
        mproc::Process child([&] {
            l.at(-1).put(7);
            std::_Exit(l.at(2).get(5s) == 7 ? 0 : 1);  // the same queue
        });
        child.start();
        REQUIRE(child.join(60s));
        CHECK(child.exitcode() == 0);
        l.set(0, mproc::Queue<int>({.buffer_bytes = 1 << 16}));  // overwritten: the old one goes
        CHECK(mappings_of("mproc-queue") == queues + 3);
        l.remove(l.at(2));  // one of the two copies
        CHECK(mappings_of("mproc-queue") == queues + 3);
        l.pop();  // the other
        CHECK(mappings_of("mproc-queue") == queues + 2);
        {
            mproc::SharedList<mproc::SharedList<mproc::Queue<int>>> outer;
            outer.append(l);
            outer.at(0).at(0).put(1);
            CHECK(l.at(0).get() == 1);
            CHECK(mappings_of("mproc-list") == lists + 2);
        }
        l.clear();
        CHECK(mappings_of("mproc-queue") == queues);
    }
    CHECK(mappings_of("mproc-list") == lists);
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(mproc_test::dev_shm_names() == shm_before);
    CHECK(child_count() == 0);
}

TEST_CASE("A SharedList handle crosses a Pipe; a handle of the wrong type is refused") {
    mproc::SharedList<int> l{1};
    auto [a, b] = mproc::Pipe<mproc::SharedList<int>>();
    mproc::Process child([&] {
        auto received = b.recv();
        received.append(2);
    });
    child.start();
    a.send(l);
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK(l.to_vector() == std::vector<int>{1, 2});
    const auto bytes = mproc::to_bytes(l);
    CHECK_THROWS_AS((mproc::from_bytes<mproc::SharedList<long>>(bytes)), mproc::SerializationError);
    CHECK_THROWS_AS((mproc::from_bytes<mproc::SharedDict<int, int>>(bytes)), mproc::SerializationError);
    CHECK(child_count() == 0);
}
