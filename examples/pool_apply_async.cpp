// Twin of docs/python-twins/pool_apply_async.py, the Python tutorial program for Pool.apply_async:
//
//     def foo_pool(x):
//         return x*x
//     result_list = []
//     def log_result(result):
//         result_list.append(result)      # runs in the main process, not in the workers
//     pool = Pool()
//     for i in range(10):
//         pool.apply_async(foo_pool, args=(i, ), callback=log_result)
//     pool.close()
//     pool.join()
//     print(result_list)    # e.g. [1, 0, 4, 9, 25, 16, 49, 36, 81, 64]: completion order
#include <mproc/pool.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <tuple>
#include <vector>

int foo_pool(int x) { return x * x; }

int main() {
    std::vector<int> result_list;  // touched only by the callback, which runs in this process
    mproc::Pool pool;
    for (int i = 0; i < 10; ++i)
        pool.apply_async(foo_pool, std::tuple{i}, [&](int result) { result_list.push_back(result); });
    pool.close();
    pool.join();
    fmt::print("{}\n", result_list);
}
