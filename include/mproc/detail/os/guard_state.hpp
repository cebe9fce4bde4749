// mproc — ChildGuard's process-wide state, and what a freshly forked child does with it.
//
// ChildGuard (guard.hpp) replaces the dispositions of SIGINT and SIGTERM and remembers the ones it
// replaced here. A child that mproc forks from a guarded process is guarded too, for its whole
// life: detail::fork_child calls inherit_guard_after_fork() in every child, which keeps the
// guard's handlers (and the atexit and terminate hooks, inherited through fork) working there, so
// that a child ended by its parent's guard first ends and reaps its own children. A child of an
// unguarded process gets the dispositions the program had, untouched. Everything here is
// constant-initialised and lock-free, so the signal handler may read it.
#pragma once

#include <atomic>
#include <csignal>
#include <exception>
#include <mutex>
#include <sys/types.h>

#include "fork_locks.hpp"

namespace mproc::detail {

/// The signals a ChildGuard handles, in the order of GuardState::previous.
inline constexpr int guarded_signals[] = {SIGINT, SIGTERM};
inline constexpr int guarded_signal_count = 2;

/// ChildGuard::default_grace, in nanoseconds.
inline constexpr long long default_grace_ns = 1'000'000'000;

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
    /// The bits of `installed` that a ChildGuard of this process installed (not inherited): the
    /// ones the last guard here puts back.
    std::atomic<unsigned> own{0};
    /// This process is a child that mproc forked from a guarded process: guarded from birth to
    /// death, with or without a ChildGuard of its own.
    std::atomic<bool> inherited{false};
    struct sigaction previous[guarded_signal_count] = {};
    /// The guard's handler (set before it is first installed).
    std::atomic<void (*)(int, siginfo_t*, void*)> handler{nullptr};
    /// The signal the guard's handler is ending the program for (0: none).
    std::atomic<int> dying_of{0};
    /// The process (its pid: a copy in a child is not the child's) that is ending its children
    /// as it ends — from its guard's exit or terminate hook on, from an mproc child's return from
    /// its target on, and while an unguarded program's exit hook ends them: no fork there
    /// meanwhile (process_ending).
    std::atomic<pid_t> ending{0};
    /// How long children get between SIGTERM and SIGKILL: the outermost ChildGuard's while one is
    /// alive, default_grace_ns when none is. A guarded child has three quarters of its parent's
    /// (child_grace_ns).
    std::atomic<long long> grace_ns{default_grace_ns};
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
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) != 0) return false;
    return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == guard_state().handler.load();
}

/// Held while a ChildGuard installs or puts back its handlers and sets or clears `owner`: every
/// fork waits for it (fork_locks.hpp), so no child copies the guard half-changed (owner set and
/// a handler missing: the child took itself for guarded, and SIGTERM killed it outright).
/// Registered before main, so that no fork can miss it.
inline std::mutex& guard_transition() noexcept {
    static std::mutex mutex;
    return mutex;
}
inline const bool guard_transition_registered = (ForkLocks::add(ForkLockRank::guard, guard_transition()), true);

/// Puts the guard's handler (GuardState::handler) in place for guarded_signals[i], whose
/// disposition is `current`, and keeps `current` in previous[i] for the handler to chain to.
/// False if sigaction refused. Async-signal-safe.
inline bool take_signal(int i, const struct sigaction& current) noexcept {
    GuardState& g = guard_state();
    g.previous[i] = current;
    struct sigaction ours {};
    ours.sa_sigaction = g.handler.load();
    ours.sa_flags = SA_SIGINFO | (current.sa_flags & (SA_RESTART | SA_ONSTACK));
    ours.sa_mask = current.sa_mask;
    for (int other : guarded_signals) ::sigaddset(&ours.sa_mask, other);
    return ::sigaction(guarded_signals[i], &ours, nullptr) == 0;
}

/// Whether this process is ending its children as it ends — its guard's handler for a fatal
/// signal, an exit or terminate hook, or a normal end (GuardState::ending) — so that a child
/// forked now would outlive that cleanup (fork_here refuses it). Async-signal-safe; sequentially
/// consistent (see ChildRegistry::begin_fork).
inline bool process_ending() noexcept {
    const GuardState& g = guard_state();
    const pid_t self = ::getpid();
    return g.ending.load() == self || (g.owner.load() == self && g.dying_of.load() != 0);
}
/// From now on this process is ending (process_ending). Async-signal-safe.
inline void mark_process_ending() noexcept { guard_state().ending.store(::getpid()); }
/// It is no longer: an exit's cleanup is over, and code that runs after it (a later exit
/// handler, a static destructor) may start and join a child of its own. Async-signal-safe.
inline void clear_process_ending() noexcept {
    pid_t self = ::getpid();
    guard_state().ending.compare_exchange_strong(self, 0);
}

/// The grace a guarded child gives its own children when its parent's is `parent_ns`: three
/// quarters of it. The parent's guard and the child's start their graces together (the parent's
/// SIGTERM, or a Ctrl-C that reaches both), so a child whose children wait out the whole grace
/// still kills them, reaps them and ends a quarter of the grace before its parent's SIGKILL —
/// which would orphan them, left to the parent-death signal and to init. Each level of a deeper
/// tree has three quarters of the one above.
constexpr long long child_grace_ns(long long parent_ns) noexcept { return parent_ns - parent_ns / 4; }

/// In a child that mproc just forked from `parent`. If the parent was guarded, the child is too:
/// it becomes the owner of its copy of the guard state, with the handlers and hooks it inherited
/// and a shorter grace (child_grace_ns). Otherwise any copy of a guard there (a grandparent's, copied by a plain fork) is
/// forgotten, and the dispositions it replaced are put back where its handler is still in place.
/// Async-signal-safe.
inline void inherit_guard_after_fork(pid_t parent) noexcept {
    GuardState& g = guard_state();
    g.dying_of.store(0);
    g.depth.store(0);
    g.busy.store(0);
    g.own.store(0);
    if (g.owner.load() == parent) {  // whole: forks wait for a guard's handlers to change (guard_transition)
        g.inherited.store(true);
        g.grace_ns.store(child_grace_ns(g.grace_ns.load()));
        g.owner.store(::getpid());
        return;
    }
    const unsigned installed = g.installed.exchange(0);
    for (int i = 0; i < guarded_signal_count; ++i)
        if ((installed & (1u << i)) && guard_handles(guarded_signals[i]))
            ::sigaction(guarded_signals[i], &g.previous[i], nullptr);
    g.inherited.store(false);
    g.owner.store(0);
}

}  // namespace mproc::detail
