#!/usr/bin/env bash
# mproc's fuzzing in CI: builds the libFuzzer targets with clang-16 (ASan + UBSan) and runs each
# for SECONDS seconds (default 60) from its seed corpus in tests/fuzz/corpus/. Any crash, sanitizer
# report, leak, timeout or property violation fails the run (exit 1) and leaves the input that did
# it in <build>/artifacts/.
#
#   bash tests/fuzz/run.sh [SECONDS]          build dir: build/fuzz (MPROC_FUZZ_BUILD overrides)
#
# New inputs the fuzzers find go to <build>/corpus-<target>/, never into the repository; to grow
# the kept seeds, minimise first: fuzz_decode -merge=1 tests/fuzz/corpus/decode <build>/corpus-decode
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
seconds=${1:-60}
build=${MPROC_FUZZ_BUILD:-$root/build/fuzz}

cmake -S "$root/tests/fuzz" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++-16 >/dev/null
cmake --build "$build" -j2 --target fuzz_decode fuzz_shm_ops

mkdir -p "$build/artifacts"
failed=0
# -malloc_limit_mb: the decoder must never allocate far beyond its input (inputs stay under 4 KiB);
# -timeout: a single input that runs 30 s is a hang.
run() {
    local target=$1 corpus=$2 malloc_mb=$3
    local work="$build/corpus-$corpus" log="$build/$target.log"
    mkdir -p "$work"
    printf '\n==> %s: %s s from tests/fuzz/corpus/%s\n' "$target" "$seconds" "$corpus"
    if ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 UBSAN_OPTIONS=print_stacktrace=1 \
        "$build/$target" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -malloc_limit_mb="$malloc_mb" -max_len=4096 -print_final_stats=1 \
        -artifact_prefix="$build/artifacts/$target-" "$work" "$root/tests/fuzz/corpus/$corpus" >"$log" 2>&1; then
        local runs rate
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        echo "$target: ${runs:-?} inputs in $seconds s (${rate:-?}/s), corpus $(ls "$work" | wc -l) + seeds: no failure"
    else
        failed=1
        echo "$target: FAILED — the end of its log ($log):"
        grep -v '^#[0-9]' "$log" | tail -n 60
        ls -l "$build/artifacts/" || true
    fi
}
run fuzz_decode decode 64
run fuzz_shm_ops shm_ops 256
exit "$failed"
