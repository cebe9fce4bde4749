// A task that crashes its worker does not hang the pool (Python's Pool would wait forever): that
// one item fails with mproc::WorkerLost, a replacement worker starts, and every other item
// completes. imap hands out each item's outcome in order, so the loop sees exactly which failed.
#include <mproc/pool.hpp>

#include <csignal>
#include <fmt/core.h>
#include <vector>

int risky_square(int x) {
    if (x == 3) std::raise(SIGSEGV);  // a bug in the task: the worker dies
    return x * x;
}

int main() {
    mproc::Pool pool(2);
    const std::vector<int> xs = {0, 1, 2, 3, 4, 5};
    auto results = pool.imap(risky_square, xs);
    int x = 0;
    for (auto it = results.begin(); it != results.end(); ++it, ++x) {
        try {
            fmt::print("risky_square({}) = {}\n", x, *it);
        } catch (const mproc::WorkerLost& lost) {
            fmt::print("risky_square({}) failed: the worker died by signal {}\n", x, lost.signal());
        }
    }
    // The pool is still whole: the dead worker was replaced.
    fmt::print("after the crash: pool.apply(risky_square, 7) = {}\n", pool.apply(risky_square, 7));
    pool.close();
    pool.join();
}
