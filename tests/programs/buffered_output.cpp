// A program for test_process: writes through printf, iostream and fmt without a newline or a flush,
// then starts a Process whose child writes buffered output of its own and returns (or, with
// "exit", leaves through std::exit). Run with stdout on a pipe, where stdio buffers fully, every
// token must come out exactly once: the parent's not duplicated by the fork, the child's not lost.
//
//     buffered_output [synced|unsynced] [return|exit]
// "unsynced" turns off std::ios::sync_with_stdio, so std::cout keeps a buffer of its own.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fmt/core.h>
#include <iostream>
#include <mproc/process.hpp>

int main(int argc, char** argv) {
    const bool unsynced = argc > 1 && std::strcmp(argv[1], "unsynced") == 0;
    const bool child_exits = argc > 2 && std::strcmp(argv[2], "exit") == 0;
    if (unsynced) std::ios::sync_with_stdio(false);

    std::printf("<parent-printf>");
    std::cout << "<parent-iostream>";
    fmt::print("<parent-fmt>");

    mproc::Process child([child_exits] {
        std::printf("<child-printf>");
        std::cout << "<child-iostream>";
        fmt::print("<child-fmt>");
        if (child_exits) std::exit(0);
    });
    child.start();
    child.join();

    std::printf("<parent-after>");
    return child.exitcode() == 0 ? 0 : 1;
}
