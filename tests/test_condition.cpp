// Condition across processes, threads and Pool tasks: notify, notify_all, timeouts, wait_for, an
// RLock's depth across a wait, misuse, a waiter or a notifier killed by SIGKILL, idle waiters, and
// the handle crossing processes.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/sync.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"
#include "test_pool_common.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;
using mproc_test::eventually;
using pool_test::Watchdog;

namespace {

/// True once `value` (read under the condition's lock) is `expected`: the processes that raise it
/// do so under the lock, right before they wait, so they are then all asleep in wait().
bool eventually_under(mproc::Condition& cond, mproc::Value<int>& value, int expected) {
    return eventually([&] {
        std::lock_guard g(cond);
        return value.load() == expected;
    });
}

/// A process that takes the condition's lock, counts itself in `waiting`, waits (without a
/// timeout unless given one) and counts itself in `woken` if notified.
mproc::Process waiter(mproc::Condition& cond, mproc::Value<int>& waiting, mproc::Value<int>& woken,
                      std::optional<mproc::Seconds> timeout = std::nullopt) {
    return mproc::Process([&cond, &waiting, &woken, timeout] {
        std::lock_guard g(cond);
        waiting += 1;
        if (cond.wait(timeout)) woken += 1;
    });
}

}  // namespace

TEST_CASE("Condition: notify wakes one waiter in another process, notify_all the rest") {
    Watchdog dog(180s, "Condition notify across processes");
    mproc::Condition cond;
    mproc::Value<int> waiting(0), woken(0);
    std::vector<mproc::Process> waiters;
    for (int i = 0; i < 3; ++i) waiters.push_back(waiter(cond, waiting, woken));
    for (auto& w : waiters) w.start();
    REQUIRE(eventually_under(cond, waiting, 3));
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    REQUIRE(eventually([&] { return woken.load() == 1; }));
    std::this_thread::sleep_for(200ms);  // room for a second, wrongful, wake-up to show
    CHECK(woken.load() == 1);
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    for (auto& w : waiters) {
        REQUIRE(w.join(60s));
        CHECK(w.exitcode() == 0);
    }
    CHECK(woken.load() == 3);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition: notify(n) wakes n waiters, and notifying nobody is harmless") {
    Watchdog dog(180s, "Condition notify(n)");
    mproc::Condition cond;
    {
        std::lock_guard g(cond);
        cond.notify();  // no waiter: nothing happens, nothing is remembered
        cond.notify_all();
    }
    mproc::Value<int> waiting(0), woken(0);
    std::vector<mproc::Process> waiters;
    for (int i = 0; i < 4; ++i) waiters.push_back(waiter(cond, waiting, woken, 60s));
    for (auto& w : waiters) w.start();
    REQUIRE(eventually_under(cond, waiting, 4));
    {
        std::lock_guard g(cond);
        cond.notify(3);
    }
    REQUIRE(eventually([&] { return woken.load() == 3; }));
    std::this_thread::sleep_for(200ms);
    CHECK(woken.load() == 3);
    {
        std::lock_guard g(cond);
        cond.notify(10);  // more than wait: wakes the one left
    }
    for (auto& w : waiters) REQUIRE(w.join(60s));
    CHECK(woken.load() == 4);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition::wait times out with false, holding the lock again; a notify in time makes it true") {
    Watchdog dog(180s, "Condition timeouts");
    mproc::Condition cond;
    {
        std::unique_lock g(cond);
        CHECK_FALSE(cond.wait(100ms));
        CHECK_FALSE(cond.wait(0s));
        // Still held by this thread: another cannot take it.
        std::thread probe([&] { CHECK_FALSE(cond.acquire(50ms)); });
        probe.join();
    }
    // The timed-out waits gave the lock back at the depth they found it: one release freed it.
    mproc::Process taker([&] {
        if (!cond.acquire(10s)) std::_Exit(1);
        cond.release();
        std::_Exit(0);
    });
    taker.start();
    REQUIRE(taker.join(60s));
    CHECK(taker.exitcode() == 0);

    mproc::Value<int> waiting(0), woken(0);
    mproc::Process in_time = waiter(cond, waiting, woken, 60s);
    in_time.start();
    REQUIRE(eventually_under(cond, waiting, 1));
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    REQUIRE(in_time.join(60s));
    CHECK(woken.load() == 1);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition::wait_for waits until a predicate over a Value holds, or times out with its last value") {
    Watchdog dog(180s, "Condition wait_for");
    mproc::Condition cond;
    mproc::Value<int> done(0);
    mproc::Event go;
    constexpr int producers = 4;
    std::vector<mproc::Process> children;
    for (int i = 0; i < producers; ++i)
        children.emplace_back([&] {
            go.wait();
            std::lock_guard g(cond);
            done += 1;
            cond.notify_all();
        });
    for (auto& c : children) c.start();
    {
        std::unique_lock g(cond);
        go.set();  // they cannot count before this thread waits: it holds the lock
        int evaluations = 0;
        CHECK(cond.wait_for(
            [&] {
                ++evaluations;
                return done.load() == producers;
            },
            60s));
        CHECK(done.load() == producers);
        CHECK(evaluations >= 2);  // checked before waiting, and again after each wake
        CHECK_FALSE(cond.wait_for([&] { return done.load() > producers; }, 50ms));
        CHECK(cond.wait_for([] { return true; }, 0s));  // true at once: no wait at all
    }
    for (auto& c : children) {
        REQUIRE(c.join(60s));
        CHECK(c.exitcode() == 0);
    }
    CHECK(child_count() == 0);
}

TEST_CASE("Condition over an RLock: wait gives up every hold and restores the depth") {
    Watchdog dog(180s, "Condition over an RLock");
    mproc::RLock rlock;
    mproc::Condition cond(rlock);
    mproc::Value<int> other_took_it(0);
    mproc::Event go;
    mproc::Process other([&] {
        go.wait();
        // Takes the lock while the parent waits at depth 3: only possible if all three were given up.
        if (!rlock.acquire(60s)) std::_Exit(1);
        other_took_it.store(1);
        cond.notify();
        rlock.release();
    });
    other.start();
    REQUIRE(rlock.acquire());
    REQUIRE(cond.acquire());  // the same lock
    REQUIRE(rlock.acquire());
    go.set();
    CHECK(cond.wait(60s));
    CHECK(other_took_it.load() == 1);
    // Held three times again: another thread cannot take it until all three are released.
    auto probe = [&] {
        bool got = false;
        std::thread t([&] {
            got = rlock.acquire(50ms);
            if (got) rlock.release();
        });
        t.join();
        return got;
    };
    rlock.release();
    rlock.release();
    CHECK_FALSE(probe());
    rlock.release();
    CHECK_THROWS_AS(rlock.release(), mproc::Error);  // exactly three holds came back
    CHECK(probe());
    REQUIRE(other.join(60s));
    CHECK(other.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition over a Lock or a Value's lock is that lock") {
    mproc::Lock lock;
    mproc::Condition cond(lock);
    cond.acquire();
    CHECK_FALSE(lock.try_lock());  // this thread holds it, through the condition
    CHECK_THROWS_AS(lock.acquire(), mproc::Error);
    lock.release();  // released through the lock itself
    CHECK_THROWS_AS(cond.notify(), mproc::Error);

    mproc::Value<long> v(0);
    mproc::Condition on_value(v.get_lock());
    mproc::Event go;
    mproc::Process setter([&] {
        go.wait();
        std::lock_guard g(v.get_lock());
        v.store(42);
        on_value.notify();
    });
    setter.start();
    {
        std::unique_lock g(on_value);
        go.set();
        CHECK(on_value.wait_for([&] { return v.load() == 42; }, 60s));
    }
    REQUIRE(setter.join(60s));
    CHECK(setter.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition: wait, wait_for, notify and notify_all without the lock are an mproc::Error and change nothing") {
    mproc::Condition cond;
    CHECK_THROWS_AS(cond.notify(), mproc::Error);
    CHECK_THROWS_AS(cond.notify_all(), mproc::Error);
    CHECK_THROWS_AS(cond.wait(10ms), mproc::Error);
    CHECK_THROWS_AS(cond.wait_for([] { return true; }, 10ms), mproc::Error);
    CHECK_THROWS_WITH(cond.notify(), Catch::Contains("does not hold"));
    // Held by another thread is not held by this one.
    cond.acquire();
    std::thread other([&] {
        CHECK_THROWS_AS(cond.notify(), mproc::Error);
        CHECK_THROWS_AS(cond.wait(10ms), mproc::Error);
    });
    other.join();
    cond.release();
    // Held by another process, likewise.
    mproc::Event held, done;
    mproc::Process holder([&] {
        cond.acquire();
        held.set();
        done.wait(60s);
        cond.release();
    });
    holder.start();
    REQUIRE(held.wait(60s));
    CHECK_THROWS_AS(cond.notify_all(), mproc::Error);
    done.set();
    REQUIRE(holder.join(60s));
    // Nothing changed: the condition works.
    std::unique_lock g(cond);
    CHECK_FALSE(cond.wait(10ms));
    CHECK(child_count() == 0);
}

TEST_CASE("Condition: a waiter killed by SIGKILL while it waits does not swallow notify(1) meant for a live one") {
    Watchdog dog(180s, "Condition with a dead waiter");
    mproc::Condition cond;
    mproc::Value<int> waiting(0), woken(0);
    // The victim waits first: notify wakes the longest waiting, so without the check for dead
    // waiters notify(1) would go to the victim and the live waiter would sleep on.
    mproc::Process victim = waiter(cond, waiting, woken);
    victim.start();
    REQUIRE(eventually_under(cond, waiting, 1));
    mproc::Process live = waiter(cond, waiting, woken);
    live.start();
    REQUIRE(eventually_under(cond, waiting, 2));
    victim.kill();
    REQUIRE(victim.join(60s));
    CHECK(victim.exitcode() == -SIGKILL);
    {
        std::lock_guard g(cond);
        cond.notify(1);
    }
    REQUIRE(live.join(60s));
    CHECK(live.exitcode() == 0);
    CHECK(woken.load() == 1);

    // Its place is free again: many more waiters than one come and go.
    std::vector<mproc::Process> more;
    for (int i = 0; i < 4; ++i) more.push_back(waiter(cond, waiting, woken));
    for (auto& w : more) w.start();
    REQUIRE(eventually_under(cond, waiting, 6));
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    for (auto& w : more) REQUIRE(w.join(60s));
    CHECK(woken.load() == 5);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition: a notifier killed holding the lock is recovered like a Lock's holder (owner_died)") {
    Watchdog dog(180s, "Condition with a dead notifier");
    mproc::Condition cond;
    mproc::Value<int> waiting(0), woken(0), waiter_saw_owner_died(-1);
    mproc::Process sleeper([&] {
        std::lock_guard g(cond);
        waiting += 1;
        if (cond.wait()) woken += 1;
        waiter_saw_owner_died.store(cond.owner_died() ? 1 : 0);
    });
    sleeper.start();
    REQUIRE(eventually_under(cond, waiting, 1));
    mproc::Event notified;
    mproc::Process notifier([&] {
        cond.acquire();
        cond.notify();
        notified.set();
        while (true) ::pause();  // dies holding the lock
    });
    notifier.start();
    REQUIRE(notified.wait(60s));
    notifier.kill();
    REQUIRE(notifier.join(60s));
    // The notified waiter takes the lock back from the dead notifier, and is told.
    REQUIRE(sleeper.join(60s));
    CHECK(sleeper.exitcode() == 0);
    CHECK(woken.load() == 1);
    CHECK(waiter_saw_owner_died.load() == 1);
    // A notifier that dies holding it with nobody waiting: the next acquire is told too.
    mproc::Process holder([&] {
        cond.acquire();
        std::_Exit(0);
    });
    holder.start();
    REQUIRE(holder.join(60s));
    REQUIRE(cond.acquire(10s));
    CHECK(cond.owner_died());
    cond.release();
    CHECK_FALSE(cond.owner_died());
    CHECK(child_count() == 0);
}

namespace {
int wait_for_flag(mproc::Condition cond, mproc::Value<int> flag, mproc::Value<int> waiting) {
    std::unique_lock g(cond);
    waiting += 1;
    return cond.wait_for([&] { return flag.load() != 0; }, 60s) ? flag.load() : -1;
}
void set_flag_and_notify(mproc::Condition cond, mproc::Value<int> flag, int value) {
    std::lock_guard g(cond);
    flag.store(value);
    cond.notify_all();
}
bool timed_wait(mproc::Condition cond) {
    std::lock_guard g(cond);
    return cond.wait(50ms);
}
}  // namespace

TEST_CASE("Condition as a Pool task argument: tasks wait for the parent, and the parent for a task") {
    Watchdog dog(180s, "Condition in Pool tasks");
    mproc::Condition cond;
    mproc::Value<int> flag(0), waiting(0);
    mproc::Pool pool(2);
    auto a = pool.apply_async(wait_for_flag, std::tuple{cond, flag, waiting});
    auto b = pool.apply_async(wait_for_flag, std::tuple{cond, flag, waiting});
    REQUIRE(eventually_under(cond, waiting, 2));
    {
        std::lock_guard g(cond);
        flag.store(7);
        cond.notify_all();
    }
    CHECK(a.get(60s) == 7);
    CHECK(b.get(60s) == 7);
    CHECK_FALSE(pool.apply(timed_wait, cond));

    flag.store(0);
    {
        std::unique_lock g(cond);
        auto set = pool.apply_async(set_flag_and_notify, std::tuple{cond, flag, 9});
        CHECK(cond.wait_for([&] { return flag.load() == 9; }, 60s));
        g.unlock();
        set.get(60s);
    }
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("Condition: threads of one process wait and are notified too, up to 255 at once") {
    Watchdog dog(180s, "Condition with 255 threads");
    mproc::Condition cond;
    mproc::Value<int> waiting(0), woken(0);
    constexpr int capacity = 255;
    std::vector<std::thread> threads;
    for (int t = 0; t < capacity; ++t)
        threads.emplace_back([&] {
            std::lock_guard g(cond);
            waiting += 1;
            if (cond.wait(120s)) woken += 1;
        });
    REQUIRE(eventually_under(cond, waiting, capacity));
    {
        std::lock_guard g(cond);
        // One more is refused, clearly, with the lock still held and nothing changed.
        CHECK_THROWS_WITH(cond.wait(1s), Catch::Contains("255 threads already wait"));
        cond.notify(5);
    }
    REQUIRE(eventually([&] { return woken.load() == 5; }));
    {
        std::lock_guard g(cond);
        cond.notify_all();
    }
    for (auto& t : threads) t.join();
    CHECK(woken.load() == capacity);
}

TEST_CASE("Condition: a process waiting uses no CPU") {
    mproc::Condition cond;
    mproc::Value<int> waiting(0), woken(0);
    mproc::Process w = waiter(cond, waiting, woken);
    w.start();
    REQUIRE(eventually_under(cond, waiting, 1));
    std::this_thread::sleep_for(200ms);
    const long before = mproc_test::cpu_ticks(w.pid());
    std::this_thread::sleep_for(1s);
    const long used = mproc_test::cpu_ticks(w.pid()) - before;
    INFO("the waiter used " << used << " ticks over an idle second");
    CHECK(used <= 10);  // a spinning waiter would use about 100
    CHECK(w.is_alive());
    {
        std::lock_guard g(cond);
        cond.notify();
    }
    REQUIRE(w.join(60s));
    CHECK(woken.load() == 1);
    CHECK(child_count() == 0);
}

TEST_CASE("Condition handles: copies, a Pipe and bytes refer to the same condition and lock; a wrong type is refused") {
    Watchdog dog(180s, "Condition handles");
    mproc::Lock lock;
    mproc::Condition over_lock(lock);
    mproc::Condition own;
    using Pair = std::tuple<mproc::Condition, mproc::Condition>;
    auto [parent_end, child_end] = mproc::Pipe<Pair>();
    mproc::Value<int> ready(0);
    mproc::Process child([&] {
        auto [a, b] = child_end.recv();
        std::unique_lock g(b);
        ready.store(1);
        b.notify();
        b.wait_for([&] { return ready.load() == 2; }, 60s);
        g.unlock();
        std::_Exit(a.acquire(60s) ? 0 : 1);  // the parent's Lock, through the decoded Condition
    });
    child.start();
    lock.acquire();
    parent_end.send(Pair{over_lock, own});
    {
        std::unique_lock g(own);
        CHECK(own.wait_for([&] { return ready.load() == 1; }, 60s));
        ready.store(2);
        own.notify();
    }
    lock.release();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);

    const auto bytes = mproc::to_bytes(own);
    mproc::Condition back = mproc::from_bytes<mproc::Condition>(bytes);
    back.acquire();
    std::thread other([&] { CHECK_FALSE(own.try_lock()); });  // the same RLock: held by this thread
    other.join();
    back.release();
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Lock>(bytes), mproc::Error);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Condition>(mproc::to_bytes(lock)), mproc::Error);
    CHECK(child_count() == 0);
}
