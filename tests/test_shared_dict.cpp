// SharedDict across processes: the API, atomic updates, any key and value types, the size limit,
// printing, snapshots, and processes killed by SIGKILL in the middle of updates.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/sync.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;
using mproc_test::eventually;

TEST_CASE("SharedDict: set, get, contains, erase, size, clear, pop, update") {
    mproc::SharedDict<std::string, int> d;
    CHECK(d.empty());
    d["count"] = 0;
    d.set("k", 1);
    CHECK(d.size() == 2);
    CHECK(d.contains("k"));
    CHECK_FALSE(d.contains("nope"));
    CHECK(d.get("k") == 1);
    CHECK(d.get("nope") == std::nullopt);
    CHECK(d.get("nope", 7) == 7);
    CHECK(d.at("k") == 1);
    int n = d["k"];
    CHECK(n == 1);
    CHECK(d["k"] == 1);
    CHECK((d["k"] += 4) == 5);
    CHECK((d["k"] -= 1) == 4);
    CHECK(++d["k"] == 5);
    d["count"] = d["k"];  // assigns the value, not the proxy
    CHECK(d.at("count") == 5);
    CHECK(d.update("u", [](std::optional<int> old) { return old.value_or(0) + 1; }) == 1);
    CHECK(d.update("u", [](std::optional<int> old) { return old.value_or(0) + 1; }) == 2);
    CHECK(d.pop("u") == 2);
    CHECK(d.pop("u") == std::nullopt);
    CHECK(d.erase("k"));
    CHECK_FALSE(d.erase("k"));
    CHECK(d.size() == 1);
    d.clear();
    CHECK(d.size() == 0);
    CHECK(d.items().empty());
    d["again"] = 3;
    CHECK(d.items() == std::vector<std::pair<std::string, int>>{{"again", 3}});
}

TEST_CASE("SharedDict: absent keys raise KeyError, for reads and for d[new] += 1, changing nothing") {
    mproc::SharedDict<std::string, int> d;
    CHECK_THROWS_AS(d.at("missing"), mproc::KeyError);
    CHECK_THROWS_AS(static_cast<int>(d["missing"]), mproc::KeyError);
    CHECK_THROWS_AS(d["new"] += 1, mproc::KeyError);
    CHECK_THROWS_WITH(d["new"] += 1, Catch::Contains("\"new\""));
    CHECK_FALSE(d.contains("new"));
    CHECK(d.size() == 0);
    // An update whose function throws changes nothing either.
    d["x"] = 1;
    CHECK_THROWS_AS(d.update("x", [](std::optional<int>) -> int { throw std::runtime_error("no"); }),
                    std::runtime_error);
    CHECK(d.at("x") == 1);
}

TEST_CASE("The tutorial Manager program: 5 processes add 1..5, dic={\"count\": 15}") {
    mproc::SharedDict<std::string, int> d;
    d["count"] = 0;
    std::vector<mproc::Process> ps;
    for (int c = 1; c <= 5; ++c) ps.emplace_back([&d, c] { d["count"] += c; });
    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == 0);
    }
    CHECK(fmt::format("dic={}", d) == "dic={\"count\": 15}");
    CHECK(child_count() == 0);
}

TEST_CASE("8 processes x 100,000 d[\"count\"] += 1 end at exactly 800,000") {
    mproc::SharedDict<std::string, long> d;
    d["count"] = 0;
    std::vector<mproc::Process> ps;
    for (int i = 0; i < 8; ++i)
        ps.emplace_back([&] {
            for (int j = 0; j < 100000; ++j) d["count"] += 1;
        });
    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        REQUIRE(p.join(300s));
        CHECK(p.exitcode() == 0);
    }
    CHECK(d.at("count") == 800000);
    CHECK(child_count() == 0);
}

TEST_CASE("update() is atomic across processes") {
    mproc::SharedDict<std::string, std::vector<int>> d;
    std::vector<mproc::Process> ps;
    for (int i = 0; i < 4; ++i)
        ps.emplace_back([&, i] {
            for (int j = 0; j < 2000; ++j)
                d.update("log", [&](std::optional<std::vector<int>> old) {
                    auto v = old.value_or(std::vector<int>{});
                    v.push_back(i);
                    return v;
                });
        });
    for (auto& p : ps) p.start();
    for (auto& p : ps) REQUIRE(p.join(120s));
    const auto log = d.at("log");
    CHECK(log.size() == 8000);
    for (int i = 0; i < 4; ++i) CHECK(std::count(log.begin(), log.end(), i) == 2000);
    CHECK(child_count() == 0);
}

namespace {
struct Record {
    std::string name;
    std::vector<double> xs;
    bool operator==(const Record&) const = default;
    template <class Archive> void serialize(Archive& ar) { ar(name, xs); }
};
}  // namespace

TEST_CASE("SharedDict holds any serialisable keys and values, of any length, and grows as it fills") {
    mproc::SharedDict<std::vector<int>, Record> d;
    const std::string long_name(1 << 20, 'n');
    d.set({1, 2, 3}, Record{long_name, {1.5, 2.5}});
    d.set({}, Record{"empty key", {}});
    mproc::Process child([&] { d.set({4}, Record{"from child", std::vector<double>(100000, 4.0)}); });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(d.at({1, 2, 3}) == Record{long_name, {1.5, 2.5}});
    CHECK(d.at({}).name == "empty key");
    CHECK(d.at({4}).xs.size() == 100000);

    mproc::SharedDict<std::string, std::string> big;
    constexpr int count = 100000;
    for (int i = 0; i < count; ++i)
        big.set("key-" + std::to_string(i), std::string(static_cast<std::size_t>(i % 300), 'v'));
    CHECK(big.size() == count);
    for (int i = 0; i < count; i += 2) REQUIRE(big.erase("key-" + std::to_string(i)));
    CHECK(big.size() == count / 2);
    for (int i = 0; i < count; ++i) {
        const auto v = big.get("key-" + std::to_string(i));
        if (i % 2 == 0) REQUIRE_FALSE(v.has_value());
        else REQUIRE(v == std::string(static_cast<std::size_t>(i % 300), 'v'));
    }
    CHECK(big.keys().size() == count / 2);
    CHECK(big.values().size() == count / 2);
    CHECK(child_count() == 0);
}

TEST_CASE("Past max_bytes an insert throws Full and leaves the dict unchanged; freed room is reused") {
    mproc::SharedDict<std::string, std::string> d({.max_bytes = 1 << 20});
    CHECK(d.max_bytes() == (1u << 20));
    int inserted = 0;
    bool full = false;
    while (!full) {
        try {
            d.set(fmt::format("k{}", inserted), std::string(10000, 'x'));
            ++inserted;
        } catch (const mproc::Full&) {
            full = true;
        }
    }
    CHECK(inserted > 50);
    const auto before = d.items();
    CHECK(static_cast<int>(before.size()) == inserted);
    CHECK_THROWS_AS(d.set("another", std::string(10000, 'y')), mproc::Full);
    CHECK_THROWS_AS(d.set("k0", std::string(500000, 'z')), mproc::Full);  // a bigger replacement
    CHECK(d.items() == before);
    // Removing entries makes room again, many times over.
    for (int round = 0; round < 20; ++round) {
        for (int i = 0; i < 10; ++i) REQUIRE(d.erase("k" + std::to_string(i)));
        for (int i = 0; i < 10; ++i) REQUIRE_NOTHROW(d.set("k" + std::to_string(i), std::string(10000, 'w')));
    }
    CHECK(d.size() == before.size());
    d.clear();
    CHECK(d.size() == 0);
    for (int i = 0; i < inserted; ++i) REQUIRE_NOTHROW(d.set("k" + std::to_string(i), std::string(10000, 'x')));
}

TEST_CASE("fmt prints a SharedDict like a map: strings quoted, numbers bare") {
    mproc::SharedDict<std::string, int> d;
    CHECK(fmt::format("{}", d) == "{}");
    d["count"] = 15;
    d["other \"q\""] = -2;
    CHECK(fmt::format("dic={}", d) == "dic={\"count\": 15, \"other \\\"q\\\"\": -2}");
    mproc::SharedDict<int, std::vector<std::string>> nested;
    nested.set(1, {"a", "b"});
    nested.set(2, {});
    CHECK(fmt::format("{}", nested) == "{1: [\"a\", \"b\"], 2: []}");
    mproc::SharedDict<std::string, std::optional<double>> opt;
    opt.set("x", 1.5);
    opt.set("y", std::nullopt);
    CHECK(fmt::format("{}", opt) == "{\"x\": 1.5, \"y\": None}");
}

TEST_CASE("items() is a consistent snapshot while others write") {
    // The writer inserts key 0, 1, 2, ... in order: any consistent snapshot is a prefix.
    mproc::SharedDict<int, int> d;
    mproc::Event looked;  // the writer waits, half-way, until a snapshot was taken meanwhile
    mproc::Process writer([&] {
        for (int i = 0; i < 20000; ++i) {
            d.set(i, i * 2);
            if (i == 10000) (void)looked.wait(60s);
        }
    });
    writer.start();
    int torn = 0, snapshots = 0;
    bool writer_done = false;
    do {  // at least one look, even when the writer is done first
        writer_done = writer.join(0s);
        const auto items = d.items();
        ++snapshots;
        if (items.size() > 1 && items.size() < 20000) looked.set();
        for (std::size_t i = 0; i < items.size(); ++i)
            if (items[i].first != static_cast<int>(i) || items[i].second != static_cast<int>(i) * 2) ++torn;
    } while (!writer_done);
    CHECK(torn == 0);
    CHECK(snapshots > 0);
    CHECK(d.size() == 20000);
    CHECK(child_count() == 0);
}

TEST_CASE("A SharedDict handle crosses a Pipe; a handle of the wrong type is refused") {
    mproc::SharedDict<std::string, int> d;
    auto [a, b] = mproc::Pipe<mproc::SharedDict<std::string, int>>();
    mproc::Process child([&] {
        auto received = b.recv();
        received["from child"] = 1;
    });
    child.start();
    a.send(d);
    REQUIRE(child.join(60s));
    CHECK(d.at("from child") == 1);
    const auto bytes = mproc::to_bytes(d);
    CHECK_THROWS_AS((mproc::from_bytes<mproc::SharedDict<std::string, long>>(bytes)), mproc::SerializationError);
    CHECK(child_count() == 0);
}

namespace {
struct Item {
    int producer = 0;
    long seq = 0;
    std::string payload;
    template <class Archive> void serialize(Archive& ar) { ar(producer, seq, payload); }
};
}  // namespace

TEST_CASE("100 rounds of SIGKILL mid-update: survivors go on, nothing that returned is lost or doubled", "[stress]") {
    const auto shm_before = mproc_test::dev_shm_names();
    constexpr int rounds = 100;
    mproc::SharedDict<std::string, long> d;
    d["k"] = 0;
    mproc::Queue<Item> q;
    // Per victim (and, last, the survivor): increments and puts started and finished.
    mproc::Array<long> inc_started(rounds + 1), inc_done(rounds + 1), put_started(rounds + 1), put_done(rounds + 1);
    auto worker = [&](int id, std::size_t max_payload, const mproc::Event* stop) {
        std::mt19937_64 rng(static_cast<std::uint64_t>(id) + 99);
        const auto slot = static_cast<std::size_t>(id);
        for (long i = 0; !stop || !stop->is_set(); ++i) {
            std::atomic_ref<long>(inc_started[slot]).store(i + 1);
            d["k"] += 1;
            std::atomic_ref<long>(inc_done[slot]).store(i + 1);
            // Keys come and go too, so the kill also lands in inserts, erases and table rebuilds.
            const std::string key = fmt::format("p{}-{}", id, i % 50);
            if (i % 3 == 0) d.erase(key);
            else d.set(key, i);
            std::atomic_ref<long>(put_started[slot]).store(i + 1);
            q.put(Item{id, i, std::string(rng() % max_payload, 'x')});
            std::atomic_ref<long>(put_done[slot]).store(i + 1);
        }
    };
    mproc::Event stop;
    mproc::Process survivor([&] { worker(rounds, 2000, &stop); });
    survivor.start();

    std::map<int, std::vector<long>> received;
    auto drain = [&] {
        while (auto item = q.try_get()) received[item->producer].push_back(item->seq);
    };
    std::mt19937 rng(12345);
    for (int round = 0; round < rounds; ++round) {
        mproc::Process victim([&, round] { worker(round, 100000, nullptr); });
        victim.start();
        const long target = 1 + static_cast<long>(rng() % 300);
        REQUIRE(eventually([&] {
            drain();
            return std::atomic_ref<long>(inc_done[static_cast<std::size_t>(round)]).load() >= target;
        }));
        victim.kill();
        REQUIRE(victim.join(60s));
        CHECK(victim.exitcode() == -SIGKILL);
        drain();
    }
    stop.set();
    REQUIRE(survivor.join(120s));
    CHECK(survivor.exitcode() == 0);
    drain();

    long done = 0, started = 0;
    for (int id = 0; id <= rounds; ++id) {
        done += inc_done[static_cast<std::size_t>(id)];
        started += inc_started[static_cast<std::size_t>(id)];
    }
    // An increment whose process was killed before it could report may or may not have landed;
    // every increment that returned has.
    const long k = d.at("k");
    CHECK(k >= done);
    CHECK(k <= started);
    for (int id = 0; id <= rounds; ++id) {
        const auto& seqs = received[id];
        const long put_returned = put_done[static_cast<std::size_t>(id)];
        const long put_begun = put_started[static_cast<std::size_t>(id)];
        INFO("producer " << id << ": " << seqs.size() << " received, " << put_returned << " puts returned");
        CHECK(static_cast<long>(seqs.size()) >= put_returned);
        CHECK(static_cast<long>(seqs.size()) <= put_begun);
        bool in_order = true;
        for (std::size_t i = 0; i < seqs.size(); ++i) in_order = in_order && seqs[i] == static_cast<long>(i);
        CHECK(in_order);
    }
    // The structures are whole: every key reads back, sizes agree, and they keep working.
    const auto items = d.items();
    CHECK(items.size() == d.size());
    for (const auto& [key, value] : items) REQUIRE(d.get(key) == value);
    for (int i = 0; i < 1000; ++i) d.set("after-" + std::to_string(i), i);
    CHECK(d.size() == items.size() + 1000);
    q.put(Item{-1, 0, "last"});
    CHECK(q.get(10s).payload == "last");
    CHECK(q.try_get() == std::nullopt);

    CHECK(child_count() == 0);
    CHECK(mproc_test::dev_shm_names() == shm_before);
}

TEST_CASE("A writer killed while holding the dict's lock leaves it usable and whole") {
    const auto shm_before = mproc_test::dev_shm_names();
    mproc::SharedDict<int, std::string> d({.max_bytes = 64 << 20});
    for (int i = 0; i < 1000; ++i) d.set(i, std::string(100, 'a'));
    for (int round = 0; round < 20; ++round) {
        mproc::Event inside;
        mproc::Process victim([&] {
            // Holds the lock inside update() while it is killed.
            d.update(-1, [&](std::optional<std::string> old) {
                inside.set();
                while (true) ::pause();
                return old.value_or("");
            });
        });
        victim.start();
        REQUIRE(inside.wait(60s));
        victim.kill();
        REQUIRE(victim.join(60s));
        d.set(round, std::string(200, 'b'));  // the next locker repairs and goes on
    }
    CHECK(d.size() == 1000);
    CHECK_FALSE(d.contains(-1));
    for (int i = 0; i < 20; ++i) CHECK(d.at(i) == std::string(200, 'b'));
    CHECK(d.at(20) == std::string(100, 'a'));
    CHECK(child_count() == 0);
    CHECK(mproc_test::dev_shm_names() == shm_before);
}

// ---- Pool tasks, snapshots of keys and values, kills inside the lock --------------------------

namespace {
using Dict = mproc::SharedDict<std::string, int>;
void add_to_count(Dict dic, int c) { dic["count"] += c; }
void bump_absent(Dict dic) { dic["absent"] += 1; }
int read_count(Dict dic) { return dic["count"]; }

/// Walks the dict's arena block by block (its blocks tile [begin, top)) and counts those marked
/// in use. In a whole dict that is exactly its entries plus its slot table: a block in use that
/// the table does not reach is half-done work of a writer that died.
std::size_t blocks_in_use(const mproc::detail::DictHeader& h) {
    const auto* base = reinterpret_cast<const std::byte*>(&h);  // the dict starts its segment
    std::size_t used = 0;
    for (std::uint64_t at = h.arena.begin; at < h.arena.top;) {
        const auto* block = reinterpret_cast<const mproc::detail::ArenaBlock*>(base + at);
        if (block->cls >= mproc::detail::arena_classes) return ~std::size_t{0};
        if (block->state == mproc::detail::Arena::used_state) ++used;
        at += mproc::detail::arena_class_size(block->cls);
    }
    return used;
}
}  // namespace

TEST_CASE(
    "A SharedDict passed to Pool tasks is the same dict: the tutorial Manager program gives dic={\"count\": 15}") {
    Dict d;
    d["count"] = 0;
    mproc::Pool pool(5);
    const std::vector<std::tuple<Dict, int>> args = {{d, 1}, {d, 2}, {d, 3}, {d, 4}, {d, 5}};
    pool.starmap(add_to_count, args);
    CHECK(fmt::format("dic={}", d) == "dic={\"count\": 15}");
    CHECK(pool.apply(read_count, d) == 15);
    // Many small tasks on every worker at once: no increment is lost.
    std::vector<std::tuple<Dict, int>> ones(5000, {d, 1});
    pool.starmap(add_to_count, ones, 1);
    pool.starmap(add_to_count, ones);
    CHECK(d.at("count") == 10015);
    // mproc's own errors come back as themselves: KeyError for d["absent"] += 1 in a worker.
    CHECK_THROWS_AS(pool.apply(bump_absent, d), mproc::KeyError);
    CHECK_THROWS_WITH(pool.apply(bump_absent, d), Catch::Contains("\"absent\""));
    CHECK_FALSE(d.contains("absent"));
    // A dict made after the pool reaches its workers too: the pool sends them its memory.
    Dict late;
    late["count"] = 0;
    pool.apply(add_to_count, late, 1);
    CHECK(late.at("count") == 1);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("keys() and values() are consistent snapshots while others write") {
    // The writer inserts i -> 2i in order, then erases them in order: every consistent snapshot
    // of keys is a run of consecutive integers, and values match them.
    mproc::SharedDict<int, int> d;
    mproc::Process writer([&] {
        for (int i = 0; i < 20000; ++i) d.set(i, i * 2);
        for (int i = 0; i < 20000; ++i) d.erase(i);
    });
    writer.start();
    int torn = 0, snapshots = 0;
    // At least one snapshot, even if the writer is done before this loop first looks (a busy
    // machine may run the child to its end first): the loop checks the end after each snapshot.
    do {
        const auto keys = d.keys();
        const auto values = d.values();
        ++snapshots;
        for (std::size_t i = 1; i < keys.size(); ++i)
            if (keys[i] != keys[i - 1] + 1) ++torn;
        for (std::size_t i = 1; i < values.size(); ++i)
            if (values[i] != values[i - 1] + 2 || values[i] % 2 != 0) ++torn;
    } while (!writer.join(0s));
    CHECK(torn == 0);
    INFO(snapshots << " snapshots");
    CHECK(d.keys().empty());
    CHECK(d.values().empty());
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Writers killed while they hold the dict's lock: the next locker repairs it, and the count equals the increments "
    "that returned") {
    // A process in a tight loop of d["k"] += 1 (plus inserts and erases, so the kill also lands
    // in allocations and table rebuilds) is killed at a random point. About a third of the kills
    // land while it holds the dict's lock (the kernel marks the lock's owner dead, which the test
    // reads). Rounds go on until 20 such kills; a hang guard caps them at 2000.
    mproc::SharedDict<std::string, long> d;
    d["k"] = 0;
    auto* header = reinterpret_cast<mproc::detail::DictHeader*>(mproc_test::object_address(d));
    mproc::Value<long> inc_started(0), inc_done(0);
    std::mt19937 rng(77);
    int in_lock = 0, rounds = 0;
    long expected = 0;
    for (; in_lock < 20 && rounds < 2000; ++rounds) {
        inc_started.store(0);
        inc_done.store(0);
        mproc::Process victim([&, rounds] {
            for (long i = 0;; ++i) {
                inc_started.store(i + 1);
                d["k"] += 1;
                inc_done.store(i + 1);
                // Keys of many lengths: entries of many block sizes come and go.
                const std::string key = fmt::format("r{}-{}-", rounds % 7, i % 64) +
                                        std::string(static_cast<std::size_t>(i % 64) * 11, 'x');
                if (i % 3 == 0) d.erase(key);
                else d.set(key, i);
            }
        });
        victim.start();
        const long target = 1 + static_cast<long>(rng() % 2000);
        REQUIRE(eventually([&] { return inc_started.load() >= target; }));
        victim.kill();
        REQUIRE(victim.join(60s));
        if (mproc_test::died_holding(header->mutex)) ++in_lock;
        const long k = d.at("k");  // this lock does the repair
        REQUIRE(blocks_in_use(*header) == d.size() + 1);  // nothing half-built or half-freed is left
        const long done = inc_done.load(), started = inc_started.load();
        // The increment in flight when the kill came either landed whole or not at all.
        INFO("round " << rounds << ": k went from " << expected << " to " << k << "; " << done
                      << " increments returned, " << started << " begun");
        REQUIRE(k >= expected + done);
        REQUIRE(k <= expected + started);
        expected = k;
    }
    INFO(rounds << " rounds");
    CHECK(in_lock >= 20);
    CHECK_FALSE(mproc_test::died_holding(header->mutex));
    // The dict is whole: every entry reads back, sizes agree, and it keeps working.
    const auto items = d.items();
    CHECK(items.size() == d.size());
    for (const auto& [key, value] : items) REQUIRE(d.get(key) == value);
    for (int i = 0; i < 2000; ++i) d.set("after-" + std::to_string(i), i);
    CHECK(d.size() == items.size() + 2000);
    for (int i = 0; i < 2000; ++i) REQUIRE(d.erase("after-" + std::to_string(i)));
    CHECK(d.items() == items);
    CHECK(child_count() == 0);
}

// ---- Handles stored inside a SharedDict: the dict keeps their objects alive ------------------

namespace {

/// Every kind of handle, with a small Array (carved from a shared chunk) and a big one (a
/// segment of its own).
struct AllKinds {
    mproc::Queue<int> queue{mproc::QueueOptions{.buffer_bytes = 1 << 16}};
    mproc::SharedDict<std::string, int> dict{mproc::SharedDictOptions{.max_bytes = 1 << 20}};
    mproc::Lock lock;
    mproc::RLock rlock;
    mproc::Semaphore semaphore{0};
    mproc::Event event;
    mproc::Barrier barrier{1};
    mproc::Value<long> value{0};
    mproc::Array<int> small = mproc::Array<int>(4);
    mproc::Array<double> big = mproc::Array<double>(std::size_t{1} << 16);  // 512 KiB: a segment of its own
    template <class Archive> void serialize(Archive& ar) {
        ar(queue, dict, lock, rlock, semaphore, event, barrier, value, small, big);
    }
};

/// Uses every object in `all` once, as the process numbered `who` (1, 2, 3, ...). Returns the
/// number of checks that failed. Pool workers run it at once: the queue's round trip and the
/// arrays' plain read-modify-writes are made under the lock.
int use_all_kinds(AllKinds all, int who) {
    int failures = 0;
    {
        std::lock_guard l(all.lock);
        std::lock_guard r1(all.rlock);
        std::lock_guard r2(all.rlock);
        all.queue.put(who);
        failures += all.queue.get(5s) == who ? 0 : 1;
        all.small[0] += who;
        all.big[(1 << 16) - 1] += who;
    }
    all.dict[std::to_string(who)] = who;
    failures += all.dict.at(std::to_string(who)) == who ? 0 : 1;
    all.semaphore.release();
    failures += all.semaphore.acquire(5s) ? 0 : 1;
    all.event.set();
    failures += all.event.wait(5s) ? 0 : 1;
    all.barrier.wait(5s);
    all.value += who;
    return failures;
}

using StoredKinds = mproc::SharedDict<std::string, AllKinds>;
int use_stored_kinds(StoredKinds d, int who) { return use_all_kinds(d.at("all"), who); }

std::size_t mappings_of(const std::string& name) { return mproc_test::memfd_mappings(::getpid(), name).size(); }

}  // namespace

TEST_CASE("Dicts and a Queue stored only inside a SharedDict stay usable (Python's nested manager dicts and queues)") {
    const std::size_t dicts = mappings_of("mproc-dict"), queues = mappings_of("mproc-queue");
    {
        mproc::SharedDict<std::string, mproc::SharedDict<std::string, int>> d;
        {
            mproc::SharedDict<std::string, int> pets, supplies;
            pets["ferrets"] = 2;
            pets["hamsters"] = 4;
            supplies["water"] = 10;
            supplies["feed"] = 3;
            d["pets"] = pets;
            d["supplies"] = supplies;
            CHECK(d.at("supplies").at("water") == 10);
        }  // the last handles of this process go: only the stored copies are left
        CHECK(d.at("pets").at("ferrets") == 2);
        d.at("supplies")["blankets"] = 5;
        d.at("supplies")["water"] = 7;
        CHECK(d.at("supplies").at("blankets") == 5);
        CHECK(d.at("supplies").at("water") == 7);
        CHECK(mappings_of("mproc-dict") == dicts + 3);
        // A child forked now has them too, and sees the same dicts.
        mproc::Process child(
            [&] { std::_Exit(d.at("pets").at("hamsters") == 4 && d.at("supplies").size() == 3 ? 0 : 1); });
        child.start();
        REQUIRE(child.join(60s));
        CHECK(child.exitcode() == 0);
        d.erase("pets");
        CHECK(mappings_of("mproc-dict") == dicts + 2);
        d.clear();
        CHECK(d.empty());
        CHECK(mappings_of("mproc-dict") == dicts + 1);

        // CPython's test_nested_queue: b[0] = Queue(); b[0].put(456); b[0].get() == 456.
        mproc::SharedDict<int, mproc::Queue<int>> b;
        b[0] = mproc::Queue<int>();
        b.at(0).put(456);
        CHECK(b.at(0).get() == 456);
        CHECK(mappings_of("mproc-queue") == queues + 1);
    }
    CHECK(mappings_of("mproc-dict") == dicts);
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Every kind of handle stored only inside a SharedDict works here, in a Process child and in Pool workers, and goes "
    "with its last stored copy") {
    const std::size_t mapped = mproc::detail::segments().mapped_count();
    const std::size_t dicts = mappings_of("mproc-dict"), queues = mappings_of("mproc-queue"),
                      arrays = mappings_of("mproc-array");
    {
        StoredKinds d;
        d["all"] = AllKinds{};  // the temporary is gone: the dict holds the only handles
        CHECK(mproc::detail::segments().retained_count() >= 3);  // the queue, the dict, the big array
        CHECK(mappings_of("mproc-queue") == queues + 1);
        CHECK(mappings_of("mproc-array") == arrays + 1);
        CHECK(use_stored_kinds(d, 1) == 0);
        // Forked after the last handles went: the child maps them through the parent's hold.
        mproc::Process child([&] { std::_Exit(use_stored_kinds(d, 2) == 0 ? 0 : 1); });
        child.start();
        REQUIRE(child.join(60s));
        CHECK(child.exitcode() == 0);
        {
            mproc::Pool pool(2);  // its workers too
            std::vector<mproc::AsyncResult<int>> results;
            for (int who = 3; who < 7; ++who) results.push_back(pool.apply_async(use_stored_kinds, std::tuple{d, who}));
            for (auto& r : results) CHECK(r.get(60s) == 0);
            pool.close();
            pool.join();
        }
        const AllKinds all = d.at("all");
        CHECK(all.value.load() == 1 + 2 + 3 + 4 + 5 + 6);
        CHECK(all.small[0] == 21);
        CHECK(all.big[(1 << 16) - 1] == 21.0);
        CHECK(all.dict.size() == 6);
    }
    // The dict went, and with it everything only it held.
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(mappings_of("mproc-dict") == dicts);
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mappings_of("mproc-array") == arrays);
    CHECK(mproc::detail::segments().mapped_count() <= mapped + 1);  // at most a new chunk of small objects
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A nested object goes when its last stored copy is overwritten, erased, popped or cleared, or when the dicts "
    "holding it go") {
    const std::size_t dicts = mappings_of("mproc-dict"), queues = mappings_of("mproc-queue");
    using Queues = mproc::SharedDict<std::string, mproc::Queue<int>>;
    Queues d;
    d["a"] = mproc::Queue<int>();
    d["b"] = mproc::Queue<int>();
    CHECK(mappings_of("mproc-queue") == queues + 2);
    d["a"] = mproc::Queue<int>();  // overwritten: the first queue goes, the new one stays
    CHECK(mappings_of("mproc-queue") == queues + 2);
    d["c"] = d.at("b");  // a second stored copy of b
    d.erase("b");
    CHECK(mappings_of("mproc-queue") == queues + 2);  // c still holds b's queue
    {
        std::optional<mproc::Queue<int>> popped = d.pop("c");
        REQUIRE(popped);
        popped->put(1);
        CHECK(popped->get() == 1);
    }  // the popped handle was the last
    CHECK(mappings_of("mproc-queue") == queues + 1);
    d.clear();
    CHECK(mappings_of("mproc-queue") == queues);

    // A chain: outer -> inner -> queue; dropping the outer dict lets all of them go.
    {
        mproc::SharedDict<std::string, Queues> outer;
        {
            Queues inner;
            inner["q"] = mproc::Queue<int>();
            outer["inner"] = inner;
        }
        outer.at("inner").at("q").put(5);
        CHECK(outer.at("inner").at("q").get() == 5);
        CHECK(mappings_of("mproc-dict") == dicts + 3);  // d, outer, inner
        CHECK(mappings_of("mproc-queue") == queues + 1);
    }
    CHECK(mappings_of("mproc-dict") == dicts + 1);  // only d
    CHECK(mappings_of("mproc-queue") == queues);

    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(mappings_of("mproc-queue") == queues);
}

TEST_CASE(
    "A handle stored by another process outlives this process's own handles, and one erased by another process goes at "
    "this process's next use of the dict") {
    const std::size_t queues = mappings_of("mproc-queue");
    mproc::SharedDict<std::string, mproc::Queue<int>> d;
    {
        mproc::Queue<int> q;
        mproc::Process storer([&] { d["q"] = q; });
        storer.start();
        REQUIRE(storer.join(60s));
        CHECK(storer.exitcode() == 0);
    }  // this process's only handle goes; the copy the child stored keeps the queue here
    d.at("q").put(7);
    CHECK(d.at("q").get() == 7);
    CHECK(mappings_of("mproc-queue") == queues + 1);
    mproc::Process eraser([&] { std::_Exit(d.erase("q") ? 0 : 1); });
    eraser.start();
    REQUIRE(eraser.join(60s));
    CHECK(eraser.exitcode() == 0);
    CHECK_FALSE(d.contains("q"));  // any call on the dict notices
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A process killed in the middle of counting a dict's handles: the next locker recounts them from the entries") {
    const std::size_t queues = mappings_of("mproc-queue");
    mproc::SharedDict<std::string, mproc::Queue<int>> d;
    d["q"] = mproc::Queue<int>();
    d["n"] = mproc::Queue<int>();
    CHECK(mappings_of("mproc-queue") == queues + 2);
    const auto [q_id,
                q_offset] = mproc::from_bytes<std::tuple<std::uint64_t, std::uint64_t>>(mproc::to_bytes(d.at("q")));
    (void)q_offset;
    mproc::Event inside;
    mproc::Process writer([&] {
        // What a writer killed between two steps of a change leaves: the dict's lock held, the
        // table of counts marked as changing, and a count that no entry backs.
        auto* h = reinterpret_cast<mproc::detail::DictHeader*>(mproc_test::object_address(d));
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
    // The next locker repairs; the counts are what the entries hold again, so erasing the entries
    // lets the queues go.
    CHECK(d.size() == 2);
    d.erase("q");
    CHECK(mappings_of("mproc-queue") == queues + 1);
    d.erase("n");
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Threads storing, reading back and erasing nested handles at once: each sees its own objects, and nothing is left "
    "mapped") {
    const std::size_t queues = mappings_of("mproc-queue");
    mproc::SharedDict<int, mproc::Queue<int>> d;
    mproc::SharedDict<int, mproc::SharedDict<int, mproc::Queue<int>>> outer;
    outer[0] = d;
    constexpr int threads = 4, rounds = 200;
    std::atomic<int> wrong{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            for (int i = 0; i < rounds; ++i) {
                d[t] = mproc::Queue<int>({.buffer_bytes = 1 << 16});  // only the stored copy is left
                mproc::Queue<int> back = outer.at(0).at(t);
                back.put(t * rounds + i);
                if (d.at(t).get(5s) != t * rounds + i) ++wrong;
                if (i % 2 == 0) d.erase(t);
            }
            d.erase(t);
        });
    for (auto& w : workers) w.join();
    CHECK(wrong == 0);
    CHECK(d.empty());
    CHECK(mappings_of("mproc-queue") == queues);
    CHECK(mproc::detail::segments().retained_count() == 0);
}
