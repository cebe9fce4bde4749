#include <catch2/catch.hpp>
#include <mproc/process.hpp>

#include "support.hpp"

TEST_CASE("a process that returns exits with 0") {
    mproc::Process p([] {});
    p.start();
    REQUIRE(p.join());
    CHECK(p.exitcode() == 0);
    CHECK(mproc_test::child_count() == 0);
}
