// mproc benchmarks — what every benchmark program shares: the clock, percentiles, arguments,
// CPU pinning, /proc readers and the one output format.
//
// Every program prints one JSON object per line on stdout, the same fields as its Python twin
// (bench/python/common.py):
//   {"op": "pool_map", "impl": "mproc", "value": 1.2e6, "unit": "tasks/s", "n": 1000000, "seconds": 0.83, ...}
// `value` is the figure the table shows; anything else is context. A program that finds a wrong
// result prints the reason on stderr and exits 1: a benchmark that did the wrong work has no figure.
#pragma once

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <map>
#include <sched.h>
#include <sstream>
#include <string>
#include <string_view>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <utility>
#include <vector>

namespace bench {

inline std::int64_t now_ns() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

inline double seconds_since(std::int64_t start_ns) noexcept { return static_cast<double>(now_ns() - start_ns) / 1e9; }

[[noreturn]] inline void die(const std::string& why) {
    std::fprintf(stderr, "bench: %s\n", why.c_str());
    std::fflush(stderr);
    std::exit(1);
}

inline void check(bool ok, const std::string& why) {
    if (!ok) die("wrong result: " + why);
}

/// `--name value` arguments after the operation name.
class Args {
public:
    Args(int argc, char** argv) {
        if (argc < 2) die("usage: " + std::string(argv[0]) + " <operation> [--key value]...");
        op_ = argv[1];
        for (int i = 2; i < argc; ++i) {
            std::string key = argv[i];
            if (key.rfind("--", 0) != 0) die("unexpected argument " + key);
            key = key.substr(2);
            if (i + 1 < argc && std::string_view(argv[i + 1]).rfind("--", 0) != 0)
                values_[key] = std::string(argv[++i]);
            else values_[key] = std::string(1, '1');
        }
    }
    const std::string& op() const { return op_; }
    long long num(const std::string& key, long long fallback) const {
        auto it = values_.find(key);
        if (it == values_.end()) return fallback;
        return std::stoll(it->second);
    }
    bool flag(const std::string& key) const { return values_.count(key) != 0 && values_.at(key) != "0"; }
    std::string str(const std::string& key, std::string fallback) const {
        auto it = values_.find(key);
        return it == values_.end() ? fallback : it->second;
    }
    /// A comma-separated list of sizes ("64,4096,1048576").
    std::vector<long long> sizes(const std::string& key, std::vector<long long> fallback) const {
        auto it = values_.find(key);
        if (it == values_.end()) return fallback;
        std::vector<long long> out;
        std::stringstream ss(it->second);
        std::string part;
        while (std::getline(ss, part, ',')) out.push_back(std::stoll(part));
        return out;
    }

private:
    std::string op_;
    std::map<std::string, std::string> values_;
};

/// One output line: {"op": ..., "impl": ..., "value": ..., "unit": ..., extra fields...}.
class Record {
public:
    Record(std::string op, std::string impl, double value, std::string unit) {
        text_ = "{\"op\": \"" + op + "\", \"impl\": \"" + impl + "\", \"value\": " + number(value) + ", \"unit\": \"" +
                unit + "\"";
    }
    Record& set(const std::string& key, double v) {
        text_ += ", \"" + key + "\": " + number(v);
        return *this;
    }
    Record& set(const std::string& key, const std::string& v) {
        text_ += ", \"" + key + "\": \"" + v + "\"";
        return *this;
    }
    void print() const {
        std::printf("%s}\n", text_.c_str());
        std::fflush(stdout);
    }

private:
    static std::string number(double v) {
        if (!std::isfinite(v)) return "null";
        char buf[64];
        // Whole numbers (sizes, counts) exactly, so 1048576 does not read back as 1.04858e+06.
        if (v == std::floor(v) && std::fabs(v) < 1e15) std::snprintf(buf, sizeof buf, "%.0f", v);
        else std::snprintf(buf, sizeof buf, "%.6g", v);
        return buf;
    }
    std::string text_;
};

/// Percentile (0..100) of latencies in ns, nearest-rank on a sorted copy.
inline double percentile(std::vector<std::int64_t> v, double p) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    const auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
    return static_cast<double>(v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)]);
}

/// Adds p50/p90/p99 (µs) of `lat_ns` to a record whose value is the p50 in µs.
inline Record latency_record(const std::string& op, const std::string& impl, const std::vector<std::int64_t>& lat_ns) {
    const double p50 = percentile(lat_ns, 50) / 1e3;
    Record r(op, impl, p50, "us");
    r.set("p50_us", p50).set("p90_us", percentile(lat_ns, 90) / 1e3).set("p99_us", percentile(lat_ns, 99) / 1e3);
    r.set("n", static_cast<double>(lat_ns.size()));
    return r;
}

/// Pins the calling process (and so the children it forks afterwards) to one CPU.
inline void pin_to_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (::sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity: " + std::string(std::strerror(errno)));
}

/// The CPU this process may use first (so pinning honours an outer affinity mask).
inline int first_allowed_cpu() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    for (int i = 0; i < CPU_SETSIZE; ++i)
        if (CPU_ISSET(i, &set)) return i;
    return 0;
}

// ---- /proc -------------------------------------------------------------------------------

/// Private_Clean + Private_Dirty of a process, in KiB (from /proc/<pid>/smaps_rollup).
inline long private_kib(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/smaps_rollup");
    if (!in) die("cannot read /proc/" + std::to_string(pid) + "/smaps_rollup");
    std::string key;
    long value = 0;
    std::string unit;
    long total = 0;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        ls >> key >> value >> unit;
        if (key == "Private_Clean:" || key == "Private_Dirty:") total += value;
    }
    return total;
}

/// utime + stime of a whole process (every thread), in clock ticks (from /proc/<pid>/stat).
inline long long cpu_ticks(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    if (!in) return -1;
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto close = text.rfind(')');
    if (close == std::string::npos) return -1;
    std::istringstream rest(text.substr(close + 2));
    std::string field;
    long long utime = 0, stime = 0;
    // Fields after the command: state(3) ... utime(14) stime(15).
    for (int i = 3; i <= 15; ++i) {
        rest >> field;
        if (i == 14) utime = std::stoll(field);
        if (i == 15) stime = std::stoll(field);
    }
    return utime + stime;
}

/// Time on a CPU of every thread of a process, in ns (sum of /proc/<pid>/task/*/schedstat), or -1.
inline long long cpu_ns(pid_t pid) {
    const std::string dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* d = ::opendir(dir.c_str());
    if (!d) return -1;
    long long total = 0;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream in(dir + "/" + e->d_name + "/schedstat");
        long long ns = 0;
        if (in >> ns) total += ns;
    }
    ::closedir(d);
    return total;
}

/// Voluntary + involuntary context switches of every thread of a process (wake-ups), or -1.
inline long long context_switches(pid_t pid) {
    const std::string dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* d = ::opendir(dir.c_str());
    if (!d) return -1;
    long long total = 0;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream in(dir + "/" + e->d_name + "/status");
        std::string line;
        while (std::getline(in, line)) {
            if (line.rfind("voluntary_ctxt_switches:", 0) == 0 || line.rfind("nonvoluntary_ctxt_switches:", 0) == 0)
                total += std::stoll(line.substr(line.find(':') + 1));
        }
    }
    ::closedir(d);
    return total;
}

/// CPU used by a set of processes over `seconds` of wall time: prints the idle record.
/// value: percent of one CPU (schedstat ns; utime+stime ticks beside it) and wake-ups/s.
inline void idle_record(const std::string& op, const std::string& impl, const std::vector<pid_t>& pids,
                        double seconds) {
    long long ticks0 = 0, ns0 = 0, sw0 = 0;
    for (pid_t p : pids) {
        ticks0 += cpu_ticks(p);
        ns0 += cpu_ns(p);
        sw0 += context_switches(p);
    }
    const std::int64_t t0 = now_ns();
    timespec ts{static_cast<time_t>(seconds), static_cast<long>((seconds - std::floor(seconds)) * 1e9)};
    while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    const double wall = seconds_since(t0);
    long long ticks1 = 0, ns1 = 0, sw1 = 0;
    for (pid_t p : pids) {
        ticks1 += cpu_ticks(p);
        ns1 += cpu_ns(p);
        sw1 += context_switches(p);
    }
    const double hz = static_cast<double>(::sysconf(_SC_CLK_TCK));
    const double stat_pct = static_cast<double>(ticks1 - ticks0) / hz / wall * 100.0;
    // utime+stime count whole 10 ms ticks: one stray tick reads as 1% of a second. schedstat counts
    // nanoseconds, so it is the figure shown; the tick-based one is kept beside it.
    const double pct = ns0 >= 0 && ns1 >= 0 ? static_cast<double>(ns1 - ns0) / 1e9 / wall * 100.0 : stat_pct;
    Record r(op, impl, pct, "% CPU");
    r.set("seconds", wall).set("processes", static_cast<double>(pids.size()));
    r.set("cpu_pct_stat", stat_pct);
    r.set("wakeups_per_s", static_cast<double>(sw1 - sw0) / wall);
    r.print();
}

/// The children of a process (from /proc/<pid>/task/*/children).
inline std::vector<pid_t> children_of(pid_t pid) {
    std::vector<pid_t> out;
    const std::string dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* d = ::opendir(dir.c_str());
    if (!d) return out;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream in(dir + "/" + e->d_name + "/children");
        pid_t c;
        while (in >> c) out.push_back(c);
    }
    ::closedir(d);
    return out;
}

/// Busy-free sleep.
inline void sleep_s(double seconds) {
    timespec ts{static_cast<time_t>(seconds), static_cast<long>((seconds - std::floor(seconds)) * 1e9)};
    while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/// A message of `size` bytes whose content depends on `seq` (so a lost or reordered message shows).
/// Makes this process hold `mib` MiB of private memory, every page touched (a large parent for
/// the fork rows); the memory stays until the process ends.
inline void hold_resident(long long mib) {
    if (mib <= 0) return;
    const std::size_t bytes = static_cast<std::size_t>(mib) << 20;
    void* block = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (block == MAP_FAILED) die("mmap of the resident block failed");
    std::memset(block, 1, bytes);
}

inline void stamp(char* data, std::size_t size, std::uint64_t seq) {
    if (size >= sizeof seq) std::memcpy(data, &seq, sizeof seq);
    else if (size > 0) data[0] = static_cast<char>(seq);
}
inline std::uint64_t stamp_of(const char* data, std::size_t size) {
    std::uint64_t seq = 0;
    if (size >= sizeof seq) std::memcpy(&seq, data, sizeof seq);
    else if (size > 0) seq = static_cast<unsigned char>(data[0]);
    return seq;
}
inline bool stamp_matches(const char* data, std::size_t size, std::uint64_t seq) {
    if (size >= sizeof seq) return stamp_of(data, size) == seq;
    if (size > 0) return static_cast<unsigned char>(data[0]) == static_cast<unsigned char>(seq);
    return true;
}

/// How many messages of `size` bytes make up `bytes`, within [lo, hi].
inline long long count_for(long long size, long long bytes, long long lo, long long hi) {
    return std::clamp(bytes / std::max(1LL, size), lo, hi);
}

}  // namespace bench
