// Driven by tests/mpi/expect_exit.cmake under mpirun: how an MPI job with an mproc::mpi::Pool ends.
//   kill     a task SIGKILLs its own rank (rank 2) mid-map: the job must end with an error, not hang
//   status N rank 0 returns N after using a pool: every rank ends, mpirun exits with N
//   throw    rank 0 leaves main by an exception while a pool has work
//   exit N   rank 0 calls std::exit(N) with a pool still open
//   idle     rank 0 never creates a pool
//   alone    run without mpirun: creating a pool is a clear mproc::Error
#include <mproc/mpi.hpp>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

int die_on_rank_two(int x) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 2 && x == 5) ::raise(SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return x;
}
int slow(int x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return x;
}

}  // namespace

int main(int argc, char** argv) {
    mproc::mpi::Init mpi(argc, argv);
    const std::string mode = argc > 1 ? argv[1] : "";
    const int n = argc > 2 ? std::atoi(argv[2]) : 0;
    std::vector<int> xs(100);
    for (int i = 0; i < 100; ++i) xs[static_cast<std::size_t>(i)] = i;

    if (mode == "kill") {
        mproc::mpi::Pool pool;
        pool.map(die_on_rank_two, xs, 1);
        std::puts("map finished although a rank died");
        return 0;
    }
    if (mode == "status") {
        mproc::mpi::Pool pool;
        const auto r = pool.map(slow, std::vector<int>{1, 2, 3, 4});
        pool.close();
        pool.join();
        std::printf("mapped %zu, returning %d\n", r.size(), n);
        return n;
    }
    if (mode == "throw") {
        mproc::mpi::Pool pool;
        for (int x : xs) pool.apply_async(slow, std::tuple{x});
        throw std::runtime_error("rank 0 gives up");
    }
    if (mode == "exit") {
        mproc::mpi::Pool pool;
        for (int i = 0; i < 6; ++i) pool.apply_async(slow, std::tuple{i});
        std::exit(n);
    }
    if (mode == "idle") return 0;
    if (mode == "alone") {
        try {
            mproc::mpi::Pool pool;
        } catch (const mproc::Error& e) {
            std::printf("mproc::Error: %s\n", e.what());
            return 0;
        }
        return 1;
    }
    std::fprintf(stderr, "unknown mode '%s'\n", mode.c_str());
    return 2;
}
