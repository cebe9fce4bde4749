// mproc — PoolStats: what a Pool is doing, per worker and in total (Pool::stats()).
//
//     mproc::PoolStats st = pool.stats();
//     fmt::print("{}\n", st);        // a table: one line per worker, then the totals
//     st.workers[0].busy;             // time seat 0's workers spent running tasks
//
// Taking the figures costs only the call itself: the pool keeps its counters as it delivers
// results, and reads each worker's resident memory when asked.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <fmt/core.h>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

#include "time.hpp"

namespace mproc {

/// Why a seat's workers were replaced, by cause.
struct RestartCounts {
    unsigned crashed = 0;    // killed by a signal or exited on their own (not one below)
    unsigned timeout = 0;    // killed for task_timeout, a stall, or by the stall_timeout watchdog
    unsigned memory = 0;     // went past memory_limit, or past max_memory_per_child after a task
    unsigned cancelled = 0;  // ended to stop a cancelled task
    unsigned recycled = 0;   // ran max_tasks_per_child tasks

    unsigned total() const noexcept { return crashed + timeout + memory + cancelled + recycled; }
};

/// One seat of the pool: its current worker and the history of the workers it has had.
struct WorkerStats {
    unsigned seat = 0;                          // its place in the pool; a replacement takes the same seat
    pid_t pid = 0;                              // the live worker (0: none right now)
    std::uint64_t tasks_done = 0;               // tasks (chunks) its workers finished
    Seconds busy{0};                            // time its workers spent running tasks
    Seconds idle{0};                            // time its workers were alive and not running a task
    std::optional<std::uint64_t> current_task;  // the task being run now
    Seconds current_for{0};                     // and for how long (its current item, with task_timeout)
    std::size_t resident_bytes = 0;             // the live worker's resident memory
    RestartCounts restarts;                     // why its workers were replaced
    std::string last_restart;                   // how the last replaced worker ended ("" if none was)
};

/// The whole pool.
struct PoolStats {
    std::vector<WorkerStats> workers;
    std::uint64_t tasks_done = 0;      // tasks finished (a map's chunk is one task)
    std::size_t tasks_queued = 0;      // submitted and not yet given to a worker
    std::size_t tasks_in_flight = 0;   // given to a worker and not yet finished
    std::uint64_t retries = 0;         // items run again after their worker was lost (max_retries)
    Seconds uptime{0};                 // since the pool started

    /// Restarts of every seat.
    RestartCounts restarts() const noexcept {
        RestartCounts r;
        for (const WorkerStats& w : workers) {
            r.crashed += w.restarts.crashed;
            r.timeout += w.restarts.timeout;
            r.memory += w.restarts.memory;
            r.cancelled += w.restarts.cancelled;
            r.recycled += w.restarts.recycled;
        }
        return r;
    }
    /// The share of the workers' time spent running tasks since the pool started (0 to 1).
    double utilisation() const noexcept {
        double busy = 0;
        for (const WorkerStats& w : workers) busy += w.busy.count();
        const double capacity = uptime.count() * static_cast<double>(workers.size());
        return capacity > 0 ? std::min(1.0, busy / capacity) : 0.0;
    }
};

}  // namespace mproc

/// A PoolStats as a table: one line per seat, then the totals.
template <> struct fmt::formatter<mproc::PoolStats> {
    constexpr auto parse(fmt::format_parse_context& ctx) { return ctx.begin(); }
    template <class Context> auto format(const mproc::PoolStats& st, Context& ctx) const {
        auto out = ctx.out();
        out = fmt::format_to(out, "{:>4} {:>8} {:>8} {:>9} {:>9} {:>12} {:>9} {:>8}  {}\n", "seat", "pid", "tasks",
                             "busy s", "idle s", "current", "RSS MiB", "restarts", "last restart");
        for (const mproc::WorkerStats& w : st.workers) {
            const std::string current = w.current_task
                                            ? fmt::format("#{} {:.1f}s", *w.current_task, w.current_for.count())
                                            : "-";
            out = fmt::format_to(out, "{:>4} {:>8} {:>8} {:>9.3f} {:>9.3f} {:>12} {:>9.1f} {:>8}  {}\n", w.seat, w.pid,
                                 w.tasks_done, w.busy.count(), w.idle.count(), current,
                                 static_cast<double>(w.resident_bytes) / (1024.0 * 1024.0), w.restarts.total(),
                                 w.last_restart.empty() ? "-" : w.last_restart);
        }
        const mproc::RestartCounts r = st.restarts();
        return fmt::format_to(out,
                              "{} tasks done, {} queued, {} in flight; {} retries; utilisation {:.0f}% over {:.1f}s; "
                              "restarts: {} crashed, {} timeout, {} memory, {} cancelled, {} recycled",
                              st.tasks_done, st.tasks_queued, st.tasks_in_flight, st.retries, st.utilisation() * 100.0,
                              st.uptime.count(), r.crashed, r.timeout, r.memory, r.cancelled, r.recycled);
    }
};
