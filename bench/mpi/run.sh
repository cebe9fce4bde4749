#!/usr/bin/env bash
# Pool::map tasks/s: mproc::mpi::Pool with 3 ranks (rank 0 + 2 workers) beside mpi4py.futures with
# the same 3 ranks, workload (x*x) and chunksizes, and beside the local mproc::Pool with 2 workers;
# then the workers' busy share with 200 µs tasks at chunksize 1 (mpi_pool_bench --busy).
#
#   bash bench/mpi/run.sh [--hosts] [N] [N_CHUNKSIZE_1]   defaults: 200000 tasks, 50000 of them at chunksize 1
#
# --hosts: one rank on each of three hosts simulated with namespaces (tests/mpi/hosts/hosts.sh,
# root; TCP between them), with MPROC_HOSTS_DELAY_MS=N for a link that delays rank 0's traffic N ms
# each way. Chunksizes: 1, and len/(4 x workers) = N/8. Best of 3 runs each. Builds into
# build/mpi-bench. Needs openmpi-bin, libopenmpi-dev and (for the comparison) python3-mpi4py.
set -euo pipefail
root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
hosts=false
if [[ ${1:-} == --hosts ]]; then
    hosts=true
    shift
fi
n=${1:-200000}
n1=${2:-50000}
build=$root/build/mpi-bench
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cmake -S "$root/bench/mpi" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j 2 >/dev/null
mpirun=(mpirun --oversubscribe -n 3)
if $hosts; then
    hosts_sh=$root/tests/mpi/hosts/hosts.sh
    bash "$hosts_sh" up >&2
    trap 'bash "$hosts_sh" down >&2' EXIT
    mpirun=(bash "$hosts_sh" mpirun -n 3)
fi
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
"${mpirun[@]}" "$build/mpi_pool_bench" --busy 200 5000
