// Twin of docs/python-twins/process_hello.py, the Python tutorial program for Process:
//
//     def f(name):
//         print('hello', name)
//     p = Process(target=f, args=('bob',)); p.start(); p.join()
//
// prints: hello bob
#include <mproc/process.hpp>

#include <fmt/core.h>
#include <string>

void f(const std::string& name) { fmt::print("hello {}\n", name); }

int main() {
    mproc::Process p(f, std::string("bob"));
    p.start();
    p.join();
}
