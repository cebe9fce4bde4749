"""Python twin of bench/mproc/pipe.cpp.

    pipe.py rtt    --size 64 --n 20000 [--pin]   duplex Pipe(), send/recv echoed by a child: p50/p90/p99 us
    pipe.py oneway --size 1048576 --n 512        Pipe(duplex=False), send_bytes -> recv_bytes: MB/s
    pipe.py sweep  --sizes 64,...,4194304 --bytes 67108864   oneway at each size
"""
import sys
from multiprocessing import Pipe, Process

from common import (Args, check, count_for, die, latency_record, now_ns, pin_to_one_cpu, record, stamp,
                    stamp_into, stamp_matches, use_fork)


def echo(here, there):
    here.close()
    while True:
        m = there.recv()
        if not m:
            return
        there.send(m)


def bench_rtt(args):
    size = args.num("size", 64)
    n = args.num("n", 20000)
    warm = args.num("warm", 1000)
    pin = args.flag("pin")
    if pin:
        pin_to_one_cpu()
    here, there = Pipe()
    p = Process(target=echo, args=(here, there))
    p.start()
    there.close()
    filler = b"x" * size
    lat = []
    for i in range(warm + n):
        msg = stamp(i, size, filler)
        t0 = now_ns()
        here.send(msg)
        back = here.recv()
        t1 = now_ns()
        if len(back) != size or not stamp_matches(back, size, i):
            die("wrong result: echo %d" % i)
        if i >= warm:
            lat.append(t1 - t0)
    here.send(b"")
    p.join()
    check(p.exitcode == 0, "echo process exit code")
    latency_record("pipe_rtt_pinned" if pin else "pipe_rtt", "python", lat, size=size)


def produce(reader, writer, size, n):
    reader.close()
    buf = bytearray(b"x" * size)
    for i in range(n + 1):
        stamp_into(buf, i)
        writer.send_bytes(buf)


def oneway(op, size, n):
    reader, writer = Pipe(duplex=False)
    p = Process(target=produce, args=(reader, writer, size, n))
    p.start()
    writer.close()
    first = reader.recv_bytes()
    check(len(first) == size, "first message size")
    t0 = now_ns()
    for i in range(1, n + 1):
        m = reader.recv_bytes()
        if len(m) != size or not stamp_matches(m, size, i):
            die("wrong result: message %d of %d B" % (i, size))
    s = (now_ns() - t0) / 1e9
    p.join()
    check(p.exitcode == 0, "producer exit code")
    record(op, "python", size * n / s / 1e6, "MB/s", size=size, n=n, seconds=s, msgs_per_s=n / s)


def main():
    use_fork()
    args = Args(sys.argv)
    if args.op == "rtt":
        bench_rtt(args)
    elif args.op == "oneway":
        oneway("pipe_oneway", args.num("size", 1 << 20), args.num("n", 512))
    elif args.op == "sweep":
        budget = args.num("bytes", 64 << 20)
        for size in args.sizes("sizes", [64, 1024, 4096, 65536, 1 << 20, 4 << 20]):
            oneway("pipe_sweep", size, count_for(size, budget, 16, 100000))
    else:
        die("unknown operation " + args.op)


if __name__ == "__main__":
    main()
