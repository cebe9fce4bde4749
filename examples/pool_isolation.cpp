// Four tasks that would take a Python Pool down — one leaks, one blows its memory limit, one hangs,
// one is not wanted any more — beside tasks that complete. Each bad one is contained: the leaking
// worker is recycled, the greedy one ends at its limit, the hung one is cut off by the watchdog,
// the unwanted one is cancelled while it runs; every other result arrives, and pool.stats() shows
// what each worker went through.
#include <mproc/pool.hpp>

#include <chrono>
#include <cstddef>
#include <fmt/format.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace std::chrono_literals;

int square(int x) { return x * x; }

/// Leaks 32 MiB (touched) every call.
int leaky(int x) {
    static std::vector<std::vector<char>> kept;  // never freed: the worker grows with every call
    kept.emplace_back(std::size_t{32} << 20, 1);
    return x + kept.back()[0] - 1;
}

/// Wants 2 GiB at once.
int greedy(int x) {
    std::vector<char> huge(std::size_t{2} << 30, 1);
    return x + static_cast<int>(huge.back());
}

/// Never returns.
[[noreturn]] int hangs(int) {
    for (;;) ::pause();
}

/// Takes a while.
int slow(int x) {
    std::this_thread::sleep_for(10s);
    return x;
}

template <class T> void show(const char* what, mproc::AsyncResult<T>& r) {
    try {
        fmt::print("{:<8} -> {}\n", what, r.get());
    } catch (const mproc::Error& e) {
        fmt::print("{:<8} -> {}\n", what, e.what());
    }
}

int main() {
    mproc::Pool pool({.processes = 2,
                      .max_memory_per_child = std::size_t{96} << 20,  // recycle a worker above 96 MiB after a task
                      .memory_limit = std::size_t{256} << 20,         // end a worker allocating 256 MiB more
                      .stall_timeout = 5s});                          // nothing moves for 5 s: fail what is pending

    for (int i = 0; i < 6; ++i) {  // the leaking worker is recycled along the way
        auto leaked = pool.apply_async(leaky, std::tuple{i});
        show("leaky", leaked);
    }
    auto greedy_result = pool.apply_async(greedy, std::tuple{1});
    show("greedy", greedy_result);

    auto slow_result = pool.apply_async(slow, std::tuple{2});
    std::this_thread::sleep_for(200ms);  // it is running now
    fmt::print("cancel   -> {}\n", slow_result.cancel());
    show("slow", slow_result);

    auto hung = pool.apply_async(hangs, std::tuple{3});
    show("hangs", hung);

    std::vector<int> xs = {1, 2, 3, 4, 5};
    fmt::print("map      -> {}\n", fmt::join(pool.map(square, xs), ", "));

    fmt::print("\n{}\n", pool.stats());
    pool.close();
    pool.join();
}
