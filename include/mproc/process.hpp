// mproc — Process: run a callable in a forked child, as Python's multiprocessing.Process does.
//
//     mproc::Process p(f, std::string("bob"));
//     p.start();
//     p.join();
//     assert(p.exitcode() == 0);
#pragma once

#include <concepts>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

#include "detail/os/child_registry.hpp"
#include "detail/os/clock.hpp"
#include "detail/os/cpu.hpp"
#include "detail/os/fork.hpp"
#include "detail/os/wait.hpp"
#include "detail/serialize/type_name.hpp"
#include "errors.hpp"

namespace mproc {

/// What current_process() returns: this process's name and pid.
class ProcessInfo {
public:
    const std::string& name() const { return detail::identity().name; }
    pid_t pid() const noexcept { return ::getpid(); }
};

// mproc::cpu_count() comes with detail/cpu.hpp (a Pool sizes itself with it too).

/// The process this code runs in: "MainProcess", or the name of the Process that started it.
inline ProcessInfo current_process() { return {}; }

/// The pids of this process's children that mproc started and that are still running: Process
/// children and each Pool's fork server (a Pool's workers are the server's children, not yours).
/// Reaps the children that have ended, keeping their statuses for Process::join and exitcode().
inline std::vector<pid_t> active_children() { return detail::children().live(); }

namespace detail {
/// A callable bound to its arguments, run once, in the child.
struct BoundTarget {
    virtual ~BoundTarget() = default;
    virtual void run() = 0;
};
template <class F, class Args> struct BoundTargetOf final : BoundTarget {
    BoundTargetOf(F f, Args args) : target(std::move(f)), args(std::move(args)) {}
    void run() override { std::apply(std::move(target), std::move(args)); }
    F target;
    Args args;
};
}  // namespace detail

/// A child process running one callable. Move-only, like std::thread.
class Process {
public:
    /// How long the destructor waits after SIGTERM before it sends SIGKILL.
    static constexpr Seconds termination_grace{0.5};

    Process() = default;

    /// Any callable, capturing lambdas included (fork copies the whole process); the arguments are
    /// copied or moved into the Process and handed to the target in the child.
    template <class F, class... Args> requires std::invocable<std::decay_t<F>, std::decay_t<Args>...>
    explicit Process(F&& target, Args&&... args)
        : target_(std::make_unique<detail::BoundTargetOf<std::decay_t<F>, std::tuple<std::decay_t<Args>...>>>(
              std::forward<F>(target), std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...))),
          name_("Process-" + std::to_string(++detail::identity().process_counter)) {}

    Process(Process&& other) noexcept
        : target_(std::move(other.target_)), name_(std::move(other.name_)), pid_(std::exchange(other.pid_, 0)),
          serial_(std::exchange(other.serial_, 0)), status_(std::exchange(other.status_, std::nullopt)) {}
    Process& operator=(Process&& other) noexcept {
        if (this != &other) {
            stop_and_reap();
            target_ = std::move(other.target_);
            name_ = std::move(other.name_);
            pid_ = std::exchange(other.pid_, 0);
            serial_ = std::exchange(other.serial_, 0);
            status_ = std::exchange(other.status_, std::nullopt);
        }
        return *this;
    }
    Process(const Process&) = delete;
    Process& operator=(const Process&) = delete;

    /// A started, unjoined child is terminated (SIGTERM, then SIGKILL after a grace period) and reaped.
    ~Process() { stop_and_reap(); }

    /// Forks the child and runs the target there. Throws mproc::Error if already started.
    void start() {
        if (pid_ != 0) throw Error("process " + name_ + " already started (pid " + std::to_string(pid_) + ")");
        if (!target_) throw Error("process " + name_ + " has no target");
        pid_ = detail::fork_child([this] { return run_target(); }, name_, &serial_);
    }

    /// Waits for the child to end and reaps it. With a timeout, returns false if it still runs.
    bool join(std::optional<Seconds> timeout = std::nullopt) {
        if (pid_ == 0) throw Error("cannot join process " + name_ + ": it was never started");
        if (status_) return true;
        const auto status = detail::wait_child(pid_, detail::deadline_after(timeout), serial_);
        if (!status) return false;
        status_ = *status;
        detail::children().forget(pid_, serial_);
        return true;
    }

    /// True from start() until the child has ended.
    bool is_alive() {
        if (pid_ == 0 || status_) return false;
        if (auto status = detail::children().reap(pid_, false, serial_)) {
            status_ = *status;
            detail::children().forget(pid_, serial_);
            return false;
        }
        return true;
    }

    /// SIGTERM to the child (nothing if it has been reaped).
    void terminate() { signal(SIGTERM); }
    /// SIGKILL to the child (nothing if it has been reaped).
    void kill() { signal(SIGKILL); }
    /// Any signal to the child, while it has not been reaped (its pid cannot be reused before).
    void signal(int sig) {
        // is_alive() first: the registry may have reaped the child for someone else (children().live()),
        // and then its pid is free for the kernel to give to an unrelated process.
        if (is_alive()) ::kill(pid_, sig);
    }

    /// nullopt while running (or never started); N for an exit with status N; -N if killed by signal N.
    std::optional<int> exitcode() {
        if (pid_ != 0 && !status_) is_alive();
        if (!status_) return std::nullopt;
        return detail::exit_code_of(*status_);
    }

    pid_t pid() const noexcept { return pid_; }
    const std::string& name() const noexcept { return name_; }
    /// Names the child, as current_process().name() will report inside it. Before start().
    void set_name(std::string name) { name_ = std::move(name); }

private:
    int run_target() noexcept {
        try {
            target_->run();
            return 0;
        } catch (...) {
            std::fprintf(stderr, "Process %s: %s\n", name_.c_str(), detail::describe_current_exception().c_str());
            return 1;
        }
    }

    void stop_and_reap() noexcept {
        if (pid_ == 0 || status_) return;
        try {
            if (!join(Seconds{0})) {
                terminate();
                if (!join(termination_grace)) {
                    kill();
                    join();
                }
            }
        } catch (...) {
            // A destructor cannot report; the child was signalled and the registry still reaps it.
        }
    }

    std::unique_ptr<detail::BoundTarget> target_;
    std::string name_;
    pid_t pid_ = 0;
    std::uint64_t serial_ = 0;   // of the child's record in detail::children()
    std::optional<int> status_;  // the raw wait status once reaped
};

}  // namespace mproc
