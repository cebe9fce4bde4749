// Twin of docs/python-twins/queue_example.py, the Python tutorial program for Queue:
//
//     def f(q):
//         q.put([42, None, 'hello'])
//     q = Queue()
//     p = Process(target=f, args=(q,)); p.start()
//     print(q.get())    # prints "[42, None, 'hello']"
//     p.join()
//
// Python's list holds values of any type; in C++ the item is a tuple of an int, an int that may be
// absent (None) and a string, printed the way Python prints the list. The queue is a handle: the
// child's copy refers to the same queue.
#include <mproc/process.hpp>
#include <mproc/queue.hpp>

#include <fmt/core.h>
#include <optional>
#include <string>
#include <tuple>

using Item = std::tuple<int, std::optional<int>, std::string>;

void f(mproc::Queue<Item> q) { q.put({42, std::nullopt, "hello"}); }

std::string python_repr(const Item& item) {
    const auto& [number, maybe, text] = item;
    return fmt::format("[{}, {}, '{}']", number, maybe ? std::to_string(*maybe) : "None", text);
}

int main() {
    mproc::Queue<Item> q;
    mproc::Process p(f, q);
    p.start();
    fmt::print("{}\n", python_repr(q.get()));
    p.join();
}
