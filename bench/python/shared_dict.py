"""Python twin of bench/mproc/shared_dict.cpp, with multiprocessing.Manager().dict().

    shared_dict.py getset --n 100000 --keys 1000        n/2 d[k] = v, then n/2 v = d[k], in one process: ops/s
    shared_dict.py incr   --n 10000 --procs 2 [--nolock] d["k"] += 1, n times in each of 2 processes: incr/s, lost

incr takes a Manager Lock around each += (what a correct program must do); --nolock leaves it out
(impl "python-nolock") to show the updates Python loses.
"""
import os
import sys
from multiprocessing import Manager, Process

from common import Args, check, die, now_ns, record, use_fork


def getset(args):
    n = args.num("n", 100000)
    nkeys = args.num("keys", 1000)
    keys = ["key%d" % i for i in range(nkeys)]
    with Manager() as manager:
        d = manager.dict()
        sets = n // 2
        gets = n - sets
        t0 = now_ns()
        for i in range(sets):
            d[keys[i % nkeys]] = i
        t1 = now_ns()
        total = 0
        for i in range(gets):
            total += d[keys[i % nkeys]]
        t2 = now_ns()
        expect = sum(k + ((sets - 1 - k) // nkeys) * nkeys for k in (i % nkeys for i in range(gets)))
        check(total == expect, "sum of the values read back")
        check(len(d) == min(nkeys, sets), "dict size")
    s = (t2 - t0) / 1e9
    record("dict_getset", "python", n / s, "ops/s", n=n, seconds=s, set_ops_per_s=sets / ((t1 - t0) / 1e9),
           get_ops_per_s=gets / ((t2 - t1) / 1e9))


def increment(d, lock, n, go, done):
    if len(os.read(go, 1)) != 1:
        os._exit(2)
    if lock is None:
        for _ in range(n):
            d["k"] += 1
    else:
        for _ in range(n):
            with lock:
                d["k"] += 1
    os.write(done, b"d")


def incr(args):
    import time
    n = args.num("n", 10000)
    procs = args.num("procs", 2)
    nolock = args.flag("nolock")
    with Manager() as manager:
        d = manager.dict()
        d["k"] = 0
        lock = None if nolock else manager.Lock()
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        workers = [Process(target=increment, args=(d, lock, n, go_r, done_w)) for _ in range(procs)]
        for w in workers:
            w.start()
        time.sleep(0.05)
        t0 = now_ns()
        os.write(go_w, b"g" * procs)
        for _ in range(procs):
            if len(os.read(done_r, 1)) != 1:
                die("a worker did not finish")
        s = (now_ns() - t0) / 1e9
        for w in workers:
            w.join()
            check(w.exitcode == 0, "worker exit code")
        total = n * procs
        lost = total - d["k"]
    record("dict_incr", "python-nolock" if nolock else "python", total / s, "incr/s", n=total, seconds=s, lost=lost)
    if not nolock:
        check(lost == 0, "%d of %d increments lost" % (lost, total))


def main():
    use_fork()
    args = Args(sys.argv)
    if args.op == "getset":
        getset(args)
    elif args.op == "incr":
        incr(args)
    else:
        die("unknown operation " + args.op)


if __name__ == "__main__":
    main()
