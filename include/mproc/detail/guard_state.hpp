// mproc — ChildGuard's process-wide state, and what a freshly forked child does with it.
//
// ChildGuard (guard.hpp) replaces the dispositions of SIGINT and SIGTERM and remembers the ones it
// replaced here. A child is never guarded by its parent's ChildGuard: detail::fork_child calls
// forget_guard_after_fork() in every child it forks, which puts those dispositions back (and the
// child may construct a ChildGuard of its own). Everything here is constant-initialised and
// lock-free, so the signal handler may read it.
#pragma once

#include <atomic>
#include <csignal>
#include <exception>
#include <sys/types.h>

namespace mproc::detail {

/// The signals a ChildGuard handles, in the order of GuardState::previous.
inline constexpr int guarded_signals[] = {SIGINT, SIGTERM};
inline constexpr int guarded_signal_count = 2;

struct GuardState {
    /// The process whose ChildGuard is active; 0 when there is none. A process that is not the
    /// owner (a child forked without mproc, which keeps a copy of this state) never cleans up.
    std::atomic<pid_t> owner{0};
    /// ChildGuard objects alive in the owner: the first installs, the last cleans up and uninstalls.
    std::atomic<int> depth{0};
    /// The pid of the process whose thread is constructing or destroying a guard (0: nobody).
    /// A value from another process is a copy that a fork caught mid-update: it is stale.
    std::atomic<pid_t> busy{0};
    /// Bit i: the guard's handler is installed for guarded_signals[i] and previous[i] holds the
    /// disposition it replaced (written before the handler is installed, then only read).
    std::atomic<unsigned> installed{0};
    struct sigaction previous[guarded_signal_count] = {};
    /// The guard's handler (set before it is first installed).
    std::atomic<void (*)(int, siginfo_t*, void*)> handler{nullptr};
    /// How long children get between SIGTERM and SIGKILL.
    std::atomic<long long> grace_ns{1'000'000'000};
    /// The atexit and std::terminate hooks are installed once per program and check `owner`.
    std::atomic<bool> atexit_registered{false};
    std::atomic<bool> terminate_hooked{false};
    std::atomic<std::terminate_handler> previous_terminate{nullptr};
};

inline GuardState& guard_state() noexcept {
    static constinit GuardState state{};  // constant-initialised: no guard variable, safe in a handler
    return state;
}

/// Whether the guard's handler is the current disposition of `sig`.
inline bool guard_handles(int sig) noexcept {
    struct sigaction current{};
    if (::sigaction(sig, nullptr, &current) != 0) return false;
    return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == guard_state().handler.load();
}

/// In a freshly forked child: puts back the SIGINT/SIGTERM dispositions the parent's guard
/// replaced (where the guard's handler is still in place: a handler the program installed after
/// the guard stays) and forgets that guard. Async-signal-safe.
inline void forget_guard_after_fork() noexcept {
    GuardState& g = guard_state();
    const unsigned installed = g.installed.exchange(0);
    for (int i = 0; i < guarded_signal_count; ++i)
        if ((installed & (1u << i)) && guard_handles(guarded_signals[i]))
            ::sigaction(guarded_signals[i], &g.previous[i], nullptr);
    g.owner.store(0);
    g.depth.store(0);
    g.busy.store(0);
}

}  // namespace mproc::detail
