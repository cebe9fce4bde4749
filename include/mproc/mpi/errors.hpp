// mproc — the error of mproc::mpi that the local Pool has no counterpart for.
#pragma once

#include <string>
#include <sys/types.h>

#include "../errors.hpp"

namespace mproc::mpi {

/// A worker rank fell silent (its host cut off, stopped, or crashed): rank 0 heard nothing from
/// it for the heartbeat timeout (InitOptions::heartbeat_timeout), or its connection closed. The
/// live pool's pending tasks fail with it; results already delivered stay delivered. MPI cannot
/// go on without a rank, so no new pool starts, and the program's end ends the job with
/// MPI_Abort (mpirun exits non-zero).
class RankLost : public Error {
public:
    RankLost(int rank, const std::string& host, pid_t pid, const std::string& why)
        : Error("mproc::mpi: rank " + std::to_string(rank) + " (pid " + std::to_string(pid) + " on host " + host +
                ") lost: " + why),
          rank_(rank), host_(host), pid_(pid), why_(why) {}
    int rank() const noexcept { return rank_; }
    /// What the heartbeat saw ("not heard from for 10.0 s", "its heartbeat connection closed...").
    const std::string& why() const noexcept { return why_; }
    const std::string& host() const noexcept { return host_; }
    pid_t pid() const noexcept { return pid_; }

private:
    int rank_;
    std::string host_;
    pid_t pid_;
    std::string why_;
};

}  // namespace mproc::mpi
