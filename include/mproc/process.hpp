// mproc — Process: run a callable in a forked child, as Python's multiprocessing.Process does.
//
//     mproc::Process p(f, std::string("bob"));
//     p.start();
//     p.join();
//     assert(p.exitcode() == 0);
#pragma once

#include <algorithm>
#include <cerrno>
#include <concepts>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fcntl.h>
#include <memory>
#include <mutex>
#include <optional>
#include <poll.h>
#include <string>
#include <sys/types.h>
#include <sys/wait.h>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>

#include "detail/os/child_registry.hpp"
#include "detail/os/clock.hpp"
#include "detail/os/cpu.hpp"
#include "detail/os/fork.hpp"
#include "detail/os/guard_state.hpp"
#include "detail/os/io.hpp"
#include "detail/os/process_id.hpp"
#include "detail/os/unique_fd.hpp"
#include "detail/os/wait.hpp"
#include "detail/serialize/type_name.hpp"
#include "errors.hpp"

namespace mproc {

class Waitable;

/// What current_process() returns: this process's name and pid.
class ProcessInfo {
public:
    const std::string& name() const { return detail::identity().name; }
    pid_t pid() const noexcept { return ::getpid(); }
};

// mproc::cpu_count() comes with detail/cpu.hpp (a Pool sizes itself with it too).

/// The process this code runs in: "MainProcess", or the name of the Process that started it.
inline ProcessInfo current_process() { return {}; }

/// What parent_process() returns: the name and pid of the process that started this one, as they
/// were when it did.
class ParentProcess {
public:
    ParentProcess(std::string name, pid_t pid) : name_(std::move(name)), pid_(pid) {}
    const std::string& name() const noexcept { return name_; }
    pid_t pid() const noexcept { return pid_; }
    /// True while the parent runs (this process is then still its child).
    bool is_alive() const noexcept { return ::getppid() == pid_; }

private:
    std::string name_;
    pid_t pid_;
};

/// In a process that mproc started (a Process child, a Pool worker): the process that started it
/// ("MainProcess" for a child of the program; a Pool worker's parent is the pool's fork server).
/// Empty in a process mproc did not start: the program itself, or a plain fork() of anything.
inline std::optional<ParentProcess> parent_process() {
    const detail::Identity& self = detail::identity();
    if (!self.is_child || self.pid != ::getpid()) return std::nullopt;
    return ParentProcess(self.parent_name, self.parent_pid);
}

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

/// At a normal exit of the program (exit(), a return from main): Process children still running
/// are ended by Python's rule (daemon ones terminated, the others joined), or by the guard's when
/// a ChildGuard is in place (whose own hook then does it). Other children are left as they were.
inline void end_process_children_at_exit() noexcept {
    if (guard_state().owner.load() == ::getpid()) return;  // the guard's exit hook ends them all
    mark_process_ending();  // no fork while they are ended (see ChildGuard's exit hook)
    end_children_normally(/*all=*/false);
    clear_process_ending();
}

/// Registers end_process_children_at_exit once per program (before the first Process starts).
inline void hook_process_exit() {
    static const bool hooked = [] {
        if (std::atexit(&end_process_children_at_exit) != 0)
            throw Error("cannot register mproc's exit hook for Process children");
        return true;
    }();
    (void)hooked;
}
}  // namespace detail

/// A child process running one callable. Move-only, like std::thread.
///
/// Any thread of the process that made it may call any member, at the same time as others (a
/// join beside an is_alive, say) — but set_name() beside name(), whose reference it changes;
/// moving it while another thread uses it is undefined, as for std::thread. In another process
/// (a child forked with a copy of it) every member but name(), daemon() and closed() throws
/// mproc::Error and changes nothing, and its destructor leaves the child alone (Python: "can only
/// join a child process").
class Process {
public:
    /// How long the destructor waits after SIGTERM before it sends SIGKILL — in a process with a
    /// ChildGuard, at least the guard's grace: the child, guarded too, ends its own children
    /// within three quarters of it, and is not killed while it reaps them.
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
        : target_(std::move(other.target_)), name_(std::move(other.name_)), owner_(other.owner_),
          pid_(std::exchange(other.pid_, 0)), serial_(std::exchange(other.serial_, 0)),
          status_(std::exchange(other.status_, std::nullopt)), sentinel_(std::move(other.sentinel_)),
          daemon_(std::exchange(other.daemon_, false)), closed_(std::exchange(other.closed_, false)) {}
    Process& operator=(Process&& other) noexcept {
        if (this != &other) {
            stop_and_reap();
            target_ = std::move(other.target_);
            name_ = std::move(other.name_);
            owner_ = other.owner_;
            pid_ = std::exchange(other.pid_, 0);
            serial_ = std::exchange(other.serial_, 0);
            status_ = std::exchange(other.status_, std::nullopt);
            sentinel_ = std::move(other.sentinel_);
            daemon_ = std::exchange(other.daemon_, false);
            closed_ = std::exchange(other.closed_, false);
        }
        return *this;
    }
    Process(const Process&) = delete;
    Process& operator=(const Process&) = delete;

    /// A started, unjoined child is terminated (SIGTERM, then SIGKILL after a grace period) and
    /// reaped, daemon or not.
    ~Process() { stop_and_reap(); }

    /// Forks the child and runs the target there. Throws mproc::Error if already started or closed.
    void start() {
        std::string name;
        detail::ChildRole role{};
        {
            const auto lock = hold("start");
            if (pid_ != 0 || starting_)
                throw Error("process " + name_ + " already started" +
                            (pid_ != 0 ? " (pid " + std::to_string(pid_) + ")" : std::string()));
            if (!target_) throw Error("process " + name_ + " has no target");
            name = name_;
            role = daemon_ ? detail::ChildRole::daemon : detail::ChildRole::joined;
            starting_ = true;  // the fork is made with the lock let go: no lock of mproc's is copied held
        }
        int pidfd = -1;
        pid_t pid = 0;
        std::uint64_t serial = 0;
        try {
            detail::hook_process_exit();
            pid = detail::fork_child([this] { return run_target(); }, std::move(name),
                                     detail::ForkOptions{&serial, role, &pidfd});
        } catch (...) {
            const std::lock_guard lock(mutex_);
            starting_ = false;
            throw;
        }
        const std::lock_guard lock(mutex_);
        pid_ = pid;
        serial_ = serial;
        sentinel_.reset(pidfd);
        starting_ = false;
    }

    /// Waits for the child to end and reaps it. With a timeout, returns false if it still runs.
    /// The wait holds no lock: other threads may ask about, signal or join the child meanwhile.
    bool join(std::optional<Seconds> timeout = std::nullopt) {
        detail::check_timeout(timeout);
        const detail::Deadline deadline = detail::deadline_after(timeout);
        detail::UniqueFd ended;  // readable once the child has ended (this call's own pidfd)
        pid_t pid = 0;
        {
            const auto lock = hold("join");
            if (pid_ == 0) throw Error("cannot join process " + name_ + ": it was never started");
            if (!alive_locked()) return true;
            pid = pid_;
            ended = copy_sentinel_locked();
        }
        for (;;) {
            // Until it has ended, without reaping it: a reap is made under the lock, where the
            // status is kept for every caller.
            detail::wait_ended(pid, ended.get(), deadline, [&] { return !alive(); });
            const std::lock_guard lock(mutex_);
            if (!alive_locked()) return true;
            if (detail::expired(deadline)) return false;
        }
    }

    /// True from start() until the child has ended.
    bool is_alive() {
        const auto lock = hold("is_alive");
        return alive_locked();
    }

    /// SIGTERM to the child (nothing if it has been reaped).
    void terminate() { signal(SIGTERM); }
    /// SIGKILL to the child (nothing if it has been reaped).
    void kill() { signal(SIGKILL); }
    /// Any signal to the child, while it has not been reaped (its pid cannot be reused before).
    void signal(int sig) {
        const auto lock = hold("signal");
        // alive first: the registry may have reaped the child for someone else (children().live()),
        // and then its pid is free for the kernel to give to an unrelated process. Under the lock,
        // no other thread of this Process reaps it in between.
        if (alive_locked()) ::kill(pid_, sig);
    }

    /// nullopt while running (or never started); N for an exit with status N; -N if killed by signal N.
    std::optional<int> exitcode() {
        const auto lock = hold("exitcode");
        if (pid_ != 0) alive_locked();
        if (!status_) return std::nullopt;
        return detail::exit_code_of(*status_);
    }

    /// The child's pid once started (0 before).
    pid_t pid() const {
        const auto lock = hold("pid");
        return pid_;
    }
    const std::string& name() const noexcept { return name_; }
    /// Names the child, as current_process().name() will report inside it. Before start().
    void set_name(std::string name) {
        const auto lock = hold("set_name");
        name_ = std::move(name);
    }

    /// Whether the child is a daemon: at a normal exit of this process (exit(), a return from
    /// main), a daemon child still running is terminated, a non-daemon one is waited for.
    bool daemon() const noexcept { return read_flag(daemon_); }
    /// Sets the daemon flag (false by default, as in Python). Before start(): Error after it.
    void set_daemon(bool daemonic) {
        const auto lock = hold("set_daemon");
        if (pid_ != 0 || starting_)
            throw Error("cannot set the daemon flag of process " + name_ + ": it has already started");
        daemon_ = daemonic;
    }

    /// A descriptor that becomes readable when the child ends, and stays so (a pidfd: close-on-exec,
    /// owned by this Process until close() or destruction), for poll, epoll or mproc::wait. Error
    /// before start(), after close(), and on a kernel without pidfds (before Linux 5.3).
    int sentinel() const {
        const auto lock = hold("sentinel");
        return sentinel_locked();
    }

    /// Releases what the Process holds (its sentinel, its child's record, its target). Error if the
    /// child still runs (join() or terminate() it first), and then nothing changes. Once closed,
    /// every other call but name() and daemon() throws mproc::Error; closing again does nothing.
    void close() {
        require_here("close");
        const std::lock_guard lock(mutex_);
        if (closed_) return;
        if (starting_ || (pid_ != 0 && alive_locked()))
            throw Error("cannot close process " + name_ + " (pid " + std::to_string(pid_) +
                        "): it is still running; join() or terminate() it first");
        sentinel_.reset();
        target_.reset();
        closed_ = true;
    }
    /// Whether close() was called.
    bool closed() const noexcept { return read_flag(closed_); }

private:
    friend class Waitable;

    /// A descriptor of its own that watches the child's end as sentinel() does (a duplicate of
    /// it, close-on-exec), for a wait that must not lose it to close() on another thread. Error
    /// for `op` as sentinel() says, and when no descriptor is left for it.
    detail::UniqueFd sentinel_copy(const char* op) const {
        const auto lock = hold(op);
        (void)sentinel_locked();
        detail::UniqueFd copy = copy_sentinel_locked();
        if (!copy) detail::throw_errno(std::string(op) + ": a descriptor to watch process " + name_);
        return copy;
    }
    /// sentinel()'s descriptor, or its error (lock held).
    int sentinel_locked() const {
        if (pid_ == 0) throw Error("process " + name_ + " has no sentinel: it was never started");
        if (!sentinel_) throw Error("process " + name_ + " has no sentinel: this kernel has no pidfd (Linux 5.3)");
        return sentinel_.get();
    }
    /// A duplicate of the sentinel (close-on-exec), or none: no sentinel, or no descriptor left
    /// (lock held).
    detail::UniqueFd copy_sentinel_locked() const {
        return detail::UniqueFd(sentinel_ ? ::fcntl(sentinel_.get(), F_DUPFD_CLOEXEC, 0) : -1);
    }

    /// Error unless this is the process that made the Process and it is not closed.
    /// Error in any process but the one that made the Process. Before its lock: a forked copy
    /// of that lock may be held for ever (by a thread of the parent, which the child has not).
    void require_here(const char* op) const {
        if (!here())
            throw Error(std::string(op) + " on process " + name_ + " from process " +
                        std::to_string(detail::this_process_id()) + ": only the process that made it (" +
                        std::to_string(owner_) + ") may use it");
    }
    /// Whether this is the process that made the Process.
    bool here() const noexcept { return detail::this_process_id() == owner_; }
    /// One of its flags: under its lock, or as copied in a forked copy (no lock: see require_here).
    bool read_flag(const bool& flag) const noexcept {
        if (!here()) return flag;
        const std::lock_guard lock(mutex_);
        return flag;
    }
    /// The Process's lock, for `op`: Error in another process (require_here), and once it is
    /// held, if the Process is closed.
    std::unique_lock<std::mutex> hold(const char* op) const {
        require_here(op);
        std::unique_lock lock(mutex_);
        if (closed_) throw Error(std::string(op) + " on process " + name_ + ", which is closed");
        return lock;
    }

    /// Whether the child runs; reaps it once it has ended, keeping its status (lock held).
    bool alive_locked() {
        if (pid_ == 0 || status_) return false;
        if (auto status = detail::children().reap(pid_, false, serial_)) {
            status_ = *status;
            detail::children().forget(pid_, serial_);
            return false;
        }
        return true;
    }
    bool alive() {
        const std::lock_guard lock(mutex_);
        return alive_locked();
    }

    int run_target() noexcept {
        try {
            target_->run();
            return 0;
        } catch (...) {
            try {
                detail::report("Process %s: %s\n", name_.c_str(), detail::describe_current_exception().c_str());
            } catch (...) {  // saying what needs memory: a target that ran out of it still exits with 1
                detail::report("Process %s: an exception (no memory left to say what)\n", name_.c_str());
            }
            return 1;
        }
    }

    /// termination_grace, or the guard's grace where this process is guarded (its children are).
    static Seconds destructor_grace() noexcept {
        const detail::GuardState& g = detail::guard_state();
        if (g.owner.load() != ::getpid()) return termination_grace;
        return std::max(termination_grace, Seconds{static_cast<double>(g.grace_ns.load()) / 1e9});
    }

    /// The destructor's end of a child still running: in the process that made it only (in a
    /// forked copy the child is another process's).
    void stop_and_reap() noexcept {
        if (pid_ == 0 || status_ || closed_ || !here()) return;
        try {
            if (!join(Seconds{0})) {
                terminate();
                if (!join(destructor_grace())) {
                    kill();
                    join();
                }
            }
        } catch (...) {
            // A destructor cannot report; the child was signalled and the registry still reaps it
            // — unless it was reaped outside mproc: then its record goes with this object.
            detail::children().forget_if_gone(pid_, serial_);
        }
    }

    std::unique_ptr<detail::BoundTarget> target_;
    std::string name_;
    pid_t owner_ = detail::this_process_id();  // the process that made it: the only one that may use it
    pid_t pid_ = 0;
    std::uint64_t serial_ = 0;  // of the child's record in detail::children()
    std::optional<int> status_;  // the raw wait status once reaped
    detail::UniqueFd sentinel_;  // a pidfd of the child, from start() to close()
    bool daemon_ = false;
    bool closed_ = false;
    bool starting_ = false;  // start() is forking, its lock let go
    mutable std::mutex mutex_;  // every member's state; held for no wait (see join)
};

}  // namespace mproc
