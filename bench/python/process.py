"""Python twin of bench/mproc/process.cpp.

    process.py start_join --n 300     Process(target=noop).start(); join(): p50/p90/p99 us per process
"""
import sys
from multiprocessing import Process

from common import Args, die, latency_record, now_ns, use_fork


def noop():
    pass


def bench_start_join(args):
    n = args.num("n", 300)
    warm = args.num("warm", 20)
    lat = []
    for i in range(warm + n):
        t0 = now_ns()
        p = Process(target=noop)
        p.start()
        p.join()
        t1 = now_ns()
        if p.exitcode != 0:
            die("wrong result: process exit code")
        if i >= warm:
            lat.append(t1 - t0)
    latency_record("process_start_join", "python", lat)


def main():
    use_fork()
    args = Args(sys.argv)
    if args.op == "start_join":
        bench_start_join(args)
    else:
        die("unknown operation " + args.op)


if __name__ == "__main__":
    main()
