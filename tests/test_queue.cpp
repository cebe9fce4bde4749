// Queue across processes: order, bounds, timeouts, messages larger than the ring, producers that
// exit or die, idle consumers, and many producers and consumers at once; shutdown, and JoinableQueue.
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
#include <csignal>
#include <cstring>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"
#include "test_pool_common.hpp"

using namespace std::chrono_literals;
using mproc_test::checksum;
using mproc_test::child_count;
using mproc_test::eventually;

TEST_CASE("The tutorial Queue program: a child puts, the parent gets") {
    using Message = std::tuple<int, std::optional<int>, std::string>;
    mproc::Queue<Message> q;
    mproc::Process p([&] { q.put({42, std::nullopt, "hello"}); });
    p.start();
    const Message m = q.get(60s);
    CHECK(m == Message{42, std::nullopt, "hello"});
    REQUIRE(p.join(60s));
    CHECK(p.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Items from one producer arrive in order; qsize, empty, try_get") {
    mproc::Queue<int> q;
    CHECK(q.empty());
    CHECK(q.qsize() == 0);
    CHECK_FALSE(q.full());
    CHECK(q.try_get() == std::nullopt);
    mproc::Process producer([&] {
        for (int i = 0; i < 10000; ++i) q.put(i);
    });
    producer.start();
    REQUIRE(producer.join(60s));
    CHECK(q.qsize() == 10000);
    CHECK_FALSE(q.empty());
    for (int i = 0; i < 10000; ++i) REQUIRE(q.get(10s) == i);
    CHECK(q.try_get() == std::nullopt);
    CHECK(q.empty());
    CHECK(child_count() == 0);
}

TEST_CASE("Timeouts: put on a full bounded queue throws Full, get on an empty one throws Empty") {
    mproc::Queue<std::string> q(2);
    CHECK(q.maxsize() == 2);
    q.put("a");
    q.put("b", 1s);
    CHECK(q.full());
    CHECK_THROWS_AS(q.put("c", 50ms), mproc::Full);
    CHECK_THROWS_AS(q.put_nowait("c"), mproc::Full);
    CHECK(q.qsize() == 2);
    CHECK(q.get() == "a");
    q.put("c", 1s);
    CHECK(q.get_nowait() == "b");
    CHECK(q.get(1s) == "c");
    CHECK_THROWS_AS(q.get(50ms), mproc::Empty);
    CHECK_THROWS_AS(q.get_nowait(), mproc::Empty);
    CHECK(q.try_get() == std::nullopt);
}

TEST_CASE("A bounded queue never holds more than maxsize; a blocked producer resumes") {
    mproc::Queue<int> q(4);
    mproc::Value<int> over(0);
    mproc::Process producer([&] {
        for (int i = 0; i < 2000; ++i) q.put(i);
    });
    mproc::Process watcher([&] {
        for (int i = 0; i < 20000; ++i)
            if (q.qsize() > 4) over += 1;
    });
    producer.start();
    watcher.start();
    for (int i = 0; i < 2000; ++i) REQUIRE(q.get(60s) == i);
    REQUIRE(producer.join(60s));
    REQUIRE(watcher.join(60s));
    CHECK(over.load() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("A producer blocked on a full queue gives up with Full, having added nothing") {
    mproc::Queue<int> q(1);
    q.put(1);
    mproc::Value<int> outcome(0);
    mproc::Process producer([&] {
        try {
            q.put(2, 100ms);
            outcome.store(1);
        } catch (const mproc::Full&) {
            outcome.store(2);
        }
    });
    producer.start();
    REQUIRE(producer.join(60s));
    CHECK(outcome.load() == 2);
    CHECK(q.qsize() == 1);
    CHECK(q.get() == 1);
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

TEST_CASE("close(): this handle puts no more, others still can") {
    mproc::Queue<int> q;
    mproc::Queue<int> other = q;
    q.put(1);
    q.close();
    CHECK(q.closed());
    CHECK_THROWS_AS(q.put(2), mproc::Error);
    other.put(3);
    CHECK(q.get() == 1);  // a closed handle still reads
    CHECK(q.get() == 3);
}

namespace {
struct Explosive {
    int value = 0;
    template <class Archive> void serialize(Archive& ar) {
        if (value < 0) throw std::runtime_error("cannot serialise a negative value");
        ar(value);
    }
};
}  // namespace

TEST_CASE("A serialisation error surfaces in put, and the queue is unchanged") {
    mproc::Queue<Explosive> q;
    q.put(Explosive{1});
    CHECK_THROWS_WITH(q.put(Explosive{-1}), "cannot serialise a negative value");
    CHECK(q.qsize() == 1);
    CHECK(q.get().value == 1);
    CHECK(q.try_get() == std::nullopt);
}

namespace {
/// Encodes any value, and refuses to decode 13.
struct Fragile {
    int value = 0;
    template <class Archive> void serialize(Archive& ar) {
        const int before = value;
        ar(value);
        if (value != before && value == 13) throw std::runtime_error("cannot decode 13");
    }
};
}  // namespace

TEST_CASE("Getting an item that holds a handle makes no shared object of its own") {
    // decode() default-constructs the value before it reads it: a Queue made there would be a new
    // 1 GiB memfd thrown away at once (and, a whole item being decoded under the queue's locks,
    // work every other process would wait for).
    mproc::Queue<std::pair<mproc::Queue<int>, std::string>> q;
    mproc::Queue<int> inner;
    q.put({inner, "one"});
    q.put({inner, "two"});
    const std::uint64_t made = mproc::detail::segments().generation();
    auto [first, text] = q.get(5s);
    CHECK(text == "one");
    CHECK(mproc::from_bytes<std::pair<mproc::Queue<int>, std::string>>(
              mproc::to_bytes(std::pair<mproc::Queue<int>, std::string>{inner, "x"}))
              .second == "x");
    CHECK(mproc::detail::segments().generation() == made);  // nothing created by either decode
    first.put(5);
    CHECK(inner.get(5s) == 5);  // the handle decoded is the queue put
    CHECK(q.get(5s).second == "two");
}

namespace {
/// A type whose serialize leaves its queue out: only `n` crosses.
struct LeavesQueueOut {
    int n = 0;
    mproc::Queue<int> replies;
    template <class Archive> void serialize(Archive& ar) { ar(n); }
};
}  // namespace

TEST_CASE("A handle a type's serialize leaves out is empty after decoding: its use is a clear Error") {
    LeavesQueueOut sent{7, {}};
    sent.replies.put(1);  // the sender's queue works
    const std::uint64_t made = mproc::detail::segments().generation();
    LeavesQueueOut got = mproc::from_bytes<LeavesQueueOut>(mproc::to_bytes(sent));
    CHECK(got.n == 7);
    CHECK(mproc::detail::segments().generation() == made);  // no queue was made for the member
    CHECK_THROWS_AS(got.replies.put(2), mproc::Error);
    CHECK_THROWS_WITH(got.replies.put(2), Catch::Matchers::Contains("empty shared-object handle"));
    CHECK_THROWS_AS(mproc::to_bytes(got.replies), mproc::SerializationError);
    CHECK(sent.replies.get(5s) == 1);  // and the sender's is untouched
}

TEST_CASE("An item whose decoding throws is taken with the error, and the next get has the next item") {
    // A whole item is decoded before it is taken (so that a get out of memory leaves it): one that
    // cannot be decoded must still go, or it would block the queue for ever.
    mproc::Queue<Fragile> q;
    q.put(Fragile{13});
    q.put(Fragile{7});
    CHECK_THROWS_WITH(q.get(5s), "cannot decode 13");
    CHECK(q.qsize() == 1);
    CHECK(q.get(5s).value == 7);
    CHECK(q.try_get() == std::nullopt);
}

TEST_CASE("A buffer_bytes so large that rounding it up would wrap is refused") {
    // Rounded up to a page first, SIZE_MAX wrapped to 0 and passed the size check: a queue of no
    // room, whose put waited for ever.
    for (std::size_t bytes : {SIZE_MAX, SIZE_MAX - 4095, (std::size_t{1} << 46) + 1})
        CHECK_THROWS_WITH(mproc::Queue<int>({.buffer_bytes = bytes}), Catch::Matchers::Contains("too large"));
}

TEST_CASE("A 64 MiB message goes through a 64 KiB ring, between smaller ones") {
    mproc::Queue<std::string> q({.buffer_bytes = 64 << 10});
    CHECK(q.buffer_bytes() == 64 << 10);
    std::string big(64 << 20, '\0');
    std::mt19937_64 rng(7);
    for (auto& c : big) c = static_cast<char>(rng());
    const auto sum = checksum(big);
    mproc::Process producer([&] {
        q.put("before");
        q.put(big);
        q.put("after");
    });
    producer.start();
    CHECK(q.get(60s) == "before");
    const std::string got = q.get(60s);
    CHECK(got.size() == big.size());
    CHECK(checksum(got) == sum);
    CHECK(q.get(60s) == "after");
    REQUIRE(producer.join(60s));
    CHECK(child_count() == 0);
}

TEST_CASE("Strings and vectors of numbers of every size, sent from their own memory, arrive whole") {
    // put copies these straight from data() (no encoding pass): whole records, records that wrap
    // the ring's end, and items streamed in pieces larger and smaller than the ring — through
    // rings whose capacity is a power of two (a position's place in the ring is then a mask) and
    // rings whose capacity is not (a division), one of them larger than its resident part.
    const std::size_t rings[] = {64 << 10, 60 << 10, std::size_t{5} << 20};
    for (const std::size_t ring : rings) {
        INFO("a ring of " << ring << " bytes");
        mproc::Queue<std::vector<double>> doubles({.buffer_bytes = ring});
        mproc::Queue<std::string> strings({.buffer_bytes = ring});
        REQUIRE(strings.buffer_bytes() == ring);
        const std::vector<std::size_t> sizes{0, 1, 7, 8, 4095, 8191, 8192, 30000, 100000, 300000, 1 << 20};
        const auto vector_of = [](std::size_t n) {
            std::vector<double> v(n);
            for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<double>(i) * 0.5 + static_cast<double>(n);
            return v;
        };
        const auto string_of = [](std::size_t n) {
            std::string s(n, '\0');
            for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + n) % 26);
            return s;
        };
        mproc::Process producer([&] {
            for (int round = 0; round < 3; ++round)
                for (std::size_t n : sizes) {
                    doubles.put(vector_of(n));
                    strings.put(string_of(n));
                }
        });
        producer.start();
        for (int round = 0; round < 3; ++round)
            for (std::size_t n : sizes) {
                INFO("round " << round << ", " << n << " elements");
                REQUIRE(doubles.get(60s) == vector_of(n));
                REQUIRE(strings.get(60s) == string_of(n));
            }
        REQUIRE(producer.join(60s));
        CHECK(producer.exitcode() == 0);
        CHECK(doubles.try_get() == std::nullopt);
    }
    CHECK(child_count() == 0);
}

TEST_CASE("Large and small messages from several producers through a small ring keep each producer's order") {
    mproc::Queue<std::tuple<int, int, std::string>> q({.buffer_bytes = 16 << 10});
    constexpr int producers = 3, per_producer = 300;
    std::vector<mproc::Process> ps;
    for (int p = 0; p < producers; ++p)
        ps.emplace_back([&, p] {
            std::mt19937 rng(static_cast<unsigned>(p));
            for (int i = 0; i < per_producer; ++i) {
                const std::size_t size = rng() % 10 == 0 ? rng() % (100 << 10) : rng() % 100;
                q.put({p, i, std::string(size, static_cast<char>('a' + (i % 26)))});
            }
        });
    for (auto& p : ps) p.start();
    std::vector<int> next(producers, 0);
    for (int n = 0; n < producers * per_producer; ++n) {
        auto [p, i, s] = q.get(60s);
        REQUIRE(i == next[static_cast<std::size_t>(p)]);
        ++next[static_cast<std::size_t>(p)];
        REQUIRE(s.find_first_not_of(static_cast<char>('a' + (i % 26))) == std::string::npos);
    }
    for (auto& p : ps) REQUIRE(p.join(60s));
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

TEST_CASE("A producer that put 100 MB and exited loses nothing; joining it first does not deadlock") {
    mproc::Queue<std::vector<std::uint8_t>> q;
    mproc::Process producer([&] {
        for (int i = 0; i < 100; ++i) q.put(std::vector<std::uint8_t>(1 << 20, static_cast<std::uint8_t>(i)));
    });
    producer.start();
    REQUIRE(producer.join(120s));  // Python's documented trap: this join would hang there
    CHECK(producer.exitcode() == 0);
    CHECK(q.qsize() == 100);
    for (int i = 0; i < 100; ++i) {
        const auto v = q.get(10s);
        REQUIRE(v.size() == (1u << 20));
        REQUIRE(v.front() == static_cast<std::uint8_t>(i));
        REQUIRE(v.back() == static_cast<std::uint8_t>(i));
    }
    CHECK(q.try_get() == std::nullopt);
    // Read memory goes back: what is left is the queue's small resident part.
    CHECK(q.memory_in_use() < (16u << 20));
    CHECK(child_count() == 0);
}

TEST_CASE("A stream of large items reuses the ring's pages, which go back once such items stop") {
    mproc::Queue<std::string> q;
    for (int i = 0; i < 6; ++i) {
        q.put(std::string(std::size_t{8} << 20, static_cast<char>('a' + i)));
        REQUIRE(q.get(10s)[12345] == static_cast<char>('a' + i));
    }
    // The ring keeps room for three such items warm instead of faulting each one in afresh and
    // handing it back once read ...
    const std::size_t kept = q.memory_in_use();
    CHECK(kept >= (std::size_t{8} << 20));
    CHECK(kept <= (std::size_t{28} << 20));
    // ... and hands it back when the ring empties a while after the last of them.
    std::this_thread::sleep_for(1200ms);
    q.put("small");
    CHECK(q.get(10s) == "small");
    CHECK(q.memory_in_use() < (std::size_t{6} << 20));
}

TEST_CASE("A consumer that sleeps between items is woken by every put, never left to its re-check") {
    // A waker could take a wake decision for a sleeper that had just left (it found the futex
    // word changed); the mark it left made the next waker hold back, and the next consumer to
    // sleep slept until its re-check (1 s; lengthened here, so that a lost wake-up hangs).
    // Items of 64 KiB: the consumer outpaces the producer and sleeps for nearly every item.
    mproc::detail::set_recheck_interval(std::chrono::hours(1));
    struct Restore {
        ~Restore() { mproc::detail::set_recheck_interval(std::chrono::seconds(1)); }
    } restore;
    mproc::Queue<std::string> q;
    constexpr int n = 60'000;
    std::atomic<int> got{0};
    std::thread producer([&] {
        try {
            for (int i = 0; i < n; ++i) q.put(std::string(std::size_t{64} << 10, static_cast<char>('a' + i % 26)));
        } catch (const mproc::ShutDown&) {}
    });
    std::thread consumer([&] {
        try {
            for (int i = 0; i < n; ++i) {
                if (q.get()[777] != static_cast<char>('a' + i % 26)) return;
                got.fetch_add(1);
            }
        } catch (const mproc::ShutDown&) {}
    });
    const auto until = std::chrono::steady_clock::now() + 300s;
    while (got.load() < n && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
    const int received = got.load();
    if (received < n) q.shutdown(true);  // frees a consumer asleep with no wake coming
    producer.join();
    consumer.join();
    CHECK(received == n);
}

TEST_CASE("A streamed piece being copied in is never handed back by a consumer taking items meanwhile") {
    // A producer copies a reserved piece of a streamed item with the lock released; meanwhile a
    // consumer takes items and hands back the ring memory it passed. The piece lies past the
    // committed tail but in a chunk the consumer had just left (the ring wrapped and is nearly
    // full): that chunk must stay. Replayed in one thread, in the order the real code allows.
    using namespace mproc::detail;
    SharedRef ref = ByteQueue::create(std::size_t{16} << 20, 0, 42, 0);
    ByteQueue q(ref);
    QueueRing ring(ref);
    const std::vector<std::byte> item(250'000, std::byte{1});
    mproc::Buffer out;
    for (int i = 0; i < 40; ++i) REQUIRE(q.put(item, std::nullopt));
    int whole = 40;  // whole items in the ring, ahead of the streamed one
    for (int i = 0; i < 24; ++i, --whole) REQUIRE(q.get(out, std::nullopt, false) == Take::item);
    // Laps back to the ring's start, and fills it.
    while (q.put(item, Clock::now())) ++whole;
    for (int i = 0; i < 2; ++i, --whole) REQUIRE(q.get(out, std::nullopt, false) == Take::item);
    constexpr std::size_t len = 1'000'000;  // streams (over 256 KiB), too small to raise the resident part
    std::vector<std::byte> msg(len);
    for (std::size_t i = 0; i < len; ++i) msg[i] = static_cast<std::byte>(1 + i % 251);
    QueueWakes wakes;
    REQUIRE(ring.start_stream(len, {}, wakes));
    StreamPiece piece;
    REQUIRE(ring.reserve_write_piece(len, piece) == StreamStep::more);
    ring.copy_piece_in(piece, ItemBytes{msg});  // the producer, lock released ...
    for (int i = 0; i < 2; ++i, --whole) REQUIRE(q.get(out, std::nullopt, false) == Take::item);  // ... a consumer
    REQUIRE(ring.commit_write_piece(piece, wakes) == StreamStep::more);
    for (;;) {
        const StreamStep step = ring.reserve_write_piece(len, piece);
        if (step == StreamStep::blocked) {  // full: the consumer takes another (never the streamed one)
            REQUIRE(whole > 0);
            REQUIRE(q.get(out, std::nullopt, false) == Take::item);
            --whole;
            continue;
        }
        REQUIRE(step == StreamStep::more);
        ring.copy_piece_in(piece, ItemBytes{msg});
        if (ring.commit_write_piece(piece, wakes) == StreamStep::done) break;
    }
    for (; whole > 0; --whole) REQUIRE(q.get(out, std::nullopt, false) == Take::item);
    REQUIRE(q.get(out, std::nullopt, false) == Take::item);  // the streamed one
    REQUIRE(out.size() == len);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < len; ++i) wrong += out.data()[i] != msg[i];
    CHECK(wrong == 0);
}

TEST_CASE("A streamed put that finds the write claim held for a moment by a consumer's probe waits for it") {
    // A consumer waiting for the next piece of a streamed item probes whether its producer is
    // alive by taking the write claim for a moment (QueueRing::writer_gone), holding only the
    // consumers' lock. A producer starting the next streamed item at that moment must wait for
    // the claim, not fail the put. Replayed: another thread holds the claim as a probe would.
    using namespace mproc::detail;
    SharedRef ref = ByteQueue::create(std::size_t{16} << 20, 0, 42, 0);
    ByteQueue q(ref);
    QueueHeader& h = QueueRing(ref).header();
    std::atomic<int> held{0};  // 1: the prober holds the claim; -1: it could not take it
    std::thread prober([&] {
        if (!holds(h.write_claim.lock())) {
            held = -1;
            return;
        }
        held = 1;
        std::this_thread::sleep_for(50ms);
        h.write_claim.unlock();
    });
    while (held == 0) std::this_thread::yield();
    REQUIRE_FALSE(held == -1);
    const std::vector<std::byte> big(1'000'000, std::byte{5});  // streams (over 256 KiB)
    bool put = false;
    CHECK_NOTHROW(put = q.put(big, std::nullopt));
    prober.join();
    CHECK(put);
    mproc::Buffer out;
    REQUIRE(q.get(out, std::nullopt, /*nowait=*/true) == Take::item);
    CHECK(out.size() == big.size());
}

TEST_CASE("A wake request taken and then made again never puts back the value a sleeper is about to sleep on") {
    // Replayed in one thread: sleeper A asks for a wake (the word's low bit) and is on its way to
    // sleep on that value; a waker takes the request; sleeper B asks again. A's futex_wait must
    // find the word changed: if it read A's value again, A would sleep with no wake coming (a
    // producer slept through the take that made room for it).
    using namespace mproc::detail;
    FutexWord word{40};
    const std::uint32_t seen = word.fetch_or(wake_wanted) | wake_wanted;
    REQUIRE(take_wake_request(word));
    CHECK_FALSE(take_wake_request(word));  // taken once
    word.fetch_or(wake_wanted);
    CHECK(word.load() != seen);
    CHECK((word.load() & wake_wanted) != 0);  // B's request stands
}

TEST_CASE(
    "A shut-down queue that drops its items while a streamed one is drained wakes the consumers behind the drain") {
    // Replayed in one thread. A consumer that finds another draining a streamed item waits on
    // `items` until the drain ends or the queue is shut down and empty. shutdown() then
    // shutdown(true) empties it with the drain still going: the word must change (a consumer
    // watching it, or on its way to sleep, would otherwise sleep on), and the drain's end must
    // wake a sleeper (ShutDown is its answer now), though no item is left.
    using namespace mproc::detail;
    SharedRef ref = ByteQueue::create(std::size_t{16} << 20, 0, 42, 0);
    ByteQueue q(ref);
    QueueRing ring(ref);
    constexpr std::size_t len = 1'000'000;  // streams (over 256 KiB)
    const std::vector<std::byte> big(len, std::byte{7});
    const std::vector<std::byte> small(64, std::byte{8});
    REQUIRE(q.put(big, std::nullopt));
    REQUIRE(q.put(small, std::nullopt));
    REQUIRE(q.put(small, std::nullopt));
    QueueWakes wakes;
    const QueueCursor c = ring.cursor();
    const QueueRecord record = ring.record_at(c.r.head, ring.word_at(c.r.head));
    REQUIRE(record.streamed);
    ring.start_read(c, record, wakes);  // a consumer starts draining the big item
    q.shutdown(false);
    const std::uint32_t waited_on = ring.header().items.load();  // by a consumer behind the drain
    q.shutdown(true);  // the two small items are dropped; the one being drained stays its reader's
    CHECK(ring.cursor().count() == 0);
    CHECK(ring.header().items.load() != waited_on);
    std::vector<std::byte> into(len);
    const ItemPlace place{std::span<std::byte>(into)};
    for (;;) {
        wakes = QueueWakes{};
        StreamPiece piece;
        REQUIRE(ring.reserve_read_piece(len, piece, wakes) == StreamStep::more);
        ring.copy_piece_out(piece, place);
        if (ring.commit_read_piece(piece, true, wakes) == StreamStep::done) break;
    }
    CHECK(wakes.items);  // the drain's end wakes the consumer behind it
    CHECK(into == big);
    mproc::Buffer out;
    CHECK(q.get(out, std::nullopt, false) == Take::shut_down);
}

TEST_CASE("A consumer that watched the queue before sleeping is not left asleep by a put it just missed") {
    // The consumer watches the queue for a few microseconds before it sleeps. A put that publishes
    // after the watch's last look, while the consumer waits for the lock, must keep it from sleeping
    // (each round here waits for the reply, so no later put would wake it). Re-check lengthened.
    mproc::detail::set_recheck_interval(std::chrono::hours(1));
    struct Restore {
        ~Restore() { mproc::detail::set_recheck_interval(std::chrono::seconds(1)); }
    } restore;
    mproc::Queue<std::string> there, back;
    constexpr int rounds = 3'000;
    std::atomic<int> done{0};
    std::thread consumer([&] {
        try {
            for (int i = 0; i < rounds; ++i) {
                if (there.get().size() < 100'000) return;
                back.put("k");
            }
        } catch (const mproc::ShutDown&) {}
    });
    std::thread producer([&] {
        try {
            for (int i = 0; i < rounds; ++i) {
                there.put(std::string(100'000 + static_cast<std::size_t>(i % 7) * 15'000, 'x'));
                back.get();
                done.fetch_add(1);
            }
        } catch (const mproc::ShutDown&) {}
    });
    const auto until = std::chrono::steady_clock::now() + 300s;
    while (done.load() < rounds && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
    const int finished = done.load();
    if (finished < rounds) {  // free whichever side sleeps with no wake coming
        there.shutdown(true);
        back.shutdown(true);
    }
    producer.join();
    consumer.join();
    CHECK(finished == rounds);
}

TEST_CASE("Idle consumers blocked in get use no CPU") {
    mproc::Queue<int> q;
    mproc::Semaphore ready(0);
    constexpr int consumers = 3;
    std::vector<mproc::Process> cs;
    for (int i = 0; i < consumers; ++i)
        cs.emplace_back([&] {
            ready.release();
            (void)q.get();
        });
    for (auto& c : cs) c.start();
    for (int i = 0; i < consumers; ++i) REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);  // let them reach the wait
    std::vector<long> before;
    for (auto& c : cs) before.push_back(mproc_test::cpu_ticks(c.pid()));
    std::this_thread::sleep_for(1s);
    for (std::size_t i = 0; i < cs.size(); ++i) {
        const long after = mproc_test::cpu_ticks(cs[i].pid());
        INFO("consumer " << i << " used " << after - before[i] << " ticks over an idle second");
        // A consumer that spun would use about one tick per 10 ms: ~100. Allow generous slack.
        CHECK(after - before[i] <= 10);
    }
    for (int i = 0; i < consumers; ++i) q.put(i);
    for (auto& c : cs) {
        REQUIRE(c.join(60s));
        CHECK(c.exitcode() == 0);
    }
    CHECK(child_count() == 0);
}

namespace {
/// What the stress tests send: producer, sequence number, payload and its checksum.
struct Message {
    int producer = 0;
    int seq = 0;
    std::string payload;
    std::uint64_t sum = 0;
    template <class Archive> void serialize(Archive& ar) { ar(producer, seq, payload, sum); }
};

std::string random_payload(std::mt19937_64& rng) {
    const auto roll = rng() % 10000;
    std::size_t size;
    if (roll == 0) size = (1 << 20) + rng() % (2 << 20);  // past the piece size: streamed
    else if (roll < 100) size = rng() % (200 << 10);
    else size = rng() % 2000;
    std::string s(size, '\0');
    for (std::size_t i = 0; i < size; i += 8) {
        const auto word = rng();
        std::memcpy(s.data() + i, &word, std::min<std::size_t>(8, size - i));
    }
    return s;
}

/// P producers × C consumers × n messages each; every message must arrive exactly once, intact,
/// and each consumer must see each producer's messages in increasing order.
void many_to_many(mproc::Queue<Message> q, int producers, int consumers, int per_producer) {
    mproc::Array<std::uint32_t> seen(static_cast<std::size_t>(producers) * per_producer);
    mproc::Value<long> corrupt(0), out_of_order(0), received(0);
    std::vector<mproc::Process> cs;
    for (int c = 0; c < consumers; ++c)
        cs.emplace_back([&] {
            std::vector<int> last(static_cast<std::size_t>(producers), -1);
            for (;;) {
                Message m = q.get();
                if (m.producer < 0) return;
                if (checksum(m.payload) != m.sum) corrupt += 1;
                if (m.seq <= last[static_cast<std::size_t>(m.producer)]) out_of_order += 1;
                last[static_cast<std::size_t>(m.producer)] = m.seq;
                std::atomic_ref<std::uint32_t>(seen[static_cast<std::size_t>(m.producer) * per_producer + m.seq])
                    .fetch_add(1);
                received += 1;
            }
        });
    std::vector<mproc::Process> ps;
    for (int p = 0; p < producers; ++p)
        ps.emplace_back([&, p] {
            std::mt19937_64 rng(static_cast<std::uint64_t>(p) * 7919 + 1);
            for (int i = 0; i < per_producer; ++i) {
                Message m{p, i, random_payload(rng), 0};
                m.sum = checksum(m.payload);
                q.put(m);
            }
        });
    for (auto& c : cs) c.start();
    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        REQUIRE(p.join(1000s));
        CHECK(p.exitcode() == 0);
    }
    for (int c = 0; c < consumers; ++c) q.put(Message{-1, 0, {}, 0});
    for (auto& c : cs) {
        REQUIRE(c.join(1000s));
        CHECK(c.exitcode() == 0);
    }
    CHECK(corrupt.load() == 0);
    CHECK(out_of_order.load() == 0);
    CHECK(received.load() == static_cast<long>(producers) * per_producer);
    std::size_t not_once = 0;
    for (std::size_t i = 0; i < seen.size(); ++i) not_once += seen[i] != 1 ? 1 : 0;
    CHECK(not_once == 0);
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}
}  // namespace

TEST_CASE("4 producers x 4 consumers x 200,000 random-size messages arrive exactly once, intact", "[stress]") {
    // Sanitised builds run 10x slower: they check the same with a tenth of the messages.
    const int n = mproc_test::under_sanitizer() ? 20000 : 200000;
    many_to_many(mproc::Queue<Message>(), 4, 4, n);
}

TEST_CASE("Many producers and consumers through a small bounded ring") {
    many_to_many(mproc::Queue<Message>({.maxsize = 64, .buffer_bytes = 64 << 10}), 4, 4,
                 mproc_test::under_sanitizer() ? 1000 : 5000);
}

TEST_CASE("Threads of one process put and get concurrently") {
    mproc::Queue<int> q(16);
    std::atomic<long> sum{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < 5000; ++i) q.put(t * 5000 + i);
        });
    for (int t = 0; t < 2; ++t)
        threads.emplace_back([&] {
            for (int i = 0; i < 5000; ++i) sum += q.get(60s);
        });
    for (auto& t : threads) t.join();
    CHECK(sum.load() == 10000L * 9999 / 2);
    CHECK(q.empty());
}

TEST_CASE("A producer killed while streaming a large message: the partial message is dropped, the queue goes on") {
    mproc::Queue<std::string> q({.buffer_bytes = 64 << 10});
    mproc::Value<long> streamed(0);
    mproc::Process victim([&] {
        q.put("first");
        streamed.store(1);
        q.put(std::string(32 << 20, 'v'));  // blocks: nobody reads the rest
    });
    victim.start();
    CHECK(q.get(60s) == "first");
    REQUIRE(eventually([&] { return streamed.load() == 1; }));
    std::this_thread::sleep_for(100ms);  // let it fill the ring with the start of the big one
    victim.kill();
    REQUIRE(victim.join(60s));
    // Nothing of the dead producer's last message comes out; the next producer's does.
    mproc::Process next([&] { q.put("second"); });
    next.start();
    CHECK(q.get(60s) == "second");
    REQUIRE(next.join(60s));
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

TEST_CASE("A consumer killed while reading a large message: another consumer takes over and the queue goes on") {
    mproc::Queue<std::string> q({.buffer_bytes = 64 << 10});
    mproc::Event slow_reader_started;
    mproc::Process producer([&] {
        q.put(std::string(8 << 20, 'p'));
        q.put("next");
    });
    mproc::Process reader([&] {
        slow_reader_started.set();
        (void)q.get();  // takes the big one; is killed while it streams or after
    });
    reader.start();
    REQUIRE(slow_reader_started.wait(60s));
    producer.start();
    std::this_thread::sleep_for(50ms);
    reader.kill();
    REQUIRE(reader.join(60s));
    // Whatever the reader had taken is gone with it; what follows still arrives.
    std::string got = q.get(60s);
    if (got != "next") {
        CHECK(got == std::string(8 << 20, 'p'));  // the reader died before taking it
        got = q.get(60s);
    }
    CHECK(got == "next");
    REQUIRE(producer.join(60s));
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

TEST_CASE("join wakes when the item of a consumer killed while draining it is drained away by the next") {
    // The item went with the dead reader: drained away by the consumer that takes its claim over,
    // it is done, and a join asleep must learn it then, not at its re-check (lengthened here, so
    // that a missing wake hangs until the test frees it). The reader is a child that starts the
    // drain as get() does and is killed there.
    using namespace mproc::detail;
    set_recheck_interval(std::chrono::hours(1));
    struct Restore {
        ~Restore() { set_recheck_interval(std::chrono::seconds(1)); }
    } restore;
    SharedRef ref = ByteQueue::create(std::size_t{16} << 20, 0, 42, /*joinable=*/1);
    ByteQueue q(ref);
    QueueHeader& h = QueueRing(ref).header();
    REQUIRE(q.put(std::vector<std::byte>(std::size_t{1} << 20, std::byte{3}), std::nullopt));  // streamed, whole
    mproc::Event started;
    mproc::Process reader([&] {
        QueueRing ring(ref);
        REQUIRE(holds(h.read_mutex.lock()));
        const QueueCursor c = ring.read_view_fresh();
        QueueWakes wakes;
        ring.start_read(c, ring.record_at(c.r.head, ring.word_at(c.r.head)), wakes);
        h.read_mutex.unlock();
        started.set();
        for (;;) ::pause();  // killed holding the read claim, the item half read
    });
    reader.start();
    REQUIRE(started.wait(60s));
    reader.kill();
    REQUIRE(reader.join(60s));
    REQUIRE(q.unfinished() == 1);
    std::atomic<bool> joined{false};
    std::thread joiner([&] {
        q.join(std::nullopt);
        joined = true;
    });
    struct Free {  // however the test leaves, the joiner is freed and joined
        ByteQueue& q;
        std::thread& joiner;
        std::atomic<bool>& joined;
        ~Free() {
            if (!joined) q.shutdown(true);
            joiner.join();
        }
    } freed{q, joiner, joined};
    REQUIRE(eventually([&] { return h.join_waiters.load() == 1; }));  // asleep before the drain ends
    mproc::Buffer out;
    CHECK(q.get(out, std::nullopt, /*nowait=*/true) == Take::none);  // takes the drain over, drains it away
    CHECK(q.unfinished() == 0);
    CHECK(eventually([&] { return joined.load(); }));
    CHECK(child_count() == 0);
}

TEST_CASE("A Queue handle whose memory gives its ring no whole pages is refused") {
    // The header's fields agree with each other and with the segment's size, but the ring they
    // describe is empty, or not whole pages: decoding a handle to it is a SerializationError,
    // not a queue that divides by zero or masks with a wrong mask.
    mproc::Queue<int> q({.buffer_bytes = 64 << 10});
    auto* h = reinterpret_cast<mproc::detail::QueueHeader*>(mproc_test::object_address(q));
    const auto bytes = mproc::to_bytes(q);
    const std::uint64_t capacity = h->capacity, refs = h->refs, resident = h->resident.load();
    // (Each keeps the RefTable after the ring 8-byte aligned, as the registry reads it meanwhile.)
    for (const std::uint64_t corrupt : {std::uint64_t{0}, std::uint64_t{5000}, capacity - 8}) {
        INFO("capacity " << corrupt);
        h->capacity = corrupt;
        h->refs = h->data_offset + corrupt;
        h->resident.store(std::min(resident, corrupt));
        CHECK_THROWS_AS(mproc::from_bytes<mproc::Queue<int>>(bytes), mproc::SerializationError);
    }
    h->capacity = capacity;
    h->refs = refs;
    h->resident.store(resident);
    mproc::Queue<int> again = mproc::from_bytes<mproc::Queue<int>>(bytes);
    again.put(5);
    CHECK(q.get(5s) == 5);
}

TEST_CASE("A Queue handle crosses a Pipe; a handle of the wrong type is refused") {
    mproc::Queue<std::string> q;
    auto [a, b] = mproc::Pipe<mproc::Queue<std::string>>();
    mproc::Process child([&] {
        auto received = b.recv();
        received.put("through the pipe");
    });
    child.start();
    a.send(q);
    CHECK(q.get(60s) == "through the pipe");
    REQUIRE(child.join(60s));
    const auto bytes = mproc::to_bytes(q);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Queue<int>>(bytes), mproc::SerializationError);
    CHECK(child_count() == 0);
}

// ---- Pool tasks, put-then-die, timeouts, idle producers, kills inside the lock ----------------

namespace {
void put_square(mproc::Queue<int> q, int x) { q.put(x * x); }
int take_one(mproc::Queue<int> q) { return q.get(60s); }
std::size_t size_of(mproc::Queue<int> q) { return q.qsize(); }

struct Entry {
    int round = 0;
    long seq = 0;
    std::string payload;
    template <class Archive> void serialize(Archive& ar) { ar(round, seq, payload); }
};

/// Seconds `call` took (for lower bounds on timeouts only).
template <class Call> double seconds_taken(Call&& call) {
    const auto start = std::chrono::steady_clock::now();
    call();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

TEST_CASE("A Queue passed to Pool tasks is the same queue, both ways") {
    mproc::Queue<int> q;
    mproc::Pool pool(2);
    std::vector<std::tuple<mproc::Queue<int>, int>> args;
    for (int i = 0; i < 200; ++i) args.emplace_back(q, i);
    pool.starmap(put_square, args, 3);
    CHECK(pool.apply(size_of, q) == 200);  // the worker sees what the others put
    std::vector<int> got;
    for (int i = 0; i < 200; ++i) got.push_back(q.get(10s));
    std::sort(got.begin(), got.end());
    for (int i = 0; i < 200; ++i) REQUIRE(got[static_cast<std::size_t>(i)] == i * i);
    // And workers take what the parent put.
    for (int i = 1; i <= 100; ++i) q.put(i);
    const auto taken = pool.map(take_one, std::vector<mproc::Queue<int>>(100, q));
    CHECK(std::accumulate(taken.begin(), taken.end(), 0) == 5050);
    CHECK(q.try_get() == std::nullopt);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("A Queue created after the Pool reaches its workers: the pool sends them its memory") {
    mproc::Pool pool(1);
    mproc::Queue<int> late;
    pool.apply(put_square, late, 3);
    CHECK(late.get(60s) == 9);
    pool.apply(put_square, late, 4);  // the worker has it now; nothing is sent again
    CHECK(late.get(60s) == 16);
    CHECK(late.try_get() == std::nullopt);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("An item is in the queue as soon as put returns: a producer that SIGKILLs itself right after loses nothing") {
    mproc::Queue<std::string> q({.buffer_bytes = 8 << 20});
    mproc::Process producer([&] {
        for (int i = 0; i < 1000; ++i) q.put(std::to_string(i));
        q.put(std::string(3 << 20, 's'));  // streamed in pieces, but whole before put returns
        q.put("last");
        ::kill(::getpid(), SIGKILL);  // no exit path, no flush, no feeder thread to wait for
        std::_Exit(1);
    });
    producer.start();
    REQUIRE(producer.join(60s));
    CHECK(producer.exitcode() == -SIGKILL);
    CHECK(q.qsize() == 1002);
    for (int i = 0; i < 1000; ++i) REQUIRE(q.get(10s) == std::to_string(i));
    CHECK(q.get(10s) == std::string(3 << 20, 's'));
    CHECK(q.get(10s) == "last");
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Queue timeouts across processes: get and put give up no sooner than asked, and succeed when the other side acts "
    "in time") {
    constexpr double asked = 0.2, at_least = asked * 0.95;
    mproc::Queue<int> q(1);
    double took = seconds_taken([&] { CHECK_THROWS_AS(q.get(mproc::Seconds{asked}), mproc::Empty); });
    CHECK(took >= at_least);
    q.put(1);
    took = seconds_taken([&] { CHECK_THROWS_AS(q.put(2, mproc::Seconds{asked}), mproc::Full); });
    CHECK(took >= at_least);
    CHECK(q.qsize() == 1);

    // A producer in another process blocked on the full queue gets in when we take the item.
    mproc::Value<int> outcome(0);
    mproc::Process producer([&] {
        try {
            q.put(2, 30s);
            outcome.store(1);
        } catch (const mproc::Full&) {
            outcome.store(2);
        }
    });
    producer.start();
    std::this_thread::sleep_for(100ms);
    CHECK(q.get(10s) == 1);
    REQUIRE(producer.join(60s));
    CHECK(outcome.load() == 1);
    CHECK(q.get(10s) == 2);

    // A consumer in another process waiting with a timeout gets what we put within it.
    mproc::Value<int> received(0);
    mproc::Process consumer([&] { received.store(q.get(30s)); });
    consumer.start();
    std::this_thread::sleep_for(100ms);
    q.put(7);
    REQUIRE(consumer.join(60s));
    CHECK(consumer.exitcode() == 0);
    CHECK(received.load() == 7);
    CHECK(child_count() == 0);
}

TEST_CASE("Producers blocked in put use no CPU: on a full bounded queue, and streaming into a full ring") {
    mproc::Queue<int> bounded(1);
    bounded.put(0);
    mproc::Queue<std::string> small({.buffer_bytes = 64 << 10});
    mproc::Semaphore ready(0);
    mproc::Process blocked_on_count([&] {
        ready.release();
        bounded.put(1);
    });
    mproc::Process blocked_on_room([&] {
        ready.release();
        small.put(std::string(1 << 20, 'r'));  // 16 times the ring: waits for a reader
    });
    blocked_on_count.start();
    blocked_on_room.start();
    REQUIRE(ready.acquire(60s));
    REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);
    const long before_count = mproc_test::cpu_ticks(blocked_on_count.pid());
    const long before_room = mproc_test::cpu_ticks(blocked_on_room.pid());
    std::this_thread::sleep_for(1s);
    const long used_count = mproc_test::cpu_ticks(blocked_on_count.pid()) - before_count;
    const long used_room = mproc_test::cpu_ticks(blocked_on_room.pid()) - before_room;
    INFO("blocked on a full bounded queue: " << used_count << " ticks; streaming into a full ring: " << used_room);
    CHECK(used_count <= 10);
    CHECK(used_room <= 10);
    CHECK(blocked_on_count.is_alive());
    CHECK(blocked_on_room.is_alive());
    CHECK(bounded.get(10s) == 0);
    CHECK(bounded.get(10s) == 1);
    CHECK(small.get(30s) == std::string(1 << 20, 'r'));
    REQUIRE(blocked_on_count.join(60s));
    REQUIRE(blocked_on_room.join(60s));
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Producers killed while they hold the Queue's lock: the next locker repairs it, and every put that returned is "
    "delivered once") {
    // A producer in a tight put loop is killed at a random point; about a third of the kills land
    // while it holds the queue's internal lock (the kernel then marks the lock's owner dead, which
    // the test reads). Rounds go on until 20 such kills — a hang guard caps them at 2000.
    mproc::Queue<Entry> q({.buffer_bytes = 64 << 20});
    auto* header = reinterpret_cast<mproc::detail::QueueHeader*>(mproc_test::object_address(q));
    mproc::Value<long> put_started(0), put_done(0);
    std::mt19937 rng(2024);
    int in_lock = 0, rounds = 0;
    long delivered = 0;
    for (; in_lock < 20 && rounds < 2000; ++rounds) {
        put_started.store(0);
        put_done.store(0);
        mproc::Process victim([&, rounds] {
            for (long i = 0;; ++i) {
                // Every 51st item is as large as a whole item goes (just under the 256 KiB piece):
                // copied under the lock, it keeps the producer there long enough for a good share
                // of the kills to land inside. Every 301st streams in (pieces copied outside the
                // lock), and a kill may land between its pieces, while the producer holds the
                // stream's claim.
                const std::size_t size = i % 301 == 300 ? (1 << 20) + 4096
                                         : i % 51 == 50 ? 250'000
                                                        : static_cast<std::size_t>(i % 500);
                std::string payload(size, 'q');
                put_started.store(i + 1);
                q.put(Entry{rounds, i, std::move(payload)});
                put_done.store(i + 1);
            }
        });
        victim.start();
        const long target = 1 + static_cast<long>(rng() % 2000);
        REQUIRE(eventually([&] { return put_started.load() >= target; }));
        victim.kill();
        REQUIRE(victim.join(60s));
        if (mproc_test::died_holding(header->mutex)) ++in_lock;
        // Drain: the first lock taken here does the repair.
        std::vector<long> seqs;
        while (auto e = q.try_get()) {
            REQUIRE(e->round == rounds);
            seqs.push_back(e->seq);
        }
        const long done = put_done.load(), started = put_started.load();
        INFO("round " << rounds << ": " << seqs.size() << " delivered, " << done << " puts returned, " << started
                      << " begun");
        REQUIRE(static_cast<long>(seqs.size()) >= done);
        REQUIRE(static_cast<long>(seqs.size()) <= started);
        for (std::size_t i = 0; i < seqs.size(); ++i) REQUIRE(seqs[i] == static_cast<long>(i));
        delivered += static_cast<long>(seqs.size());
    }
    INFO(rounds << " rounds, " << delivered << " items delivered");
    CHECK(in_lock >= 20);
    // The queue is whole: it takes and gives items of every size. (The drains above took the
    // consumers' lock; the producers' is repaired by the next producer, this put.)
    q.put(Entry{-1, 0, std::string(3 << 20, 'z')});
    CHECK_FALSE(mproc_test::died_holding(header->mutex));  // repaired: nobody sees a dead owner now
    q.put(Entry{-1, 1, "small"});
    CHECK(q.get(10s).payload.size() == (3u << 20));
    CHECK(q.get(10s).payload == "small");
    CHECK(q.qsize() == 0);
    CHECK(child_count() == 0);
}

// ---- Handles in flight through a Queue: the queue keeps their objects alive -------------------

namespace {
std::size_t queue_mappings(const std::string& name) { return mproc_test::memfd_mappings(::getpid(), name).size(); }

struct Parcel;
Parcel parcel(std::string note);

struct Parcel {
    mproc::Queue<int> reply{mproc::QueueOptions{.buffer_bytes = 1 << 16}};
    mproc::Lock lock;
    mproc::Value<long> total{0};
    mproc::Array<double> big = mproc::Array<double>(std::size_t{1} << 16);  // a segment of its own
    std::string note;
    template <class Archive> void serialize(Archive& ar) { ar(reply, lock, total, big, note); }
};
Parcel parcel(std::string note) {
    Parcel p;
    p.note = std::move(note);
    return p;
}
}  // namespace

TEST_CASE(
    "Handles whose only copy is an item in a Queue stay usable until the item is taken, then go with their last "
    "handle") {
    const std::size_t queues = queue_mappings("mproc-queue"), arrays = queue_mappings("mproc-array");
    mproc::Queue<Parcel> parcels({.buffer_bytes = 1 << 20});
    parcels.put(parcel("first"));  // the temporary goes: the queue holds the only copies
    parcels.put(parcel("second"));
    CHECK(queue_mappings("mproc-queue") == queues + 3);
    CHECK(queue_mappings("mproc-array") == arrays + 2);
    {
        Parcel first = parcels.get();  // in this process
        CHECK(first.note == "first");
        first.reply.put(1);
        CHECK(first.reply.get() == 1);
        std::lock_guard g(first.lock);
        first.total += 5;
        first.big[7] = 2.5;
    }  // its last handle: it goes
    CHECK(queue_mappings("mproc-queue") == queues + 2);
    CHECK(queue_mappings("mproc-array") == arrays + 1);
    // A child forked now takes the second one.
    mproc::Process consumer([&] {
        Parcel second = parcels.get(60s);
        second.total += 3;
        std::_Exit(second.note == "second" && second.total.load() == 3 ? 0 : 1);
    });
    consumer.start();
    REQUIRE(consumer.join(60s));
    CHECK(consumer.exitcode() == 0);
    // Taken elsewhere: this process lets go at its next call on a queue or a dict.
    CHECK(parcels.empty());
    CHECK_FALSE(parcels.try_get().has_value());
    CHECK(queue_mappings("mproc-queue") == queues + 1);
    CHECK(queue_mappings("mproc-array") == arrays);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A streamed item holding handles: taken whole, or withdrawn when its producer gives up, its handles are counted "
    "once") {
    const std::size_t queues = queue_mappings("mproc-queue");
    mproc::Queue<std::pair<mproc::Queue<int>, std::string>> q({.buffer_bytes = 1 << 16});
    mproc::Queue<int> sent;  // made before the child, so the child maps it
    mproc::Process consumer([&] {
        auto [inner, text] = q.get(60s);
        inner.put(static_cast<int>(text.size()));
        std::_Exit(inner.get(5s) == 300'000 ? 0 : 1);
    });
    consumer.start();
    q.put({std::move(sent), std::string(300'000, 'x')}, 60s);  // streams through the ring as the child reads
    { const mproc::Queue<int> gone = std::move(sent); }  // this process's handle: none left but the item's
    REQUIRE(consumer.join(60s));
    CHECK(consumer.exitcode() == 0);
    CHECK(q.empty());
    CHECK(queue_mappings("mproc-queue") == queues + 1);
    // A producer that gives up (nobody takes the stream before its timeout): withdrawn, not counted.
    CHECK_THROWS_AS(q.put({mproc::Queue<int>(), std::string(300'000, 'y')}, 200ms), mproc::Full);
    CHECK(q.empty());
    CHECK_FALSE(q.try_get().has_value());
    CHECK(queue_mappings("mproc-queue") == queues + 1);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A producer killed holding the Queue's lock while counting an item's handles: the next locker recounts from the "
    "ring") {
    const std::size_t queues = queue_mappings("mproc-queue");
    mproc::Queue<mproc::Queue<int>> q({.buffer_bytes = 1 << 16});
    std::uint64_t inner_id = 0;
    {
        mproc::Queue<int> inner;
        inner_id = std::get<0>(mproc::from_bytes<std::tuple<std::uint64_t, std::uint64_t>>(mproc::to_bytes(inner)));
        q.put(inner);
    }
    CHECK(queue_mappings("mproc-queue") == queues + 2);
    mproc::Event inside;
    mproc::Process writer([&] {
        // What a producer killed between counting an item's handles and publishing it leaves.
        auto* h = reinterpret_cast<mproc::detail::QueueHeader*>(mproc_test::object_address(q));
        h->mutex.lock();
        mproc::detail::RefCounts counts(
            reinterpret_cast<mproc::detail::RefTable*>(reinterpret_cast<std::byte*>(h) + h->refs));
        counts.begin();
        const std::uint64_t stray[] = {inner_id};  // a count that no item backs
        counts.add(stray);
        inside.set();
        while (true) ::pause();
    });
    writer.start();
    REQUIRE(inside.wait(60s));
    writer.kill();
    REQUIRE(writer.join(60s));
    CHECK(q.qsize() == 1);  // the next locker repairs
    {
        mproc::Queue<int> inner = q.get();
        inner.put(3);
        CHECK(inner.get() == 3);
    }
    CHECK(queue_mappings("mproc-queue") == queues + 1);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

// ---- a process killed between the steps of a change (detail/shm/crash_points.hpp) -------------

namespace {
/// A child kills itself (SIGKILL) at the `kill_at`-th crash point whose name starts with `kill_prefix`.
const char* kill_prefix = "";
int kill_at = 0;
int kill_seen = 0;
void kill_at_point(const char* name) {
    if (std::strncmp(name, kill_prefix, std::strlen(kill_prefix)) == 0 && ++kill_seen == kill_at) ::raise(SIGKILL);
}
void arm_kill(const char* prefix, int at) {
    kill_prefix = prefix;
    kill_at = at;
    kill_seen = 0;
    mproc::detail::crash_hook.store(&kill_at_point);
}
/// An item that says which it is: its number in front, then a filling that depends on it.
std::string numbered(int seq, std::size_t size) {
    std::string s(size, static_cast<char>('a' + seq % 26));
    const std::string tag = std::to_string(seq) + ":";
    s.replace(0, tag.size(), tag);
    return s;
}
}  // namespace

TEST_CASE("A consumer killed at any step of handing ring memory back: the items after its own arrive, intact") {
    // A consumer hands back the memory of each chunk it passes beyond the ring's resident part
    // (a 16 MiB ring holding 10 MB, 4 MiB of it resident): killed at each of those steps in turn,
    // it may lose the item it was taking, never one after it.
    constexpr int n = 100;
    constexpr std::size_t size = 100'000;
    int kills = 0;
    for (int at = 1; at <= 12; ++at) {
        mproc::Queue<std::string> q({.buffer_bytes = 16 << 20});
        for (int i = 0; i < n; ++i) q.put(numbered(i, size));
        mproc::Value<int> done(0);
        mproc::Process consumer([&] {
            arm_kill("queue.hand_back", at);
            for (int i = 0; i < n; ++i) {
                if (q.get(60s) != numbered(i, size)) std::_Exit(2);
                done.store(i + 1);
            }
            std::_Exit(0);
        });
        consumer.start();
        REQUIRE(consumer.join(60s));
        INFO("hand-back step " << at << ", after " << done.load() << " items");
        if (consumer.exitcode() == 0) break;  // past the last point
        REQUIRE(consumer.exitcode() == -SIGKILL);
        ++kills;
        int next = done.load();
        if (next < n) {
            const std::string first = q.get(60s);
            if (first != numbered(next, size)) ++next;  // the dead consumer's item is lost
            REQUIRE(next < n);
            CHECK(first == numbered(next, size));
            for (++next; next < n; ++next) CHECK(q.get(60s) == numbered(next, size));
        }
        CHECK(q.try_get() == std::nullopt);
    }
    CHECK(kills >= 5);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A producer killed at any step of withdrawing its streamed item: the handles of the items left are counted "
    "once") {
    // The producer gives up on a streamed item that holds a handle (nobody takes it before its
    // timeout) and is killed at each step of the withdrawal in turn. The item before it holds a
    // handle to the same queue: counted once too few, that queue would go with its last handle
    // outside the ring, while the item still points into it.
    const std::size_t queues = queue_mappings("mproc-queue");
    int kills = 0;
    for (int at = 1; at <= 8; ++at) {
        mproc::Queue<std::pair<mproc::Queue<int>, std::string>> q({.buffer_bytes = 1 << 16});
        bool last = false;
        {
            mproc::Queue<int> inner;
            q.put({inner, "first"});
            mproc::Process producer([&] {
                arm_kill("queue.withdraw", at);
                try {
                    q.put({inner, std::string(300'000, 'y')}, 200ms);
                } catch (const mproc::Full&) {
                    std::_Exit(0);
                }
                std::_Exit(3);
            });
            producer.start();
            REQUIRE(producer.join(60s));
            last = producer.exitcode() == 0;
            if (!last) {
                REQUIRE(producer.exitcode() == -SIGKILL);
                ++kills;
            }
            CHECK(q.qsize() == 1);  // the next locker repairs
        }  // this process's own handle of `inner` is gone: the item's keeps it
        INFO("killed at withdrawal step " << at);
        CHECK(queue_mappings("mproc-queue") == queues + 2);
        {
            auto [inner, text] = q.get(60s);
            CHECK(text == "first");
            inner.put(7);
            CHECK(inner.get(5s) == 7);
        }
        CHECK(q.try_get() == std::nullopt);
        CHECK(queue_mappings("mproc-queue") == queues + 1);
        if (last) break;
    }
    CHECK(kills >= 2);
    CHECK(mproc::detail::segments().retained_count() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Producers that put while a consumer hands ring memory back keep out of the chunks it hands back") {
    // Between publishing its new head and handing back the chunks it passed, a consumer holds them
    // off: producers count the ring as held from the first of them, not from the new head. Here a
    // producer fills the ring at that very moment (in the crash hook, in this process): counted
    // from the head, its last items would lie where the hand-back then zeroes the memory.
    mproc::Queue<std::string> q({.buffer_bytes = 16 << 20});  // 4 MiB of it resident
    static constexpr std::size_t big = 100'000, small = 1000;
    std::vector<std::size_t> sizes;
    try {
        for (;;) {
            q.put_nowait(numbered(static_cast<int>(sizes.size()), big));
            sizes.push_back(big);
        }
    } catch (const mproc::Full&) {}
    static mproc::Queue<std::string>* target = nullptr;
    static std::vector<std::size_t>* put_sizes = nullptr;
    static int hook_runs = 0;
    static bool hook_failed = false;  // a put threw something else (the hook runs in a noexcept function)
    target = &q;
    put_sizes = &sizes;
    hook_runs = 0;
    hook_failed = false;
    struct Unhook {
        ~Unhook() { mproc::detail::crash_hook.store(nullptr); }
    } unhook;
    mproc::detail::crash_hook.store([](const char* name) {
        if (std::strcmp(name, "queue.hand_back.published") != 0 || hook_runs++ != 0) return;
        try {
            for (;;) {
                target->put_nowait(numbered(static_cast<int>(put_sizes->size()), small));
                put_sizes->push_back(small);
            }
        } catch (const mproc::Full&) {
        } catch (...) {
            hook_failed = true;
        }
    });
    const std::size_t before = sizes.size();
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        const std::string got = q.get(60s);
        if (got != numbered(static_cast<int>(i), sizes[i])) {
            FAIL_CHECK("item " << i << " of " << sizes.size() << " arrived wrong");
            break;
        }
    }
    CHECK(hook_runs > 0);
    CHECK_FALSE(hook_failed);
    CHECK(sizes.size() > before + 1000);  // the hook's puts found room
    CHECK(q.try_get() == std::nullopt);
}

TEST_CASE("A reader whose streamed item is withdrawn keeps the piece it is copying until it lets the item go") {
    // The producer of a streamed item gives up while a consumer copies a piece of it with the lock
    // released. The item is dropped, but until its reader lets it go, no put may write where that
    // piece lies (the reader's copy would race the put's). Replayed in one thread.
    using namespace mproc::detail;
    SharedRef ref = ByteQueue::create(std::size_t{64} << 10, 0, 42, 0);
    ByteQueue q(ref);
    QueueRing ring(ref);
    constexpr std::size_t len = 300'000;  // streams (over 256 KiB), several times the ring
    std::vector<std::byte> msg(len);
    for (std::size_t i = 0; i < len; ++i) msg[i] = static_cast<std::byte>(1 + i % 251);
    QueueWakes wakes;
    REQUIRE(ring.start_stream(len, {}, wakes));  // the producer's steps
    StreamPiece wpiece;
    REQUIRE(ring.reserve_write_piece(len, wpiece) == StreamStep::more);
    ring.copy_piece_in(wpiece, ItemBytes{msg});
    REQUIRE(ring.commit_write_piece(wpiece, wakes) == StreamStep::more);
    const QueueCursor c = ring.read_view_fresh();  // the consumer's
    ring.start_read(c, ring.record_at(c.r.head, ring.word_at(c.r.head)), wakes);
    StreamPiece rpiece;
    REQUIRE(ring.reserve_read_piece(len, rpiece, wakes) == StreamStep::more);
    REQUIRE(rpiece.n == wpiece.n);
    ring.withdraw_stream(wakes);  // the producer gives up, while the consumer copies ...
    const std::vector<std::byte> small(1000, std::byte{0});
    int puts = 0;
    while (puts < 1000 && q.put(small, Clock::now())) ++puts;  // ... and other producers put
    std::vector<std::byte> copied(rpiece.n);
    ring.copy_piece_out(rpiece, ItemPlace{copied});
    CHECK(std::equal(copied.begin(), copied.end(), msg.begin()));  // what it copies is still the item's
    CHECK(ring.commit_read_piece(rpiece, true, wakes) == StreamStep::dropped);
    mproc::Buffer out;
    for (int i = 0; i < puts; ++i) REQUIRE(q.get(out, Clock::now(), false) == Take::item);
    while (q.put(small, Clock::now())) ++puts;  // the ring's room is back
    CHECK(puts > 0);
}

TEST_CASE("A streamed put that finds the write claim held by a stopped process gives up at its deadline") {
    // A consumer probing whether a streaming producer lives holds the write claim for a moment; a
    // process stopped (SIGSTOP) in that moment holds it until continued — played here by a child
    // that takes the claim and waits. A streamed put waits for the claim, but no longer than its
    // deadline.
    mproc::Queue<std::string> q({.buffer_bytes = 1 << 20});
    auto* h = reinterpret_cast<mproc::detail::QueueHeader*>(mproc_test::object_address(q));
    mproc::Event holding;
    mproc::Process prober([&] {
        REQUIRE(mproc::detail::holds(h->write_claim.lock()));
        holding.set();
        for (;;) ::pause();
    });
    prober.start();
    REQUIRE(holding.wait(60s));
    struct Release {  // however the test leaves, the claim's holder goes
        mproc::Process& p;
        ~Release() {
            if (p.is_alive()) p.kill();
            (void)p.join(60s);
        }
    } release{prober};
    std::atomic<int> outcome{0};  // 1: gave up with Full, 2: put, 3: other
    std::thread producer([&] {
        try {
            q.put(std::string(1 << 20, 'z'), 300ms);
            outcome = 2;
        } catch (const mproc::Full&) {
            outcome = 1;
        } catch (...) {
            outcome = 3;
        }
    });
    const bool ended = eventually([&] { return outcome.load() != 0; });
    if (!ended) prober.kill();  // frees the put (its claim's owner died), so the thread can be joined
    producer.join();
    CHECK(ended);
    CHECK(outcome.load() == 1);
    CHECK(q.empty());
}

// ---- shutdown (Python 3.13's Queue.shutdown) ----------------------------------------------------

namespace {
void put_one(mproc::Queue<int> q, int x) { q.put(x); }
/// Takes items until the queue says it is shut down; how many it took.
int drain_until_shut_down(mproc::Queue<int> q) {
    int n = 0;
    try {
        for (;;) {
            (void)q.get(60s);
            ++n;
        }
    } catch (const mproc::ShutDown&) {
        return n;
    }
}
bool shut_down_here(mproc::Queue<int> q) { return q.is_shutdown(); }
void shut_down_from_task(mproc::Queue<int> q) { q.shutdown(); }

/// What a child blocked in a queue call ended with.
enum Outcome : int { pending = 0, returned = 1, shut_down = 2, other_error = 3 };
/// 'R', 'S', 'T' (stopped), ... for `pid`; '?' if it is gone.
char process_state(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line)) return '?';
    const auto close = line.rfind(')');
    return close != std::string::npos && close + 2 < line.size() ? line[close + 2] : '?';
}

/// Stops `pid` (SIGSTOP) at a moment it does not hold `mutex` (a stopped holder would block the
/// test itself): the owner's thread id is in the robust mutex's lock word.
bool stop_outside(pid_t pid, const mproc::detail::RobustMutex& mutex) {
    const auto* raw = reinterpret_cast<const pthread_mutex_t*>(&mutex);
    for (int attempt = 0; attempt < 1000; ++attempt) {
        ::kill(pid, SIGSTOP);
        if (!eventually([&] { return process_state(pid) == 'T'; })) return false;
        const auto owner = static_cast<pid_t>(__atomic_load_n(&raw->__data.__lock, __ATOMIC_ACQUIRE) & 0x3fffffff);
        if (owner != pid) return true;
        ::kill(pid, SIGCONT);
        std::this_thread::sleep_for(1ms);
    }
    return false;
}

template <class Call> void record_outcome(mproc::Value<int>& outcome, Call&& call) {
    try {
        call();
        outcome.store(returned);
    } catch (const mproc::ShutDown&) {
        outcome.store(shut_down);
    } catch (...) {
        outcome.store(other_error);
    }
}
}  // namespace

TEST_CASE("After shutdown put throws ShutDown, and get takes what is left, then throws ShutDown instead of Empty") {
    pool_test::Watchdog dog(120s, "get on a shut-down queue");
    mproc::Queue<int> q;
    mproc::Queue<int> other = q;
    CHECK_FALSE(q.is_shutdown());
    q.put(1);
    q.put(2);
    other.shutdown();
    CHECK(q.is_shutdown());
    CHECK(other.is_shutdown());
    CHECK_THROWS_AS(q.put(3), mproc::ShutDown);
    CHECK_THROWS_AS(q.put(3, 1s), mproc::ShutDown);
    CHECK_THROWS_AS(q.put_nowait(3), mproc::ShutDown);
    CHECK_THROWS_AS(q.put(3), mproc::Error);  // a ShutDown is an mproc::Error
    CHECK(q.qsize() == 2);                    // refused puts added nothing
    q.shutdown();                             // twice: harmless
    CHECK(q.get() == 1);
    CHECK(q.get_nowait() == 2);
    CHECK_THROWS_AS(q.get(60s), mproc::ShutDown);  // not Empty after a wait
    CHECK_THROWS_AS(q.get(), mproc::ShutDown);     // not a wait for ever
    CHECK_THROWS_AS(q.get(10ms), mproc::ShutDown);
    CHECK_THROWS_AS(q.get_nowait(), mproc::ShutDown);
    CHECK(q.try_get() == std::nullopt);
    CHECK(q.empty());
}

TEST_CASE("A put blocked on a full queue in another process wakes with ShutDown on a plain shutdown, as a get does") {
    mproc::Queue<int> full(1);
    full.put(0);
    mproc::Queue<int> empty;
    mproc::Value<int> putter_outcome(pending), getter_outcome(pending);
    mproc::Semaphore ready(0);
    mproc::Process putter([&] {
        ready.release();
        record_outcome(putter_outcome, [&] { full.put(1); });
    });
    mproc::Process getter([&] {
        ready.release();
        record_outcome(getter_outcome, [&] { (void)empty.get(); });
    });
    putter.start();
    getter.start();
    REQUIRE(ready.acquire(60s));
    REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);  // let them reach their waits
    full.shutdown();
    empty.shutdown();
    REQUIRE(putter.join(60s));
    REQUIRE(getter.join(60s));
    CHECK(putter_outcome.load() == shut_down);
    CHECK(getter_outcome.load() == shut_down);
    CHECK(full.get() == 0);  // a plain shutdown keeps what was in the queue
    CHECK_THROWS_AS(full.get(60s), mproc::ShutDown);
    CHECK(child_count() == 0);
}

TEST_CASE("shutdown(immediate) drops what is left and wakes a blocked get and a blocked put in other processes") {
    mproc::Queue<int> empty;
    mproc::Queue<int> full(2);
    full.put(10);
    full.put(11);
    mproc::Value<int> getter_outcome(pending), putter_outcome(pending);
    mproc::Semaphore ready(0);
    mproc::Process getter([&] {
        ready.release();
        record_outcome(getter_outcome, [&] { (void)empty.get(); });
    });
    mproc::Process putter([&] {
        ready.release();
        record_outcome(putter_outcome, [&] { full.put(12); });
    });
    getter.start();
    putter.start();
    REQUIRE(ready.acquire(60s));
    REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);
    CHECK(getter_outcome.load() == pending);
    CHECK(putter_outcome.load() == pending);
    empty.shutdown(true);
    full.shutdown(true);
    CHECK(full.qsize() == 0);  // dropped at once
    REQUIRE(getter.join(60s));
    REQUIRE(putter.join(60s));
    CHECK(getter_outcome.load() == shut_down);
    CHECK(putter_outcome.load() == shut_down);
    CHECK_THROWS_AS(full.get_nowait(), mproc::ShutDown);
    CHECK_THROWS_AS(full.put_nowait(1), mproc::ShutDown);
    CHECK(child_count() == 0);
}

TEST_CASE("shutdown(immediate) after a plain one still drops what is left") {
    mproc::Queue<std::string> q;
    q.put("a");
    q.put("b");
    q.shutdown();
    CHECK(q.get() == "a");
    q.shutdown(true);
    CHECK(q.qsize() == 0);
    CHECK_THROWS_AS(q.get(60s), mproc::ShutDown);
}

TEST_CASE("shutdown(immediate) frees the dropped items' memory and lets go of the objects their handles kept alive") {
    const std::size_t queues = queue_mappings("mproc-queue"), arrays = queue_mappings("mproc-array");
    mproc::Queue<Parcel> parcels({.buffer_bytes = 1 << 20});
    parcels.put(parcel("first"));  // the queue holds the only copies of their objects
    parcels.put(parcel("second"));
    CHECK(queue_mappings("mproc-queue") == queues + 3);
    CHECK(queue_mappings("mproc-array") == arrays + 2);
    parcels.shutdown(true);
    CHECK(parcels.qsize() == 0);
    CHECK(queue_mappings("mproc-queue") == queues + 1);  // without the drop, the items keep them
    CHECK(queue_mappings("mproc-array") == arrays);
    CHECK(mproc::detail::segments().retained_count() == 0);

    // Ring memory past the resident part goes back to the kernel.
    mproc::Queue<std::vector<std::uint8_t>> big;
    for (int i = 0; i < 40; ++i) big.put(std::vector<std::uint8_t>(1 << 20, static_cast<std::uint8_t>(i)));
    CHECK(big.memory_in_use() > (32u << 20));
    big.shutdown(true);
    CHECK(big.memory_in_use() < (16u << 20));
    CHECK_THROWS_AS(big.get(60s), mproc::ShutDown);

    // Also what large items raised the resident part to.
    mproc::Queue<std::string> large;
    for (int i = 0; i < 4; ++i) large.put(std::string(std::size_t{8} << 20, 'x'));
    CHECK(large.memory_in_use() > (std::size_t{32} << 20));
    large.shutdown(true);
    CHECK(large.memory_in_use() < (std::size_t{16} << 20));
}

TEST_CASE("shutdown(immediate) withdraws an item streaming in: its producer in another process gets ShutDown") {
    mproc::Queue<std::string> q({.buffer_bytes = 64 << 10});
    mproc::Value<int> outcome(pending);
    mproc::Process producer([&] {
        record_outcome(outcome, [&] { q.put(std::string(4 << 20, 's')); });  // fills the ring, then waits for room
    });
    producer.start();
    REQUIRE(eventually([&] { return q.qsize() == 1; }));  // its record is in: it streams
    std::this_thread::sleep_for(100ms);
    q.shutdown(true);
    REQUIRE(producer.join(60s));  // without the withdrawal, it waits for room for ever
    CHECK(outcome.load() == shut_down);
    CHECK(q.qsize() == 0);
    CHECK_THROWS_AS(q.get(60s), mproc::ShutDown);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "shutdown(immediate) while a consumer drains an item still streaming in: the consumer and the producer both get "
    "ShutDown") {
    mproc::Queue<std::string> q({.buffer_bytes = 64 << 10});
    const auto* h = reinterpret_cast<const mproc::detail::QueueHeader*>(mproc_test::object_address(q));
    const auto reading = [h] { return h->read.snapshot().reading; };
    const auto writing = [h] { return h->write.snapshot().writing; };
    mproc::Value<int> got(pending), put(pending);
    mproc::Process reader([&] { record_outcome(got, [&] { (void)q.get(); }); });
    mproc::Process producer([&] { record_outcome(put, [&] { q.put(std::string(256 << 20, 'p')); }); });
    reader.start();
    producer.start();
    // Stop the producer while the reader is on its item: both sides then wait, the item half through.
    REQUIRE(eventually([&] { return reading() == 1; }));
    REQUIRE(stop_outside(producer.pid(), h->mutex));
    std::this_thread::sleep_for(100ms);
    REQUIRE(writing() == 1);  // 256 MiB through a 64 KiB ring cannot have finished
    REQUIRE(reading() == 1);
    q.shutdown(true);
    REQUIRE(reader.join(60s));
    CHECK(got.load() == shut_down);  // it dropped what it had read
    ::kill(producer.pid(), SIGCONT);
    REQUIRE(producer.join(60s));
    CHECK(put.load() == shut_down);
    CHECK(q.qsize() == 0);
    CHECK_THROWS_AS(q.get(60s), mproc::ShutDown);
    CHECK(child_count() == 0);
}

TEST_CASE("Shutdown is seen by Process children and Pool tasks, and made by them") {
    mproc::Queue<int> q;
    mproc::Queue<int> by_child;
    mproc::Queue<int> by_task;
    mproc::Pool pool(2);
    CHECK_FALSE(pool.apply(shut_down_here, q));
    for (int i = 0; i < 5; ++i) q.put(i);
    q.shutdown();
    CHECK(pool.apply(shut_down_here, q));
    CHECK_THROWS_AS(pool.apply(put_one, q, 9), mproc::ShutDown);  // carried from the worker as itself
    CHECK(pool.apply(drain_until_shut_down, q) == 5);              // drains, then ShutDown
    mproc::Value<int> seen(pending);
    mproc::Process child([&] {
        record_outcome(seen, [&] { (void)q.get(); });
        by_child.shutdown();
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(seen.load() == shut_down);
    CHECK(by_child.is_shutdown());
    CHECK_THROWS_AS(by_child.put(1), mproc::ShutDown);
    pool.apply(shut_down_from_task, by_task);
    CHECK(by_task.is_shutdown());
    CHECK_THROWS_AS(by_task.get(60s), mproc::ShutDown);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

// ---- JoinableQueue ------------------------------------------------------------------------------

namespace {
void square_jobs(mproc::JoinableQueue<int> jobs, mproc::Queue<int> out) {
    const int x = jobs.get(60s);
    out.put(x * x);
    jobs.task_done();
}
std::size_t unfinished_in_task(mproc::JoinableQueue<int> jobs) { return jobs.unfinished_tasks(); }
}  // namespace

TEST_CASE("JoinableQueue across processes: join returns once every item put has had its task_done") {
    mproc::JoinableQueue<int> jobs;
    mproc::Value<long> sum(0);
    std::vector<mproc::Process> consumers;
    for (int c = 0; c < 2; ++c)
        consumers.emplace_back([&] {
            for (;;) {
                const int x = jobs.get();
                if (x < 0) {
                    jobs.task_done();
                    return;
                }
                std::this_thread::sleep_for(std::chrono::microseconds(x % 7 == 0 ? 200 : 0));
                sum += x;  // the work, before its task_done
                jobs.task_done();
            }
        });
    mproc::Process producer([&] {
        for (int i = 1; i <= 1000; ++i) jobs.put(i);
    });
    for (auto& c : consumers) c.start();
    producer.start();
    REQUIRE(producer.join(60s));
    REQUIRE(jobs.join(60s));
    CHECK(sum.load() == 500500);  // every item was processed before join returned
    CHECK(jobs.unfinished_tasks() == 0);
    for (int c = 0; c < 2; ++c) jobs.put(-1);
    for (auto& c : consumers) REQUIRE(c.join(60s));
    CHECK(jobs.join(60s));
    CHECK(child_count() == 0);
}

TEST_CASE("JoinableQueue::join(timeout) returns false while an item is unfinished, true once it is done") {
    pool_test::Watchdog dog(120s, "join on a JoinableQueue with nothing unfinished");
    mproc::JoinableQueue<std::string> q;
    CHECK(q.join());  // nothing put: done at once
    CHECK(q.join(0s));
    q.put("job");
    CHECK(q.unfinished_tasks() == 1);
    CHECK_FALSE(q.join(50ms));
    CHECK(q.get() == "job");
    CHECK_FALSE(q.join(50ms));  // got, not yet done
    mproc::Process worker([&] { q.task_done(); });
    worker.start();
    REQUIRE(worker.join(60s));
    CHECK(worker.exitcode() == 0);
    CHECK(q.join(10s));
    CHECK(q.unfinished_tasks() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("task_done called more times than items were put throws mproc::Error and changes nothing") {
    mproc::JoinableQueue<int> q;
    CHECK_THROWS_AS(q.task_done(), mproc::Error);
    q.put(1);
    q.put(2);
    CHECK(q.get() == 1);
    q.task_done();
    q.task_done();  // ahead of the second get: allowed, as in Python
    CHECK(q.unfinished_tasks() == 0);
    CHECK_THROWS_WITH(q.task_done(), Catch::Contains("task_done") && Catch::Contains("more times"));
    mproc::Value<int> child_outcome(pending);
    mproc::Process child([&] { record_outcome(child_outcome, [&] { q.task_done(); }); });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child_outcome.load() == other_error);
    CHECK(q.unfinished_tasks() == 0);
    CHECK(q.qsize() == 1);
    CHECK(q.get() == 2);
    CHECK(q.join(1s));
    q.put(3);  // the refused calls counted nothing: one more put is one unfinished item
    CHECK(q.unfinished_tasks() == 1);
    CHECK_FALSE(q.join(20ms));
    CHECK(q.get() == 3);
    q.task_done();
    CHECK(q.join(1s));
    CHECK(child_count() == 0);
}

TEST_CASE("join returns after shutdown(immediate): the dropped items count as done, one got still needs task_done") {
    mproc::JoinableQueue<int> q;
    for (int i = 0; i < 5; ++i) q.put(i);
    mproc::Value<int> joined(pending);
    mproc::Semaphore ready(0);
    mproc::Process joiner([&] {
        ready.release();
        record_outcome(joined, [&] {
            if (!q.join()) throw std::runtime_error("join without a timeout returned false");
        });
    });
    joiner.start();
    REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);
    CHECK(joined.load() == pending);
    q.shutdown(true);
    REQUIRE(joiner.join(60s));  // without the drop counting as done, it waits for ever
    CHECK(joined.load() == returned);
    CHECK(q.join(1s));

    // CPython 3.13: an item got before the shutdown is still unfinished until its task_done.
    mproc::JoinableQueue<int> r;
    r.put(1);
    r.put(2);
    CHECK(r.get() == 1);
    r.shutdown(true);
    CHECK(r.unfinished_tasks() == 1);
    CHECK_FALSE(r.join(50ms));
    r.task_done();
    CHECK(r.join(1s));
    CHECK_THROWS_AS(r.task_done(), mproc::Error);

    // A plain shutdown keeps the items: join waits until they are got and done.
    mproc::JoinableQueue<int> s;
    s.put(1);
    s.shutdown();
    CHECK_FALSE(s.join(50ms));
    CHECK(s.get() == 1);
    s.task_done();
    CHECK(s.join(1s));
    CHECK_THROWS_AS(s.get(60s), mproc::ShutDown);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A consumer SIGKILLed between get and task_done leaves its item unfinished: join with a timeout returns false") {
    mproc::JoinableQueue<int> q;
    for (int i = 0; i < 3; ++i) q.put(i);
    mproc::Event got;
    mproc::Process victim([&] {
        (void)q.get();
        got.set();
        while (true) ::pause();  // killed before its task_done
    });
    victim.start();
    REQUIRE(got.wait(60s));
    victim.kill();
    REQUIRE(victim.join(60s));
    mproc::Process survivor([&] {
        for (int i = 0; i < 2; ++i) {
            (void)q.get(10s);
            q.task_done();
        }
    });
    survivor.start();
    REQUIRE(survivor.join(60s));
    CHECK(survivor.exitcode() == 0);
    CHECK(q.qsize() == 0);
    CHECK(q.unfinished_tasks() == 1);  // the dead consumer's item
    CHECK_FALSE(q.join(200ms));        // returns, not hangs
    q.task_done();                     // someone accounts for it
    CHECK(q.join(1s));
    CHECK(child_count() == 0);
}

TEST_CASE("A process waiting in JoinableQueue::join uses no CPU") {
    mproc::JoinableQueue<int> q;
    q.put(1);
    mproc::Semaphore ready(0);
    mproc::Process joiner([&] {
        ready.release();
        std::_Exit(q.join() ? 0 : 1);
    });
    joiner.start();
    REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);
    const long before = mproc_test::cpu_ticks(joiner.pid());
    std::this_thread::sleep_for(1s);
    const long used = mproc_test::cpu_ticks(joiner.pid()) - before;
    INFO("a joiner used " << used << " ticks over an idle second");
    CHECK(used <= 10);
    CHECK(joiner.is_alive());
    (void)q.get();
    q.task_done();
    REQUIRE(joiner.join(60s));
    CHECK(joiner.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE(
    "A JoinableQueue is a handle shared by Pool tasks, Process children and a SharedDict, and a Queue handle does "
    "not decode as one") {
    mproc::JoinableQueue<int> jobs;
    mproc::Queue<int> out;
    mproc::SharedDict<std::string, mproc::JoinableQueue<int>> d;
    mproc::Pool pool(2);
    for (int i = 1; i <= 20; ++i) jobs.put(i);
    CHECK(pool.apply(unfinished_in_task, jobs) == 20);
    std::vector<std::tuple<mproc::JoinableQueue<int>, mproc::Queue<int>>> args(20, {jobs, out});
    pool.starmap(square_jobs, args);
    REQUIRE(jobs.join(60s));
    int sum = 0;
    for (int i = 0; i < 20; ++i) sum += out.get(10s);
    CHECK(sum == 20 * 21 * 41 / 6);

    d["jobs"] = jobs;
    mproc::Process child([&] {
        mproc::JoinableQueue<int> stored = d.at("jobs");
        stored.put(7);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK_FALSE(d.at("jobs").join(20ms));
    CHECK(jobs.get() == 7);
    d.at("jobs").task_done();
    CHECK(jobs.join(1s));

    // A JoinableQueue is a Queue<int>; a Queue<int>, or a JoinableQueue of another type, is not a JoinableQueue<int>.
    const mproc::Queue<int> as_queue = mproc::from_bytes<mproc::Queue<int>>(mproc::to_bytes(jobs));
    mproc::Queue<int>(as_queue).put(8);
    CHECK(jobs.get() == 8);
    jobs.task_done();
    CHECK_THROWS_AS(mproc::from_bytes<mproc::JoinableQueue<int>>(mproc::to_bytes(out)), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::JoinableQueue<long>>(mproc::to_bytes(jobs)), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Queue<long>>(mproc::to_bytes(jobs)), mproc::SerializationError);
    const auto again = mproc::from_bytes<mproc::JoinableQueue<int>>(mproc::to_bytes(jobs));
    CHECK(mproc::JoinableQueue<int>(again).join(1s));
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}
