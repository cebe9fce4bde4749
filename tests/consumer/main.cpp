// The consumer's program: a Pool, a Queue and a SharedDict, through the umbrella header.
// Prints "consumer ok" and exits 0 when every part gave the right answer, and the headers' version
// (mproc::version()) is MPROC_EXPECTED_VERSION, the version the package that built it declares.
#include <mproc/mproc.hpp>

#include <fmt/core.h>
#include <string>
#include <vector>

int square(int x) { return x * x; }

int main() {
    mproc::ChildGuard guard;
    mproc::Queue<std::string> queue;
    mproc::SharedDict<std::string, int> dict;
    dict["count"] = 0;

    mproc::Process producer([&] {
        queue.put("from the child");
        dict["count"] += 2;
    });
    producer.start();
    const std::string got = queue.get();
    producer.join();

    mproc::Pool pool(2);
    const std::vector<int> squares = pool.map(square, std::vector<int>{1, 2, 3, 4});
    pool.close();
    pool.join();

    const bool ok = got == "from the child" && producer.exitcode() == 0 && dict["count"] == 2 &&
                    squares == std::vector<int>{1, 4, 9, 16};
    if (mproc::version() != MPROC_EXPECTED_VERSION) {
        fmt::print("the headers say mproc {}, the package {}\n", mproc::version(), MPROC_EXPECTED_VERSION);
        return 1;
    }
    fmt::print("{}\n", ok ? "consumer ok" : "consumer FAILED");
    return ok ? 0 : 1;
}
