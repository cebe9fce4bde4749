"""mproc benchmark runner (started by bench/run.sh, which builds the programs first).

Runs every benchmark program -- mproc (bench/mproc), its Python twin (bench/python) and the raw OS
limit (bench/limits) -- round after round, the three of each operation one right after the other
(their order rotating each round), so a change in the machine's load touches all three alike.
Every program prints JSON lines; each is kept, with its round, in <build>/results.jsonl. The table
shows the median of the rounds, the ratios and the issue's targets with pass/miss. A full run also
rewrites the generated part of docs/performance.md and the chart (gnuplot).

Debian's python3 and its standard library only: the Python twins need an interpreter anyway, and
the runner's work (subprocesses, JSON, medians, text) is what a standard library does well.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3"

KIB = 1024
MIB = 1024 * 1024
SWEEP_SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, MIB, 4 * MIB]


# ---- what to run -------------------------------------------------------------------------------

class Cmd:
    """One program invocation: `impl` is mproc, python or limit (what its records say)."""

    def __init__(self, impl, argv):
        self.impl = impl
        self.argv = argv


class Group:
    """The invocations that measure one operation, run back to back in each round."""

    def __init__(self, name, cmds, rounds=None):
        self.name = name
        self.cmds = cmds
        self.rounds = rounds  # None: every round


def groups(bin_dir, quick):
    def m(prog, *args):
        return Cmd("mproc", [os.path.join(bin_dir, prog)] + [str(a) for a in args])

    def lim(*args):
        return Cmd("limit", [os.path.join(bin_dir, "bench_limits")] + [str(a) for a in args])

    def py(script, *args):
        return Cmd("python", [PYTHON, os.path.join(HERE, "python", script)] + [str(a) for a in args])

    def q(full, small):
        return small if quick else full

    n_map = q(1000000, 300000)
    n_c1 = q(100000, 20000)
    n_async = q(100000, 20000)
    n_lat = q(2000, 1000)
    n_star = q(1000000, 300000)
    n_rtt = q(20000, 5000)
    n_oneway = q(512, 128)
    n_fork = q(300, 100)
    n_get = q(100000, 20000)
    n_incr = q(10000, 2000)
    idle_ms = q(1000, 500)
    sweep_bytes = q(64 * MIB, 8 * MIB)
    sizes = ",".join(str(s) for s in (SWEEP_SIZES if not quick else SWEEP_SIZES[::2]))
    queue_n = {64: q(200000, 50000), 4 * KIB: q(50000, 10000), MIB: q(256, 64)}

    g = [
        Group("pool_map", [m("bench_mproc_pool", "map", "--n", n_map), py("pool.py", "map", "--n", n_map)]),
        Group("pool_map_c1", [m("bench_mproc_pool", "map_c1", "--n", n_c1), py("pool.py", "map_c1", "--n", n_c1)]),
        Group("pool_apply_async", [m("bench_mproc_pool", "apply_async", "--n", n_async),
                                   py("pool.py", "apply_async", "--n", n_async)]),
        Group("pool_apply_lat", [m("bench_mproc_pool", "apply_lat", "--n", n_lat),
                                 py("pool.py", "apply_lat", "--n", n_lat),
                                 lim("pipe_rtt", "--size", 64, "--n", n_rtt)]),
        Group("pool_apply_lat_pinned", [m("bench_mproc_pool", "apply_lat", "--n", n_lat, "--pin"),
                                        py("pool.py", "apply_lat", "--n", n_lat, "--pin"),
                                        lim("pipe_rtt", "--size", 64, "--n", n_rtt, "--pin")]),
        Group("pool_starmap", [m("bench_mproc_pool", "starmap", "--n", n_star), py("pool.py", "starmap", "--n", n_star)]),
        Group("pool_uneven", [m("bench_mproc_pool", "uneven", "--n", q(2000, 1000))]),
        Group("pool_apply_async_stats", [m("bench_mproc_pool", "apply_async", "--n", n_async, "--stats-ms", 10),
                                         m("bench_mproc_pool", "apply_async", "--n", n_async)]),
    ]
    for size in (4 * MIB, 16 * MIB, 64 * MIB):
        queue_n[size] = max(4, q(1 << 30, 128 * MIB) // size)
    for size, n in queue_n.items():
        g.append(Group("queue_tput_%d" % size, [m("bench_mproc_queue", "tput", "--size", size, "--n", n),
                                                 py("queue_bench.py", "tput", "--size", size, "--n", n),
                                                 lim("shm_ring", "--size", size, "--n", n)]))
    g += [
        Group("queue_tput_64_simplequeue", [py("queue_bench.py", "tput", "--size", 64, "--n", queue_n[64], "--simple")],
              rounds=1 if quick else 3),
        Group("pipe_rtt", [m("bench_mproc_pipe", "rtt", "--size", 64, "--n", n_rtt),
                           py("pipe.py", "rtt", "--size", 64, "--n", n_rtt)]),
        Group("pipe_rtt_pinned", [m("bench_mproc_pipe", "rtt", "--size", 64, "--n", n_rtt, "--pin"),
                                  m("bench_mproc_pipe", "rtt", "--size", 64, "--n", n_rtt, "--pin", "--simplex"),
                                  py("pipe.py", "rtt", "--size", 64, "--n", n_rtt, "--pin"),
                                  lim("pipe_rtt", "--size", 64, "--n", n_rtt, "--pin"),
                                  lim("pipe_rtt", "--size", 64, "--n", n_rtt, "--pin", "--socket")]),
        Group("pipe_oneway", [m("bench_mproc_pipe", "oneway", "--size", MIB, "--n", n_oneway),
                              m("bench_mproc_pipe", "oneway", "--size", MIB, "--n", n_oneway, "--duplex"),
                              py("pipe.py", "oneway", "--size", MIB, "--n", n_oneway),
                              lim("pipe_oneway", "--size", MIB, "--n", n_oneway)]),
        Group("dict_getset", [m("bench_mproc_dict", "getset", "--n", n_get), py("shared_dict.py", "getset", "--n", n_get)]),
        Group("dict_incr", [m("bench_mproc_dict", "incr", "--n", n_incr), py("shared_dict.py", "incr", "--n", n_incr)]),
        Group("dict_incr_nolock", [py("shared_dict.py", "incr", "--n", n_incr, "--nolock")], rounds=1),
        Group("process_start_join", [m("bench_mproc_process", "start_join", "--n", n_fork),
                                     py("process.py", "start_join", "--n", n_fork),
                                     lim("fork_wait", "--n", n_fork)]),
        Group("memory", [m("bench_mproc_pool", "memory"), py("pool.py", "memory"), lim("fork_memory")]),
        Group("idle_pool", [m("bench_mproc_pool", "idle", "--ms", idle_ms), py("pool.py", "idle", "--ms", idle_ms),
                            lim("idle_read", "--ms", idle_ms, "--as", "idle_pool")]),
        Group("idle_queue", [m("bench_mproc_queue", "idle", "--ms", idle_ms), py("queue_bench.py", "idle", "--ms", idle_ms),
                             lim("idle_read", "--ms", idle_ms, "--as", "idle_queue_consumer")]),
        Group("shm_memcpy", [lim("shm_memcpy", "--size", size, "--bytes", q(1 << 30, 256 * MIB))
                             for size in (MIB, 4 * MIB, 16 * MIB, 64 * MIB)]),
        Group("queue_shm", [m("bench_mproc_queue", "shm", "--size", size, "--n", max(8, q(1 << 30, 256 * MIB) // size))
                            for size in (MIB, 64 * MIB)]),
        Group("queue_mpmc", [m("bench_mproc_queue", "mpmc", "--size", 64, "--n", q(400000, 100000)),
                             lim("mpmc_ring", "--size", 64, "--n", q(400000, 100000))]),
        Group("process_start_join_1g", [m("bench_mproc_process", "start_join", "--n", q(100, 30), "--resident-mib", 1024),
                                        lim("fork_wait", "--n", q(100, 30), "--resident-mib", 1024)]),
        Group("openmp", [m("bench_mproc_openmp", "map", "--grain-us", grain, "--seconds", q(1.0, 0.3)) for grain in (1, 20, 200)]),
        Group("queue_sweep", [m("bench_mproc_queue", "sweep", "--sizes", sizes, "--bytes", sweep_bytes),
                              py("queue_bench.py", "sweep", "--sizes", sizes, "--bytes", sweep_bytes),
                              lim("ring_sweep", "--sizes", sizes, "--bytes", sweep_bytes)], rounds=3),
        Group("pipe_sweep", [m("bench_mproc_pipe", "sweep", "--sizes", sizes, "--bytes", sweep_bytes),
                             py("pipe.py", "sweep", "--sizes", sizes, "--bytes", sweep_bytes),
                             lim("pipe_sweep", "--sizes", sizes, "--bytes", sweep_bytes)], rounds=3),
    ]
    return g


# ---- the build rows ----------------------------------------------------------------------------

BUILD_SOURCES = {
    # The target row: a program that includes the umbrella header (its limit, the standard headers
    # mproc's code names, is set below from the headers themselves).
    ("build", "mproc"): "#include <mproc/mproc.hpp>\nint main() { return 0; }\n",
    # Context: a program that also uses Pool.map, a Queue and a Process (templates instantiated),
    # against one doing the same with std::async.
    ("build_using", "mproc"): """#include <mproc/mproc.hpp>
#include <string>
#include <vector>
static long square(long x) { return x * x; }
int main() {
    mproc::Pool pool(2);
    std::vector<long> xs{1, 2, 3};
    auto r = pool.map(square, xs);
    mproc::Queue<std::string> q;
    mproc::Process p([q]() mutable { q.put("hi"); });
    p.start();
    auto s = q.get();
    p.join();
    return static_cast<int>(r.size() + s.size());
}
""",
    ("build_using", "limit"): """#include <future>
#include <string>
#include <thread>
#include <vector>
static long square(long x) { return x * x; }
int main() {
    std::vector<std::future<long>> fs;
    for (long x : {1L, 2L, 3L}) fs.push_back(std::async(std::launch::async, square, x));
    std::promise<std::string> q;
    std::thread t([&q] { q.set_value("hi"); });
    auto s = q.get_future().get();
    t.join();
    long r = 0;
    for (auto& f : fs) r += f.get();
    return static_cast<int>(r + static_cast<long>(s.size()));
}
""",
}


# Each concept header alone, against a file that includes the standard and system headers that
# header's own code names (found by following its includes through mproc's headers).
CONCEPT_HEADERS = ["process", "pool", "queue", "pipe", "shared_dict", "shared_list", "sync", "serialize", "wait",
                   "progress", "guard"]


def system_includes(header):
    """The <...> headers, other than mproc's and fmt's, that include/mproc/<header> needs."""
    import re
    inc_root = os.path.join(ROOT, "include")
    pattern = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
    seen, system = set(), set()
    todo = [os.path.join(inc_root, "mproc", header)]
    while todo:
        path = os.path.normpath(todo.pop())
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        with open(path) as f:
            text = f.read()
        for kind, name in pattern.findall(text):
            if kind == '"':
                todo.append(os.path.join(os.path.dirname(path), name))
            elif name.startswith("mproc/"):
                todo.append(os.path.join(inc_root, name))
            elif not name.startswith("fmt/"):
                system.add(name)
    return sorted(system)


# The umbrella row's limit likewise: the standard headers all of mproc's (local) headers need.
BUILD_SOURCES[("build", "limit")] = "".join(
    "#include <%s>\n" % n for n in system_includes("mproc.hpp")) + "int main() { return 0; }\n"
for _h in CONCEPT_HEADERS:
    BUILD_SOURCES[("build_" + _h, "mproc")] = "#include <mproc/%s.hpp>\nint main() { return 0; }\n" % _h
    BUILD_SOURCES[("build_" + _h, "limit")] = "".join(
        "#include <%s>\n" % n for n in system_includes(_h + ".hpp")) + "int main() { return 0; }\n"


def build_commands(build_dir, tmp):
    with open(os.path.join(build_dir, "bench_build_info.json")) as f:
        info = json.load(f)
    base = [info["cxx"]] + info["flags"].split() + [info["std"]]
    for d in info["include_dirs"].split(";"):
        if d and d not in ("/usr/include",):
            base.append("-I" + d)
    for d in info["definitions"].split(";"):
        if d:
            base.append("-D" + d)
    cmds = {}
    for (op, impl), text in BUILD_SOURCES.items():
        src = os.path.join(tmp, "%s_%s.cpp" % (op, impl))
        with open(src, "w") as f:
            f.write(text)
        cmds[(op, impl)] = base + ["-c", src, "-o", os.path.join(tmp, "%s_%s.o" % (op, impl))]
    return info, cmds


def time_build(op, impl, argv):
    t0 = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s = time.monotonic() - t0
    if p.returncode != 0:
        return [{"op": op, "impl": impl, "value": None, "unit": "s", "error": p.stderr.strip()[-2000:]}]
    return [{"op": op, "impl": impl, "value": s, "unit": "s", "seconds": s}]


# ---- running -----------------------------------------------------------------------------------

def run_cmd(cmd, timeout):
    """Runs one program; returns its records (or one error record)."""
    try:
        p = subprocess.run(cmd.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"op": "?", "impl": cmd.impl, "value": None, "error": "timed out after %d s" % timeout}]
    records = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"op": "?", "impl": cmd.impl, "value": None, "error": "not JSON: " + line[:200]})
    if p.returncode != 0:
        records.append({"op": "?", "impl": cmd.impl, "value": None,
                        "error": "exit %d: %s" % (p.returncode, p.stderr.strip()[-2000:])})
    return records


def key_of(r):
    size = r.get("size")
    return (r.get("op"), r.get("impl"), int(size) if size is not None else None)


# ---- the table ---------------------------------------------------------------------------------

class Row:
    """One line of the table. `mproc`, `python` and `limit` are keys (op, impl, size) into the medians;
    `field` picks the figure (default "value"); `targets` are (against, relation, number):
    against "python" or "limit" compares the ratio mproc/that, "abs" the mproc figure itself."""

    def __init__(self, label, op, size=None, python=True, limit=None, field="value", unit=None, scale=1.0,
                 targets=(), target_text="", extra=None, python_impl="python"):
        self.label = label
        self.mproc = (op, "mproc", size)
        self.python = (op, python_impl, size) if python else None
        self.limit = limit
        self.field = field
        self.unit = unit
        self.scale = scale
        self.targets = targets
        self.target_text = target_text
        self.extra = extra  # a function(medians) -> (ok, text) for a further condition


def lost_zero(med):
    lost = med.get(("dict_incr", "mproc", None), {}).get("lost_max")
    if lost is None:
        return None, "lost: ?"
    return lost == 0, "lost: %d" % lost


ROWS = [
    Row("Pool.map x*x, 1M ints, default chunksize", "pool_map", unit="tasks/s",
        targets=[("python", ">=", 25)], target_text="≥ 25× Python"),
    Row("Pool.map, chunksize 1, 100k ints", "pool_map_c1", unit="tasks/s",
        targets=[("python", ">=", 15), ("abs", ">=", 1e6)], target_text="≥ 15× Python, ≥ 1M tasks/s"),
    Row("apply_async + callback, 100k tasks", "pool_apply_async", unit="tasks/s",
        targets=[("python", ">=", 20)], target_text="≥ 20× Python"),
    Row("apply(f, x) round trip p50 pinned (limit: pipe ping-pong, pinned)", "pool_apply_lat_pinned",
        limit=("pipe_rtt_pinned", "limit", 64), unit="µs", targets=[("limit", "<=", 1.5)],
        target_text="≤ 1.5× raw pipe p50"),
    Row("starmap, 1M pairs", "pool_starmap", unit="tasks/s", targets=[("python", ">=", 10)], target_text="≥ 10× Python"),
    Row("Pool.map, items 20 µs–2 ms (100×): makespan / ideal", "pool_uneven", python=False, unit="× ideal",
        targets=[("abs", "<=", 1.15)], target_text="≤ 1.15× (total / workers + longest item)"),
    Row("apply_async with stats() every 10 ms (limit: without)", "pool_apply_async_stats", python=False,
        limit=("pool_apply_async", "mproc", None), unit="tasks/s", targets=[("limit", ">=", 0.95)],
        target_text="≥ 0.95× without"),
    Row("Queue 1→1, 64 B (msgs/s; limit: shm ring)", "queue_tput", size=64, limit=("queue_tput", "limit", 64),
        field="msgs_per_s", unit="msgs/s", targets=[("python", ">=", 30), ("limit", ">=", 0.5)],
        target_text="≥ 30× Python, ≥ 0.5× ring"),
    Row("Queue 1→1, 4 KiB (limit: shm ring)", "queue_tput", size=4 * KIB, limit=("queue_tput", "limit", 4 * KIB),
        unit="MB/s", targets=[("python", ">=", 15), ("limit", ">=", 0.4)], target_text="≥ 15× Python, ≥ 0.4× ring"),
    Row("Queue 4→4, 64 B (msgs/s; limit: MPMC shm ring)", "queue_mpmc", size=64, python=False,
        limit=("queue_mpmc", "limit", 64), field="msgs_per_s", unit="msgs/s", targets=[("limit", ">=", 0.5)],
        target_text="≥ 0.5× MPMC ring"),
    Row("Queue 1→1, 1 MiB (limit: memcpy into shm)", "queue_tput", size=MIB, limit=("shm_memcpy", "limit", MIB),
        unit="MB/s", targets=[("limit", ">=", 0.5)], target_text="≥ 0.5× memcpy"),
    Row("Queue 1→1, 4 MiB (limit: memcpy into shm)", "queue_tput", size=4 * MIB, limit=("shm_memcpy", "limit", 4 * MIB),
        unit="MB/s", targets=[("limit", ">=", 0.5)], target_text="≥ 0.5× memcpy"),
    Row("Queue 1→1, 16 MiB (limit: memcpy into shm)", "queue_tput", size=16 * MIB,
        limit=("shm_memcpy", "limit", 16 * MIB), unit="MB/s", targets=[("limit", ">=", 0.5)],
        target_text="≥ 0.5× memcpy"),
    Row("Queue 1→1, 64 MiB (limit: memcpy into shm)", "queue_tput", size=64 * MIB,
        limit=("shm_memcpy", "limit", 64 * MIB), unit="MB/s", targets=[("limit", ">=", 0.5)],
        target_text="≥ 0.5× memcpy"),
    Row("Queue 1→1, 1 MiB by SharedMemory handle (limit: memcpy into shm)", "queue_shm", size=MIB, python=False,
        limit=("shm_memcpy", "limit", MIB), unit="MB/s", targets=[("limit", ">=", 0.5)], target_text="≥ 0.5× memcpy"),
    Row("Queue 1→1, 64 MiB by SharedMemory handle (limit: memcpy into shm)", "queue_shm", size=64 * MIB,
        python=False, limit=("shm_memcpy", "limit", 64 * MIB), unit="MB/s", targets=[("limit", ">=", 0.5)],
        target_text="≥ 0.5× memcpy"),
    Row("Pipe 64 B round trip p50 pinned, duplex (limit: raw socketpair)", "pipe_rtt_pinned", size=64,
        limit=("pipe_rtt_pinned_socketpair", "limit", 64), unit="µs", targets=[("limit", "<=", 1.2)],
        target_text="≤ 1.2× raw socketpair"),
    Row("Pipe 64 B round trip p50 pinned, two simplex (limit: raw pipes)", "pipe_rtt_pinned_simplex", size=64,
        python=False, limit=("pipe_rtt_pinned", "limit", 64), unit="µs", targets=[("limit", "<=", 1.2)],
        target_text="≤ 1.2× raw pipe"),
    Row("Pipe one-way, 1 MiB, simplex (limit: best raw)", "pipe_oneway", size=MIB, limit=("pipe_oneway", "limit", MIB),
        unit="MB/s", targets=[("limit", ">=", 0.8)], target_text="≥ 0.8× best of pipe, enlarged pipe, socketpair"),
    Row("Pipe one-way, 1 MiB, duplex (limit: best raw)", "pipe_oneway_duplex", size=MIB, python=False,
        limit=("pipe_oneway", "limit", MIB), unit="MB/s", targets=[("limit", ">=", 0.8)],
        target_text="≥ 0.8× best of pipe, enlarged pipe, socketpair"),
    Row("Pipe one-way, 4 KiB", "pipe_sweep", size=4 * KIB, limit=("pipe_sweep", "limit", 4 * KIB), unit="MB/s",
        targets=[("python", ">=", 1.5)], target_text="≥ 1.5× Python"),
    Row("Pipe one-way, 16 KiB", "pipe_sweep", size=16 * KIB, limit=("pipe_sweep", "limit", 16 * KIB), unit="MB/s",
        targets=[("python", ">=", 1.5)], target_text="≥ 1.5× Python"),
    Row("Pipe one-way, 64 KiB", "pipe_sweep", size=64 * KIB, limit=("pipe_sweep", "limit", 64 * KIB), unit="MB/s",
        targets=[("python", ">=", 1.5)], target_text="≥ 1.5× Python"),
    Row("SharedDict get/set, 1 process", "dict_getset", unit="ops/s", targets=[("python", ">=", 250)],
        target_text="≥ 250× Manager().dict()"),
    Row("SharedDict d[\"k\"] += 1, 2 processes", "dict_incr", unit="incr/s", targets=[("python", ">=", 100)],
        target_text="≥ 100× Python (locked), 0 lost", extra=lost_zero),
    Row("Process start + join p50 (limit: fork+waitpid)", "process_start_join", limit=("process_start_join", "limit", None),
        unit="µs", targets=[("limit", "<=", 1.3)], target_text="≤ 1.3× fork+waitpid"),
    Row("Process start + join p50, 1 GiB resident parent (limit: fork+waitpid of it)", "process_start_join_1g",
        python=False, limit=("process_start_join_1g", "limit", None), unit="µs", targets=[("limit", "<=", 1.3)],
        target_text="≤ 1.3× fork+waitpid"),
    Row("Pool.map vs OpenMP schedule(dynamic), 1 µs items", "openmp", size=1, python=False,
        limit=("openmp", "limit", 1), unit="items/s", targets=[("limit", ">=", 0.85)], target_text="≥ 0.85× OpenMP"),
    Row("Pool.map vs OpenMP schedule(dynamic), 20 µs items", "openmp", size=20, python=False,
        limit=("openmp", "limit", 20), unit="items/s", targets=[("limit", ">=", 0.95)], target_text="≥ 0.95× OpenMP"),
    Row("Pool.map vs OpenMP schedule(dynamic), 200 µs items", "openmp", size=200, python=False,
        limit=("openmp", "limit", 200), unit="items/s", targets=[("limit", ">=", 0.98)], target_text="≥ 0.98× OpenMP"),
    Row("private memory per idle Pool worker", "pool_worker_memory", limit=("pool_worker_memory", "limit", None),
        unit="MiB", targets=[("abs", "<=", 2.0)], target_text="≤ 2 MiB"),
    Row("idle Pool, CPU (limit: child blocked in read)", "idle_pool", limit=("idle_pool", "limit", None),
        unit="% CPU", targets=[("abs", "<=", 0.5)], target_text="~0% (≤ 0.5% of a CPU)"),
    Row("consumer blocked on empty Queue, CPU", "idle_queue_consumer", limit=("idle_queue_consumer", "limit", None),
        unit="% CPU", targets=[("abs", "<=", 0.5)], target_text="~0% (≤ 0.5% of a CPU)"),
    Row("build: TU including <mproc/mproc.hpp> (limit: the standard headers it needs)", "build",
        python=False, limit=("build", "limit", None), unit="s", targets=[("limit", "<=", 1.5)],
        target_text="≤ 1.5× the standard headers"),
] + [
    Row("build: TU including <mproc/%s.hpp> alone (limit: the standard headers it needs)" % h, "build_" + h,
        python=False, limit=("build_" + h, "limit", None), unit="s", targets=[("limit", "<=", 1.3)],
        target_text="≤ 1.3× its standard headers") for h in CONCEPT_HEADERS

]

CONTEXT_ROWS = [
    Row("Pipe 64 B round trip p50, unpinned", "pipe_rtt", size=64, limit=("pipe_rtt", "limit", 64), unit="µs"),
    Row("apply(f, x) round trip p50, unpinned (limit: pipe ping-pong)", "pool_apply_lat",
        limit=("pipe_rtt", "limit", 64), unit="µs"),
    Row("raw socketpair round trip p50, pinned (limit only)", "pipe_rtt_pinned_socketpair", size=64, python=False,
        limit=("pipe_rtt_pinned_socketpair", "limit", 64), unit="µs"),
    Row("Queue 64 B vs Python SimpleQueue (msgs/s)", "queue_tput", size=64, field="msgs_per_s", unit="msgs/s",
        python_impl="python-simplequeue"),
    Row("SharedDict += from 2 processes vs Python without a lock (loses updates)", "dict_incr", unit="incr/s",
        python_impl="python-nolock"),
    Row("memcpy into shared memory, 1 MiB (limit only)", "shm_memcpy", size=MIB, python=False,
        limit=("shm_memcpy", "limit", MIB), unit="MB/s"),
    Row("build: a program using Pool.map, Queue, Process (limit: same with std::async, std::thread)",
        "build_using", python=False, limit=("build_using", "limit", None), unit="s"),
]


def fmt_num(v, unit=None):
    if v is None:
        return "—"
    a = abs(v)
    if unit in ("µs", "s", "MiB", "% CPU") or a < 1000:
        if a >= 100:
            s = "%.0f" % v
        elif a >= 10:
            s = "%.1f" % v
        elif a >= 1:
            s = "%.2f" % v
        else:
            s = "%.3f" % v
    elif a >= 1e9:
        s = "%.3gG" % (v / 1e9)
    elif a >= 1e6:
        s = "%.3gM" % (v / 1e6)
    else:
        s = "%.3gk" % (v / 1e3)
    return s


def fmt_ratio(r):
    if r is None:
        return "—"
    if r >= 100:
        return "%.0f×" % r
    if r >= 10:
        return "%.1f×" % r
    return "%.2f×" % r


def evaluate(row, med):
    def fig(key):
        if key is None or key not in med:
            return None
        return med[key].get(row.field if key[1] == "mproc" or key[1].startswith("python") else "value",
                            med[key].get("value"))

    mv = fig(row.mproc)
    pv = fig(row.python)
    # The limit of a msgs/s row is in msgs/s too.
    lv = None
    if row.limit is not None and row.limit in med:
        lv = med[row.limit].get(row.field, med[row.limit].get("value"))
    r_py = mv / pv if mv is not None and pv else None
    r_lim = mv / lv if mv is not None and lv else None
    verdicts = []
    for against, rel, num in row.targets:
        x = {"python": r_py, "limit": r_lim, "abs": mv}[against]
        if x is None:
            verdicts.append(None)
        else:
            verdicts.append(x >= num if rel == ">=" else x <= num)
    note = ""
    if row.extra is not None:
        ok, note = row.extra(med)
        verdicts.append(ok)
    if not row.targets and row.extra is None:
        verdict = ""
    elif any(v is None for v in verdicts):
        verdict = "?"
    else:
        verdict = "pass" if all(verdicts) else "MISS"
    return {"label": row.label, "mproc": mv, "python": pv, "limit": lv, "r_py": r_py, "r_lim": r_lim,
            "unit": row.unit, "target": row.target_text, "verdict": verdict, "note": note}


def table_lines(results, markdown):
    head = ["operation", "unit", "mproc", "Python", "limit", "mproc/Python", "mproc/limit", "target", ""]
    rows = []
    for e in results:
        target = e["target"] + ((" (" + e["note"] + ")") if e["note"] else "")
        rows.append([e["label"], e["unit"] or "", fmt_num(e["mproc"], e["unit"]), fmt_num(e["python"], e["unit"]),
                     fmt_num(e["limit"], e["unit"]), fmt_ratio(e["r_py"]), fmt_ratio(e["r_lim"]), target,
                     {"pass": "pass", "MISS": "**miss**" if markdown else "MISS"}.get(e["verdict"], e["verdict"])])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return out
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    widths[0] = min(widths[0], 58)
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        label = r[0] if len(r[0]) <= widths[0] else r[0][:widths[0] - 1] + "…"
        out.append("  ".join(c.ljust(w) for c, w in zip([label] + r[1:], widths)).rstrip())
    return out


# ---- the machine -------------------------------------------------------------------------------

def machine(build_info):
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    except OSError:
        pass
    hyper = ""
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Hypervisor vendor:"):
                hyper = line.split(":", 1)[1].strip()
    except OSError:
        pass
    commit = "?"
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True).stdout.strip() or "?"
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "hypervisor": hyper,
        "memory": mem,
        "kernel": platform.release(),
        "os": os_name(),
        "compiler": build_info.get("cxx_id", "?") + " (" + build_info.get("cxx", "?") + ")",
        "flags": (build_info.get("flags", "").strip() + " " + build_info.get("std", "")).strip(),
        "python": platform.python_version() + " (" + sys.executable + ")",
        "commit": commit,
        "loadavg": os.getloadavg(),
    }


def os_name():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


# ---- the chart ---------------------------------------------------------------------------------

def chart(med, build_dir, out_svg):
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        return "gnuplot is missing: chart skipped"
    data_dir = os.path.join(build_dir, "chart")
    os.makedirs(data_dir, exist_ok=True)
    series = {}
    for (op, impl, size), v in med.items():
        if op in ("queue_sweep", "pipe_sweep") and impl in ("mproc", "python", "limit") and size is not None:
            series.setdefault((op, impl), []).append((size, v["value"]))
    for (op, impl), pts in series.items():
        with open(os.path.join(data_dir, "%s_%s.dat" % (op, impl)), "w") as f:
            for size, v in sorted(pts):
                f.write("%d %.6g\n" % (size, v))

    def plot(op, title, limit_title):
        parts = []
        for impl, name, style in (("mproc", "mproc", "lt 1 lw 2 pt 7"), ("python", "Python multiprocessing", "lt 2 lw 2 pt 5"),
                                  ("limit", limit_title, "lt 3 lw 2 pt 9 dt 2")):
            path = os.path.join(data_dir, "%s_%s.dat" % (op, impl))
            if os.path.exists(path):
                parts.append("'%s' using 1:2 with linespoints %s title '%s'" % (path, style, name))
        if not parts:
            return "set title '%s (no data)'\nplot 0 notitle\n" % title
        return "set title '%s'\nplot %s\n" % (title, ", ".join(parts))

    script = """set terminal svg size 1100,460 dynamic font 'sans,12' background '#ffffff'
set output '%s'
set multiplot layout 1,2
set logscale xy
set grid xtics ytics mxtics mytics lc '#dddddd'
set key top left box opaque
set xlabel 'message size'
set ylabel 'MB/s (log)'
set xtics ("64 B" 64, "256" 256, "1 KiB" 1024, "4 KiB" 4096, "16 KiB" 16384, "64 KiB" 65536, "256 KiB" 262144, "1 MiB" 1048576, "4 MiB" 4194304)
set lt 1 lc '#d62728'
set lt 2 lc '#1f77b4'
set lt 3 lc '#555555'
%s%s
unset multiplot
""" % (out_svg, plot("queue_sweep", "Queue, 1 producer → 1 consumer", "raw SPSC ring in shared memory"),
       plot("pipe_sweep", "Pipe, one way", "raw pipe write → read"))
    path = os.path.join(data_dir, "throughput.gp")
    with open(path, "w") as f:
        f.write(script)
    p = subprocess.run([gnuplot, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return "gnuplot failed: " + p.stderr.strip()[-500:]
    return None


# ---- docs/performance.md -----------------------------------------------------------------------

BEGIN = "<!-- BEGIN bench/run.sh output: everything up to END is rewritten by each full run -->"
END = "<!-- END bench/run.sh output -->"


def generated_block(results, context, mach, run_info, med, chart_name):
    la = mach["loadavg"]
    lines = [BEGIN, "",
             "Run of %s, commit `%s`, %d rounds (medians), %.0f s in all."
             % (run_info["date"], mach["commit"], run_info["rounds"], run_info["seconds"]), "",
             "| machine | |", "|---|---|",
             "| CPU | %s, %d cores%s |" % (mach["cpu"], mach["cores"],
                                           (", " + mach["hypervisor"] + " guest") if mach["hypervisor"] else ""),
             "| memory | %s |" % mach["memory"],
             "| OS, kernel | %s, Linux %s |" % (mach["os"], mach["kernel"]),
             "| compiler | %s, `%s` |" % (mach["compiler"], mach["flags"]),
             "| Python | %s |" % mach["python"],
             "| load average at the start | %.2f %.2f %.2f |" % la, "",
             "### Targets", ""]
    lines += table_lines(results, markdown=True)
    lines += ["", "### Context (no target)", ""]
    lines += table_lines(context, markdown=True)
    lines += ["", "### Throughput against message size", ""]
    if chart_name:
        lines += ["![Queue and Pipe throughput against message size: mproc, Python, the raw limit](%s)" % chart_name, ""]
    sweep = []
    for op in ("queue_sweep", "pipe_sweep"):
        sizes = sorted({k[2] for k in med if k[0] == op and k[2] is not None})
        for s in sizes:
            vals = [med.get((op, impl, s), {}).get("value") for impl in ("mproc", "python", "limit")]
            sweep.append("| %s | %s | %s | %s | %s | %s |" % (
                "Queue" if op == "queue_sweep" else "Pipe", size_text(s),
                *(fmt_num(v, "MB/s") for v in vals),
                fmt_ratio(vals[0] / vals[1]) if vals[0] and vals[1] else "—"))
    if sweep:
        lines += ["| channel | size | mproc MB/s | Python MB/s | limit MB/s | mproc/Python |", "|---|---|---|---|---|---|"]
        lines += sweep
    lines += ["", END]
    return "\n".join(lines)


def size_text(s):
    if s >= MIB and s % MIB == 0:
        return "%d MiB" % (s // MIB)
    if s >= KIB and s % KIB == 0:
        return "%d KiB" % (s // KIB)
    return "%d B" % s


def write_docs(block):
    path = os.path.join(ROOT, "docs", "performance.md")
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        b = text.find(BEGIN)
        e = text.find(END)
        if b >= 0 and e > b:
            text = text[:b] + block + text[e + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n## Latest run\n\n" + block + "\n"
    else:
        text = "# mproc performance\n\n## Latest run\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    return path


# ---- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build", "bench"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes and 3 rounds (< 2 min); docs untouched")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, --quick 3)")
    ap.add_argument("--only", action="append", help="run only the groups whose name contains this (repeatable)")
    ap.add_argument("--docs", dest="docs", action="store_true", default=None, help="update docs/performance.md")
    ap.add_argument("--no-docs", dest="docs", action="store_false", help="leave docs/performance.md alone")
    ap.add_argument("--timeout", type=int, default=180, help="seconds one program may take")
    ap.add_argument("--from-results", action="store_true",
                    help="run nothing: rebuild the table (and, with --docs, the page) from the last results.jsonl")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    docs = args.docs if args.docs is not None else (not args.quick and not args.only)
    bin_dir = os.path.join(args.build_dir, "bench")

    with open(os.path.join(args.build_dir, "bench_build_info.json")) as f:
        build_info = json.load(f)
    machine_path = os.path.join(args.build_dir, "machine.json")
    if args.from_results:
        # The machine as the run that wrote results.jsonl saw it (its load, its date).
        if not os.path.exists(machine_path):
            sys.exit("bench/run.py: --from-results needs %s, written by a run" % machine_path)
        with open(machine_path) as f:
            mach = json.load(f)
    else:
        mach = machine(build_info)
        mach["run_date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(machine_path, "w") as f:
            json.dump(mach, f, indent=1)
    all_groups = groups(bin_dir, args.quick)
    if not os.path.exists(os.path.join(bin_dir, "bench_mproc_openmp")):
        print("bench/run.py: bench_mproc_openmp was not built (no OpenMP for this compiler): its rows are skipped")
        all_groups = [g for g in all_groups if g.name != "openmp"]
    for missing in [c.argv[0] for g in all_groups for c in g.cmds if c.impl != "python" and not os.path.exists(c.argv[0])]:
        sys.exit("bench/run.py: %s is missing (did bench/run.sh build it?)" % missing)
    if args.only:
        all_groups = [g for g in all_groups if any(s in g.name for s in args.only)]
    with_build = not args.only or any(s in "build" for s in args.only)

    results_path = os.path.join(args.build_dir, "results.jsonl")
    if args.from_results:
        with open(results_path) as f:
            previous = [json.loads(line) for line in f]
        rounds = max(r.get("round", 0) for r in previous) + 1
        seconds = mach.get("run_seconds", 0.0)
    else:
        seconds = run_all(args, rounds, all_groups, with_build, results_path)
        mach["run_seconds"] = seconds  # the run's own length: a sum of its records would count overlaps
        with open(machine_path, "w") as f:
            json.dump(mach, f, indent=1)
    return summarise(args, rounds, seconds, results_path, mach, build_info, docs)


def run_all(args, rounds, all_groups, with_build, results_path):
    """Runs every group `rounds` times into results_path (JSON lines); returns the seconds taken."""
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    started = time.monotonic()
    out = open(results_path, "w")
    tmp = tempfile.mkdtemp(prefix="mproc-bench-")
    _, build_cmds = build_commands(args.build_dir, tmp)

    print("mproc benchmarks: %d rounds%s; raw figures -> %s" % (rounds, " (quick)" if args.quick else "", results_path),
          file=sys.stderr)
    try:
        for rnd in range(rounds):
            t_round = time.monotonic()
            todo = [g for g in all_groups if g.rounds is None or rnd < g.rounds]
            for gi, g in enumerate(todo):
                # Rotate the order of the three each round, so none always runs first.
                k = (rnd + gi) % len(g.cmds)
                for cmd in g.cmds[k:] + g.cmds[:k]:
                    t0 = time.monotonic()
                    for r in run_cmd(cmd, args.timeout):
                        r.update(run=run_id, round=rnd, group=g.name, wall_s=round(time.monotonic() - t0, 3))
                        if "error" in r:
                            r["cmd"] = " ".join(cmd.argv)
                            print("  ERROR %s %s: %s" % (g.name, cmd.impl, r["error"]), file=sys.stderr)
                        out.write(json.dumps(r) + "\n")
                    out.flush()
            if with_build and rnd < (1 if args.quick else 3):
                for (op, impl) in sorted(build_cmds, key=lambda k: (k[0], k[1] != ("mproc", "limit")[rnd % 2])):
                    if args.quick and op not in ("build", "build_pool", "build_process"):
                        continue
                    for r in time_build(op, impl, build_cmds[(op, impl)]):
                        r.update(run=run_id, round=rnd, group=op)
                        if "error" in r:
                            print("  ERROR %s %s: %s" % (op, impl, r["error"]), file=sys.stderr)
                        out.write(json.dumps(r) + "\n")
            print("  round %d/%d: %.0f s" % (rnd + 1, rounds, time.monotonic() - t_round), file=sys.stderr)
    finally:
        out.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return time.monotonic() - started


def summarise(args, rounds, seconds, results_path, mach, build_info, docs):
    """Medians of results_path: the printed table, medians.json, and (with docs) the page and chart."""

    # Medians over the rounds, per (op, impl, size), of every numeric field.
    samples = {}
    with open(results_path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("value") is None:
                continue
            samples.setdefault(key_of(r), []).append(r)
    med = {}
    for k, rs in samples.items():
        fields = {}
        for r in rs:
            for name, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and name not in ("round",):
                    fields.setdefault(name, []).append(v)
        med[k] = {name: statistics.median(vs) for name, vs in fields.items()}
        med[k]["samples"] = len(rs)
        if "lost" in fields:
            med[k]["lost_max"] = max(fields["lost"])
    with open(os.path.join(args.build_dir, "medians.json"), "w") as f:
        json.dump([{"op": k[0], "impl": k[1], "size": k[2], **v} for k, v in sorted(med.items(), key=str)], f, indent=1)

    results = [evaluate(row, med) for row in ROWS]
    context = [evaluate(row, med) for row in CONTEXT_ROWS]
    print()
    print("mproc vs Python multiprocessing vs the raw OS limit — medians of %d rounds%s, %.0f s"
          % (rounds, ", quick sizes" if args.quick else "", seconds))
    print("\n".join(table_lines(results, markdown=False)))
    print()
    print("context:")
    print("\n".join(table_lines(context, markdown=False)))
    met = sum(1 for e in results if e["verdict"] == "pass")
    print()
    print("targets met: %d of %d%s" % (met, len(results),
                                       " (quick sizes: the full run is the one that counts)" if args.quick else ""))
    print("raw figures: %s" % results_path)

    if docs:
        chart_name = "performance-throughput.svg"
        err = chart(med, args.build_dir, os.path.join(ROOT, "docs", chart_name))
        if err:
            print("chart: " + err, file=sys.stderr)
            if not os.path.exists(os.path.join(ROOT, "docs", chart_name)):
                chart_name = None
        run_info = {"date": mach.get("run_date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    "rounds": rounds, "seconds": seconds}
        path = write_docs(generated_block(results, context, mach, run_info, med, chart_name))
        print("updated %s%s" % (os.path.relpath(path, ROOT), "" if not chart_name else " and docs/" + chart_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
