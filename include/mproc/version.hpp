// mproc's version: macros for the preprocessor, mproc::version() for the program.
//
// The three numbers below are the version of these headers, and the same as CMake's
// `project(mproc VERSION ...)` in CMakeLists.txt: configuring mproc with CMake fails if they differ
// (cmake/version.cmake), and the test test_version compares them. A release changes both.
#pragma once

#include <string_view>

/// mproc's version, MAJOR.MINOR.PATCH (semantic versioning).
#define MPROC_VERSION_MAJOR 0
#define MPROC_VERSION_MINOR 1
#define MPROC_VERSION_PATCH 0

/// The version as one number, for `#if`: MAJOR * 10000 + MINOR * 100 + PATCH (0.1.0 is 100, 1.2.3 is
/// 10203; MINOR and PATCH stay below 100). `#if MPROC_VERSION >= 200` means "0.2.0 or later".
#define MPROC_VERSION (MPROC_VERSION_MAJOR * 10000 + MPROC_VERSION_MINOR * 100 + MPROC_VERSION_PATCH)

#define MPROC_DETAIL_STR(x) MPROC_DETAIL_STR_(x)
#define MPROC_DETAIL_STR_(x) #x
/// The version as a string literal, "MAJOR.MINOR.PATCH" ("0.1.0").
#define MPROC_VERSION_STRING              \
    MPROC_DETAIL_STR(MPROC_VERSION_MAJOR) \
    "." MPROC_DETAIL_STR(MPROC_VERSION_MINOR) "." MPROC_DETAIL_STR(MPROC_VERSION_PATCH)

namespace mproc {

/// The version of the mproc headers this program was compiled with, "MAJOR.MINOR.PATCH" (the
/// value of MPROC_VERSION_STRING), e.g. for a program's --version output or a log line.
constexpr std::string_view version() noexcept { return MPROC_VERSION_STRING; }

}  // namespace mproc
