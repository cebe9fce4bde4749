// The Pool when memory runs out on the calling thread: each allocation a submit makes is failed in
// turn (this program replaces operator new with one that can fail on request), and the pool must
// neither lose a task it took nor take one it refused — join() returns, and every call that returned
// a result gets its value.
#include "test_pool_common.hpp"

#include <cstdlib>
#include <new>
#include <numeric>

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

/// >0: the allocation that many allocations from now on this thread fails with std::bad_alloc.
thread_local long fail_countdown = 0;

/// Fails the `nth` allocation the calling thread makes from now on (0: none).
void fail_allocation(long nth) noexcept { fail_countdown = nth; }

long square(long x) { return x * x; }
long slow_square(long x) {
    std::this_thread::sleep_for(200us);
    return x * x;
}

}  // namespace

// GCC sees operator delete inlined into code whose pointer came from operator new, and takes the
// free() in it for a mismatch: here new and delete are the malloc and free pair on purpose.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

// The plain, array and nothrow forms of operator new and delete are replaced (the array and
// nothrow ones would otherwise be the sanitizers' own, whose memory this operator delete would
// free): all are malloc and free. The over-aligned forms are left as they are.
void* operator new(std::size_t n) {
    if (fail_countdown > 0 && --fail_countdown == 0) throw std::bad_alloc();
    if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
    throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    try {
        return ::operator new(n);
    } catch (...) {
        return nullptr;
    }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return ::operator new(n, std::nothrow); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

TEST_CASE("apply_async with each of its allocations failing in turn loses no task", "[pool][memory]") {
    Watchdog dog(280s, "apply_async under failing allocations");
    mproc::Pool pool(1);
    std::vector<std::pair<mproc::AsyncResult<long>, long>> results;
    int refused = 0;   // the call threw: nothing was queued
    long x = 0;
    // Each round fails the 1st, 2nd, ... allocation of a call, a new call each time, until a call
    // makes fewer: every allocation of a call fails once. The deques behind the backlog and the
    // worker's seat allocate a block every few tasks, and the rounds go through their phases.
    for (int round = 0; round < 200; ++round) {
        for (long nth = 1;; ++nth) {
            ++x;
            std::optional<mproc::AsyncResult<long>> result;
            fail_allocation(nth);
            try {
                result.emplace(pool.apply_async(square, std::tuple{x}));
            } catch (const std::bad_alloc&) {
                ++refused;
            }
            const bool fired = fail_countdown == 0;
            fail_allocation(0);
            if (result) {
                results.emplace_back(std::move(*result), x * x);
                if (!fired) break;  // the call made fewer than nth allocations
            }
        }
    }
    CHECK(refused > 0);   // failures did land inside apply_async
    pool.close();
    pool.join();
    for (auto& [result, expected] : results) REQUIRE(result.get() == expected);
}

TEST_CASE("map and map_async with each of their allocations failing in turn lose no task", "[pool][memory]") {
    Watchdog dog(280s, "map under failing allocations");
    mproc::Pool pool(2);
    std::vector<long> xs(40);
    std::iota(xs.begin(), xs.end(), 1L);
    long sum = 0;
    for (long x : xs) sum += x * x;
    std::vector<mproc::AsyncResult<std::vector<long>>> pending;
    int refused = 0;
    int done = 0;
    bool map_outran = false;  // a map made fewer than nth allocations: every one of its had failed
    bool async_outran = false;
    for (long nth = 1; nth <= 200; ++nth) {
        fail_allocation(nth);
        try {
            if (nth % 2 == 0) {
                std::vector<long> ys = pool.map(slow_square, xs, 3);
                map_outran |= fail_countdown != 0;
                fail_allocation(0);
                CHECK(std::accumulate(ys.begin(), ys.end(), 0L) == sum);
                ++done;
            } else {
                auto result = pool.map_async(slow_square, xs, 3);
                async_outran |= fail_countdown != 0;
                fail_allocation(0);
                pending.push_back(std::move(result));
            }
        } catch (const std::bad_alloc&) {
            ++refused;
        }
        fail_allocation(0);
    }
    CHECK(refused > 0);
    CHECK(done > 0);
    CHECK(map_outran);  // each allocation of a map and of a map_async failed once, within 200
    CHECK(async_outran);
    pool.close();
    pool.join();
    for (auto& result : pending) {
        const std::vector<long> ys = result.get();
        CHECK(std::accumulate(ys.begin(), ys.end(), 0L) == sum);
    }
}
