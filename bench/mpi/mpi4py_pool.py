"""Tasks per second of mpi4py.futures' map over N tasks of x*x at a chunksize, best of REPEAT runs.

    mpiexec --oversubscribe -n 3 python3 -m mpi4py.futures mpi4py_pool.py N CHUNKSIZE [REPEAT]

The twin of mpi_pool_bench.cpp; prints the same JSON line.
"""
import json
import sys
import time

from mpi4py.futures import MPIPoolExecutor


def square(x):
    return x * x


def main():
    n, chunksize = int(sys.argv[1]), int(sys.argv[2])
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    xs = list(range(n))
    with MPIPoolExecutor() as pool:
        list(pool.map(square, range(min(n, 2000)), chunksize=1))
        best = 0.0
        for _ in range(repeat):
            begun = time.perf_counter()
            out = list(pool.map(square, xs, chunksize=chunksize))
            seconds = time.perf_counter() - begun
            if out != [x * x for x in xs]:
                sys.exit("bench: wrong result")
            best = max(best, n / seconds)
        workers = pool._max_workers  # mpi4py 3.1 has no public count
    print(json.dumps({"op": "pool_map", "impl": "mpi4py.futures", "value": round(best), "unit": "tasks/s",
                      "n": n, "chunksize": chunksize, "workers": workers}))


if __name__ == "__main__":
    main()
