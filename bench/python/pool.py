"""Python twin of bench/mproc/pool.cpp: the same operations, sizes, checks and output.

    pool.py map         --n 1000000     Pool.map(square, xs), default chunksize: tasks/s
    pool.py map_c1      --n 100000      Pool.map(square, xs, 1): tasks/s
    pool.py apply_async --n 100000      apply_async(square, (i,), callback=...) x n, then wait all: tasks/s
    pool.py apply_lat   --n 2000 [--pin] apply(square, (i,)) one at a time: p50/p90/p99 us
                                        (--pin: this process, and so the pool, on one CPU)
    pool.py starmap     --n 1000000     Pool.starmap(add, pairs), default chunksize: tasks/s
    pool.py memory                      private memory of each idle worker: MiB
    pool.py idle        --ms 1000       CPU of an idle Pool (this process and its children): %
"""
import os
import sys
import time
from multiprocessing import Pool

from common import (Args, check, children_of, die, idle_record, latency_record, now_ns, pin_to_one_cpu, private_kib,
                    record, use_fork)


def square(x):
    return x * x


def add(x, y):
    return x + y


def sum_squares(n):
    return (n - 1) * n * (2 * n - 1) // 6


def warm_up(pool):
    r = pool.map(square, range(100))
    check(len(r) == 100 and r[99] == 99 * 99, "warm-up map")


def bench_map(args, chunk1):
    n = args.num("n", 100000 if chunk1 else 1000000)
    xs = list(range(n))
    with Pool() as pool:
        warm_up(pool)
        t0 = now_ns()
        r = pool.map(square, xs, 1) if chunk1 else pool.map(square, xs)
        s = (now_ns() - t0) / 1e9
        processes = pool._processes
    check(len(r) == n, "map returned %d results" % len(r))
    check(sum(r) == sum_squares(n), "map: sum of results")
    check(all(r[i] == i * i for i in range(0, n, 9973)), "map: result out of order")
    record("pool_map_c1" if chunk1 else "pool_map", "python", n / s, "tasks/s", n=n, seconds=s, processes=processes)


def bench_apply_async(args):
    n = args.num("n", 100000)
    with Pool() as pool:
        warm_up(pool)
        got = []
        t0 = now_ns()
        results = [pool.apply_async(square, (i,), callback=got.append) for i in range(n)]
        for r in results:
            r.get()
        s = (now_ns() - t0) / 1e9
    check(len(got) == n, "callbacks ran %d times" % len(got))
    check(sum(got) == sum_squares(n), "apply_async: sum")
    record("pool_apply_async", "python", n / s, "tasks/s", n=n, seconds=s)


def bench_apply_latency(args):
    n = args.num("n", 2000)
    pin = args.flag("pin")
    if pin:
        pin_to_one_cpu()  # before the pool: its processes inherit it
    with Pool() as pool:
        warm_up(pool)
        for i in range(100):
            check(pool.apply(square, (i,)) == i * i, "apply warm-up")
        lat = []
        for i in range(n):
            t0 = now_ns()
            r = pool.apply(square, (i,))
            lat.append(now_ns() - t0)
            check(r == i * i, "apply result")
    latency_record("pool_apply_lat_pinned" if pin else "pool_apply_lat", "python", lat)


def bench_starmap(args):
    n = args.num("n", 1000000)
    pairs = [(i, i) for i in range(n)]
    with Pool() as pool:
        warm_up(pool)
        t0 = now_ns()
        r = pool.starmap(add, pairs)
        s = (now_ns() - t0) / 1e9
    check(len(r) == n, "starmap result count")
    check(sum(r) == n * (n - 1), "starmap: sum of results")
    record("pool_starmap", "python", n / s, "tasks/s", n=n, seconds=s)


def bench_memory(args):
    with Pool() as pool:
        warm_up(pool)
        time.sleep(args.num("settle_ms", 300) / 1000.0)
        pids = [p.pid for p in pool._pool]
        check(len(pids) == pool._processes, "worker count")
        total = sum(private_kib(p) for p in pids)
        record("pool_worker_memory", "python", total / len(pids) / 1024.0, "MiB", workers=len(pids),
               parent_private_mib=private_kib(os.getpid()) / 1024.0)


def bench_idle(args):
    with Pool() as pool:
        warm_up(pool)
        time.sleep(0.2)
        pids = [os.getpid()]
        i = 0
        while i < len(pids):
            pids += children_of(pids[i])
            i += 1
        idle_record("idle_pool", "python", pids, args.num("ms", 1000) / 1000.0)


def main():
    use_fork()
    args = Args(sys.argv)
    ops = {"map": lambda: bench_map(args, False), "map_c1": lambda: bench_map(args, True),
           "apply_async": lambda: bench_apply_async(args), "apply_lat": lambda: bench_apply_latency(args),
           "starmap": lambda: bench_starmap(args), "memory": lambda: bench_memory(args),
           "idle": lambda: bench_idle(args)}
    if args.op not in ops:
        die("unknown operation " + args.op)
    ops[args.op]()


if __name__ == "__main__":
    main()
