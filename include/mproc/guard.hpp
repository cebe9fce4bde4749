// mproc — ChildGuard: no child outlives the program, however the program ends.
//
//     int main() {
//         mproc::ChildGuard guard;   // first thing in main, before any Process or Pool
//         ...
//     }
//
// From its construction until the last ChildGuard is destroyed, each of these terminates and
// reaps every live child mproc started in this process (SIGTERM, a grace period, then SIGKILL),
// and then takes its usual effect:
//   * SIGINT, SIGTERM  — the program then dies of the signal (the shell sees 130 / 143; the first
//                        process of a pid namespace, which a default action does not kill, exits
//                        with 130 / 143), or, if the
//                        program had installed a handler of its own before the guard, that handler
//                        is called (a signal that was ignored stays ignored: no handler is installed);
//   * exit(), or returning from main — an atexit hook, and the guard's destructor;
//   * an exception that leaves main (or any std::terminate) — a terminate handler that then calls
//                        the one installed before it (by default: print the exception, abort).
// Every child mproc forks from a guarded process is guarded the same way for its whole life, with
// the same handlers chained to the same previous dispositions: so the SIGTERM that ends a Process
// child or a Pool's fork server first makes it end and reap its own children (a Process's
// children, the Pool's workers), and a Ctrl-C that reaches every process of a tree at once leaves
// each one to reap its own. A guarded child gives its children three quarters of the grace it was
// given, so that even when they wait out the whole of it, it has reaped them and ended before its
// parent's SIGKILL. Nothing is ever left for init to reap. Grandchildren whose parent is
// killed outright (SIGKILL) die through the parent-death signal every mproc child arms.
//
// A handler installed *after* the guard replaces the guard's: call
// mproc::ChildGuard::terminate_children() from it. A ChildGuard in a child that is already
// guarded changes nothing but the cleanup at its destruction; in a child of an unguarded process,
// or one forked without mproc, the parent's guard does nothing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <sys/types.h>
#include <unistd.h>

#include "detail/os/child_registry.hpp"
#include "detail/os/clock.hpp"
#include "detail/os/guard_state.hpp"

namespace mproc {

/// While one is alive, SIGINT, SIGTERM, exit(), returning from main and an uncaught exception
/// terminate and reap every child mproc started, then end the program as they otherwise would.
/// Non-copyable, non-movable; guards nest (the outermost one installs and cleans up).
class ChildGuard {
public:
    /// How long children get to end after SIGTERM before they are sent SIGKILL.
    static constexpr Seconds default_grace{static_cast<double>(detail::default_grace_ns) / 1e9};

    /// mproc::Error, changing nothing, for a grace of NaN seconds; a negative one is 0, and at most
    /// an hour is used.
    explicit ChildGuard(Seconds grace = default_grace) {
        const double grace_s = std::min(detail::timeout_seconds(grace, "ChildGuard grace"), 3600.0);
        detail::GuardState& g = detail::guard_state();
        const Lock lock;
        if (g.owner.load() != ::getpid()) {  // none here (or a parent's, copied by a plain fork)
            g.depth.store(0);
            g.inherited.store(false);
        }
        if (g.depth.load() == 0) {
            const std::lock_guard transition(detail::guard_transition());
            install(grace_s);
        }
        g.depth.fetch_add(1);
    }

    /// The last guard terminates and reaps the children still alive, then puts back the
    /// dispositions and the terminate handler it replaced (where they are still the guard's). In a
    /// child guarded from birth, what it inherited stays.
    ~ChildGuard() {
        detail::GuardState& g = detail::guard_state();
        const Lock lock;
        if (g.owner.load() != ::getpid() || g.depth.fetch_sub(1) != 1) return;
        terminate_children();
        const std::lock_guard transition(detail::guard_transition());
        uninstall();
    }

    ChildGuard(const ChildGuard&) = delete;
    ChildGuard& operator=(const ChildGuard&) = delete;

    /// SIGTERM to every live child mproc started in this process, up to the grace period for them
    /// to end, SIGKILL to the rest; every one is reaped and its status kept, so Process::join and
    /// exitcode() still report it. Async-signal-safe (no allocation, no lock): call it from a
    /// signal handler of your own. Works with or without a ChildGuard; the grace is the one the
    /// outermost guard was given (default_grace when there is none), or in a guarded child three
    /// quarters of its parent's.
    static void terminate_children() noexcept {
        const int saved_errno = errno;
        const detail::GuardState& g = detail::guard_state();
        const long long grace_ns = g.grace_ns.load();
        // Dying of a signal, whose handler may have interrupted a thread holding a lock a fork
        // under way waits for (malloc's): such a fork is waited for a quarter of the grace.
        const bool dying = g.dying_of.load() != 0 && g.owner.load() == ::getpid();
        detail::children().terminate_and_reap(
            grace_ns, detail::ChildRegistry::any_role,
            dying ? grace_ns / 4 + 10'000'000LL : detail::ChildRegistry::default_fork_wait_ns);
        errno = saved_errno;
    }

private:
    /// Serialises guards being constructed and destroyed on several threads (never taken in a
    /// handler). A lock held in another process is a copy a fork caught: it is taken over.
    struct Lock {
        Lock() noexcept {
            std::atomic<pid_t>& busy = detail::guard_state().busy;
            const pid_t self = ::getpid();
            for (;;) {
                pid_t holder = busy.load();
                if ((holder == 0 || holder != self) && busy.compare_exchange_weak(holder, self)) return;
                ::sched_yield();
            }
        }
        ~Lock() { detail::guard_state().busy.store(0); }
        Lock(const Lock&) = delete;
        Lock& operator=(const Lock&) = delete;
    };

    /// Installs the handlers where they are not in place yet (a guarded child has them from its
    /// parent), and the atexit and terminate hooks once per program.
    static void install(double grace_s) {
        detail::GuardState& g = detail::guard_state();
        const bool inherited = g.inherited.load();
        if (!inherited) {  // a guarded child keeps the grace its parent gave it
            g.grace_ns.store(static_cast<long long>(grace_s * 1e9));
        }
        g.handler.store(&on_signal);
        g.owner.store(::getpid());
        unsigned installed = 0;
        unsigned own = 0;
        for (int i = 0; i < detail::guarded_signal_count; ++i) {
            const int sig = detail::guarded_signals[i];
            struct sigaction current {};
            if (::sigaction(sig, nullptr, &current) != 0) continue;
            if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_IGN) continue;  // stays ignored
            if (detail::guard_handles(sig)) {  // inherited through fork: previous[i] is right
                installed |= 1u << i;
                continue;
            }
            if (detail::take_signal(i, current)) {
                installed |= 1u << i;
                own |= 1u << i;
            }
        }
        g.installed.store(installed);
        g.own.store(own);
        if (!g.atexit_registered.exchange(true)) std::atexit(&at_exit);
        if (!g.terminate_hooked.exchange(true)) g.previous_terminate.store(std::set_terminate(&on_terminate));
    }

    /// Puts back what install() replaced. In a guarded child, only what a ChildGuard of its own
    /// installed: the rest came from its parent and stays for the child's whole life.
    static void uninstall() noexcept {
        detail::GuardState& g = detail::guard_state();
        const bool inherited = g.inherited.load();
        const unsigned restore = inherited ? g.own.load() : g.installed.load();
        for (int i = 0; i < detail::guarded_signal_count; ++i)
            if ((restore & (1u << i)) && detail::guard_handles(detail::guarded_signals[i]))
                ::sigaction(detail::guarded_signals[i], &g.previous[i], nullptr);
        g.installed.fetch_and(~restore);
        g.own.store(0);
        if (inherited) return;
        g.grace_ns.store(detail::default_grace_ns);  // the grace of a process with no guard
        if (std::get_terminate() == &on_terminate) {
            std::set_terminate(g.previous_terminate.load());
            g.terminate_hooked.store(false);
        }
        g.owner.store(0);
    }

    static void on_signal(int sig, siginfo_t* info, void* context) noexcept {
        const int saved_errno = errno;
        detail::GuardState& g = detail::guard_state();
        const int i = sig == detail::guarded_signals[0] ? 0 : 1;
        const struct sigaction previous = g.previous[i];
        const bool fatal = !(previous.sa_flags & SA_SIGINFO) && previous.sa_handler == SIG_DFL;
        // The program is about to die of this signal: from now on, another thread that fails
        // because its children are gone (an mproc::Error nobody catches, an exit()) waits for that
        // death instead of ending the program its own way (see park_while_dying).
        if (fatal && g.owner.load() == ::getpid()) g.dying_of.store(sig);
        if (g.owner.load() == ::getpid()) terminate_children();
        if (previous.sa_flags & SA_RESETHAND) {  // a one-shot handler: from now on, the default
            g.previous[i].sa_handler = SIG_DFL;
            g.previous[i].sa_flags = 0;
        }
        if (previous.sa_flags & SA_SIGINFO) {
            if (previous.sa_sigaction) previous.sa_sigaction(sig, info, context);
        } else if (previous.sa_handler == SIG_DFL) {
            die_of(sig);
        } else if (previous.sa_handler != SIG_IGN) {
            previous.sa_handler(sig);
        }
        errno = saved_errno;
    }

    /// The signal's default action: the process dies of it, as the shell and the parent expect.
    /// The first process of a pid namespace (a container's entry point) is not killed by a
    /// signal's default action: it exits with the status a shell reports for that death
    /// (128 + the signal), rather than run on with its children gone.
    static void die_of(int sig) noexcept {
        if (::getpid() == 1) ::_exit(128 + sig);
        struct sigaction fallback {};
        fallback.sa_handler = SIG_DFL;
        ::sigemptyset(&fallback.sa_mask);
        ::sigaction(sig, &fallback, nullptr);
        sigset_t only;
        ::sigemptyset(&only);
        ::sigaddset(&only, sig);
        ::pthread_sigmask(SIG_UNBLOCK, &only, nullptr);
        ::raise(sig);
        // Delivered by now; if a runtime (a sanitizer's) defers it, it is delivered when the
        // handler returns, with the default action in place.
    }

    /// While the guard's handler ends the program for a fatal signal: the calling thread sleeps
    /// until the signal's death takes the process (so the status is the signal's: 130 or 143).
    static void park_while_dying() noexcept {
        detail::GuardState& g = detail::guard_state();
        if (g.dying_of.load() == 0 || g.owner.load() != ::getpid()) return;
        for (;;) ::pause();
    }

    static void at_exit() noexcept {
        park_while_dying();
        detail::GuardState& g = detail::guard_state();
        if (g.owner.load() != ::getpid()) return;
        // No fork from here on: its child would be missed, or outlive the program the guard
        // promises nothing outlives (a later exit handler or static destructor gets an Error).
        detail::mark_process_ending();
        terminate_children();
    }

    [[noreturn]] static void on_terminate() noexcept {
        park_while_dying();
        detail::GuardState& g = detail::guard_state();
        if (g.owner.load() == ::getpid()) {
            detail::mark_process_ending();
            terminate_children();
        }
        if (const std::terminate_handler previous = g.previous_terminate.load()) previous();
        std::abort();
    }
};

}  // namespace mproc
