#!/usr/bin/env bash
# mproc benchmarks: builds the benchmark programs (Release, in build/bench), then runs mproc, its
# Python twins and the raw OS limits interleaved, and prints the table (bench/run.py does the
# running; see docs/performance.md).
#
#   bash bench/run.sh            full run (< 10 min on 2 cores): updates docs/performance.md and the chart
#   bash bench/run.sh --quick    smaller sizes, 3 rounds (< 2 min): build/bench only, docs untouched
#
# Other options are passed to bench/run.py (--rounds N, --only SUBSTRING, --no-docs, --docs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="${MPROC_BENCH_BUILD_DIR:-$root/build/bench}"
python=/usr/bin/python3  # Debian's, standard library only (not a pyenv or virtualenv one)

if [[ ! -x $python ]]; then
    echo "bench/run.sh: $python is missing (apt-get install python3)" >&2
    exit 1
fi
if ! command -v gnuplot >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bench/run.sh: installing gnuplot-nox for the chart" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null ||
            echo "bench/run.sh: could not install gnuplot-nox; the chart will be skipped" >&2
    else
        echo "bench/run.sh: gnuplot is missing (apt-get install gnuplot-nox); the chart will be skipped" >&2
    fi
fi

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if [[ ! -f $build/CMakeCache.txt ]]; then
    cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DMPROC_BUILD_TESTS=OFF -DMPROC_BUILD_EXAMPLES=OFF -DMPROC_BUILD_BENCHMARKS=ON -DMPROC_INSTALL=OFF >/dev/null
fi
echo "bench/run.sh: building the benchmarks in $build" >&2
cmake --build "$build" -j2 --target mproc_benchmarks >/dev/null ||
    { cmake --build "$build" -j1 --target mproc_benchmarks; exit 1; }

exec "$python" "$here/run.py" --build-dir "$build" "$@"
