# cmake -DMODE=installed|subdirectory|pkgconfig -DSOURCE_DIR=<mproc> -DWORK_DIR=<scratch> -DCXX=<compiler>
#       [-DPKG_CONFIG=<pkg-config>] -P check.cmake
#
# installed:     `cmake --install` mproc into WORK_DIR/prefix, then build the consumer with
#                find_package(mproc CONFIG REQUIRED) against that prefix, and run it.
# subdirectory:  build the consumer with add_subdirectory(mproc source tree), and run it.
# pkgconfig:     `cmake --install` mproc into WORK_DIR/prefix, then build the consumer with nothing but
#                the compiler and `pkg-config --cflags --libs mproc` (mproc.pc of that prefix), and run it.
# Each way, the consumer also checks that mproc::version() is the version its package declares.
cmake_minimum_required(VERSION 3.20)
foreach(var MODE SOURCE_DIR WORK_DIR CXX)
    if(NOT DEFINED ${var})
        message(FATAL_ERROR "check.cmake: -D${var}=... is required")
    endif()
endforeach()

function(run)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        string(REPLACE ";" " " shown "${ARGN}")
        message(FATAL_ERROR "consumer (${MODE}): failed (${rc}): ${shown}")
    endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(consumer_build "${WORK_DIR}/build")
set(configure_args -S "${SOURCE_DIR}/tests/consumer" -B "${consumer_build}" -DCMAKE_CXX_COMPILER=${CXX}
    -DCMAKE_BUILD_TYPE=Release)

# install_mproc(): a build of mproc of its own, with nothing but the library, installed into
# WORK_DIR/prefix: what a packager installs. Sets `prefix`.
macro(install_mproc)
    set(prefix "${WORK_DIR}/prefix")
    run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/mproc" -DCMAKE_CXX_COMPILER=${CXX}
        -DMPROC_BUILD_TESTS=OFF -DMPROC_BUILD_EXAMPLES=OFF -DMPROC_BUILD_BENCHMARKS=OFF
        "-DCMAKE_INSTALL_PREFIX=${prefix}")
    run(${CMAKE_COMMAND} --install "${WORK_DIR}/mproc")
    foreach(file include/mproc/mproc.hpp include/mproc/version.hpp include/mproc/detail/os/fork.hpp)
        if(NOT EXISTS "${prefix}/${file}")
            message(FATAL_ERROR "consumer (${MODE}): ${file} was not installed")
        endif()
    endforeach()
endmacro()

set(consumer_program "${consumer_build}/consumer")
if(MODE STREQUAL "installed")
    install_mproc()
    file(GLOB_RECURSE config_files "${prefix}/*/mprocConfig.cmake" "${prefix}/*/mprocConfigVersion.cmake")
    list(LENGTH config_files n)
    if(NOT n EQUAL 2)
        message(FATAL_ERROR "consumer (installed): expected mprocConfig.cmake and mprocConfigVersion.cmake, found: ${config_files}")
    endif()
    run(${CMAKE_COMMAND} ${configure_args} "-DCMAKE_PREFIX_PATH=${prefix}")
    run(${CMAKE_COMMAND} --build "${consumer_build}" -j 2)
elseif(MODE STREQUAL "subdirectory")
    run(${CMAKE_COMMAND} ${configure_args} "-DMPROC_SOURCE_DIR=${SOURCE_DIR}")
    run(${CMAKE_COMMAND} --build "${consumer_build}" -j 2)
elseif(MODE STREQUAL "pkgconfig")
    if(NOT PKG_CONFIG)
        message(FATAL_ERROR "consumer (pkgconfig): -DPKG_CONFIG=<pkg-config program> is required")
    endif()
    install_mproc()
    file(GLOB_RECURSE pc_files "${prefix}/*/mproc.pc")
    list(LENGTH pc_files n)
    if(NOT n EQUAL 1)
        message(FATAL_ERROR "consumer (pkgconfig): expected one mproc.pc under ${prefix}, found: ${pc_files}")
    endif()
    get_filename_component(pc_dir "${pc_files}" DIRECTORY)
    # Only this prefix's mproc.pc (pkg-config still finds fmt.pc where the system keeps it).
    set(ENV{PKG_CONFIG_PATH} "${pc_dir}")
    foreach(query cflags libs modversion)
        execute_process(COMMAND ${PKG_CONFIG} --${query} mproc RESULT_VARIABLE rc
                        OUTPUT_VARIABLE pc_${query} ERROR_VARIABLE err OUTPUT_STRIP_TRAILING_WHITESPACE)
        if(NOT rc EQUAL 0)
            message(FATAL_ERROR "consumer (pkgconfig): pkg-config --${query} mproc failed (${rc}): ${err}")
        endif()
    endforeach()
    message(STATUS "consumer (pkgconfig): mproc ${pc_modversion}: ${pc_cflags} ${pc_libs}")
    string(FIND " ${pc_cflags} " " -I${prefix}/include " at)
    if(at EQUAL -1)
        message(FATAL_ERROR "consumer (pkgconfig): --cflags does not name ${prefix}/include: ${pc_cflags}")
    endif()
    separate_arguments(cflags UNIX_COMMAND "${pc_cflags}")
    separate_arguments(libs UNIX_COMMAND "${pc_libs}")
    # The plain command a user types: c++ -std=c++20 $(pkg-config --cflags --libs mproc) main.cpp
    file(MAKE_DIRECTORY "${consumer_build}")
    run(${CXX} -std=c++20 -O2 -Wall -Wextra -Wpedantic -Werror "-DMPROC_EXPECTED_VERSION=\"${pc_modversion}\""
        ${cflags} "${SOURCE_DIR}/tests/consumer/main.cpp" ${libs} -o "${consumer_program}")
else()
    message(FATAL_ERROR "check.cmake: MODE must be installed, subdirectory or pkgconfig, not '${MODE}'")
endif()

execute_process(COMMAND "${consumer_program}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
message(STATUS "consumer (${MODE}) printed: ${out}")
if(NOT rc EQUAL 0 OR NOT out STREQUAL "consumer ok\n")
    message(FATAL_ERROR "consumer (${MODE}): the program failed (${rc}): ${out}")
endif()
