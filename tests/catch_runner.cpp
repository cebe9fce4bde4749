// Catch2's implementation and session, compiled once per build and shared by every test program.
// It is built at -O0 whatever the build type: it is the slowest source of the suite to compile (and
// to optimise), and nothing in it is under test.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "catch_runner.hpp"

int mproc_test::run_catch(int argc, char** argv) { return Catch::Session().run(argc, argv); }
