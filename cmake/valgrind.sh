#!/usr/bin/env bash
# mproc under valgrind: runs every example with memcheck, following every process mproc forks
# (Pool workers, fork servers, Process children), and fails if any process reports an invalid
# access, a use of uninitialised memory, a bad free, or a leak (definite, indirect or possible).
#
#   bash cmake/valgrind.sh [BUILD_DIR]     default: build/examples, as `cmake --workflow --preset
#                                          examples` leaves it (configured and built here if needed)
#
# Each process writes its own log (<build>/valgrind/<example>.<pid>.log); the script reads them all.
# Exit status: 0 when every example exited 0 and every log is clean; 1 otherwise.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build/examples}
cd "$root"
command -v valgrind >/dev/null || { echo "valgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

if [[ ! -f $build/CMakeCache.txt ]]; then
    cmake --preset examples -B "$build" >/dev/null
fi
cmake --build "$build" -j2 >/dev/null

examples=$(sed -n 's/^set(MPROC_EXAMPLES \(.*\))$/\1/p' examples/CMakeLists.txt)
[[ -n $examples ]] || { echo "valgrind.sh: cannot read the example list from examples/CMakeLists.txt" >&2; exit 1; }
logs=$build/valgrind
rm -rf "$logs"
mkdir -p "$logs"

failed=0
processes=0
summarised=0
for example in $examples; do
    started=$SECONDS
    # --child-silent-after-fork=no: forked children (workers, servers) are checked too, each with its
    # own log; --trace-children=yes follows any exec. No --error-exitcode: a worker must exit as it
    # would without valgrind, or the Pool would see a death that is not there.
    set +e
    valgrind --tool=memcheck --trace-children=yes --child-silent-after-fork=no \
        --leak-check=full --show-leak-kinds=definite,indirect,possible \
        --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes \
        --log-file="$logs/$example.%p.log" "$build/examples/$example" >"$logs/$example.stdout" 2>&1
    status=$?
    set -e
    count=0 checked=0 bad=()
    for log in "$logs/$example".*.log; do
        count=$((count + 1))
        # A process killed by SIGKILL (the Pool ending its workers) writes no summary: nothing to check.
        grep -q 'ERROR SUMMARY:' "$log" || continue
        checked=$((checked + 1))
        if ! grep -q 'ERROR SUMMARY: 0 errors' "$log"; then bad+=("$log"); fi
    done
    processes=$((processes + count))
    summarised=$((summarised + checked))
    if ((status != 0)) || ((${#bad[@]} > 0)); then
        failed=1
        echo "$example: FAILED (exit status $status, $count processes, ${#bad[@]} with errors) in $((SECONDS - started)) s"
        for log in "${bad[@]}"; do
            echo "---- $log"
            grep -v '^==[0-9]*== *$' "$log" | head -n 80
        done
        ((status != 0)) && tail -n 20 "$logs/$example.stdout"
    else
        echo "$example: clean (exit 0; $count processes, $checked with a memcheck summary, all 0 errors) in $((SECONDS - started)) s"
    fi
done
echo "valgrind memcheck: $processes processes across the examples, $summarised with a summary" \
    "(the rest were ended by SIGKILL, as a Pool's destructor ends its workers); logs in $logs"
exit "$failed"
