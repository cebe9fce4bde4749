# cmake -DBUILD_DIR=<dir> -DTARGET=<target> -DEXPECT=<success|failure> [-DTYPE_REGEX=<regex>]
#       [-DDIAGNOSTIC=<text>] -P expect_build.cmake
#
# Builds one target. EXPECT=success: the build must succeed. EXPECT=failure: the build must fail,
# and its output must contain mproc's diagnostic (DIAGNOSTIC, by default "cannot be serialised")
# and match TYPE_REGEX (the name of the rejected type).
foreach(var BUILD_DIR TARGET EXPECT)
    if(NOT DEFINED ${var})
        message(FATAL_ERROR "expect_build.cmake: ${var} is not set")
    endif()
endforeach()

execute_process(
    COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${TARGET}
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)

if(EXPECT STREQUAL "success")
    if(NOT result EQUAL 0)
        message(FATAL_ERROR "${TARGET} should compile but did not:\n${output}")
    endif()
    message(STATUS "${TARGET} compiled, as it should")
    return()
endif()

if(result EQUAL 0)
    message(FATAL_ERROR "${TARGET} compiled, but it must be rejected at compile time")
endif()
if(NOT DEFINED DIAGNOSTIC)
    set(DIAGNOSTIC "cannot be serialised")
endif()
string(FIND "${output}" "${DIAGNOSTIC}" at)
if(at EQUAL -1)
    message(FATAL_ERROR "${TARGET} failed to compile without the \"${DIAGNOSTIC}\" diagnostic:\n${output}")
endif()
if(NOT output MATCHES "${TYPE_REGEX}")
    message(FATAL_ERROR "${TARGET}'s diagnostic does not name the type (/${TYPE_REGEX}/):\n${output}")
endif()
message(STATUS "${TARGET} was rejected with a diagnostic naming the type, as it should be")
