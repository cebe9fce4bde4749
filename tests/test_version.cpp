// The version macros and mproc::version() say the version CMake's project() declares
// (tests/CMakeLists.txt passes it in as MPROC_PROJECT_VERSION*), and <mproc/mproc.hpp> brings them.
#include <catch2/catch.hpp>
#include <mproc/mproc.hpp>

#include <string>
#include <string_view>

static_assert(MPROC_VERSION == MPROC_VERSION_MAJOR * 10000 + MPROC_VERSION_MINOR * 100 + MPROC_VERSION_PATCH);
static_assert(MPROC_VERSION_MINOR < 100 && MPROC_VERSION_PATCH < 100,
              "MPROC_VERSION's encoding needs MINOR, PATCH < 100");
static_assert(!mproc::version().empty(), "mproc::version() is usable in constant expressions");

TEST_CASE("The version macros are CMake's project version") {
    CHECK(MPROC_VERSION_MAJOR == MPROC_PROJECT_VERSION_MAJOR);
    CHECK(MPROC_VERSION_MINOR == MPROC_PROJECT_VERSION_MINOR);
    CHECK(MPROC_VERSION_PATCH == MPROC_PROJECT_VERSION_PATCH);
    CHECK(MPROC_VERSION ==
          MPROC_PROJECT_VERSION_MAJOR * 10000 + MPROC_PROJECT_VERSION_MINOR * 100 + MPROC_PROJECT_VERSION_PATCH);
    CHECK(std::string(MPROC_VERSION_STRING) == MPROC_PROJECT_VERSION);
}

TEST_CASE("mproc::version() is MAJOR.MINOR.PATCH, CMake's project version") {
    CHECK(mproc::version() == MPROC_PROJECT_VERSION);
    CHECK(mproc::version() == std::string_view(MPROC_VERSION_STRING));
    const std::string expected = std::to_string(MPROC_VERSION_MAJOR) + "." + std::to_string(MPROC_VERSION_MINOR) + "." +
                                 std::to_string(MPROC_VERSION_PATCH);
    CHECK(mproc::version() == expected);
}
