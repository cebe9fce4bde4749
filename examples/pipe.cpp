// Twin of docs/python-twins/pipe.py, the Python tutorial program for Pipe:
//
//     def f(conn):
//         conn.send([42, None, 'hello'])
//         conn.close()
//     parent_conn, child_conn = Pipe()
//     p = Process(target=f, args=(child_conn,)); p.start()
//     print(parent_conn.recv())   # prints "[42, None, 'hello']"
//     p.join()
//
// Python's list holds values of any type; in C++ the message is a tuple of an int, an int that may
// be absent (None) and a string, printed the way Python prints the list.
#include <mproc/pipe.hpp>
#include <mproc/process.hpp>

#include <fmt/core.h>
#include <optional>
#include <string>
#include <tuple>

using Message = std::tuple<int, std::optional<int>, std::string>;

void f(mproc::Connection<Message>& conn) {
    conn.send({42, std::nullopt, "hello"});
    conn.close();
}

std::string python_repr(const Message& m) {
    const auto& [number, maybe, text] = m;
    return fmt::format("[{}, {}, '{}']", number, maybe ? std::to_string(*maybe) : "None", text);
}

int main() {
    auto [parent_conn, child_conn] = mproc::Pipe<Message>();
    mproc::Process p([&] { f(child_conn); });
    p.start();
    fmt::print("{}\n", python_repr(parent_conn.recv()));
    p.join();
}
