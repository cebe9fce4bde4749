"""What every Python benchmark shares: the clock, percentiles, arguments, /proc readers and the one
output format (the same as bench/common/bench.hpp):

    {"op": "pool_map", "impl": "python", "value": 5.9e6, "unit": "tasks/s", "n": 1000000, ...}

A benchmark that finds a wrong result prints the reason on stderr and exits 1.
Standard library only; run with Debian's /usr/bin/python3.
"""
import json
import math
import multiprocessing as mp
import os
import sys
import time

now_ns = time.monotonic_ns


def die(why):
    sys.stderr.write("bench: %s\n" % why)
    sys.stderr.flush()
    sys.exit(1)


def check(ok, why):
    if not ok:
        die("wrong result: " + why)


class Args:
    """`<op> --key value ...`, as the C++ programs take them."""

    def __init__(self, argv):
        if len(argv) < 2:
            die("usage: %s <operation> [--key value]..." % argv[0])
        self.op = argv[1]
        self.values = {}
        i = 2
        while i < len(argv):
            key = argv[i]
            if not key.startswith("--"):
                die("unexpected argument " + key)
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                self.values[key[2:]] = argv[i + 1]
                i += 2
            else:
                self.values[key[2:]] = "1"
                i += 1

    def num(self, key, fallback):
        return int(self.values[key]) if key in self.values else fallback

    def flag(self, key):
        return self.values.get(key, "0") != "0"

    def str(self, key, fallback):
        return self.values.get(key, fallback)

    def sizes(self, key, fallback):
        if key not in self.values:
            return fallback
        return [int(s) for s in self.values[key].split(",")]


def record(op, impl, value, unit, **extra):
    r = {"op": op, "impl": impl, "value": value, "unit": unit}
    r.update(extra)
    sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.flush()


def percentile(values, p):
    """Nearest rank, as bench.hpp."""
    v = sorted(values)
    rank = math.ceil(p / 100.0 * len(v))
    return v[min(len(v) - 1, max(rank - 1, 0))]


def latency_record(op, impl, lat_ns, **extra):
    p50 = percentile(lat_ns, 50) / 1e3
    record(op, impl, p50, "us", p50_us=p50, p90_us=percentile(lat_ns, 90) / 1e3,
           p99_us=percentile(lat_ns, 99) / 1e3, n=len(lat_ns), **extra)


def pin_to_one_cpu():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def private_kib(pid):
    total = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                total += int(parts[1])
    return total


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _tasks(pid):
    try:
        return os.listdir("/proc/%d/task" % pid)
    except OSError:
        return []


def cpu_ns(pid):
    total = 0
    for t in _tasks(pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def context_switches(pid):
    total = 0
    for t in _tasks(pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, t)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split(":")[1])
        except OSError:
            pass
    return total


def children_of(pid):
    out = []
    for t in _tasks(pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def idle_record(op, impl, pids, seconds):
    ticks0 = sum(cpu_ticks(p) for p in pids)
    ns0 = sum(cpu_ns(p) for p in pids)
    sw0 = sum(context_switches(p) for p in pids)
    t0 = now_ns()
    time.sleep(seconds)
    wall = (now_ns() - t0) / 1e9
    ticks1 = sum(cpu_ticks(p) for p in pids)
    ns1 = sum(cpu_ns(p) for p in pids)
    sw1 = sum(context_switches(p) for p in pids)
    hz = os.sysconf("SC_CLK_TCK")
    # As bench.hpp: schedstat (ns) is the figure; utime+stime (10 ms ticks) is kept beside it.
    record(op, impl, (ns1 - ns0) / 1e9 / wall * 100.0, "% CPU", seconds=wall, processes=len(pids),
           cpu_pct_stat=(ticks1 - ticks0) / hz / wall * 100.0, wakeups_per_s=(sw1 - sw0) / wall)


def stamp(seq, size, filler):
    """A fresh message of `size` bytes carrying `seq`, like bench::stamp on a fresh std::string."""
    if size >= 8:
        return seq.to_bytes(8, "little") + filler[8:size]
    return bytes([seq & 0xFF]) + filler[1:size] if size else b""


def stamp_into(buf, seq):
    """Stamps `seq` into a bytearray in place."""
    if len(buf) >= 8:
        buf[0:8] = seq.to_bytes(8, "little")
    elif buf:
        buf[0] = seq & 0xFF


def stamp_matches(m, size, seq):
    if size >= 8:
        return int.from_bytes(m[0:8], "little") == seq
    return size == 0 or m[0] == (seq & 0xFF)


def count_for(size, budget, lo, hi):
    return max(lo, min(hi, budget // max(1, size)))


def use_fork():
    mp.set_start_method("fork")
