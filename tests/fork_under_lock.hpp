// Pools started while other threads of the parent hold mproc's process-local locks.
//
// A Pool forks its fork server from the constructing thread, and every worker is a fork of the
// server. If another thread of the parent holds one of mproc's own mutexes at that instant (the
// shared-object registry's, the small-object allocator's), the server and every worker would
// inherit it locked and hang the first time they decode a handle or create a small object.
//
// run_pools_while_threads_churn_handles(n): 8 threads create, encode, decode and drop every kind
// of handle (Queue, SharedDict, Lock, RLock, Semaphore, Event, Barrier, Value, Array) without a
// pause, while n pools start one after another; each pool runs tasks that take handles as
// arguments, use every one, and create small objects of their own. Every task must finish within a
// generous timeout (a hang is a failure, reported at the first pool that hangs).
#pragma once

#include <catch2/catch.hpp>
#include <mproc/pool.hpp>
#include <mproc/queue.hpp>
#include <mproc/serialize.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/sync.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace fork_under_lock {

using Handles = std::tuple<mproc::Queue<int>, mproc::SharedDict<int, long>, mproc::Lock, mproc::RLock, mproc::Semaphore,
                           mproc::Event, mproc::Barrier, mproc::Value<long>, mproc::Array<int>>;

inline Handles make_handles() {
    return Handles{mproc::Queue<int>({.buffer_bytes = 1 << 16}),
                   mproc::SharedDict<int, long>({.max_bytes = 1 << 20}),
                   mproc::Lock(),
                   mproc::RLock(),
                   mproc::Semaphore(1),
                   mproc::Event(),
                   mproc::Barrier(1),
                   mproc::Value<long>(0),
                   mproc::Array<int>(4)};
}

/// A Pool task: uses every handle it was given, and creates small objects of its own (the
/// small-object allocator, then the registry, in this worker).
inline long use_handles(Handles h, int round) {
    auto& [q, d, lock, rlock, sem, ev, barrier, value, array] = h;
    {
        std::lock_guard l(lock);
        std::lock_guard r1(rlock);
        std::lock_guard r2(rlock);
        sem.acquire();
        sem.release();
        q.put(round);
        d[round] = round;
        value += 1;
        array[0] += 1;
    }
    ev.set();
    barrier.wait();
    mproc::Lock own;
    mproc::Value<long> own_value(round);
    const auto back = mproc::from_bytes<mproc::Value<long>>(mproc::to_bytes(own_value));
    std::lock_guard g(own);
    return back.load() + static_cast<long>(q.get()) + d.at(round);
}

/// 8 threads churn handles of every kind while `pools` pools start one after another; returns the
/// number of pools whose tasks all finished (a hang FAILs at the first pool that hangs), and the
/// number of handle sets the threads went through in `churned_sets`.
inline int run_pools_while_threads_churn_handles(int pools, int tasks_per_pool, long* churned_sets = nullptr) {
    constexpr int threads = 8;
    constexpr auto hang = std::chrono::seconds(60);  // a task takes microseconds: only a hang lasts
    const Handles shared = make_handles();           // before every pool: each worker inherits it
    std::atomic<bool> stop{false};
    std::atomic<long> churned{0};
    std::vector<std::thread> churners;
    for (int t = 0; t < threads; ++t)
        churners.emplace_back([&, t] {
            while (!stop.load(std::memory_order_relaxed)) {
                // Create (small-object allocator, registry), encode, decode (registry lookups),
                // drop (registry removal): every one of them under mproc's process-local mutexes.
                Handles fresh = (t % 4 == 0)
                                    ? make_handles()
                                    : Handles{std::get<0>(shared), std::get<1>(shared),   mproc::Lock(),
                                              mproc::RLock(),      mproc::Semaphore(2),   mproc::Event(),
                                              mproc::Barrier(3),   mproc::Value<long>(t), mproc::Array<int>(8)};
                const auto bytes = mproc::to_bytes(fresh);
                Handles decoded = mproc::from_bytes<Handles>(bytes);
                std::get<7>(decoded) += 1;
                churned.fetch_add(1, std::memory_order_relaxed);
            }
        });
    int finished = 0;
    for (int p = 0; p < pools; ++p) {
        INFO("pool " << p << " of " << pools);
        mproc::Pool pool(2);
        std::vector<mproc::AsyncResult<long>> results;
        for (int i = 0; i < tasks_per_pool; ++i)
            results.push_back(pool.apply_async(use_handles, std::tuple{shared, i}));
        bool all = true;
        for (auto& r : results) {
            try {
                const long got = r.get(hang);  // outside CHECK, which would swallow the TimeoutError
                CHECK(got >= 0);
            } catch (const mproc::TimeoutError&) {
                all = false;
                break;
            }
        }
        if (!all) {
            stop = true;
            for (auto& t : churners) t.join();
            FAIL("a task of pool " << p << " hung: a worker (or the fork server) inherited one of mproc's locks held");
        }
        pool.close();
        pool.join();
        ++finished;
    }
    stop = true;
    for (auto& t : churners) t.join();
    CHECK(churned.load() > 0);
    if (churned_sets) *churned_sets = churned.load();
    return finished;
}

}  // namespace fork_under_lock
