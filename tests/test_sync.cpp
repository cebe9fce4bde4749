// Lock, RLock, Semaphore, Event, Barrier, Value and Array across processes: mutual exclusion,
// timeouts, robustness against a holder killed by SIGKILL, and handles crossing processes.
#include <catch2/catch.hpp>
#include <mproc/guard.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/sync.hpp>
#include <mproc/wait.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <sys/mman.h>
#include <sys/socket.h>
#include <thread>
#include <tuple>
#include <vector>

#include "fork_under_lock.hpp"
#include "shm_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;
using mproc_test::eventually;

namespace {

/// Starts `n` processes running `body(i)` and joins them all; each must exit with 0.
template <class Body> void run_processes(int n, Body body) {
    std::vector<mproc::Process> processes;
    for (int i = 0; i < n; ++i) processes.emplace_back([&body, i] { body(i); });
    for (auto& p : processes) p.start();
    for (auto& p : processes) {
        REQUIRE(p.join(120s));
        CHECK(p.exitcode() == 0);
    }
}

}  // namespace

namespace {
int seven_when_set(mproc::Event go) {
    go.wait();
    return 7;
}
}  // namespace

TEST_CASE("A timeout of NaN seconds is an mproc::Error that changes nothing in any timed call") {
    // Python refuses it (ValueError); converted to clock ticks it was undefined behaviour, and in
    // practice a deadline far in the past (and, for Process::join, a signed overflow).
    const mproc::Seconds nan{std::numeric_limits<double>::quiet_NaN()};
    const auto refused = Catch::Matchers::Contains("NaN");

    mproc::Queue<int> q(1);
    CHECK_THROWS_WITH(q.get(nan), refused);
    q.put(1);
    CHECK_THROWS_WITH(q.put(2, nan), refused);
    CHECK(q.qsize() == 1);
    CHECK(q.get(0s) == 1);

    mproc::Lock lock;
    CHECK_THROWS_WITH(lock.acquire(nan), refused);
    CHECK(lock.acquire(0s));  // not taken by the refused call
    mproc::Condition cond(lock);
    CHECK_THROWS_WITH(cond.wait(nan), refused);
    lock.release();  // still held by this thread: the refused wait did not let it go
    CHECK_THROWS_AS(lock.release(), mproc::Error);

    mproc::Semaphore sem(1);
    CHECK_THROWS_WITH(sem.acquire(nan), refused);
    CHECK(sem.get_value() == 1);
    mproc::Event event;
    CHECK_THROWS_WITH(event.wait(nan), refused);
    CHECK_THROWS_WITH(mproc::Barrier(2, nullptr, nan), refused);
    mproc::Barrier barrier(2);
    CHECK_THROWS_WITH(barrier.wait(nan), refused);
    CHECK(barrier.n_waiting() == 0);  // no arrival counted
    CHECK_FALSE(barrier.broken());

    auto [reader, writer] = mproc::Pipe<int>(false);
    writer.send(5);
    CHECK_THROWS_WITH(reader.poll(nan), refused);
    CHECK_THROWS_WITH(mproc::wait({reader}, nan), refused);
    CHECK(reader.recv() == 5);

    mproc::Process child([] {});
    child.start();
    CHECK_THROWS_WITH(child.join(nan), refused);
    REQUIRE(child.join(120s));
    CHECK(child.exitcode() == 0);
    CHECK_THROWS_WITH(child.join(nan), refused);  // refused the same once it is joined

    mproc::Event go;
    mproc::Pool pool(1);
    auto result = pool.apply_async(seven_when_set, std::tuple{go});
    CHECK_THROWS_WITH(result.wait(nan), refused);
    CHECK_THROWS_WITH(result.get(nan), refused);
    go.set();
    CHECK(result.get(120s) == 7);
    CHECK_THROWS_WITH(result.get(nan), refused);  // refused the same once the result is here
    pool.close();
    CHECK_THROWS_WITH(pool.join(nan), refused);
    CHECK(pool.join(120s));

    CHECK_THROWS_WITH(mproc::ChildGuard(nan), refused);
}

TEST_CASE("Lock gives processes mutual exclusion") {
    mproc::Lock lock;
    mproc::Array<long> counter(1);
    run_processes(4, [&](int) {
        for (int i = 0; i < 20000; ++i) {
            std::lock_guard guard(lock);
            const long v = counter[0];  // a deliberately non-atomic read-modify-write
            counter[0] = v + 1;
        }
    });
    CHECK(counter[0] == 80000);
    CHECK(child_count() == 0);
}

TEST_CASE("Lock::try_lock_until a time point at the end of its clock's range does not overflow") {
    // Subtracted in the clock's integer ticks, time_point::min() less now overflowed to a wait of
    // centuries, and seconds::max() in nanoseconds overflowed as well.
    mproc::Lock lock;
    CHECK(lock.try_lock_until(std::chrono::time_point<std::chrono::system_clock, std::chrono::seconds>::max()));
    lock.release();
    lock.acquire();  // held here: the attempt from another thread only tries, and gives up
    auto attempt = std::async(std::launch::async,
                              [&lock] { return lock.try_lock_until(std::chrono::steady_clock::time_point::min()); });
    const bool returned = attempt.wait_for(60s) == std::future_status::ready;
    lock.release();  // lets a hung attempt end
    REQUIRE(returned);
    CHECK_FALSE(attempt.get());
}

TEST_CASE("Lock::acquire with a timeout fails while another process holds it") {
    mproc::Lock lock;
    mproc::Event held, done;
    mproc::Process holder([&] {
        lock.acquire();
        held.set();
        done.wait(60s);
        lock.release();
    });
    holder.start();
    REQUIRE(held.wait(60s));
    CHECK_FALSE(lock.acquire(100ms));
    CHECK_FALSE(lock.try_lock());
    done.set();
    CHECK(lock.acquire(60s));
    CHECK_FALSE(lock.owner_died());
    lock.release();
    REQUIRE(holder.join(60s));
    CHECK(holder.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Lock: a holder killed by SIGKILL does not block the others") {
    mproc::Lock lock;
    mproc::Event held;
    mproc::Value<int> waiter_saw_owner_died(-1);
    mproc::Process holder([&] {
        lock.acquire();
        held.set();
        while (true) ::pause();
    });
    holder.start();
    REQUIRE(held.wait(60s));
    // A second process already blocked in acquire() is woken by the holder's death.
    mproc::Event waiting;
    mproc::Process waiter([&] {
        waiting.set();
        if (!lock.acquire()) std::_Exit(3);
        waiter_saw_owner_died.store(lock.owner_died() ? 1 : 0);
        lock.release();
    });
    waiter.start();
    REQUIRE(waiting.wait(60s));
    std::this_thread::sleep_for(50ms);  // let it reach the lock (either order is a valid test)
    holder.kill();
    REQUIRE(holder.join(60s));
    REQUIRE(waiter.join(60s));
    CHECK(waiter.exitcode() == 0);
    CHECK(waiter_saw_owner_died.load() == 1);
    // The waiter released it properly: the flag is gone and the lock is free.
    CHECK(lock.acquire(10s));
    CHECK_FALSE(lock.owner_died());
    lock.release();
    CHECK(child_count() == 0);
}

TEST_CASE("A robust lock's waiter whose wake-up was lost (its waker died first) still gets the lock") {
    // The state a lost wake-up leaves, made on purpose: the holder frees the futex word without
    // waking the one asleep on it — as when the waiter it woke is killed before retaking the lock,
    // or the holder between its unlock and its wake. (glibc keeps that word in __data.__lock; a
    // RobustMutex is a pthread_mutex_t and nothing else.)
    static_assert(sizeof(mproc::detail::RobustMutex) == sizeof(pthread_mutex_t));
    void* memory = ::mmap(nullptr, sizeof(mproc::detail::RobustMutex), PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(memory != MAP_FAILED);
    auto* mutex = new (memory) mproc::detail::RobustMutex;
    mutex->init();
    mproc::Event held;
    mproc::Event go;
    mproc::Process holder([&] {
        if (!mproc::detail::holds(mutex->lock())) std::_Exit(2);
        held.set();
        if (!go.wait(120s)) std::_Exit(3);
        auto* raw = reinterpret_cast<pthread_mutex_t*>(mutex);
        __atomic_store_n(&raw->__data.__lock, 0, __ATOMIC_RELEASE);  // free, and no wake
        std::_Exit(0);  // its robust list names the mutex, but the word no longer names it
    });
    holder.start();
    REQUIRE(held.wait(60s));
    mproc::Process waiter([&] {
        if (!mproc::detail::holds(mutex->lock())) std::_Exit(2);
        std::_Exit(mutex->unlock() ? 0 : 4);
    });
    waiter.start();
    // The waiter is asleep on the futex word (the first field of the mutex) when its syscall is
    // futex (202) on that address.
    char wanted[64];
    std::snprintf(wanted, sizeof wanted, "202 0x%lx ",
                  static_cast<unsigned long>(reinterpret_cast<std::uintptr_t>(memory)));
    REQUIRE(eventually(
        [&] {
            std::ifstream syscall("/proc/" + std::to_string(waiter.pid()) + "/syscall");
            std::string line;
            std::getline(syscall, line);
            return line.rfind(wanted, 0) == 0;
        },
        60s));
    go.set();
    REQUIRE(holder.join(60s));
    CHECK(holder.exitcode() == 0);
    const bool joined = waiter.join(60s);  // a lost wake-up costs at most recheck_interval()
    if (!joined) waiter.kill();
    REQUIRE(joined);
    CHECK(waiter.exitcode() == 0);
    ::munmap(memory, sizeof(mproc::detail::RobustMutex));
    CHECK(child_count() == 0);
}

TEST_CASE("Lock: the next acquire after a holder's death returns true with owner_died() until release") {
    mproc::Lock lock;
    mproc::Process holder([&] {
        lock.acquire();
        std::_Exit(0);  // leaves without releasing
    });
    holder.start();
    REQUIRE(holder.join(60s));
    CHECK(lock.acquire(10s));
    CHECK(lock.owner_died());
    lock.release();
    CHECK_FALSE(lock.owner_died());
    {
        std::lock_guard guard(lock);
        CHECK_FALSE(lock.owner_died());
    }
    CHECK(child_count() == 0);
}

TEST_CASE("Lock refuses to deadlock its own thread and to be released by a non-holder") {
    mproc::Lock lock;
    CHECK_THROWS_AS(lock.release(), mproc::Error);
    lock.acquire();
    CHECK_FALSE(lock.acquire(50ms));
    CHECK_FALSE(lock.try_lock());
    CHECK_THROWS_AS(lock.acquire(), mproc::Error);
    std::thread other([&] { CHECK_THROWS_AS(lock.release(), mproc::Error); });
    other.join();
    lock.release();
    CHECK(lock.try_lock());
    lock.unlock();
}

TEST_CASE("RLock is recursive for its holder and exclusive for others") {
    mproc::RLock rlock;
    REQUIRE(rlock.acquire());
    REQUIRE(rlock.acquire());
    mproc::Value<int> other_got(-1);
    auto probe = [&] {
        mproc::Process other([&] { other_got.store(rlock.acquire(50ms) ? 1 : 0); });
        other.start();
        REQUIRE(other.join(60s));
        return other_got.load();
    };
    CHECK(probe() == 0);
    rlock.release();
    CHECK(probe() == 0);  // still held once
    rlock.release();
    CHECK(probe() == 1);  // that child took it and exited holding it...
    CHECK(rlock.acquire(10s));
    CHECK(rlock.owner_died());  // ...so the next holder learns it
    CHECK(rlock.acquire());
    rlock.release();
    CHECK(rlock.owner_died());  // until it releases its last hold
    rlock.release();
    CHECK_FALSE(rlock.owner_died());
    CHECK_THROWS_AS(rlock.release(), mproc::Error);
    CHECK(child_count() == 0);
}

TEST_CASE("Semaphore bounds how many processes hold it at once") {
    mproc::Semaphore sem(2);
    mproc::Value<int> inside(0), most(0);
    run_processes(6, [&](int) {
        for (int i = 0; i < 200; ++i) {
            std::lock_guard guard(sem);
            const int now = (inside += 1);
            {
                std::lock_guard g(most.get_lock());
                if (now > most.load()) most.store(now);
            }
            std::this_thread::yield();
            inside -= 1;
        }
    });
    CHECK(most.load() >= 1);
    CHECK(most.load() <= 2);
    CHECK(inside.load() == 0);
    CHECK(sem.get_value() == 2);
    CHECK(child_count() == 0);
}

TEST_CASE("Semaphore: acquire times out at zero and a release in another process wakes a waiter") {
    mproc::Semaphore sem(0);
    CHECK_FALSE(sem.acquire(50ms));
    CHECK_FALSE(sem.try_lock());
    mproc::Process releaser([&] {
        std::this_thread::sleep_for(20ms);
        sem.release();
    });
    releaser.start();
    CHECK(sem.acquire(60s));
    REQUIRE(releaser.join(60s));
    sem.release(3);
    CHECK(sem.get_value() == 3);

    mproc::BoundedSemaphore bounded(1);
    bounded.acquire();
    bounded.release();
    CHECK_THROWS_AS(bounded.release(), mproc::Error);
    CHECK(child_count() == 0);
}

TEST_CASE("A negative Semaphore value or a release of fewer than one unit is an mproc::Error") {
    // Taken as unsigned 32-bit numbers, -1 became 4294967295 units (Python: ValueError).
    CHECK_THROWS_WITH(mproc::Semaphore(-1), Catch::Matchers::Contains("initial value"));
    CHECK_THROWS_WITH(mproc::BoundedSemaphore(-1), Catch::Matchers::Contains("initial value"));
    CHECK_THROWS_AS(mproc::Semaphore(std::int64_t{1} << 32), mproc::Error);
    mproc::Semaphore sem(0);
    CHECK_THROWS_AS(sem.release(-1), mproc::Error);
    CHECK_THROWS_AS(sem.release(0), mproc::Error);
    CHECK(sem.get_value() == 0);
    CHECK_FALSE(sem.acquire(0s));
    sem.release();
    CHECK(sem.get_value() == 1);
}

TEST_CASE("Value: integer arithmetic wraps past the type's range, as the atomic does") {
    // fetch_add wraps; the new value was then computed again as old + n in T, a signed overflow.
    mproc::Value<int> v(std::numeric_limits<int>::max());
    CHECK((v += 1) == std::numeric_limits<int>::min());
    CHECK(v.load() == std::numeric_limits<int>::min());
    CHECK(v-- == std::numeric_limits<int>::min());
    CHECK(v.load() == std::numeric_limits<int>::max());
    CHECK(v++ == std::numeric_limits<int>::max());
    CHECK((v -= std::numeric_limits<int>::min()) == 0);
    mproc::Value<long long> big(std::numeric_limits<long long>::min());
    CHECK(--big == std::numeric_limits<long long>::max());
}

TEST_CASE("Semaphore::release past the 32-bit value is an mproc::Error, never a silent wrap-around") {
    constexpr std::uint32_t max = 0xFFFFFFFFu;
    mproc::BoundedSemaphore bounded(2);
    CHECK_THROWS_AS(bounded.release(max), mproc::Error);  // 2 + 0xFFFFFFFF wraps to 1 in 32 bits
    CHECK(bounded.get_value() == 2);
    bounded.acquire();
    CHECK_THROWS_AS(bounded.release(max), mproc::Error);
    CHECK_THROWS_AS(bounded.release(2), mproc::Error);    // the bound, as before
    CHECK(bounded.get_value() == 1);
    bounded.release(1);
    CHECK(bounded.get_value() == 2);

    mproc::Semaphore sem(5);
    CHECK_THROWS_AS(sem.release(max), mproc::Error);
    CHECK(sem.get_value() == 5);
    sem.release(max - 5);  // up to the largest value is fine
    CHECK(sem.get_value() == max);
    CHECK_THROWS_AS(sem.release(), mproc::Error);
    CHECK(sem.get_value() == max);
    CHECK(sem.acquire(0s));
    CHECK(sem.get_value() == max - 1);
    // An overflow attempted in another process fails there and changes nothing here either.
    mproc::Process child([&] {
        std::_Exit(sem.get_value() == max - 1 &&
                           [&] {
                               try {
                                   sem.release(2);
                               } catch (const mproc::Error&) {
                                   return true;
                               }
                               return false;
                           }()
                       ? 0
                       : 1);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    CHECK(sem.get_value() == max - 1);
    CHECK(child_count() == 0);
}

TEST_CASE("Event: waiters in other processes see set(); wait times out while clear") {
    mproc::Event ev;
    CHECK_FALSE(ev.is_set());
    CHECK_FALSE(ev.wait(50ms));
    mproc::Value<int> woken(0);
    std::vector<mproc::Process> waiters;
    for (int i = 0; i < 3; ++i)
        waiters.emplace_back([&] {
            if (ev.wait(60s)) woken += 1;
        });
    for (auto& w : waiters) w.start();
    std::this_thread::sleep_for(20ms);
    ev.set();
    CHECK(ev.is_set());
    for (auto& w : waiters) REQUIRE(w.join(60s));
    CHECK(woken.load() == 3);
    CHECK(ev.wait(0s));
    ev.clear();
    CHECK_FALSE(ev.is_set());
    CHECK_FALSE(ev.wait(20ms));
    CHECK(child_count() == 0);
}

TEST_CASE("Event: a waiter asleep through set() and clear() still returns true") {
    mproc::Event ev, asleep;
    mproc::Value<int> result(-1);
    mproc::Process waiter([&] {
        asleep.set();
        result.store(ev.wait(60s) ? 1 : 0);
    });
    waiter.start();
    REQUIRE(asleep.wait(60s));
    std::this_thread::sleep_for(50ms);
    ev.set();
    ev.clear();
    REQUIRE(waiter.join(60s));
    CHECK(result.load() == 1);
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier holds processes until all arrive, round after round") {
    constexpr int parties = 4, rounds = 100;
    mproc::Barrier barrier(parties);
    mproc::Array<int> reached(parties);
    mproc::Value<int> errors(0), index_sum(0);
    run_processes(parties, [&](int me) {
        for (int round = 0; round < rounds; ++round) {
            std::atomic_ref<int>(reached[me]).store(round + 1);
            const std::size_t index = barrier.wait(60s);
            index_sum += static_cast<int>(index);
            // Past the barrier, everyone has reached this round.
            for (int other = 0; other < parties; ++other)
                if (std::atomic_ref<int>(reached[other]).load() < round + 1) errors += 1;
            barrier.wait(60s);  // keeps the next round's writes after everyone's check
        }
    });
    CHECK(errors.load() == 0);
    CHECK(index_sum.load() == rounds * (0 + 1 + 2 + 3));
    CHECK(barrier.n_waiting() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Barrier::wait that times out breaks the barrier (BrokenBarrierError, as Python) until reset()") {
    mproc::Barrier barrier(2);
    CHECK_THROWS_AS(barrier.wait(50ms), mproc::BrokenBarrierError);
    CHECK(barrier.n_waiting() == 0);
    CHECK(barrier.broken());
    CHECK_THROWS_AS(barrier.wait(60s), mproc::BrokenBarrierError);  // broken: no wait at all
    barrier.reset();
    mproc::Process other([&] { barrier.wait(60s); });
    other.start();
    CHECK_NOTHROW(barrier.wait(60s));
    REQUIRE(other.join(60s));
    CHECK(other.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Value: atomic += from 8 processes loses nothing") {
    mproc::Value<long> counter(0);
    run_processes(8, [&](int) {
        for (int i = 0; i < 100000; ++i) counter += 1;
    });
    CHECK(counter.load() == 800000);
    CHECK(child_count() == 0);
}

TEST_CASE("Value: load, store, arithmetic and get_lock for compound updates") {
    mproc::Value<long> v(5);
    CHECK(v.load() == 5);
    v.store(7);
    CHECK(static_cast<long>(v) == 7);
    CHECK((v += 3) == 10);
    CHECK((v -= 4) == 6);
    CHECK(++v == 7);
    CHECK(v++ == 7);
    CHECK(v.load() == 8);
    CHECK(v.exchange(1) == 8);
    long expected = 1;
    CHECK(v.compare_exchange(expected, 2));
    CHECK(v.value() == 2);

    mproc::Value<double> d(0.5);
    run_processes(2, [&](int) {
        for (int i = 0; i < 1000; ++i) d += 0.25;
    });
    CHECK(d.load() == 500.5);

    // x = 2x + 1 is two steps: only the lock makes it atomic.
    mproc::Value<long> x(0);
    run_processes(4, [&](int) {
        for (int i = 0; i < 1000; ++i) {
            std::lock_guard guard(x.get_lock());
            x.store(x.load() % 1000003 * 2 + 1);
        }
    });
    long model = 0;
    for (int i = 0; i < 4000; ++i) model = model % 1000003 * 2 + 1;
    CHECK(x.load() == model);

    struct Pair {
        double a;
        long b;
        char tag[40];
    };
    mproc::Value<Pair> big(Pair{1.0, 2, "x"});  // no lock-free atomics: guarded internally
    big.store(Pair{3.0, 4, "y"});
    CHECK(big.load().b == 4);
    CHECK(child_count() == 0);
}

TEST_CASE("Array is zero-initialised and shared") {
    mproc::Array<double> arr(1000);
    CHECK(arr.size() == 1000);
    for (std::size_t i = 0; i < arr.size(); ++i) REQUIRE(arr[i] == 0.0);
    arr[3] = 1.5;
    run_processes(4, [&](int me) {
        for (std::size_t i = static_cast<std::size_t>(me); i < 1000; i += 4)
            if (i != 3) arr[i] = static_cast<double>(i) * 2;
    });
    CHECK(arr[3] == 1.5);
    for (std::size_t i = 0; i < 1000; ++i)
        if (i != 3) REQUIRE(arr[i] == static_cast<double>(i) * 2);
    CHECK_THROWS_AS(arr.at(1000), mproc::Error);

    mproc::Array<int> init{1, 2, 3};
    CHECK(init.size() == 3);
    CHECK(init[2] == 3);
    mproc::Array<long> big(1 << 20);  // past the small-object size: a segment of its own
    big[(1 << 20) - 1] = 9;
    run_processes(1, [&](int) { big[0] = big[(1 << 20) - 1] + 1; });
    CHECK(big[0] == 10);
    { std::lock_guard guard(arr.get_lock()); }
    CHECK(child_count() == 0);
}

template <class T> constexpr bool has_get_lock = requires(T& t) { t.get_lock(); };

TEST_CASE("RawValue and RawArray: the shared memory of Value and Array without a lock, synchronised by the processes") {
    static_assert(has_get_lock<mproc::Value<long>> && has_get_lock<mproc::Array<int>>);
    static_assert(!has_get_lock<mproc::RawValue<long>> && !has_get_lock<mproc::RawArray<int>>, "no lock: lock=False");
    mproc::RawValue<long> total(5);
    mproc::RawArray<int> slots(8);
    mproc::Lock lock;  // the processes' own
    // The plain load-then-store under the Lock and the lock-free adds must not overlap: a process
    // already adding would have an add overwritten by another's store still under the Lock. All
    // four finish the locked phase before any adds.
    mproc::Barrier locked_phase_done(4);
    CHECK(total.load() == 5);
    CHECK(total.value() == 5);
    CHECK(slots.size() == 8);
    for (const int x : slots) REQUIRE(x == 0);
    run_processes(4, [&](int me) {
        for (int i = 0; i < 10000; ++i) {
            std::lock_guard g(lock);
            total.store(total.load() + 1);  // two plain steps, made one by the Lock
        }
        slots[static_cast<std::size_t>(me)] = me + 1;  // each its own element
        locked_phase_done.wait();
        for (int i = 0; i < 1000; ++i) std::atomic_ref<long>(total.get()).fetch_add(1);
    });
    CHECK(total.load() == 5 + 40000 + 4000);
    for (std::size_t i = 0; i < 8; ++i) CHECK(slots[i] == (i < 4 ? static_cast<int>(i) + 1 : 0));
    total = 1;
    CHECK(static_cast<long>(total) == 1);
    total.get() = 2;
    CHECK(total.load() == 2);

    mproc::RawArray<double> init{1.5, 2.5};
    CHECK(init.size() == 2);
    CHECK(init.at(1) == 2.5);
    CHECK_THROWS_AS(init.at(2), mproc::Error);
    double sum = 0;
    for (const double x : init.span()) sum += x;
    CHECK(sum == 4.0);
    mproc::RawArray<long> big(1 << 20);  // past the small-object size: a segment of its own
    big[(1 << 20) - 1] = 9;
    run_processes(1, [&](int) { big[0] = big[(1 << 20) - 1] + 1; });
    CHECK(big[0] == 10);

    // Handles: copies and bytes refer to the same memory; a Value is not a RawValue.
    mproc::RawValue<long> copy = total;
    copy.store(3);
    CHECK(total.load() == 3);
    const auto bytes = mproc::to_bytes(total);
    CHECK(mproc::from_bytes<mproc::RawValue<long>>(bytes).load() == 3);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Value<long>>(bytes), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::RawValue<long>>(mproc::to_bytes(mproc::Value<long>(1))),
                    mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Array<int>>(mproc::to_bytes(slots)), mproc::SerializationError);
    CHECK(mproc::from_bytes<mproc::RawArray<int>>(mproc::to_bytes(slots))[3] == 4);
    mproc::RawArray<int> moved = std::move(slots);
    CHECK(moved[0] == 1);
    CHECK(child_count() == 0);
}

TEST_CASE("Copies and moves of handles") {
    mproc::Value<int> a(1);
    mproc::Value<int> b = a;  // the same value
    b += 1;
    CHECK(a.load() == 2);
    mproc::Value<int> c = std::move(b);
    c += 1;
    CHECK(a.load() == 3);
    CHECK_THROWS_AS(b.load(), mproc::Error);  // NOLINT: a moved-from handle is empty
    mproc::Lock l1;
    mproc::Lock l2 = l1;
    CHECK(l1 == l2);
    l1.acquire();
    CHECK_FALSE(l2.try_lock());  // same lock, same thread: held
    l2.release();
}

TEST_CASE("Handles cross a Pipe and refer to the same objects") {
    mproc::Lock lock;
    mproc::Value<long> value(0);
    mproc::Array<int> arr(10);
    mproc::Event ev;
    mproc::Semaphore sem(0);
    mproc::Barrier barrier(2);
    using Bundle = std::tuple<mproc::Lock, mproc::Value<long>, mproc::Array<int>, mproc::Event, mproc::Semaphore,
                              mproc::Barrier>;
    auto [parent_end, child_end] = mproc::Pipe<Bundle>();
    mproc::Process child([&] {
        Bundle got = child_end.recv();
        auto& [l, v, a, e, s, b] = got;
        std::lock_guard guard(l);
        v += 41;
        a[9] = 7;
        s.release();
        b.wait(60s);
        e.set();
    });
    child.start();
    parent_end.send(Bundle{lock, value, arr, ev, sem, barrier});
    CHECK(sem.acquire(60s));
    barrier.wait(60s);
    CHECK(ev.wait(60s));
    REQUIRE(child.join(60s));
    CHECK(value.load() == 41);
    CHECK(arr[9] == 7);
    CHECK(child_count() == 0);
}

TEST_CASE("A handle decoded as the wrong type is a SerializationError") {
    mproc::Value<long> v(1);
    const auto bytes = mproc::to_bytes(v);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Value<int>>(bytes), mproc::SerializationError);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Lock>(bytes), mproc::SerializationError);
    CHECK(mproc::from_bytes<mproc::Value<long>>(bytes).load() == 1);
    std::vector<std::byte> junk(16, std::byte{0x5a});
    CHECK_THROWS_AS(mproc::from_bytes<mproc::Lock>(junk), mproc::Error);
}

namespace {
void send_fd(int socket, std::uint64_t id, int fd) {
    msghdr msg{};
    iovec iov{&id, sizeof id};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
    REQUIRE(::sendmsg(socket, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof id));
}
std::pair<std::uint64_t, int> recv_fd(int socket) {
    std::uint64_t id = 0;
    msghdr msg{};
    iovec iov{&id, sizeof id};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    if (::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC) != static_cast<ssize_t>(sizeof id)) return {0, -1};
    int fd = -1;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (c && c->cmsg_type == SCM_RIGHTS) std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return {id, fd};
}
}  // namespace

TEST_CASE("An object created after a process was forked: a clear Error there, unless its memory is adopted") {
    int sockets[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockets) == 0);
    auto [to_child, from_parent] = mproc::Pipe<std::vector<std::byte>>();
    mproc::Value<int> verdict(0);  // created before the fork: the child reports through it
    const std::uint64_t generation = mproc::detail::segments().generation();
    mproc::Process early([&] {
        const auto handle = from_parent.recv();
        try {
            (void)mproc::from_bytes<mproc::Array<long>>(handle);
            verdict.store(1);  // unexpectedly decoded
        } catch (const mproc::SerializationError&) {
            verdict.store(2);
        } catch (const mproc::Error& e) {
            const std::string what = e.what();
            verdict.store(what.find("create it before the process that uses it") != std::string::npos ? 3 : 4);
        }
        while (verdict.load() != 5) std::this_thread::sleep_for(1ms);
        // The parent sent the memory itself: now the same handle decodes.
        for (;;) {
            auto [id, fd] = recv_fd(sockets[1]);
            if (fd < 0) break;
            mproc::detail::segments().adopt(id, mproc::detail::UniqueFd(fd));
        }
        auto late = mproc::from_bytes<mproc::Array<long>>(handle);
        late[0] += 100;
        verdict.store(6);
    });
    early.start();
    // Created after `early` was forked, and big enough for a segment of its own (small objects
    // share chunks, and a chunk that predates the fork would already be there).
    mproc::Array<long> late(100000);
    late[0] = 1;
    to_child.send(mproc::to_bytes(late));
    REQUIRE(eventually([&] { return verdict.load() != 0; }));
    CHECK(verdict.load() == 3);
    const auto fresh = mproc::detail::segments().segments_since(generation);
    CHECK_FALSE(fresh.empty());
    for (auto [id, fd] : fresh) send_fd(sockets[0], id, fd);
    ::shutdown(sockets[0], SHUT_WR);
    verdict.store(5);
    REQUIRE(early.join(60s));
    CHECK(verdict.load() == 6);
    CHECK(late[0] == 101);
    ::close(sockets[0]);
    ::close(sockets[1]);
    CHECK(child_count() == 0);
}

TEST_CASE("Threads of one process share the primitives too") {
    mproc::Lock lock;
    mproc::Value<long> counter(0);
    mproc::Array<long> plain(1);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&] {
            for (int i = 0; i < 5000; ++i) {
                counter += 1;
                std::lock_guard guard(lock);
                plain[0] = plain[0] + 1;
            }
        });
    for (auto& t : threads) t.join();
    CHECK(counter.load() == 20000);
    CHECK(plain[0] == 20000);
}

// ---- Pool tasks, timeouts, idle waiters and leaks ---------------------------------------------

namespace {

bool probe_lock(mproc::Lock lock) {
    const bool got = lock.acquire(100ms);
    if (got) lock.release();
    return got;
}
bool probe_rlock(mproc::RLock lock) {
    const bool got = lock.acquire(100ms);
    if (got) lock.release();
    return got;
}
long add_under_lock(mproc::Lock lock, mproc::Value<long> total, mproc::Array<int> marks, int i) {
    std::lock_guard guard(lock);
    marks[static_cast<std::size_t>(i)] = i + 1;
    return total += 1;
}
void release_unit(mproc::Semaphore sem) { sem.release(); }
void set_event(mproc::Event ev) { ev.set(); }
bool wait_event(mproc::Event ev) { return ev.wait(60s); }
std::size_t meet(mproc::Barrier barrier) { return barrier.wait(60s); }
long first_element(mproc::Array<long> arr) { return arr[0]; }
long sum_into(mproc::RawArray<long> arr, mproc::RawValue<long> out) {
    long sum = 0;
    for (const long x : arr) sum += x;
    out.store(sum);
    return sum;
}

/// Seconds `call` took (for lower bounds on timeouts only: a wait must not end early).
template <class Call> double seconds_taken(Call&& call) {
    const auto start = std::chrono::steady_clock::now();
    call();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

TEST_CASE(
    "Pool tasks get handles to the same Lock, RLock, Semaphore, Event, Barrier, Value, Array, RawValue and RawArray") {
    mproc::Lock lock;
    mproc::RLock rlock;
    mproc::Semaphore sem(0);
    mproc::Event ev, ev2;
    mproc::Barrier barrier(3);
    mproc::Value<long> total(0);
    mproc::Array<int> marks(200);
    mproc::RawArray<long> raw{1, 2, 3, 4};
    mproc::RawValue<long> raw_sum(0);
    mproc::Pool pool(2);

    // The worker's Lock is the parent's: held here, it cannot take it; released, it can.
    lock.acquire();
    CHECK_FALSE(pool.apply(probe_lock, lock));
    lock.release();
    CHECK(pool.apply(probe_lock, lock));
    rlock.acquire();
    rlock.acquire();
    CHECK_FALSE(pool.apply(probe_rlock, rlock));
    rlock.release();
    rlock.release();
    CHECK(pool.apply(probe_rlock, rlock));

    // Value and Array: every task's update lands in the parent's memory.
    std::vector<std::tuple<mproc::Lock, mproc::Value<long>, mproc::Array<int>, int>> args;
    for (int i = 0; i < 200; ++i) args.emplace_back(lock, total, marks, i);
    const auto returned = pool.starmap(add_under_lock, args, 7);
    CHECK(total.load() == 200);
    for (int i = 0; i < 200; ++i) REQUIRE(marks[static_cast<std::size_t>(i)] == i + 1);
    CHECK(std::set<long>(returned.begin(), returned.end()).size() == 200);  // each += saw its own total

    // Semaphore and Event, both ways.
    auto released = pool.apply_async(release_unit, std::tuple{sem});
    CHECK(sem.acquire(60s));
    released.get();
    pool.apply(set_event, ev2);
    CHECK(ev2.is_set());
    auto waiting = pool.apply_async(wait_event, std::tuple{ev});
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(waiting.ready());
    ev.set();
    CHECK(waiting.get(60s));

    // RawArray and RawValue: the worker reads the parent's array and writes its value.
    CHECK(pool.apply(sum_into, raw, raw_sum) == 10);
    CHECK(raw_sum.load() == 10);

    // Barrier: two workers and the parent meet at the same barrier.
    auto a = pool.apply_async(meet, std::tuple{barrier});
    auto b = pool.apply_async(meet, std::tuple{barrier});
    const std::size_t mine = barrier.wait(60s);
    CHECK(mine + a.get(60s) + b.get(60s) == 0 + 1 + 2);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("An object created after the Pool reaches its workers: the pool sends them its memory") {
    mproc::Array<long> early(100000);
    early[0] = 3;
    mproc::Pool pool(2);
    // Big enough for a segment of its own, which the workers (forked with the pool) never had.
    mproc::Array<long> late(100000);
    late[0] = 5;
    CHECK(pool.apply(first_element, late) == 5);
    std::vector<mproc::Array<long>> many(10, late);
    CHECK(pool.map(first_element, many) == std::vector<long>(10, 5));
    // A small object, in a chunk the workers may or may not map already: the same lock either way.
    mproc::Lock small;
    small.acquire();
    CHECK_FALSE(pool.apply(probe_lock, small));  // the worker sees it held
    small.release();
    CHECK(pool.apply(probe_lock, small));
    CHECK(pool.apply(first_element, early) == 3);
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Timed waits across processes: each gives up no sooner than asked, and succeeds when the other side acts in time") {
    mproc::Lock lock;
    mproc::RLock rlock;
    mproc::Semaphore sem(2);
    mproc::Value<long> value(0);
    mproc::Array<int> arr(4);
    mproc::Event held, done, never;
    mproc::Process holder([&] {
        lock.acquire();
        rlock.acquire();
        rlock.acquire();
        sem.acquire();
        sem.acquire();
        value.get_lock().acquire();
        arr.get_lock().acquire();
        held.set();
        done.wait(60s);
        arr.get_lock().release();
        value.get_lock().release();
        sem.release(2);
        rlock.release();
        rlock.release();
        std::this_thread::sleep_for(100ms);  // the parent's lock.acquire(30s) starts waiting first
        lock.release();
    });
    holder.start();
    REQUIRE(held.wait(60s));
    constexpr double asked = 0.2, at_least = asked * 0.95;  // the 5% is clock-rounding slack only
    const auto timeout = mproc::Seconds{asked};
    double took = 0;
    took = seconds_taken([&] { CHECK_FALSE(lock.acquire(timeout)); });
    CHECK(took >= at_least);
    took = seconds_taken([&] { CHECK_FALSE(rlock.acquire(timeout)); });
    CHECK(took >= at_least);
    took = seconds_taken([&] { CHECK_FALSE(sem.acquire(timeout)); });
    CHECK(took >= at_least);
    took = seconds_taken([&] { CHECK_FALSE(value.get_lock().acquire(timeout)); });
    CHECK(took >= at_least);
    took = seconds_taken([&] { CHECK_FALSE(arr.get_lock().acquire(timeout)); });
    CHECK(took >= at_least);
    took = seconds_taken([&] { CHECK_FALSE(never.wait(timeout)); });
    CHECK(took >= at_least);
    {
        std::unique_lock timed(lock, std::chrono::milliseconds(200));  // TimedLockable
        CHECK_FALSE(timed.owns_lock());
    }
    // A zero timeout is a try: no wait at all is needed to say no.
    CHECK_FALSE(lock.acquire(0s));
    CHECK_FALSE(sem.acquire(0s));
    CHECK_FALSE(never.wait(0s));
    mproc::Barrier alone(2);
    took = seconds_taken([&] { CHECK_THROWS_AS(alone.wait(timeout), mproc::BrokenBarrierError); });
    CHECK(took >= at_least);
    CHECK(alone.broken());  // the timeout broke it
    alone.reset();

    // Now the holder lets go while we wait: the waits succeed well within their timeouts.
    done.set();
    CHECK(lock.acquire(30s));
    CHECK_FALSE(lock.owner_died());
    lock.release();
    CHECK(rlock.acquire(30s));
    rlock.release();
    CHECK(sem.acquire(30s));
    CHECK(sem.acquire(30s));
    CHECK(value.get_lock().acquire(30s));
    value.get_lock().release();
    REQUIRE(holder.join(60s));
    CHECK(holder.exitcode() == 0);

    // A party that arrives late, but within the other's timeout, passes the barrier with it.
    mproc::Process late([&] {
        std::this_thread::sleep_for(100ms);
        alone.wait(30s);
    });
    late.start();
    CHECK_NOTHROW(alone.wait(30s));
    REQUIRE(late.join(60s));
    CHECK(late.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("The locks of Value and Array, and an RLock held twice, survive a holder killed by SIGKILL") {
    mproc::Value<long> value(1);
    mproc::Array<int> arr(8);
    mproc::RLock rlock;
    mproc::Event held;
    mproc::Process holder([&] {
        value.get_lock().acquire();
        arr.get_lock().acquire();
        rlock.acquire();
        rlock.acquire();
        value += 1;  // the atomic += needs no lock, and is not blocked by it
        held.set();
        while (true) ::pause();
    });
    holder.start();
    REQUIRE(held.wait(60s));
    CHECK(value.load() == 2);
    holder.kill();
    REQUIRE(holder.join(60s));
    CHECK(holder.exitcode() == -SIGKILL);
    for (mproc::Lock* l : {&value.get_lock(), &arr.get_lock()}) {
        REQUIRE(l->acquire(10s));
        CHECK(l->owner_died());
        l->release();
        CHECK_FALSE(l->owner_died());
    }
    REQUIRE(rlock.acquire(10s));
    CHECK(rlock.owner_died());
    rlock.release();  // the dead holder's two holds went with it: one release frees it
    CHECK_THROWS_AS(rlock.release(), mproc::Error);
    mproc::Process other([&] { std::_Exit(rlock.acquire(10s) ? 0 : 1); });
    other.start();
    REQUIRE(other.join(60s));
    CHECK(other.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("Processes blocked in Lock, RLock, Semaphore, Event, Barrier and get_lock use no CPU while they wait") {
    mproc::Lock lock;
    mproc::RLock rlock;
    mproc::Semaphore sem(0);
    mproc::Event ev;
    mproc::Barrier barrier(2);
    mproc::Value<long> value(0);
    mproc::Semaphore ready(0);
    lock.acquire();
    rlock.acquire();
    value.get_lock().acquire();
    std::vector<mproc::Process> waiters;
    waiters.emplace_back([&] {
        ready.release();
        std::_Exit(lock.acquire() ? 0 : 1);
    });
    waiters.emplace_back([&] {
        ready.release();
        std::_Exit(rlock.acquire() ? 0 : 1);
    });
    waiters.emplace_back([&] {
        ready.release();
        std::_Exit(sem.acquire() ? 0 : 1);
    });
    waiters.emplace_back([&] {
        ready.release();
        std::_Exit(ev.wait() ? 0 : 1);
    });
    waiters.emplace_back([&] {
        ready.release();
        barrier.wait();
    });
    waiters.emplace_back([&] {
        ready.release();
        std::_Exit(value.get_lock().acquire() ? 0 : 1);
    });
    for (auto& w : waiters) w.start();
    for (std::size_t i = 0; i < waiters.size(); ++i) REQUIRE(ready.acquire(60s));
    std::this_thread::sleep_for(200ms);  // let them reach their waits
    std::vector<long> before;
    for (auto& w : waiters) before.push_back(mproc_test::cpu_ticks(w.pid()));
    std::this_thread::sleep_for(1s);
    for (std::size_t i = 0; i < waiters.size(); ++i) {
        const long used = mproc_test::cpu_ticks(waiters[i].pid()) - before[i];
        INFO("waiter " << i << " used " << used << " ticks over an idle second");
        // A waiter that spun would use about 100 ticks; one that re-checks once a second, ~0.
        CHECK(used <= 10);
        CHECK(waiters[i].is_alive());  // still waiting: nothing let it through early
    }
    lock.release();
    rlock.release();
    value.get_lock().release();
    sem.release();
    ev.set();
    barrier.wait(60s);
    for (auto& w : waiters) {
        REQUIRE(w.join(60s));
        CHECK(w.exitcode() == 0);
    }
    CHECK(child_count() == 0);
}

TEST_CASE(
    "Nothing in /dev/shm, even after children killed by SIGKILL mid-use: every shared object is a memfd, freed with its last handle") {
    const auto shm_before = mproc_test::dev_shm_names();
    const pid_t me = ::getpid();
    const std::size_t queues_before = mproc_test::memfd_mappings(me, "mproc-queue").size();
    const std::size_t dicts_before = mproc_test::memfd_mappings(me, "mproc-dict").size();
    {
        mproc::Lock lock;
        mproc::Value<long> value(0);
        mproc::Array<double> big(1 << 18);
        mproc::Event ready;
        mproc::Queue<std::string> q({.buffer_bytes = 1 << 20});
        mproc::SharedDict<std::string, long> d;
        d["n"] = 0;
        mproc::Pool pool(2);
        CHECK(mproc_test::memfd_mappings(me, "mproc-queue").size() == queues_before + 1);
        CHECK(mproc_test::memfd_mappings(me, "mproc-dict").size() == dicts_before + 1);
        for (int round = 0; round < 5; ++round) {
            mproc::Event inside;
            mproc::Process victim([&] {
                q.put(std::string(3 << 20, 'x'));  // streams: blocks on the full ring, claim held
            });
            mproc::Process holder([&] {
                lock.acquire();
                value.get_lock().acquire();
                d.update("n", [&](std::optional<long> n) {
                    inside.set();
                    while (true) ::pause();
                    return n.value_or(0);
                });
            });
            victim.start();
            holder.start();
            REQUIRE(inside.wait(60s));
            REQUIRE(eventually([&] { return q.qsize() == 1; }));
            // Every mproc mapping of a child is a memfd (or anonymous); none is a /dev/shm file.
            for (const pid_t pid : {victim.pid(), holder.pid()}) {
                CHECK(mproc_test::dev_shm_mappings(pid).empty());
                CHECK_FALSE(mproc_test::memfd_mappings(pid, "mproc-").empty());
                for (const auto& path : mproc_test::mproc_named_mappings(pid))
                    CHECK_THAT(path, Catch::StartsWith("/memfd:mproc-"));
            }
            REQUIRE(eventually([&] { return pool.worker_pids().size() == 2; }));  // both started
            for (const pid_t pid : pool.worker_pids()) CHECK(mproc_test::dev_shm_mappings(pid).empty());
            victim.kill();
            holder.kill();
            if (const auto pids = pool.worker_pids(); !pids.empty()) ::kill(pids.front(), SIGKILL);  // replaced
            REQUIRE(victim.join(60s));
            REQUIRE(holder.join(60s));
            // The survivors go on: the locks are free (after a repair), the queue drops the half item.
            REQUIRE(lock.acquire(10s));
            lock.release();
            REQUIRE(value.get_lock().acquire(10s));
            value.get_lock().release();
            d["n"] += 1;
            CHECK(q.try_get() == std::nullopt);
        }
        CHECK(d.at("n") == 5);
        CHECK(pool.apply(probe_lock, lock));
        pool.close();
        pool.join();
    }
    // The last handles are gone: this process maps none of those segments any more, and since
    // every process that had them is gone too, the kernel has freed them.
    CHECK(mproc_test::memfd_mappings(me, "mproc-queue").size() == queues_before);
    CHECK(mproc_test::memfd_mappings(me, "mproc-dict").size() == dicts_before);
    CHECK(mproc_test::dev_shm_mappings(me).empty());
    CHECK(mproc_test::dev_shm_names() == shm_before);
    CHECK(child_count() == 0);
}

namespace {
/// How many shared segments this process (a worker) has created since it was forked: the
/// registry's generation counts creations, and a fork child starts from its parent's count.
std::uint64_t segments_created(mproc::Queue<int>, mproc::SharedDict<int, int>, mproc::Lock, mproc::Value<long>,
                               mproc::Array<long>) {
    return mproc::detail::segments().generation();
}
}  // namespace

TEST_CASE("Handles passed as Pool task arguments are decoded in the worker, not created anew there") {
    // Decoding a task's arguments default-constructs them first; a Queue or SharedDict constructed
    // that way must be an empty handle, not a fresh 1 GiB shared object thrown away at once.
    mproc::Queue<int> q;
    mproc::SharedDict<int, int> d;
    mproc::Lock lock;
    mproc::Value<long> value(0);
    mproc::Array<long> arr(100000);
    mproc::Pool pool(1);
    using Args = std::tuple<mproc::Queue<int>, mproc::SharedDict<int, int>, mproc::Lock, mproc::Value<long>,
                            mproc::Array<long>>;
    const std::vector<Args> args(50, Args{q, d, lock, value, arr});
    const auto generations = pool.starmap(segments_created, args, 1);
    REQUIRE(generations.size() == 50);
    CHECK(generations.front() == generations.back());  // 50 tasks, no segment made for any of them
    pool.close();
    pool.join();
    CHECK(child_count() == 0);
}

TEST_CASE("Pools started while other threads create and decode handles: no worker inherits an mproc lock held") {
    // 50 pools take about a second; test_stress runs 500.
    const int finished = fork_under_lock::run_pools_while_threads_churn_handles(50, 4);
    CHECK(finished == 50);
    CHECK(child_count() == 0);
}
