// SharedMemory: a block of bytes whose handle crosses processes — by fork, a Queue, a Pipe and a
// Pool task — while its bytes stay where they are; its size and alignment; its lifetime (the last
// handle, or a Queue holding one, keeps it); and handles that are empty, corrupt or of another kind.
#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>
#include <mproc/shared_memory.hpp>
#include <mproc/sync.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <string>
#include <sys/resource.h>
#include <tuple>
#include <unistd.h>
#include <utility>
#include <vector>

#include "shm_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;
using mproc_test::child_count;

namespace {

std::size_t blocks_mapped() { return mproc_test::memfd_mappings(::getpid(), "mproc-memory").size(); }

/// A Pool task: adds `by` to every long in the block (atomically: tasks on two workers may share
/// it); returns their sum after its own adds.
long add_to_block(mproc::SharedMemory block, long by) {
    long sum = 0;
    for (long& x : block.as<long>()) sum += std::atomic_ref<long>(x).fetch_add(by) + by;
    return sum;
}

}  // namespace

TEST_CASE("SharedMemory: a zero-filled block of the size asked, aligned, shared by its copies") {
    mproc::SharedMemory small(100);
    CHECK(small.size() == 100);
    CHECK(small.buf().size() == 100);
    CHECK(reinterpret_cast<std::uintptr_t>(small.data()) % 64 == 0);
    for (std::byte b : small.buf()) CHECK(b == std::byte{0});

    mproc::SharedMemory big(std::size_t{3} << 20);  // past 16 KiB: a segment of its own
    CHECK(big.size() == std::size_t{3} << 20);
    CHECK(reinterpret_cast<std::uintptr_t>(big.data()) % static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE)) == 0);
    CHECK(mproc::to_bytes(big).size() == 17);  // whether it has a block, the segment's id, the offset
    CHECK(big.buf()[(std::size_t{3} << 20) - 1] == std::byte{0});
    CHECK(big.as<double>().size() == (std::size_t{3} << 20) / sizeof(double));
    CHECK(mproc::SharedMemory(10).as<long>().size() == 1);  // whole values only

    mproc::SharedMemory copy = big;  // a second handle, not a second block
    copy.buf()[7] = std::byte{42};
    CHECK(big.buf()[7] == std::byte{42});
    CHECK(copy == big);
    CHECK_FALSE(copy == small);

    mproc::SharedMemory moved = std::move(copy);
    CHECK(copy.empty());  // NOLINT(bugprone-use-after-move): a moved-from handle is empty
    CHECK(moved.buf()[7] == std::byte{42});
    moved.close();
    CHECK(moved.empty());
    CHECK(moved.size() == 0);
    CHECK(moved.buf().empty());
    CHECK(big.buf()[7] == std::byte{42});  // the other handle keeps the block

    mproc::SharedMemory none;
    CHECK_FALSE(none);
    CHECK(none.data() == nullptr);
    CHECK_THROWS_AS(mproc::SharedMemory(0), mproc::Error);
    CHECK_THROWS_AS(mproc::SharedMemory(std::size_t{1} << 41), mproc::Error);
}

TEST_CASE("SharedMemory: what a child writes the parent reads, and the other way round") {
    mproc::SharedMemory block(std::size_t{1} << 20);
    auto values = block.as<std::uint32_t>();
    std::iota(values.begin(), values.end(), 0u);
    mproc::Process child([block] {
        auto xs = block.as<std::uint32_t>();
        for (std::size_t i = 0; i < xs.size(); ++i)
            if (xs[i] != i) std::_Exit(2);
        for (auto& x : xs) x *= 2;
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    bool doubled = true;
    for (std::size_t i = 0; i < values.size(); ++i) doubled = doubled && values[i] == 2 * i;
    CHECK(doubled);
    CHECK(child_count() == 0);
}

TEST_CASE("SharedMemory: handles cross a Queue both ways; the bytes never go through it") {
    // 64 MiB blocks through a queue: a handle is 17 bytes, and the answer is found in the block.
    std::vector<mproc::SharedMemory> blocks;
    for (int i = 0; i < 3; ++i) blocks.emplace_back(std::size_t{64} << 20);
    mproc::Queue<mproc::SharedMemory> full({.buffer_bytes = 64 << 10});
    mproc::Queue<mproc::SharedMemory> done({.buffer_bytes = 64 << 10});
    mproc::Process consumer([full, done]() mutable {
        for (;;) {
            mproc::SharedMemory block = full.get();
            if (block.empty()) return;
            auto words = block.as<std::uint64_t>();
            const std::uint64_t round = words[0];
            if (words[words.size() - 1] != round) std::_Exit(2);
            words[1] = round + 1000;  // the answer, in the block itself
            done.put(block);
        }
    });
    consumer.start();
    for (std::uint64_t round = 0; round < 12; ++round) {
        mproc::SharedMemory block = blocks[round % blocks.size()];
        auto words = block.as<std::uint64_t>();
        words[0] = round;
        words[words.size() - 1] = round;
        full.put(block);
        mproc::SharedMemory back = done.get(60s);
        CHECK(back == block);
        CHECK(words[1] == round + 1000);  // read through the parent's own handle
    }
    full.put(mproc::SharedMemory());  // an empty handle crosses too: the consumer's signal to stop
    REQUIRE(consumer.join(60s));
    CHECK(consumer.exitcode() == 0);
    CHECK(child_count() == 0);
}

TEST_CASE("SharedMemory: a handle crosses a Pipe") {
    mproc::SharedMemory block(4096);
    auto [ours, theirs] = mproc::Pipe<mproc::SharedMemory>();
    mproc::Process child([&] {
        auto got = theirs.recv();
        if (got.size() != 4096) std::_Exit(2);
        got.buf()[100] = std::byte{7};
        theirs.send(got);
    });
    child.start();
    ours.send(block);
    mproc::SharedMemory back = ours.recv();
    CHECK(back == block);
    CHECK(block.buf()[100] == std::byte{7});
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
}

TEST_CASE("SharedMemory: a Pool task argument is the same block in the worker, made before the Pool or after") {
    mproc::SharedMemory block(std::size_t{1} << 20);
    const std::size_t n = block.as<long>().size();
    mproc::Pool pool(2);
    CHECK(pool.apply(add_to_block, block, 1L) == static_cast<long>(n));
    CHECK(pool.apply(add_to_block, block, 2L) == static_cast<long>(3 * n));
    CHECK(block.as<long>()[n - 1] == 3);
    // One made after the Pool: the pool sends its memory to the worker that runs the task.
    mproc::SharedMemory late(std::size_t{1} << 20);
    CHECK(pool.apply(add_to_block, late, 1L) == static_cast<long>(n));
    std::vector<std::tuple<mproc::SharedMemory, long>> both(8, {late, 1L});
    both.emplace_back(block, 0L);
    const auto sums = pool.starmap(add_to_block, both, 1);  // on both workers, in any order
    CHECK(late.as<long>()[0] == 9);
    CHECK(sums.back() == static_cast<long>(3 * n));
    pool.close();
    pool.join();
}

namespace {
/// How many descriptors process `pid` has open.
std::size_t open_fds(pid_t pid) {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry :
         std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd"))
        ++n;
    return n;
}
long first_long(mproc::SharedMemory block) { return block.as<long>()[0]; }
/// Kills its worker the first time it runs (the block counts the attempts), then answers.
long dies_once(mproc::SharedMemory block) {
    auto* attempts = reinterpret_cast<std::atomic<long>*>(block.data());
    if (attempts->fetch_add(1) == 0) ::kill(::getpid(), SIGKILL);
    return attempts->load();
}
/// A large argument (its task goes on the worker's socket) beside a block sent to the worker.
std::size_t big_and_block(std::string big, mproc::SharedMemory block) {
    return big.size() + static_cast<std::size_t>(block.as<long>()[0]);
}
}  // namespace

TEST_CASE("SharedMemory: blocks made after the Pool, hundreds of them, leave a worker a bounded set of descriptors") {
    mproc::Pool pool(1);
    {
        mproc::SharedMemory first(std::size_t{64} << 10);
        REQUIRE(pool.apply(first_long, first) == 0);  // the worker is up
    }
    const pid_t worker = pool.worker_pids().at(0);
    const std::size_t before = open_fds(worker);  // (it may hold `first` until the next task)
    // Blocks freed here as they go: each is let go in the worker at the next task.
    for (long i = 0; i < 300; ++i) {
        mproc::SharedMemory block(std::size_t{64} << 10);
        block.as<long>()[0] = i;
        REQUIRE(pool.apply(first_long, block) == i);
    }
    CHECK(open_fds(worker) <= before + 1);
    // Blocks all alive, queued behind one another: the worker keeps the 64 named last.
    std::vector<mproc::SharedMemory> live;
    std::vector<long> expected;
    for (long i = 0; i < 200; ++i) {
        live.emplace_back(std::size_t{64} << 10);
        live.back().as<long>()[0] = i;
        expected.push_back(i);
    }
    CHECK(pool.map(first_long, live, 1) == expected);
    CHECK(pool.map(first_long, live, 7) == expected);  // sent again, in chunks
    CHECK(pool.worker_pids().at(0) == worker);  // one worker did all of it
    CHECK(open_fds(worker) <= before + 64);
    pool.close();
    pool.join();
}

TEST_CASE("SharedMemory: a block sent to a worker that dies reaches its replacement; large frames keep their order") {
    mproc::Pool pool({.processes = 1, .max_retries = 1});
    mproc::SharedMemory counter(std::size_t{64} << 10);
    CHECK(pool.apply(dies_once, counter) == 2);  // the retry ran on a fresh worker, sent the block again
    mproc::SharedMemory block(std::size_t{64} << 10);
    block.as<long>()[0] = 7;
    const std::string big(std::size_t{4} << 20, 'b');  // past the task ring's records: on the socket
    CHECK(pool.apply(big_and_block, big, block) == big.size() + 7);
    std::vector<std::tuple<std::string, mproc::SharedMemory>> mixed;
    for (int i = 0; i < 6; ++i) {
        mproc::SharedMemory fresh(std::size_t{64} << 10);
        fresh.as<long>()[0] = i;
        mixed.emplace_back(i % 2 ? big : std::string("small"), fresh);
    }
    const auto sizes = pool.starmap(big_and_block, mixed, 1);
    for (int i = 0; i < 6; ++i)
        CHECK(sizes[static_cast<std::size_t>(i)] == (i % 2 ? big.size() : 5) + static_cast<std::size_t>(i));
    pool.close();
    pool.join();
}

namespace {
/// Lowers the worker's descriptor limit to the lowest free descriptor (`tight`: it can open no
/// more), or puts it back; returns the worker's pid.
long limit_fds(bool tight) {
    static rlimit saved{};
    static bool have_saved = false;
    if (tight) {
        const int lowest_free = ::fcntl(2, F_DUPFD_CLOEXEC, 0);
        if (lowest_free < 0 || ::getrlimit(RLIMIT_NOFILE, &saved) != 0) return -1;
        ::close(lowest_free);
        have_saved = true;
        rlimit none = saved;
        none.rlim_cur = static_cast<rlim_t>(lowest_free);
        if (::setrlimit(RLIMIT_NOFILE, &none) != 0) return -1;
    } else if (!have_saved || ::setrlimit(RLIMIT_NOFILE, &saved) != 0) {
        return -1;  // (another worker than the one limited)
    }
    return static_cast<long>(::getpid());
}
}  // namespace

TEST_CASE("SharedMemory: a block a worker could not map (no descriptor left) is sent again with the next task") {
    if (MPROC_TEST_SANITIZED) {  // their runtimes need descriptors of their own
        WARN("skipped under the sanitizers: the worker's descriptors are used up");
        return;
    }
    mproc::Pool pool(1);
    const long worker = pool.apply(limit_fds, true);
    REQUIRE(worker > 0);
    mproc::SharedMemory block(std::size_t{64} << 10);
    block.as<long>()[0] = 42;
    // Its memfd came without a descriptor the worker could take: the task fails, saying so.
    CHECK_THROWS_WITH(pool.apply(first_long, block),
                      Catch::Contains("could not be mapped here") && Catch::Contains("RLIMIT_NOFILE"));
    CHECK(pool.apply(limit_fds, false) == worker);
    // The worker said so, and the pool sends the block again: the same worker now maps it.
    CHECK(pool.apply(first_long, block) == 42);
    CHECK(pool.apply(limit_fds, false) == worker);
    pool.close();
    pool.join();
}

TEST_CASE("SharedMemory: the block goes with its last handle, and a Queue holding one keeps it") {
    const std::size_t before = blocks_mapped();
    mproc::Queue<mproc::SharedMemory> q;
    {
        mproc::SharedMemory block(std::size_t{1} << 20);
        block.buf()[5] = std::byte{9};
        CHECK(blocks_mapped() == before + 1);
        q.put(block);
    }
    CHECK(blocks_mapped() == before + 1);  // only the queue holds it now
    mproc::SharedMemory got = q.get();
    CHECK(got.buf()[5] == std::byte{9});
    got.close();
    CHECK(blocks_mapped() == before);
    CHECK(mproc::detail::segments().retained_count() == 0);
}

TEST_CASE("SharedMemory: a handle of another kind, an empty one and a corrupt one are clear errors") {
    mproc::RawArray<std::byte> array(std::size_t{1} << 20);
    std::vector<std::byte> other{std::byte{1}};  // "a block", then the array's handle
    for (std::byte b : mproc::to_bytes(array)) other.push_back(b);
    CHECK_THROWS_AS(mproc::from_bytes<mproc::SharedMemory>(other), mproc::SerializationError);
    CHECK(mproc::from_bytes<mproc::SharedMemory>(mproc::to_bytes(mproc::SharedMemory())).empty());

    mproc::SharedMemory block(64);
    std::vector<std::byte> bytes = mproc::to_bytes(block);
    CHECK(mproc::from_bytes<mproc::SharedMemory>(bytes) == block);
    bytes.back() = std::byte{0x7f};  // an offset far past the end of its segment
    CHECK_THROWS_AS(mproc::from_bytes<mproc::SharedMemory>(bytes), mproc::SerializationError);
    bytes.front() = std::byte{2};  // neither "empty" nor "a block"
    CHECK_THROWS_AS(mproc::from_bytes<mproc::SharedMemory>(bytes), mproc::SerializationError);
    bytes.front() = std::byte{1};
    bytes.pop_back();  // cut short
    CHECK_THROWS_AS(mproc::from_bytes<mproc::SharedMemory>(bytes), mproc::SerializationError);
}

TEST_CASE("SharedMemory: past the file size limit (ulimit -f) a shared object is an mproc::Error, not SIGXFSZ") {
    // A memfd counts as a file: sizing one past RLIMIT_FSIZE raised SIGXFSZ, which ended the
    // process. Limits set in a child stay there.
    mproc::Process child([] {
        rlimit fsize{};
        ::getrlimit(RLIMIT_FSIZE, &fsize);
        fsize.rlim_cur = 1 << 20;
        if (::setrlimit(RLIMIT_FSIZE, &fsize) != 0) std::_Exit(2);
        mproc_test::Refusals refused;
        refused.expect([] { mproc::Queue<int> q; });  // a 1 GiB ring
        refused.expect([] { mproc::SharedMemory block(std::size_t{2} << 20); });
        refused.expect([] { mproc::SharedDict<std::string, int> d; });
        const mproc::SharedMemory small(std::size_t{64} << 10);  // under the limit: made
        std::_Exit(refused.count == 3 && small.size() >= (std::size_t{64} << 10) ? 0 : 10 + refused.count);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode().value_or(-1000) == 0);
}
