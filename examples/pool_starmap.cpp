// Twin of docs/python-twins/pool_starmap.py, the Python tutorial program for Pool.starmap:
//
//     def my_print(x, y):
//         print(x + y)    # sometimes 2 4 3 6 5: the workers run in any order
//         return(x + y)
//     x = [1, 2, 3, 4, 5]
//     y = [1, 1, 1, 1, 1]
//     zip_args = list(zip(x, y))
//     pool = Pool(5)
//     output = pool.starmap(my_print, zip_args)
//     pool.close()
//     pool.join()
//     print(output)   # always [2, 3, 4, 5, 6]
#include <mproc/pool.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <ranges>
#include <tuple>
#include <vector>

int my_print(int x, int y) {
    fmt::print("{}\n", x + y);
    std::fflush(stdout);
    return x + y;
}

int main() {
    const std::vector<int> x = {1, 2, 3, 4, 5};
    const std::vector<int> y = {1, 1, 1, 1, 1};
    std::vector<std::tuple<int, int>> zip_args;
    for (std::size_t i = 0; i < x.size(); ++i) zip_args.emplace_back(x[i], y[i]);

    mproc::Pool pool(5);
    const std::vector<int> output = pool.starmap(my_print, zip_args);
    pool.close();
    pool.join();
    fmt::print("{}\n", output);
}
