// A program for test_process: writes through printf, iostream and fmt without a newline or a flush,
// then starts a Process whose child writes buffered output of its own and returns (or, with
// "exit", leaves through std::exit). Run with stdout on a pipe, where stdio buffers fully, every
// token must come out exactly once: the parent's not duplicated by the fork, the child's not lost.
//
//     buffered_output [synced|unsynced] [return|exit] [rdbuf|wide|tied]
// "unsynced" turns off std::ios::sync_with_stdio, so std::cout keeps a buffer of its own. With
// "rdbuf" the child also gives std::cout a buffer of its own (a filebuf on /dev/stdout, never
// destroyed) and writes <child-rdbuf> through it: only the child's last flush sends it. With
// "wide" (unsynced only: a synced std::wcout would write wide characters into the byte-oriented
// stdout) the child writes <child-wide> through std::wcout, which then has a buffer of its own.
// With "tied" the child ties std::cerr to a stream of its own on /dev/stdout (never destroyed)
// and writes <child-tied> there: only flushing std::cerr, which flushes its tie, sends it.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fmt/core.h>
#include <fstream>
#include <iostream>
#include <mproc/process.hpp>

int main(int argc, char** argv) {
    const bool unsynced = argc > 1 && std::strcmp(argv[1], "unsynced") == 0;
    const bool child_exits = argc > 2 && std::strcmp(argv[2], "exit") == 0;
    const bool own_buffer = argc > 3 && std::strcmp(argv[3], "rdbuf") == 0;
    const bool wide = argc > 3 && std::strcmp(argv[3], "wide") == 0;
    const bool tied = argc > 3 && std::strcmp(argv[3], "tied") == 0;
    if (unsynced) std::ios::sync_with_stdio(false);

    std::printf("<parent-printf>");
    std::cout << "<parent-iostream>";
    fmt::print("<parent-fmt>");

    mproc::Process child([child_exits, own_buffer, wide, tied] {
        std::printf("<child-printf>");
        std::cout << "<child-iostream>";
        fmt::print("<child-fmt>");
        if (wide) std::wcout << L"<child-wide>";
        if (tied) {
            std::fflush(stdout);  // what came before goes first
            auto* out = new std::ofstream("/dev/stdout");  // never destroyed: its destructor would flush it
            std::cerr.tie(out);
            *out << "<child-tied>";
        }
        if (own_buffer) {
            std::cout.flush();  // what came before goes first
            std::fflush(stdout);
            auto* buffer = new std::filebuf;  // never destroyed: its destructor would flush it
            if (!buffer->open("/dev/stdout", std::ios::out)) return;
            std::cout.rdbuf(buffer);
            std::cout << "<child-rdbuf>";
        }
        if (child_exits) std::exit(0);
    });
    child.start();
    child.join();

    std::printf("<parent-after>");
    return child.exitcode() == 0 ? 0 : 1;
}
