// Driven by tests/mpi/expect_exit.cmake under mpirun: how an MPI job with an mproc::mpi::Pool ends.
//   kill     a task on rank 2 SIGKILLs its own process mid-map: a local worker of that rank, so
//            the task fails alone with WorkerLost naming the rank, and the job goes on (status 0)
//   kill_rank  the same with PoolOptions::in_rank (the task runs in the rank's own process): the
//            rank dies, and the job must end with an error, not hang
//   status N rank 0 returns N after using a pool: every rank ends, mpirun exits with N
//   throw    rank 0 leaves main by an exception while a pool has work
//   exit N   rank 0 calls std::exit(N) with a pool still open
//   idle     rank 0 never creates a pool
//   alone    run without mpirun: creating a pool is a clear mproc::Error
//   one_cpu  the pool's initializer pins each rank to its first CPU: a rank whose affinity is one
//            CPU of several says once on stderr that its local pool has one worker (status 0)
// The heartbeat (timeout 1 s in these modes):
//   stopped  rank 2 is stopped (SIGSTOP) mid-map while rank 1 runs a 300 s task: the map fails
//            with RankLost naming rank 2, so do later calls on that pool, no new pool starts, and
//            the program's end ends the job at once (status nonzero; not after the 300 s task)
//   late     the program sets MPI up itself, and rank 2 reaches Init 3 s after the others (rank 1
//            waits for it in Init, connected to rank 0's heartbeat): no rank is taken for lost,
//            and the job ends with status 0
//   mute0    rank 0 is stopped for 4 s mid-map: the workers leave, and the job ends (nonzero)
//   busy     a 48 MiB task, a 3 s task and a callback that blocks rank 0's pool thread for 3 s:
//            no rank is taken for lost (status 0)
//   cut      for hosts.sh: rank 0 maps 1 s tasks until a rank is lost, printing "mapping" first;
//            the test cuts a host's cable meanwhile
#include <mproc/mpi.hpp>

#include <sched.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

int die_on_rank_two(int x) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 2 && x == 5) ::raise(SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return x;
}
/// The initializer of mode one_cpu: this rank may run on its first allowed CPU only.
void pin_to_one_cpu() {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        ::sched_setaffinity(0, sizeof one, &one);
        return;
    }
}

int slow(int x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return x;
}

}  // namespace

int sleep_ms(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
}
std::size_t length_of(const std::string& s) { return s.size(); }

/// The map fails with RankLost naming `rank`, and so does the next pool. Returns 0 when it did.
int expect_lost(mproc::mpi::Pool& pool, const std::vector<int>& xs, int rank) {
    const auto t0 = std::chrono::steady_clock::now();
    try {
        pool.map(sleep_ms, xs, 1);
        std::puts("map finished although a rank was lost");
        return 1;
    } catch (const mproc::mpi::RankLost& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("RankLost after %.1f s: %s\n", s, e.what());
        if (e.rank() != rank) return 1;
    }
    try {
        pool.apply(sleep_ms, 1);
        std::puts("the broken pool ran a task");
        return 1;
    } catch (const mproc::mpi::RankLost& e) {
        std::printf("same pool: RankLost: %s\n", e.what());
    }
    try {
        mproc::mpi::Pool next;
        std::puts("a new pool started after a rank was lost");
        return 1;
    } catch (const mproc::mpi::RankLost& e) {
        std::printf("next pool: %s\n", e.what());
    }
    std::fflush(stdout);
    return 0;
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    mproc::mpi::InitOptions options;
    if (mode == "stopped" || mode == "mute0" || mode == "busy" || mode == "late")
        options.heartbeat_timeout = std::chrono::seconds(1);
    if (mode == "cut") options.heartbeat_timeout = std::chrono::seconds(2);
    if (mode == "late") {  // code before Init runs on every rank
        int provided = 0;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
        int rank = 0;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        if (rank == 2) sleep_ms(3000);
        {
            mproc::mpi::Init mpi(argc, argv, options);
            mproc::mpi::Pool pool;
            const auto r = pool.map(sleep_ms, std::vector<int>(20, 100), 1);
            std::printf("late rank: mapped %zu\n", r.size());
            pool.close();
            pool.join();
        }
        MPI_Finalize();  // the program's own: it set MPI up
        return 0;
    }
    mproc::mpi::Init mpi(argc, argv, options);
    const int n = argc > 2 ? std::atoi(argv[2]) : 0;
    std::vector<int> xs(100);
    for (int i = 0; i < 100; ++i) xs[static_cast<std::size_t>(i)] = i;

    if (mode == "kill") {
        mproc::mpi::Pool pool;
        try {
            pool.map(die_on_rank_two, xs, 1);
            std::puts("map finished although a worker was killed");
            return 1;
        } catch (const mproc::WorkerLost& e) {
            std::printf("WorkerLost: %s\n", e.what());
        }
        const auto again = pool.map(slow, std::vector<int>{1, 2, 3, 4}, 1);
        std::printf("the job goes on: mapped %zu\n", again.size());
        pool.close();
        pool.join();
        return 0;
    }
    if (mode == "kill_rank") {
        mproc::mpi::Pool pool({.in_rank = true});
        pool.map(die_on_rank_two, xs, 1);
        std::puts("map finished although a rank died");
        return 0;
    }
    if (mode == "status") {
        mproc::mpi::Pool pool;
        const auto r = pool.map(slow, std::vector<int>{1, 2, 3, 4});
        pool.close();
        pool.join();
        std::printf("mapped %zu, returning %d\n", r.size(), n);
        return n;
    }
    if (mode == "one_cpu") {
        mproc::mpi::Pool pool({.initializer = pin_to_one_cpu});
        const auto r = pool.map(slow, std::vector<int>{1, 2, 3, 4});
        pool.close();
        pool.join();
        std::printf("one CPU: mapped %zu\n", r.size());
        return 0;
    }
    if (mode == "throw") {
        mproc::mpi::Pool pool;
        for (int x : xs) pool.apply_async(slow, std::tuple{x});
        throw std::runtime_error("rank 0 gives up");
    }
    if (mode == "exit") {
        mproc::mpi::Pool pool;
        for (int i = 0; i < 6; ++i) pool.apply_async(slow, std::tuple{i});
        std::exit(n);
    }
    if (mode == "stopped") {
        mproc::mpi::Pool pool;
        const pid_t victim = pool.ranks().at(1).pid;  // rank 2
        // One long task on each rank (the least loaded seat takes the next task): rank 1 is busy
        // for 300 s when rank 2 stops; the job must not wait for it.
        pool.apply_async(sleep_ms, std::tuple{300'000});
        pool.apply_async(sleep_ms, std::tuple{300'000});
        sleep_ms(200);
        ::kill(victim, SIGSTOP);
        return expect_lost(pool, std::vector<int>(200, 50), 2);
    }
    if (mode == "mute0") {
        mproc::mpi::Pool pool;
        pool.map(sleep_ms, std::vector<int>{10, 10, 10}, 1);
        const pid_t self = ::getpid();
        if (::fork() == 0) {  // stops rank 0 for 4 s, then lets it go on
            ::kill(self, SIGSTOP);
            ::sleep(4);
            ::kill(self, SIGCONT);
            ::_exit(0);
        }
        try {
            pool.map(sleep_ms, std::vector<int>(200, 50), 1);
            std::puts("map finished although the workers left");
        } catch (const mproc::Error& e) {
            std::printf("after the stop: %s\n", e.what());
        }
        std::fflush(stdout);
        return 0;
    }
    if (mode == "busy") {
        mproc::mpi::Pool pool;
        const std::string big(48u << 20, 'x');
        auto r = pool.apply_async(length_of, std::tuple{big}, [](std::size_t) { sleep_ms(3000); });
        auto slow3 = pool.apply_async(sleep_ms, std::tuple{3000});
        const auto sizes = pool.map(length_of, std::vector<std::string>(8, big), 1);
        std::printf("sizes %zu, long task %d ms, big task %zu bytes\n", sizes.size(), slow3.get(), r.get());
        pool.close();
        pool.join();
        return 0;
    }
    if (mode == "cut") {
        mproc::mpi::Pool pool;
        for (const auto& r : pool.ranks()) std::printf("rank %d on %s, pid %d\n", r.rank, r.host.c_str(), r.pid);
        std::puts("mapping");
        std::fflush(stdout);
        for (int round = 0; round < 600; ++round) {
            try {
                pool.map(sleep_ms, std::vector<int>(20, 100), 1);
            } catch (const mproc::mpi::RankLost& e) {
                std::printf("RankLost: %s\n", e.what());
                std::fflush(stdout);
                return 0;
            }
        }
        std::puts("no rank was lost");
        return 1;
    }
    if (mode == "idle") return 0;
    if (mode == "alone") {
        try {
            mproc::mpi::Pool pool;
        } catch (const mproc::Error& e) {
            std::printf("mproc::Error: %s\n", e.what());
            return 0;
        }
        return 1;
    }
    std::fprintf(stderr, "unknown mode '%s'\n", mode.c_str());
    return 2;
}
