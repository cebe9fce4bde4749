// Barrier across processes, threads and Pool tasks: the action (once per round, by the last to
// arrive, before anyone leaves; one that throws), abort, reset, broken, n_waiting, parties, a wait
// that times out, and parties killed by SIGKILL while they wait or while they run the action.
#include <catch2/catch.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/sync.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"
#include "test_pool_common.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;
using mproc_test::eventually;
using pool_test::Watchdog;

namespace {

// What the actions below touch: set before the processes that run them are forked, so every one
// of them has the same handles (an action takes no arguments and captures nothing).
std::optional<mproc::Value<long>> g_actions;        // how many times an action ran
std::optional<mproc::Array<int>> g_left;            // per round: parties that had left when it ran
std::optional<mproc::Value<long>> g_action_errors;  // an action that saw a party already gone
std::optional<mproc::Value<int>> g_action_pid;      // who ran the last action
std::optional<mproc::Event> g_action_started;

/// Counts the rounds; checks that no party of this round has left yet.
void count_round() {
    const long round = g_actions->load();
    if (std::atomic_ref<int>((*g_left)[static_cast<std::size_t>(round)]).load() != 0) *g_action_errors += 1;
    g_action_pid->store(static_cast<int>(::getpid()));
    *g_actions += 1;
}
void throw_from_action() { throw std::runtime_error("the action failed"); }
void block_in_action() {
    g_action_started->set();
    while (true) ::pause();
}

struct Globals {
    Globals() {
        g_actions.emplace(0);
        g_left.emplace(1000);
        g_action_errors.emplace(0);
        g_action_pid.emplace(0);
        g_action_started.emplace();
    }
    ~Globals() {
        g_actions.reset();
        g_left.reset();
        g_action_errors.reset();
        g_action_pid.reset();
        g_action_started.reset();
    }
    Globals(const Globals&) = delete;
    Globals& operator=(const Globals&) = delete;
};

/// How a child's wait ended, as its exit status.
enum Outcome { passed = 0, broken_barrier = 1, other_error = 2 };
int outcome_of(mproc::Barrier& barrier, std::optional<mproc::Seconds> timeout = std::nullopt) {
    try {
        barrier.wait(timeout);
        return passed;
    } catch (const mproc::BrokenBarrierError&) {
        return broken_barrier;
    } catch (...) {
        return other_error;
    }
}
mproc::Process party(mproc::Barrier& barrier, std::optional<mproc::Seconds> timeout = std::nullopt) {
    return mproc::Process([&barrier, timeout] { std::_Exit(outcome_of(barrier, timeout)); });
}

}  // namespace

TEST_CASE("Barrier: the action runs once per round, in the last process to arrive, before any party leaves") {
    Watchdog dog(240s, "Barrier action per round");
    Globals globals;
    constexpr int parties = 4, rounds = 60;
    mproc::Barrier barrier(parties, count_round);
    mproc::Value<int> errors(0), last_was_runner(0);
    std::vector<mproc::Process> processes;
    for (int p = 0; p < parties; ++p)
        processes.emplace_back([&] {
            for (int round = 0; round < rounds; ++round) {
                const std::size_t index = barrier.wait(60s);
                // Past the barrier: this round's action has run...
                if (g_actions->load() < round + 1) errors += 1;
                // ...in the process that arrived last.
                if (index == parties - 1 && g_action_pid->load() == ::getpid()) last_was_runner += 1;
                std::atomic_ref<int>((*g_left)[static_cast<std::size_t>(round)]).fetch_add(1);
            }
        });
    for (auto& p : processes) p.start();
    for (auto& p : processes) {
        REQUIRE(p.join(120s));
        CHECK(p.exitcode() == 0);
    }
    CHECK(g_actions->load() == rounds);
    CHECK(g_action_errors->load() == 0);
    CHECK(errors.load() == 0);
    CHECK(last_was_runner.load() == rounds);
    for (int round = 0; round < rounds; ++round) REQUIRE((*g_left)[static_cast<std::size_t>(round)] == parties);
    CHECK(barrier.n_waiting() == 0);
    CHECK_FALSE(barrier.broken());
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier: a stateless lambda as the action, and threads as the parties") {
    Watchdog dog(120s, "Barrier with threads");
    Globals globals;
    mproc::Barrier barrier(3, [] { *g_actions += 1; });
    std::vector<std::thread> threads;
    std::atomic<int> index_sum{0};
    for (int t = 0; t < 3; ++t)
        threads.emplace_back([&] {
            for (int round = 0; round < 20; ++round) index_sum += static_cast<int>(barrier.wait(60s));
        });
    for (auto& t : threads) t.join();
    CHECK(g_actions->load() == 20);
    CHECK(index_sum.load() == 20 * (0 + 1 + 2));
}

TEST_CASE("Barrier: parties, n_waiting, abort, broken and reset") {
    Watchdog dog(180s, "Barrier abort and reset");
    mproc::Barrier barrier(3);
    CHECK(barrier.parties() == 3);
    CHECK(barrier.n_waiting() == 0);
    CHECK_FALSE(barrier.broken());
    mproc::Process a = party(barrier), b = party(barrier);
    a.start();
    b.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 2; }));
    barrier.abort();
    CHECK(barrier.broken());
    for (auto* p : {&a, &b}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == broken_barrier);
    }
    CHECK(barrier.n_waiting() == 0);
    // Broken until reset: a wait fails at once, whatever its timeout.
    CHECK_THROWS_AS(barrier.wait(), mproc::BrokenBarrierError);
    CHECK_THROWS_WITH(barrier.wait(60s), Catch::Contains("aborted"));
    CHECK(barrier.broken());
    barrier.reset();
    CHECK_FALSE(barrier.broken());
    // Whole again: a full round passes.
    mproc::Process c = party(barrier, 60s), d = party(barrier, 60s);
    c.start();
    d.start();
    CHECK_NOTHROW(barrier.wait(60s));
    for (auto* p : {&c, &d}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == passed);
    }
    // abort() of a barrier nobody waits at breaks it as well.
    barrier.abort();
    CHECK(barrier.broken());
    barrier.reset();
    CHECK_FALSE(barrier.broken());
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier::reset under waiters: they get BrokenBarrierError, and the barrier is empty and usable after") {
    Watchdog dog(180s, "Barrier reset under waiters");
    mproc::Barrier barrier(3);
    mproc::Process a = party(barrier), b = party(barrier);
    a.start();
    b.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 2; }));
    barrier.reset();
    for (auto* p : {&a, &b}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == broken_barrier);
    }
    CHECK_FALSE(barrier.broken());
    CHECK(barrier.n_waiting() == 0);
    // Not two of three already there: a full round needs three new arrivals.
    mproc::Process c = party(barrier, 60s);
    c.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 1; }));
    mproc::Process d = party(barrier, 60s);
    d.start();
    CHECK(barrier.wait(60s) <= 2);
    for (auto* p : {&c, &d}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == passed);
    }
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier: a wait that times out breaks the barrier for every party, until reset()") {
    Watchdog dog(180s, "Barrier timeout");
    mproc::Barrier barrier(3);
    mproc::Process other = party(barrier);  // no timeout of its own: only the break releases it
    other.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 1; }));
    CHECK_THROWS_WITH(barrier.wait(100ms), Catch::Contains("timed out"));
    CHECK(barrier.broken());
    REQUIRE(other.join(60s));
    CHECK(other.exitcode() == broken_barrier);
    CHECK_THROWS_AS(barrier.wait(60s), mproc::BrokenBarrierError);
    try {
        barrier.wait(60s);
    } catch (const mproc::BrokenBarrierError& e) {
        CHECK_THAT(e.what(), Catch::Contains("timed out"));
    }
    barrier.reset();
    CHECK_FALSE(barrier.broken());

    // The constructor's timeout is the default of wait(); a zero timeout breaks at once.
    mproc::Barrier hasty(2, {}, 100ms);
    CHECK_THROWS_AS(hasty.wait(), mproc::BrokenBarrierError);
    CHECK(hasty.broken());
    hasty.reset();
    mproc::Process partner = party(hasty, 60s);
    partner.start();
    CHECK_NOTHROW(hasty.wait(60s));  // an explicit timeout replaces the default
    REQUIRE(partner.join(60s));
    CHECK(partner.exitcode() == passed);
    mproc::Barrier instant(2);
    CHECK_THROWS_AS(instant.wait(0s), mproc::BrokenBarrierError);
    CHECK(instant.broken());
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier: a party killed by SIGKILL while it waits breaks the barrier for the others") {
    Watchdog dog(180s, "Barrier with a dead party");
    mproc::Barrier barrier(4);
    mproc::Process victim([&] {
        barrier.wait();
        std::_Exit(0);
    });
    // The others wait without a timeout: nothing but the victim's death can release them.
    mproc::Process a = party(barrier), b = party(barrier);
    victim.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 1; }));
    a.start();
    b.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 3; }));
    const pid_t victim_pid = victim.pid();
    victim.kill();
    REQUIRE(victim.join(60s));
    for (auto* p : {&a, &b}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == broken_barrier);
    }
    CHECK(barrier.broken());
    CHECK_THROWS_WITH(barrier.wait(), Catch::Contains("process " + std::to_string(victim_pid) + " died"));
    barrier.reset();
    // Usable again, by four new parties.
    std::vector<mproc::Process> next;
    for (int i = 0; i < 3; ++i) next.push_back(party(barrier, 60s));
    for (auto& p : next) p.start();
    CHECK_NOTHROW(barrier.wait(60s));
    for (auto& p : next) {
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == passed);
    }
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier: the last party killed while it runs the action breaks the barrier for the others") {
    Watchdog dog(180s, "Barrier with a dead action");
    Globals globals;
    mproc::Barrier barrier(3, block_in_action);
    mproc::Process a = party(barrier), b = party(barrier);
    a.start();
    b.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 2; }));
    mproc::Process runner([&] { barrier.wait(); });  // arrives last: runs the action, which never ends
    runner.start();
    REQUIRE(g_action_started->wait(60s));
    CHECK(barrier.n_waiting() == 0);  // the round is full; it is not filling any more
    runner.kill();
    REQUIRE(runner.join(60s));
    for (auto* p : {&a, &b}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == broken_barrier);
    }
    CHECK(barrier.broken());
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Barrier: an action that throws breaks the barrier; its process gets the exception, the others BrokenBarrierError") {
    Watchdog dog(180s, "Barrier action that throws");
    mproc::Barrier barrier(3, throw_from_action);
    mproc::Process a = party(barrier), b = party(barrier);
    a.start();
    b.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 2; }));
    CHECK_THROWS_MATCHES(barrier.wait(60s), std::runtime_error, Catch::Message("the action failed"));
    for (auto* p : {&a, &b}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == broken_barrier);
    }
    CHECK(barrier.broken());
    CHECK_THROWS_WITH(barrier.wait(), Catch::Contains("action threw"));
    barrier.reset();
    CHECK_FALSE(barrier.broken());
    CHECK(barrier.n_waiting() == 0);
    CHECK(child_count() == 0);
}

namespace {
/// The barrier's state in shared memory, found from its handle (for the tests that kill a process
/// in the middle of a change, which nothing public can stop at).
mproc::detail::BarrierState* state_of(const mproc::Barrier& barrier) {
    const auto bytes = mproc::to_bytes(barrier);
    mproc::Reader in(bytes);
    std::uint64_t id = 0, offset = 0;
    in(id, offset);
    return reinterpret_cast<mproc::detail::BarrierState*>(mproc::detail::segments().find(id)->base() + offset);
}
mproc::detail::WaiterSlot& slot_of(mproc::detail::BarrierState* s, std::uint32_t i) {
    return reinterpret_cast<mproc::detail::WaiterSlot*>(reinterpret_cast<std::byte*>(s) +
                                                        mproc::detail::barrier_slots_offset)[i];
}
}  // namespace

TEST_CASE("Barrier: a process killed holding the barrier's mutex is repaired after; one killed mid-arrival breaks it") {
    Watchdog dog(180s, "Barrier mutex repair");
    mproc::Barrier barrier(3);
    mproc::detail::BarrierState* s = state_of(barrier);
    mproc::Process first = party(barrier);
    first.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 1; }));
    // Dies holding the mutex, having changed nothing: the next holder repairs, and nothing is lost.
    mproc::Process idle_holder([&] {
        (void)s->mutex.lock();
        std::_Exit(0);
    });
    idle_holder.start();
    REQUIRE(idle_holder.join(60s));
    mproc::Process second = party(barrier, 60s);
    second.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 2; }));
    CHECK(barrier.wait(60s) == 2);
    for (auto* p : {&first, &second}) {
        REQUIRE(p->join(60s));
        CHECK(p->exitcode() == passed);
    }
    CHECK_FALSE(barrier.broken());

    // Dies in the middle of an arrival, holding the mutex, with its slot taken and the count raised:
    // the next holder finds that party gone and breaks the round, which would otherwise complete
    // one party short.
    mproc::Process third = party(barrier);
    third.start();
    REQUIRE(eventually([&] { return barrier.n_waiting() == 1; }));
    mproc::Process half_arrival([&] {
        (void)s->mutex.lock();
        const std::uint32_t index = s->count.load();
        (void)slot_of(s, index).alive.lock();
        slot_of(s, index).state.store(mproc::detail::slot_in_use);
        s->count.store(index + 1);
        std::_Exit(0);
    });
    half_arrival.start();
    REQUIRE(half_arrival.join(60s));
    CHECK_THROWS_AS(barrier.wait(60s), mproc::BrokenBarrierError);
    REQUIRE(third.join(60s));
    CHECK(third.exitcode() == broken_barrier);
    CHECK(barrier.broken());
    barrier.reset();
    CHECK(barrier.n_waiting() == 0);
    CHECK(child_count() == 0);
}

namespace {
std::size_t meet(mproc::Barrier barrier) { return barrier.wait(60s); }
int meet_or_broken(mproc::Barrier barrier) {
    try {
        barrier.wait();
        return 0;
    } catch (const mproc::BrokenBarrierError&) {
        return 1;
    }
}
}  // namespace

TEST_CASE("Barrier as a Pool task argument: its action runs in whichever process arrives last; abort reaches workers") {
    Watchdog dog(180s, "Barrier in Pool tasks");
    Globals globals;
    mproc::Barrier barrier(3, count_round);
    mproc::Barrier doomed(3);
    mproc::Pool pool(2);
    for (int round = 0; round < 5; ++round) {
        auto a = pool.apply_async(meet, std::tuple{barrier});
        auto b = pool.apply_async(meet, std::tuple{barrier});
        const std::size_t mine = barrier.wait(60s);
        CHECK(mine + a.get(60s) + b.get(60s) == 0 + 1 + 2);
        CHECK(g_actions->load() == round + 1);
        (*g_left)[static_cast<std::size_t>(round)] = 3;
    }
    CHECK(g_action_errors->load() == 0);
    // A worker's BrokenBarrierError comes back as itself.
    auto c = pool.apply_async(meet, std::tuple{doomed});
    auto d = pool.apply_async(meet_or_broken, std::tuple{doomed});
    REQUIRE(eventually([&] { return doomed.n_waiting() == 2; }));
    doomed.abort();
    CHECK_THROWS_AS(c.get(60s), mproc::BrokenBarrierError);
    CHECK(d.get(60s) == 1);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier: bad parties are an mproc::Error; a handle of a barrier decodes as itself only") {
    CHECK_THROWS_AS(mproc::Barrier(0), mproc::Error);
    CHECK_THROWS_AS(mproc::Barrier(1u << 20), mproc::Error);
    mproc::Barrier big(1000);  // past the small-object size: memory of its own
    CHECK(big.parties() == 1000);
    const auto bytes = mproc::to_bytes(big);
    CHECK(mproc::from_bytes<mproc::Barrier>(bytes).parties() == 1000);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Event>(bytes), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Barrier>(mproc::to_bytes(mproc::Event())), mproc::SerializationError);
    mproc::Barrier one(1, count_round);  // with no Globals: never waited on
    CHECK(one.parties() == 1);
    mproc::Barrier alone(1);
    CHECK(alone.wait() == 0);
    CHECK(alone.wait(0s) == 0);  // one party: never waits, never times out
}
