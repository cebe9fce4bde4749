# Runs COMMAND (a ;-list) with a deadline and checks how it ended:
#   -DEXPECT=<status>   the exit status it must end with ("nonzero": anything but 0)
#   -DDEADLINE=<s>      it must end within this many seconds (a hang is a failure)
#   -DOUTPUT=<regex>    optional: what its output must contain
# Used by the MPI tests to check that a job ends — with the right status — rather than hangs.
string(REPLACE "|" ";" command "${COMMAND}")
string(TIMESTAMP started "%s")
execute_process(COMMAND ${command}
    TIMEOUT ${DEADLINE}
    RESULT_VARIABLE status
    OUTPUT_VARIABLE out
    ERROR_VARIABLE err)
string(TIMESTAMP ended "%s")
math(EXPR took "${ended} - ${started}")
message(STATUS "exit status: ${status} after ${took} s\n--- stdout:\n${out}\n--- stderr:\n${err}")
if(NOT status MATCHES "^[0-9]+$")
    message(FATAL_ERROR "the job did not end by itself within ${DEADLINE} s: ${status}")
endif()
if(EXPECT STREQUAL "nonzero")
    if(status EQUAL 0)
        message(FATAL_ERROR "the job ended with status 0; an error status was expected")
    endif()
elseif(NOT status EQUAL EXPECT)
    message(FATAL_ERROR "the job ended with status ${status}; ${EXPECT} was expected")
endif()
if(DEFINED OUTPUT AND NOT "${out}${err}" MATCHES "${OUTPUT}")
    message(FATAL_ERROR "the job's output does not match '${OUTPUT}'")
endif()
