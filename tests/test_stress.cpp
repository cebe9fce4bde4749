// Stress and fault injection: load held and faults survived, with the figures printed to stdout so
// that a CI log shows them. Every case is tagged [stress] and runs under the `stress` CTest label.
//
//   - Queue: 4 producers x 4 consumers x 1,000,000 messages each; every message exactly once.
//   - Pool of 2 running 20,000 tasks while a separate process SIGKILLs a random worker every 50 ms:
//     every task ends with its result or with WorkerLost, none hangs, the pool still works.
//   - SharedDict: 8 processes increment one entry while one of them is SIGKILLed every 200 ms; the
//     count is exactly the increments that returned plus those the killed ones had in flight that
//     landed (each killed process had at most one).
//   - Pools: 500 start one after another while 8 threads create, decode and drop every kind of
//     handle; each pool's tasks take handles as arguments and use them. None hangs (no worker is
//     born holding one of mproc's process-local locks).
//   - Pipe: the writer is killed in the middle of a message; the reader gets every whole message
//     before it, then SerializationError for the cut one, then EOFError; it never hangs.
//
// Sanitised builds run the same checks on less load (the counts shrink tenfold).
#include <catch2/catch.hpp>
#include <mproc/errors.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/sync.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <sys/syscall.h>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

#include "fork_under_lock.hpp"
#include "shm_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;

namespace {

constexpr long scaled(long n) { return mproc_test::under_sanitizer() ? std::max(1L, n / 10) : n; }

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// One line of figures for the CI log.
template <class... Args> void figures(const char* format, Args... args) {
    std::printf("[stress] ");
    std::printf(format, args...);
    std::printf("\n");
    std::fflush(stdout);
}

using mproc_test::Watchdog;

/// The parent pid and state of `pid` from /proc/<pid>/stat; ppid 0 if it is gone.
std::pair<pid_t, char> parent_and_state(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line)) return {0, '?'};
    const auto close = line.rfind(')');
    if (close == std::string::npos) return {0, '?'};
    std::istringstream rest(line.substr(close + 2));
    char state = '?';
    pid_t ppid = 0;
    rest >> state >> ppid;
    return {ppid, state};
}

/// SIGKILLs `pid` only if it is still a live child of `parent`: the pidfd pins the process, so a
/// pid reused by an unrelated process between the check and the signal is never hit.
bool kill_child_of(pid_t parent, pid_t pid) {
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) return false;
    bool sent = false;
    const auto [ppid, state] = parent_and_state(pid);
    if (ppid == parent && state != 'Z' && state != 'X')
        sent = ::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0) == 0;
    ::close(fd);
    return sent;
}

}  // namespace

// =================================================================================================
// Queue: 4 x 4 x 1,000,000
// =================================================================================================

namespace {
struct Numbered {
    std::int32_t producer;
    std::int32_t seq;
};
}  // namespace

TEST_CASE("Queue: 4 producers x 4 consumers x 1,000,000 messages each arrive exactly once, in each producer's order",
          "[stress]") {
    constexpr int producers = 4, consumers = 4;
    const long per_producer = scaled(1'000'000);
    const long total = producers * per_producer;
    Watchdog dog(1000s, "Queue 4x4x1,000,000");
    mproc::Queue<Numbered> q;
    mproc::Array<std::uint8_t> seen(static_cast<std::size_t>(total));
    mproc::Value<long> out_of_order(0), bad(0), received(0);

    const auto start = std::chrono::steady_clock::now();
    std::vector<mproc::Process> cs;
    for (int c = 0; c < consumers; ++c)
        cs.emplace_back([&] {
            std::vector<long> last(producers, -1);
            long mine = 0, disorder = 0, invalid = 0;
            for (;;) {
                const Numbered m = q.get();
                if (m.producer < 0) break;
                if (m.producer >= producers || m.seq < 0 || m.seq >= per_producer) {
                    ++invalid;
                    continue;
                }
                auto& prev = last[static_cast<std::size_t>(m.producer)];
                if (m.seq <= prev) ++disorder;
                prev = m.seq;
                std::atomic_ref<std::uint8_t>(seen[static_cast<std::size_t>(m.producer * per_producer + m.seq)])
                    .fetch_add(1, std::memory_order_relaxed);
                ++mine;
            }
            received += mine;
            out_of_order += disorder;
            bad += invalid;
        });
    std::vector<mproc::Process> ps;
    for (int p = 0; p < producers; ++p)
        ps.emplace_back([&, p] {
            for (long i = 0; i < per_producer; ++i) q.put(Numbered{p, static_cast<std::int32_t>(i)});
        });
    for (auto& c : cs) c.start();
    for (auto& p : ps) p.start();
    for (auto& p : ps) {
        REQUIRE(p.join(900s));
        CHECK(p.exitcode() == 0);
    }
    for (int c = 0; c < consumers; ++c) q.put(Numbered{-1, 0});
    for (auto& c : cs) {
        REQUIRE(c.join(900s));
        CHECK(c.exitcode() == 0);
    }
    const double elapsed = seconds_since(start);

    long missing = 0, duplicated = 0;
    for (std::size_t i = 0; i < seen.size(); ++i) {
        if (seen[i] == 0) ++missing;
        if (seen[i] > 1) ++duplicated;
    }
    figures("Queue %dx%d: %ld messages in %.2f s (%.0f msg/s); missing %ld, duplicated %ld, out of order %ld",
            producers, consumers, total, elapsed, static_cast<double>(total) / elapsed, missing, duplicated,
            out_of_order.load());
    CHECK(received.load() == total);
    CHECK(missing == 0);
    CHECK(duplicated == 0);
    CHECK(out_of_order.load() == 0);
    CHECK(bad.load() == 0);
    CHECK(q.try_get() == std::nullopt);
    CHECK(child_count() == 0);
}

// =================================================================================================
// Pool: 20,000 tasks while a worker is SIGKILLed every 50 ms
// =================================================================================================

namespace {
long nap_square(long x) {
    ::usleep(300);  // long enough that a kill usually finds a task running
    return x * x;
}
long square(long x) { return x * x; }
}  // namespace

TEST_CASE("Pool of 2: 20,000 tasks while another process SIGKILLs a random worker every 50 ms", "[stress]") {
    const long tasks = scaled(20'000);
    Watchdog dog(1000s, "Pool under SIGKILL every 50 ms");
    mproc::Event stop;
    mproc::Value<long> kills(0);
    {
        mproc::Pool pool(2);
        // The workers' parent is the pool's fork server: the killer picks among its children.
        std::vector<pid_t> workers;
        REQUIRE(mproc_test::eventually([&] { return (workers = pool.worker_pids()).size() == 2; }));
        const pid_t server = parent_and_state(workers.front()).first;
        REQUIRE(server > 0);
        REQUIRE(server != ::getpid());

        mproc::Process killer([&] {
            std::mt19937 rng(20240);
            while (!stop.wait(50ms)) {
                std::vector<pid_t> live;
                for (const auto& child : mproc_test::children_of(server))
                    if (child.state != 'Z') live.push_back(child.pid);
                if (live.empty()) continue;
                if (kill_child_of(server, live[rng() % live.size()])) kills += 1;
            }
        });
        killer.start();

        const auto start = std::chrono::steady_clock::now();
        std::vector<mproc::AsyncResult<long>> results;
        results.reserve(static_cast<std::size_t>(tasks));
        for (long i = 0; i < tasks; ++i) results.push_back(pool.apply_async(nap_square, std::tuple{i}));
        long ok = 0, lost = 0, wrong = 0, other = 0;
        for (long i = 0; i < tasks; ++i) {
            auto& r = results[static_cast<std::size_t>(i)];
            REQUIRE(r.wait(600s));  // a task that never ends is the failure this test exists for
            try {
                if (r.get() == i * i) ++ok;
                else ++wrong;
            } catch (const mproc::WorkerLost&) {
                ++lost;
            } catch (const std::exception& e) {
                ++other;
                UNSCOPED_INFO("task " << i << ": " << e.what());
            }
        }
        const double elapsed = seconds_since(start);
        stop.set();
        REQUIRE(killer.join(60s));
        CHECK(killer.exitcode() == 0);
        figures("Pool(2): %ld tasks in %.2f s under %ld SIGKILLs (one per 50 ms): %ld results, %ld WorkerLost", tasks,
                elapsed, kills.load(), ok, lost);
        CHECK(ok + lost == tasks);
        CHECK(wrong == 0);
        CHECK(other == 0);
        CHECK(kills.load() >= 10);   // the faults were really injected
        CHECK(lost <= kills.load());  // a death costs at most the one task its worker was running
        CHECK(lost >= 1);

        // The pool survived: it still computes, on fresh workers.
        std::vector<long> xs(1000), expected;
        for (long i = 0; i < 1000; ++i) xs[static_cast<std::size_t>(i)] = i;
        for (long x : xs) expected.push_back(x * x);
        CHECK(pool.map(square, xs) == expected);
        pool.close();
        pool.join();
    }
    CHECK(child_count() == 0);
}

// =================================================================================================
// SharedDict: 8 processes, one SIGKILLed every 200 ms
// =================================================================================================

TEST_CASE(
    "SharedDict: 8 processes increment while one of them is SIGKILLed every 200 ms, and no increment is lost or doubled",
    "[stress]") {
    constexpr int slots = 8;
    const int kills_wanted = static_cast<int>(scaled(60));
    Watchdog dog(1000s, "SharedDict under SIGKILL every 200 ms");
    const auto shm_before = mproc_test::dev_shm_names();

    // "plain": d["count"] += 1, as a user writes it. "ledger": one atomic update() adds 1 to the
    // total and to the slot's own tally, so the tallies say exactly whose increments landed.
    mproc::SharedDict<std::string, long> plain;
    plain["count"] = 0;
    mproc::SharedDict<std::string, std::vector<long>> ledger;
    ledger.set("count", std::vector<long>(slots + 1, 0));
    // Per slot, over all the processes that ran in it: operations begun and returned.
    mproc::Array<long> plain_begun(slots), plain_done(slots), ledger_begun(slots), ledger_done(slots);
    mproc::Array<long> slot_kills(slots);
    mproc::Event stop;

    auto hammer = [&](int slot) {
        const auto s = static_cast<std::size_t>(slot);
        for (long i = 0; !stop.is_set(); ++i) {
            std::atomic_ref<long>(plain_begun[s]).fetch_add(1);
            plain["count"] += 1;
            std::atomic_ref<long>(plain_done[s]).fetch_add(1);

            std::atomic_ref<long>(ledger_begun[s]).fetch_add(1);
            ledger.update("count", [slot](std::optional<std::vector<long>> old) {
                std::vector<long> v = std::move(old).value_or(std::vector<long>(slots + 1, 0));
                v[0] += 1;
                v[static_cast<std::size_t>(slot) + 1] += 1;
                return v;
            });
            std::atomic_ref<long>(ledger_done[s]).fetch_add(1);

            // Entries come and go too, so kills also land in inserts, erases and table growth.
            const std::string key = "slot" + std::to_string(slot) + "-" + std::to_string(i % 64);
            if (i % 3 == 0) plain.erase(key);
            else plain.set(key, i);
        }
    };

    const auto start = std::chrono::steady_clock::now();
    std::vector<std::optional<mproc::Process>> workers(slots);
    for (int s = 0; s < slots; ++s) {
        workers[static_cast<std::size_t>(s)].emplace([&, s] { hammer(s); });
        workers[static_cast<std::size_t>(s)]->start();
    }
    std::mt19937 rng(777);
    int kills = 0;
    while (kills < kills_wanted) {
        std::this_thread::sleep_for(200ms);
        const auto s = static_cast<std::size_t>(rng() % slots);
        auto& victim = *workers[s];
        victim.kill();
        REQUIRE(victim.join(60s));
        if (victim.exitcode() != -SIGKILL) {
            FAIL("slot " << s << " ended with " << victim.exitcode().value_or(999) << " before it was killed");
        }
        ++kills;
        slot_kills[s] += 1;
        workers[s].emplace([&, s] { hammer(static_cast<int>(s)); });
        workers[s]->start();
    }
    stop.set();
    for (auto& w : workers) {
        if (!w->join(120s)) {
            // Where it is stuck, for whoever reads the log: its state, the kernel function it
            // waits in, and its system call with arguments (a futex's address among them).
            const auto proc = [&](const char* what) {
                std::ifstream in("/proc/" + std::to_string(w->pid()) + "/" + what);
                std::string text;
                std::getline(in, text);
                return text;
            };
            FAIL("worker " << w->pid() << " still runs 120 s after stop: stat '" << proc("stat") << "', wchan '"
                           << proc("wchan") << "', syscall '" << proc("syscall") << "'");
        }
        CHECK(w->exitcode() == 0);
    }
    const double elapsed = seconds_since(start);

    long pb = 0, pd = 0, lb = 0, ld = 0;
    for (std::size_t s = 0; s < slots; ++s) {
        pb += plain_begun[s];
        pd += plain_done[s];
        lb += ledger_begun[s];
        ld += ledger_done[s];
    }
    const long count = plain.at("count");
    const std::vector<long> tally = ledger.at("count");
    REQUIRE(tally.size() == slots + 1);
    long tally_sum = 0;
    for (std::size_t s = 0; s < slots; ++s) {
        const long landed = tally[s + 1];
        tally_sum += landed;
        INFO("slot " << s << ": " << landed << " landed, " << ledger_done[s] << " returned, " << ledger_begun[s]
                     << " begun, " << slot_kills[s] << " kills");
        // Everything that returned landed; beyond that only in-flight ones, at most one per kill.
        CHECK(landed >= ledger_done[s]);
        CHECK(landed <= ledger_begun[s]);
        CHECK(landed - ledger_done[s] <= slot_kills[s]);
    }
    figures(
        "SharedDict: 8 processes, %d SIGKILLs (one per 200 ms) in %.2f s: d[\"count\"] += 1 returned %ld times, "
        "count %ld (%ld in flight at a kill landed); ledger %ld returned, total %ld",
        kills, elapsed, pd, count, count - pd, ld, tally[0]);
    CHECK(tally[0] == tally_sum);  // each update() landed whole or not at all
    CHECK(tally[0] >= ld);
    CHECK(tally[0] - ld <= kills);
    CHECK(tally[0] <= lb);
    CHECK(count >= pd);
    CHECK(count <= pb);
    CHECK(count - pd <= kills);
    // The dict is whole and usable.
    const auto items = plain.items();
    CHECK(items.size() == plain.size());
    for (const auto& [key, value] : items) REQUIRE(plain.get(key) == value);
    plain["count"] += 1;
    CHECK(plain.at("count") == count + 1);
    CHECK(child_count() == 0);
    CHECK(mproc_test::dev_shm_names() == shm_before);
}

// =================================================================================================
// Pipe: the writer killed mid-message
// =================================================================================================

namespace {
using Chunk = std::tuple<long, std::string>;

std::string payload_of(long seq, std::size_t size) {
    std::string s(size, '\0');
    for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((seq * 131 + static_cast<long>(i)) & 0xff);
    return s;
}
std::size_t size_of(long seq) {
    // Mostly small, some large: the kill lands inside a large one most of the time.
    const auto h = static_cast<std::uint64_t>(seq) * 0x9E3779B97F4A7C15ull;
    return (h >> 60) < 4 ? static_cast<std::size_t>((h >> 20) % (4u << 20)) : static_cast<std::size_t>((h >> 20) % 512);
}

struct RoundResult {
    long whole = 0;       // whole messages received, all intact and in order
    bool cut = false;     // the stream ended inside a message (SerializationError)
    bool intact = true;
};

/// The writer streams numbered messages until it is killed `delay` after it started; the reader
/// takes everything it can. `hold` keeps the reader away until the kill, so the pipe is full and
/// the writer is blocked inside a 64 MiB message when it dies.
RoundResult writer_killed(bool duplex, std::chrono::microseconds delay, bool hold) {
    auto ends = mproc::Pipe<Chunk>(duplex);
    auto& reader = ends.first;
    auto& writer = ends.second;
    mproc_test::ReadySignal ready;
    mproc::Process w([&] {
        reader.close();
        ready.notify();
        if (hold) {
            writer.send(Chunk{0, payload_of(0, 100)});
            writer.send(Chunk{1, payload_of(1, 64u << 20)});
        } else {
            for (long seq = 0;; ++seq) writer.send(Chunk{seq, payload_of(seq, size_of(seq))});
        }
    });
    w.start();
    writer.close();
    REQUIRE(ready.wait());
    RoundResult result;
    std::thread consume;
    if (!hold) {
        consume = std::thread([&] {
            for (long expect = 0;; ++expect) {
                try {
                    auto [seq, data] = reader.recv();
                    if (seq != expect || data != payload_of(seq, size_of(seq))) result.intact = false;
                    ++result.whole;
                } catch (const mproc::SerializationError&) {
                    result.cut = true;
                    break;
                } catch (const mproc::EOFError&) {
                    break;
                }
            }
        });
    }
    if (hold) {
        // Until the writer sleeps: it does so only once the channel is full, inside the big message.
        REQUIRE(mproc_test::eventually([&] { return parent_and_state(w.pid()).second == 'S'; }));
        std::this_thread::sleep_for(delay);
    } else {
        std::this_thread::sleep_for(delay);
    }
    w.kill();
    REQUIRE(w.join(60s));
    CHECK(w.exitcode() == -SIGKILL);
    if (hold) {
        auto [seq, data] = reader.recv();
        result.intact = seq == 0 && data == payload_of(0, 100);
        result.whole = 1;
        try {
            (void)reader.recv();
        } catch (const mproc::SerializationError&) {
            result.cut = true;
        }
    } else {
        consume.join();
    }
    // After the cut, or at a boundary: the cut message is gone and the stream says it is over,
    // every time (a loop that skips SerializationErrors until EOFError ends).
    CHECK_THROWS_AS(reader.recv(), mproc::EOFError);
    CHECK_THROWS_AS(reader.recv(), mproc::EOFError);
    return result;
}
}  // namespace

TEST_CASE("Pipe: a writer killed mid-message leaves whole messages, then SerializationError, then EOFError",
          "[stress]") {
    Watchdog dog(1000s, "Pipe writer killed mid-message");
    const auto start = std::chrono::steady_clock::now();
    long messages = 0, cut = 0, rounds = 0;
    // Deterministic: the writer is blocked inside a 64 MiB message when it dies.
    for (bool duplex : {false, true}) {
        const auto r = writer_killed(duplex, 20ms, true);
        CHECK(r.intact);
        CHECK(r.cut);
        messages += r.whole;
        cut += r.cut ? 1 : 0;
        ++rounds;
    }
    // Random: killed at any moment while it streams messages of random sizes to a live reader.
    std::mt19937 rng(4242);
    const int random_rounds = static_cast<int>(scaled(60));
    for (int i = 0; i < random_rounds; ++i) {
        const auto r = writer_killed(i % 2 == 1, std::chrono::microseconds(1000 + rng() % 100000), false);
        CHECK(r.intact);
        messages += r.whole;
        cut += r.cut ? 1 : 0;
        ++rounds;
    }
    figures(
        "Pipe: %ld writers killed mid-stream in %.2f s: %ld whole messages received intact, %ld kills cut a "
        "message (SerializationError), %ld fell between messages (EOFError)",
        rounds, seconds_since(start), messages, cut, rounds - cut);
    CHECK(cut >= 2);
    CHECK(child_count() == 0);
}

TEST_CASE("none of 500 Pools hangs while 8 threads create, decode and drop every kind of handle", "[stress]") {
    const auto start = std::chrono::steady_clock::now();
    const int pools = static_cast<int>(scaled(500));
    long churned = 0;
    const int finished = fork_under_lock::run_pools_while_threads_churn_handles(pools, 8, &churned);
    CHECK(finished == pools);
    figures("fork under lock: %d pools started while 8 threads churned %ld handle sets, none hung, %.1f s", pools,
            churned, seconds_since(start));
    CHECK(child_count() == 0);
}
