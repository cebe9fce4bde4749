#!/usr/bin/env bash
# Pool::map tasks/s: mproc::mpi::Pool with 3 ranks (rank 0 + 2 workers) beside mpi4py.futures with
# the same 3 ranks, workload (x*x) and chunksizes, and beside the local mproc::Pool with 2 workers.
#
#   bash bench/mpi/run.sh [N] [N_CHUNKSIZE_1]     defaults: 200000 tasks, 50000 of them at chunksize 1
#
# Chunksizes: 1, and len/(4 x workers) = N/8. Best of 3 runs each. Builds into build/mpi-bench.
# Needs openmpi-bin, libopenmpi-dev and (for the comparison) python3-mpi4py.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
n=${1:-200000}
n1=${2:-50000}
build=$root/build/mpi-bench
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S "$root/bench/mpi" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j 2 >/dev/null
mpirun=(mpirun --oversubscribe -n 3)
python=/usr/bin/python3  # Debian's, where python3-mpi4py lives
big=$((n / 8))
for cs in 1 "$big"; do
    count=$n
    [[ $cs == 1 ]] && count=$n1
    "${mpirun[@]}" "$build/mpi_pool_bench" "$count" "$cs"
    if "$python" -c 'import mpi4py.futures' 2>/dev/null; then
        "${mpirun[@]}" "$python" -m mpi4py.futures "$root/bench/mpi/mpi4py_pool.py" "$count" "$cs"
    else
        echo '{"impl": "mpi4py.futures", "skipped": "python3-mpi4py is not installed"}'
    fi
    "$build/mpi_pool_bench" --local "$count" "$cs"
done
