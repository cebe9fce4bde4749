// mproc — the Pool across machines, on MPI.
//
//     #include <mproc/mpi.hpp>
//
//     int square(int x) { return x * x; }
//
//     int main(int argc, char** argv) {
//         mproc::mpi::Init mpi(argc, argv);   // the one new line: ranks > 0 serve tasks here and
//                                             // leave; rank 0 goes on with the program
//         mproc::mpi::Pool pool;              // one worker per other rank
//         std::vector<int> sq = pool.map(square, xs);
//         ...
//     }
//
//     $ mpirun -n 4 ./app                     # rank 0 runs main, ranks 1-3 are the pool's workers
//
// mproc::mpi::Pool is an mproc::Pool — apply, apply_async (callback, error_callback), map,
// map_async, starmap, starmap_async, imap, imap_unordered, close, join, terminate — with the same
// semantics, ordering and exception transport, whose tasks run on the other MPI ranks instead of
// forked processes. Tasks are plain functions and stateless callables, as in the local Pool, named
// across ranks by their offset in the program or library that holds them (detail/mpi_address.hpp).
//
// Failure model: a task that throws fails its result, as in the local Pool. Each worker rank runs
// its tasks in a local pool of forked processes (PoolOptions::processes_per_rank), so a task that
// crashes fails alone with WorkerLost, terminate() ends running tasks too, and the rank goes on.
// A rank that dies ends the whole job, as MPI jobs end under Open MPI: mpirun kills the other
// ranks and exits non-zero — nothing hangs, and nothing is retried. A rank that falls silent (its
// host cut off or stopped) is noticed by mproc's heartbeat (detail/heartbeat.hpp) within
// InitOptions::heartbeat_timeout: the live pool's pending tasks fail with mpi::RankLost, and the
// program's end ends the job with MPI_Abort; a worker that hears nothing from rank 0 for as long
// leaves. With PoolOptions::in_rank, tasks run in the rank's own process: a crash ends the job,
// and a running task cannot be interrupted (terminate() drops its result; the end waits for it).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

#include <fmt/format.h>

#include "detail/os/cpu.hpp"
#include "detail/os/io.hpp"
#include "errors.hpp"
#include "mpi/detail/comm.hpp"
#include "mpi/detail/engine.hpp"
#include "mpi/detail/heartbeat.hpp"
#include "mpi/detail/worker.hpp"
#include "mpi/errors.hpp"
#include "pool.hpp"

namespace mproc::mpi {

/// How mproc::mpi::Init sets up the job.
struct InitOptions {
    /// How long a silent peer is waited for: rank 0 takes a worker rank it has not heard from for
    /// this long for lost (the live pool's pending tasks fail with RankLost), and a worker that has
    /// not heard from rank 0 for this long leaves. 0: no heartbeat (a lost host is then noticed by
    /// MPI's own TCP timeouts, in minutes); else 500 ms to 1 day. Rank 0's value holds on every rank.
    std::chrono::milliseconds heartbeat_timeout{10'000};
};

/// Where a worker rank of an mpi::Pool runs.
struct RankInfo {
    int rank = 0;
    std::string host;  // its hostname
    pid_t pid = 0;     // its process id, on that host
};

namespace detail {

/// What each rank tells rank 0 in Init (plain bytes: one MPI_Gather).
struct RankHello {
    std::int32_t pid = 0;
    std::int32_t heartbeat = 0;  // 1: connected to rank 0's heartbeat
    std::int32_t cpus = 1;       // in its affinity (a rank's local pool has one worker per CPU by default)
    char why_not[120] = {};      // else why not
    char host[64] = {};
};

/// What Init sets up, for the whole process.
struct Runtime {
    bool started = false;
    bool finished = false;
    bool owns_mpi = false;  // MPI_Init was ours (so MPI_Finalize is too)
    MPI_Comm comm = MPI_COMM_NULL;
    int rank = 0;
    int size = 1;
    std::unique_ptr<Master> master;  // rank 0

    static Runtime& get() {
        static Runtime runtime;
        return runtime;
    }

    /// Rank 0: lets the workers go and finalises MPI. Runs once: at the end of main (Init's
    /// destructor) or at exit().
    void finish() noexcept {
        if (!started || finished) return;
        finished = true;
        try {
            if (master) master->finish();
        } catch (const RankLost& e) {
            mproc::detail::report("%s: mproc ends the job (MPI_Abort)\n", e.what());
            std::fflush(nullptr);
            MPI_Abort(comm, 1);
        } catch (const std::exception& e) {
            mproc::detail::report("mproc::mpi: ending the pool's ranks failed: %s\n", e.what());
            MPI_Abort(comm, 1);
        }
        MPI_Comm_free(&comm);
        if (owns_mpi) MPI_Finalize();
    }
};

}  // namespace detail

/// The MPI entry point: the first line of main. On rank 0 it returns and the program goes on;
/// on every other rank it serves the Pools that rank 0 creates until rank 0 ends, then exits the
/// process with status 0 — code after it never runs there (code before it runs on every rank).
/// At the end of main (or at exit()) rank 0 lets the workers go and finalises MPI.
class Init {
public:
    Init() : Init(nullptr, nullptr, InitOptions{}) {}
    explicit Init(InitOptions options) : Init(nullptr, nullptr, options) {}
    Init(int& argc, char**& argv, InitOptions options = {}) : Init(&argc, &argv, options) {}
    Init(const Init&) = delete;
    Init& operator=(const Init&) = delete;
    ~Init() { detail::Runtime::get().finish(); }

    int rank() const noexcept { return detail::Runtime::get().rank; }
    /// The number of ranks: rank 0 and size() - 1 workers.
    int size() const noexcept { return detail::Runtime::get().size; }

private:
    Init(int* argc, char*** argv, InitOptions options) {
        auto& rt = detail::Runtime::get();
        if (rt.started) throw Error("mproc::mpi::Init: MPI is already set up (one Init per program)");
        const auto timeout = options.heartbeat_timeout;
        if (timeout.count() != 0 && (timeout < std::chrono::milliseconds(500) || timeout > std::chrono::hours(24)))
            throw Error(
                fmt::format("mproc::mpi::Init: heartbeat_timeout of {} ms: it must be 0 (none) or from "
                            "500 ms to 1 day",
                            timeout.count()));
        int already = 0;
        detail::check(MPI_Initialized(&already), "MPI_Initialized");
        int provided = 0;
        if (already) {
            detail::check(MPI_Query_thread(&provided), "MPI_Query_thread");
        } else {
            detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
            rt.owns_mpi = true;
        }
        if (provided < MPI_THREAD_SERIALIZED)
            throw Error(
                "mproc::mpi::Init: this MPI library does not allow calls from a second thread "
                "(MPI_THREAD_SERIALIZED), which mproc::mpi::Pool needs");
        detail::check(MPI_Comm_dup(MPI_COMM_WORLD, &rt.comm), "MPI_Comm_dup");
        detail::check(MPI_Comm_set_errhandler(rt.comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
        detail::check(MPI_Comm_rank(rt.comm, &rt.rank), "MPI_Comm_rank");
        detail::check(MPI_Comm_size(rt.comm, &rt.size), "MPI_Comm_size");
        rt.started = true;
        // The heartbeat: rank 0 listens, its setup reaches every rank, the workers connect.
        detail::HeartbeatSetup setup;
        if (rt.rank == 0) {
            rt.master = std::make_unique<detail::Master>(rt.comm, rt.size);
            setup = rt.master->start_heartbeat(timeout).setup();
        }
        detail::check(MPI_Bcast(&setup, static_cast<int>(sizeof setup), MPI_BYTE, 0, rt.comm), "MPI_Bcast");
        detail::RankHello hello;
        hello.pid = static_cast<std::int32_t>(::getpid());
        hello.cpus = static_cast<std::int32_t>(mproc::detail::affinity_cpu_count());
        ::gethostname(hello.host, sizeof hello.host - 1);
        // A worker beats from the moment it is connected: rank 0 times its silence from then,
        // and the gather below may wait for a slower rank.
        std::unique_ptr<detail::HeartbeatLine> line;
        if (rt.rank != 0 && setup.timeout_ms != 0 && setup.port != 0) {
            std::string why;
            auto fd = detail::connect_heartbeat(setup, rt.rank, std::chrono::seconds(10), why);
            std::snprintf(hello.why_not, sizeof hello.why_not, "%s", why.c_str());
            if (fd)
                line = std::make_unique<detail::HeartbeatLine>(
                    std::move(fd), std::chrono::milliseconds(setup.timeout_ms), &leave_lost);
        }
        hello.heartbeat = line ? 1 : 0;
        std::vector<detail::RankHello> hellos(rt.rank == 0 ? static_cast<std::size_t>(rt.size) : 0);
        detail::check(MPI_Gather(&hello, static_cast<int>(sizeof hello), MPI_BYTE, hellos.data(),
                                 static_cast<int>(sizeof hello), MPI_BYTE, 0, rt.comm),
                      "MPI_Gather");
        if (rt.rank != 0) serve_and_exit(rt, std::move(line));
        std::vector<detail::RankPlace> places;
        std::vector<bool> beating(static_cast<std::size_t>(rt.size), false);
        for (int r = 0; r < rt.size; ++r) {
            const auto& h = hellos[static_cast<std::size_t>(r)];
            beating[static_cast<std::size_t>(r)] = h.heartbeat != 0;
            places.push_back({static_cast<pid_t>(h.pid), std::string(h.host, ::strnlen(h.host, sizeof h.host)),
                              static_cast<unsigned>(std::max(h.cpus, 1))});
            if (r != 0 && setup.timeout_ms != 0 && !h.heartbeat)
                mproc::detail::report(
                    "mproc::mpi: rank %d on %s has no heartbeat (%s): if its host is lost, only MPI's own "
                    "timeouts notice\n",
                    r, places.back().host.c_str(),
                    setup.port == 0 ? rt.master->heartbeat_why_not().c_str() : h.why_not);
        }
        rt.master->set_places(std::move(places), beating);
        std::atexit([] { detail::Runtime::get().finish(); });
    }

    /// A worker rank that lost rank 0 leaves at once: its tasks' results can reach no one, and
    /// nothing of the job may stay on a host cut off from it.
    [[noreturn]] static void leave_lost(const std::string& why) noexcept {
        mproc::detail::report("mproc::mpi: rank %d: %s: leaving\n", detail::Runtime::get().rank, why.c_str());
        ::_exit(1);
    }

    [[noreturn]] static void serve_and_exit(detail::Runtime& rt, std::unique_ptr<detail::HeartbeatLine> heartbeat) {
        try {
            char host[256] = {};
            ::gethostname(host, sizeof host - 1);
            detail::WorkerRank(rt.comm, rt.rank, host).serve();
            heartbeat.reset();  // rank 0 said goodbye: stop watching before MPI ends
        } catch (const std::exception& e) {
            mproc::detail::report("mproc::mpi: rank %d cannot go on: %s\n", rt.rank, e.what());
            std::fflush(stderr);
            MPI_Abort(rt.comm, 1);
        }
        rt.finished = true;
        MPI_Comm_free(&rt.comm);
        // Even when the program set MPI up itself: its code after Init never runs on this rank,
        // so it cannot finalise it, and a rank that exits unfinalised fails the job.
        MPI_Finalize();
        std::exit(0);
    }
};

/// How an mpi::Pool is built.
struct PoolOptions {
    /// Worker ranks to use (ranks 1..processes); 0: every rank but rank 0.
    unsigned processes = 0;
    /// Runs once on each worker rank when the pool starts, in the rank's own process before its
    /// local workers are forked (they inherit what it set up). A plain function (it is named
    /// across ranks like a task); if it throws, the pool breaks as the local one does.
    void (*initializer)() = nullptr;

    /// Each worker rank runs its tasks in a local pool of this many forked worker processes of its
    /// own — 0: one per CPU of that rank's affinity — so one rank per host (`mpirun --map-by
    /// ppr:1:node`) uses every core, and a task that crashes or is killed fails alone with
    /// mproc::WorkerLost while the rank and the job go on. The local pool's options below work
    /// as in mproc::PoolOptions.
    unsigned processes_per_rank = 0;
    /// Tasks run in the rank's own process, one at a time, with no local pool: no fork, but a
    /// task that crashes ends the job, and the options below do nothing.
    bool in_rank = false;
    /// As in mproc::PoolOptions, for each rank's local pool.
    unsigned long max_tasks_per_child = 0;
    std::optional<Seconds> task_timeout = std::nullopt;
    std::size_t max_memory_per_child = 0;
    std::size_t memory_limit = 0;
    unsigned max_retries = 0;
    std::optional<Seconds> stall_timeout = std::nullopt;
};

/// mproc::Pool whose workers are the other MPI ranks. Needs mproc::mpi::Init at the top of main;
/// one live mpi::Pool at a time (after join() or terminate(), the next may start).
class Pool : public mproc::Pool {
public:
    Pool() : Pool(PoolOptions{}) {}
    explicit Pool(unsigned processes) : Pool(PoolOptions{.processes = processes}) {}
    explicit Pool(PoolOptions options)
        : mproc::Pool(make_engine(options)),
          ranks_(options.processes ? options.processes : detail::Runtime::get().master->workers()) {}

    /// Where each worker rank of this pool runs: its rank, host and pid, in the order of
    /// worker_pids() (whose pids alone are ambiguous across hosts). processes() counts the
    /// processes that run tasks: every rank's local workers.
    std::vector<RankInfo> ranks() const {
        auto& master = *detail::Runtime::get().master;
        std::vector<RankInfo> out;
        for (unsigned i = 0; i < ranks_; ++i) {
            const int rank = static_cast<int>(i) + 1;
            const auto place = master.place_of(rank);
            out.push_back(RankInfo{rank, place.host, place.pid});
        }
        return out;
    }

private:
    static std::unique_ptr<mproc::detail::PoolEngine> make_engine(const PoolOptions& options) {
        auto& rt = detail::Runtime::get();
        if (!rt.started || rt.finished)
            throw Error("mproc::mpi::Pool needs MPI: put `mproc::mpi::Init mpi(argc, argv);` at the top of main");
        if (!rt.master) throw Error("mproc::mpi::Pool: only rank 0 creates pools");
        const unsigned available = rt.master->workers();
        if (available == 0)
            throw Error("mproc::mpi::Pool: no worker ranks: start the program with mpirun -n N, N >= 2");
        if (options.processes > available)
            throw Error(
                fmt::format("mproc::mpi::Pool: {} processes asked for, but only {} worker ranks run "
                            "(mpirun -n {})",
                            options.processes, available, available + 1));
        const unsigned processes = options.processes == 0 ? available : options.processes;
        const std::uint64_t initializer = options.initializer ? rt.master->portable(reinterpret_cast<std::uintptr_t>(
                                                                    options.initializer))
                                                              : 0;
        detail::LocalPoolSpec spec;
        spec.processes = options.processes_per_rank;
        spec.in_rank = options.in_rank ? 1 : 0;
        spec.max_tasks_per_child = options.max_tasks_per_child;
        for (const auto& [name, t] :
             {std::pair{"task_timeout", options.task_timeout}, std::pair{"stall_timeout", options.stall_timeout}})
            if (t && !(t->count() > 0))
                throw Error(fmt::format("mproc::mpi::Pool: {} must be positive (got {} s)", name, t->count()));
        spec.task_timeout_s = options.task_timeout ? options.task_timeout->count() : 0.0;
        spec.max_memory_per_child = options.max_memory_per_child;
        spec.memory_limit = options.memory_limit;
        spec.max_retries = options.max_retries;
        spec.stall_timeout_s = options.stall_timeout ? options.stall_timeout->count() : 0.0;
        return std::make_unique<detail::MpiEngine>(*rt.master, processes, initializer, spec);
    }

    unsigned ranks_;
};

}  // namespace mproc::mpi
