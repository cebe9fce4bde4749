// Twin of docs/python-twins/shared_dict.py, the Python tutorial program for Manager:
//
//     def func(dic, c):
//         dic['count'] += c
//     d = Manager().dict()
//     d['count'] = 0
//     args = [(d,1), (d,2), (d,3), (d,4), (d,5)]
//     pool = Pool(5)
//     pool.starmap(func, args)
//     pool.close(); pool.join()
//     print(f'dic={d}')      # dic={'count': 15} -- or less: Python's += is not atomic
//
// `dic["count"] += c` on a SharedDict is one atomic read-modify-write, so this prints
// dic={"count": 15} every run. The dict is a handle: each task's copy is the same dict.
#include <mproc/pool.hpp>
#include <mproc/shared_dict.hpp>

#include <fmt/core.h>
#include <string>
#include <tuple>
#include <vector>

using Dict = mproc::SharedDict<std::string, int>;

void func(Dict dic, int c) { dic["count"] += c; }

int main() {
    Dict d;  // created before the pool, so its workers have its memory
    d["count"] = 0;

    const std::vector<std::tuple<Dict, int>> args = {{d, 1}, {d, 2}, {d, 3}, {d, 4}, {d, 5}};
    mproc::Pool pool(5);
    pool.starmap(func, args);
    pool.close();
    pool.join();
    fmt::print("dic={}\n", d);
}
