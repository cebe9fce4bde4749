# include/mproc/version.hpp spells out project(mproc VERSION ...) for the preprocessor: the two must
# agree, or the headers would report one version and the CMake and pkg-config packages another.
# Included by CMakeLists.txt after project(); fails the configuration when they differ.
file(STRINGS "${PROJECT_SOURCE_DIR}/include/mproc/version.hpp" _mproc_version_defines
     REGEX "^#define MPROC_VERSION_(MAJOR|MINOR|PATCH) +[0-9]+$")
set(_mproc_header_version)
foreach(_mproc_part MAJOR MINOR PATCH)
    if(NOT _mproc_version_defines MATCHES "MPROC_VERSION_${_mproc_part} +([0-9]+)")
        message(FATAL_ERROR "include/mproc/version.hpp: no `#define MPROC_VERSION_${_mproc_part} <number>` line")
    endif()
    list(APPEND _mproc_header_version "${CMAKE_MATCH_1}")
endforeach()
list(JOIN _mproc_header_version "." _mproc_header_version)
if(NOT _mproc_header_version STREQUAL PROJECT_VERSION)
    message(FATAL_ERROR
        "include/mproc/version.hpp says ${_mproc_header_version}, CMakeLists.txt's project(mproc VERSION) says "
        "${PROJECT_VERSION}: a new version changes both (CONTRIBUTING.md, \"Versions\")")
endif()
unset(_mproc_version_defines)
unset(_mproc_header_version)
unset(_mproc_part)
