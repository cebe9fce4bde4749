# cmake -DPROGRAMS="<test binaries>" -P shm_no_dev_shm.cmake
#
# Lists /dev/shm, runs every case of the shared-memory test binaries but the long [stress] ones —
# which create every kind of Queue, SharedDict, lock and shared value, and SIGKILL children in the
# middle of using them — then lists /dev/shm again. mproc's shared memory is memfd-backed, so
# nothing may be new there.
#
# Other programs on the machine may create files in /dev/shm meanwhile. So, where it is permitted
# (as root, or through a user namespace), the suites run in a mount namespace of their own with a
# fresh tmpfs on /dev/shm: only what this run creates can appear there, and any file at all is a
# failure ("private" mode). Elsewhere the listings are those of the machine's /dev/shm, and only
# new names that mproc could have given a file — every name mproc gives shared memory starts with
# "mproc" — count ("shared" mode). The mode is printed with the result.
#
# -DMODE=private|shared forces a mode (private is what the script re-runs itself with inside the
# namespace).
cmake_minimum_required(VERSION 3.20)

# The programs travel between the two runs of this script joined by "|", not ";".
string(REPLACE "|" ";" PROGRAMS "${PROGRAMS}")

if(NOT DEFINED MODE)
    find_program(UNSHARE unshare)
    if(UNSHARE)
        set(mount_shm "mount -t tmpfs -o mode=1777,size=1g mproc-private-shm /dev/shm")
        foreach(how "--mount" "--user;--map-root-user;--mount")
            execute_process(COMMAND ${UNSHARE} ${how} sh -c "${mount_shm}"
                            RESULT_VARIABLE probe OUTPUT_QUIET ERROR_QUIET)
            if(NOT probe EQUAL 0)
                continue()
            endif()
            string(REPLACE ";" "|" joined "${PROGRAMS}")
            string(REPLACE ";" " " shown "${how}")
            message(STATUS "mode: private /dev/shm (unshare ${shown}, a fresh tmpfs): any file there fails")
            execute_process(
                COMMAND ${UNSHARE} ${how} sh -c "${mount_shm} && exec \"$0\" \"$@\""
                        ${CMAKE_COMMAND} -DMODE=private "-DPROGRAMS=${joined}" -P ${CMAKE_CURRENT_LIST_FILE}
                RESULT_VARIABLE rc)
            if(NOT rc EQUAL 0)
                message(FATAL_ERROR "the shared-memory suites failed in their own mount namespace (${rc})")
            endif()
            return()
        endforeach()
    endif()
    set(MODE shared)
    message(STATUS "mode: shared /dev/shm (no private mount namespace here): only new names containing \"mproc\" fail")
endif()

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
if(MODE STREQUAL "shared" AND after)
    set(others ${after})
    list(FILTER after INCLUDE REGEX "[Mm][Pp][Rr][Oo][Cc]")
    list(REMOVE_ITEM others ${after} "")
    if(others)
        message(STATUS "new in /dev/shm meanwhile, not named like mproc's (another program's): ${others}")
    endif()
endif()
if(after)
    message(FATAL_ERROR "new in /dev/shm after the shared-memory suites (${MODE} mode): ${after}")
endif()
list(LENGTH before n)
message(STATUS "/dev/shm unchanged by the shared-memory suites (${MODE} mode; ${n} entries before and after)")
