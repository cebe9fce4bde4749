"""Python twin of bench/mproc/queue.cpp (named so as not to shadow the standard `queue` module).

    queue_bench.py tput  --size 64 --n 200000 [--simple]   1 producer process -> 1 consumer: msgs/s, MB/s
    queue_bench.py sweep --sizes 64,...,4194304 --bytes 67108864 [--simple]   tput at each size
    queue_bench.py idle  --ms 1000 [--simple]              CPU of a consumer blocked on an empty queue: %

multiprocessing.Queue by default; --simple uses SimpleQueue (no feeder thread), recorded as impl
"python-simplequeue".
"""
import sys
from multiprocessing import Process, Queue, SimpleQueue

from common import Args, check, count_for, die, idle_record, now_ns, record, stamp, stamp_matches, use_fork


def produce(q, size, n):
    filler = b"x" * size
    for i in range(n + 1):
        q.put(stamp(i, size, filler))
    if hasattr(q, "join_thread"):
        q.close()
        q.join_thread()


def tput(op, impl, make, size, n):
    q = make()
    p = Process(target=produce, args=(q, size, n))
    p.start()
    first = q.get()
    check(len(first) == size, "first message size")
    t0 = now_ns()
    for i in range(1, n + 1):
        m = q.get()
        if len(m) != size or not stamp_matches(m, size, i):
            die("wrong result: message %d of %d B" % (i, size))
    s = (now_ns() - t0) / 1e9
    p.join()
    check(p.exitcode == 0, "producer exit code")
    record(op, impl, size * n / s / 1e6, "MB/s", size=size, n=n, seconds=s, msgs_per_s=n / s)


def consume(q):
    m = q.get()
    sys.exit(0 if m == b"stop" else 3)


def idle(impl, make, args):
    import time
    q = make()
    p = Process(target=consume, args=(q,))
    p.start()
    time.sleep(0.2)
    idle_record("idle_queue_consumer", impl, [p.pid], args.num("ms", 1000) / 1000.0)
    q.put(b"stop")
    p.join()
    check(p.exitcode == 0, "consumer exit code")


def main():
    use_fork()
    args = Args(sys.argv)
    simple = args.flag("simple")
    impl = "python-simplequeue" if simple else "python"
    make = SimpleQueue if simple else Queue
    if args.op == "tput":
        tput("queue_tput", impl, make, args.num("size", 64), args.num("n", 200000))
    elif args.op == "sweep":
        budget = args.num("bytes", 64 << 20)
        for size in args.sizes("sizes", [64, 1024, 4096, 65536, 1 << 20, 4 << 20]):
            tput("queue_sweep", impl, make, size, count_for(size, budget, 16, 100000))
    elif args.op == "idle":
        idle(impl, make, args)
    else:
        die("unknown operation " + args.op)


if __name__ == "__main__":
    main()
