# cmake -DPROGRAMS="<test binaries>" -P shm_no_dev_shm.cmake
#
# Lists /dev/shm, runs every case of the shared-memory test binaries but the long [stress] ones —
# which create every kind of Queue, SharedDict, lock and shared value, and SIGKILL children in the
# middle of using them — then lists /dev/shm again. mproc's shared memory is memfd-backed, so
# nothing may be new there. (Run serially: another program's /dev/shm files would show up too.)
cmake_minimum_required(VERSION 3.20)
file(GLOB before RELATIVE /dev/shm /dev/shm/*)
foreach(program IN LISTS PROGRAMS)
    execute_process(COMMAND ${program} "~[stress]" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "${program} failed (${rc}):\n${out}")
    endif()
endforeach()
file(GLOB after RELATIVE /dev/shm /dev/shm/*)
if(before)
    list(REMOVE_ITEM after ${before})
endif()
if(after)
    message(FATAL_ERROR "new in /dev/shm after the shared-memory suites: ${after}")
endif()
list(LENGTH before n)
message(STATUS "/dev/shm unchanged (${n} entries before and after)")
