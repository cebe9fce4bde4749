// mproc::mpi::Pool: the Pool across MPI ranks. Build with the mproc::mpi CMake target, then
//
//     mpirun -n 4 ./mpi_pool                    # on this machine: rank 0 + 3 workers
//     mpirun --host a,b,c,d ./mpi_pool          # one rank per host (same binary path on each)
//
// Rank 0 runs main; every other rank serves the pool's tasks inside `mproc::mpi::Init` and leaves
// when rank 0's main ends. The code is the local Pool's, but for `Init` and the `mpi::` of Pool.
#include <mproc/mpi.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <numeric>
#include <tuple>
#include <vector>

long long square(long long x) { return x * x; }
int add(int x, int y) { return x + y; }

int main(int argc, char** argv) {
    mproc::mpi::Init mpi(argc, argv);  // the one line that makes it an MPI program

    mproc::mpi::Pool pool;  // one worker per rank but rank 0
    fmt::print("{} worker ranks\n", pool.processes());

    std::vector<int> result_list;  // filled by the callback, on rank 0, in completion order
    for (int i = 0; i < 10; ++i)
        pool.apply_async(square, std::tuple{i}, [&](long long r) { result_list.push_back(static_cast<int>(r)); });

    const std::vector<int> sums = pool.starmap(add, std::vector<std::tuple<int, int>>{{1, 1}, {2, 1}, {3, 1}});
    fmt::print("starmap: {}\n", sums);  // always [2, 3, 4]

    std::vector<long long> xs(100'000);
    std::iota(xs.begin(), xs.end(), 0LL);
    const std::vector<long long> squares = pool.map(square, xs);  // in input order
    fmt::print("sum of squares below 100000: {}\n", std::accumulate(squares.begin(), squares.end(), 0LL));

    pool.close();
    pool.join();
    fmt::print("apply_async results: {}\n", result_list);
}
