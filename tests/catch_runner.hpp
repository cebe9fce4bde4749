// The entry to Catch2's session (tests/catch_runner.cpp): the Session class is only declared in the
// translation unit that holds Catch2's implementation.
#pragma once

namespace mproc_test {
int run_catch(int argc, char** argv);
}
