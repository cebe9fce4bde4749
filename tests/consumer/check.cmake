# cmake -DMODE=installed|subdirectory -DSOURCE_DIR=<mproc> -DWORK_DIR=<scratch> -DCXX=<compiler>
#       -P check.cmake
#
# installed:     `cmake --install` mproc into WORK_DIR/prefix, then build the consumer with
#                find_package(mproc CONFIG REQUIRED) against that prefix, and run it.
# subdirectory:  build the consumer with add_subdirectory(mproc source tree), and run it.
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

if(MODE STREQUAL "installed")
    set(prefix "${WORK_DIR}/prefix")
    # A build of mproc of its own, with nothing but the library: what a packager installs.
    run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/mproc" -DCMAKE_CXX_COMPILER=${CXX}
        -DMPROC_BUILD_TESTS=OFF -DMPROC_BUILD_EXAMPLES=OFF -DMPROC_BUILD_BENCHMARKS=OFF
        "-DCMAKE_INSTALL_PREFIX=${prefix}")
    run(${CMAKE_COMMAND} --install "${WORK_DIR}/mproc")
    foreach(file include/mproc/mproc.hpp include/mproc/detail/os/fork.hpp)
        if(NOT EXISTS "${prefix}/${file}")
            message(FATAL_ERROR "consumer (installed): ${file} was not installed")
        endif()
    endforeach()
    file(GLOB_RECURSE config_files "${prefix}/*/mprocConfig.cmake" "${prefix}/*/mprocConfigVersion.cmake")
    list(LENGTH config_files n)
    if(NOT n EQUAL 2)
        message(FATAL_ERROR "consumer (installed): expected mprocConfig.cmake and mprocConfigVersion.cmake, found: ${config_files}")
    endif()
    run(${CMAKE_COMMAND} ${configure_args} "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(MODE STREQUAL "subdirectory")
    run(${CMAKE_COMMAND} ${configure_args} "-DMPROC_SOURCE_DIR=${SOURCE_DIR}")
else()
    message(FATAL_ERROR "check.cmake: MODE must be installed or subdirectory, not '${MODE}'")
endif()

run(${CMAKE_COMMAND} --build "${consumer_build}" -j 2)
execute_process(COMMAND "${consumer_build}/consumer" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
message(STATUS "consumer (${MODE}) printed: ${out}")
if(NOT rc EQUAL 0 OR NOT out STREQUAL "consumer ok\n")
    message(FATAL_ERROR "consumer (${MODE}): the program failed (${rc}): ${out}")
endif()
