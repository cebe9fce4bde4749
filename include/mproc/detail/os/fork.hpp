// mproc — the one place that forks.
//
// Before fork: flush every stdio buffer, so output the parent wrote is not written again by the
// child. In the child: arm the parent-death signal (and re-check the parent, which may have died
// before the signal was armed), stay guarded if the parent was (guard_state.hpp) or put back the
// dispositions a stale copy of a guard replaced, forget the parent's children, run the body,
// flush, end the children of its own still running (end_children_normally: a normal exit's rule),
// and leave with _exit so the parent's atexit handlers and static destructors never run twice.
//
// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. So a fork
// asked for by any thread but the main one runs on the forker: one long-lived thread per process,
// started on first use, detached, asleep on a condition variable when idle, with every signal
// blocked. The child is then a copy of the forker thread; it takes the asking thread's signal
// mask, CPU affinity and name, but thread_local variables hold the forker thread's values.
#pragma once

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#if defined(__GLIBCXX__)
#include <ext/stdio_sync_filebuf.h>
#endif
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <string>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <unistd.h>
#include <utility>

#include "../../errors.hpp"
#include "child_registry.hpp"
#include "fork_locks.hpp"
#include "guard_state.hpp"

namespace mproc::detail {

/// fork(2) itself failed (EAGAIN at RLIMIT_NPROC, ENOMEM): no child was born.
class ForkFailed : public Error {
public:
    explicit ForkFailed(int error) : Error(message(error)), error_(error) {}
    int error() const noexcept { return error_; }

private:
    static std::string message(int error) {
        if (error == ECANCELED)  // fork_here's own refusal
            return "mproc: no child was started: this process is ending its children (it is exiting, dying of a "
                   "signal, or an mproc child whose target returned)";
        char text[256];
        return std::string("fork: ") + ::strerror_r(error, text, sizeof text);
    }
    int error_;
};

/// Who this process is, as current_process() reports it.
struct Identity {
    std::string name = "MainProcess";
    pid_t pid = 0;
    /// The number of Process objects created here, for "Process-N" names.
    std::atomic<int> process_counter{0};  // Process objects may be made on several threads at once
    /// Nonzero in every process mproc forked.
    bool is_child = false;
    /// In a process mproc forked: the name and pid of the process that forked it.
    std::string parent_name;
    pid_t parent_pid = 0;
};

inline Identity& identity() {
    static Identity self;
    return self;
}

/// Flushes one C++ stream; an exception it throws (an exception mask set on it) stays here, so
/// the next stream is still flushed.
template <class Stream> void flush_quietly(Stream& stream) noexcept {
    try {
        stream.flush();
    } catch (...) {}
}

/// Calls f(stream, i) for each C++ standard output stream, numbered 0 to 5.
template <class F> void each_standard_stream(F&& f) {
    f(std::cout, 0);
    f(std::cerr, 1);
    f(std::clog, 2);
    f(std::wcout, 3);
    f(std::wcerr, 4);
    f(std::wclog, 5);
}

/// The buffers of the C++ standard streams that write straight into C stdio (libstdc++'s
/// stdio_sync_filebuf itself, not a class derived from it: what they have unless the program
/// called sync_with_stdio(false) or gave them a buffer of its own), as they were when a child was
/// forked. Null where a stream has another buffer, or where that cannot be told (another
/// library, no RTTI).
struct SyncedStreams {
    const void* buffers[6] = {};

    static SyncedStreams now() noexcept {
        SyncedStreams at_fork;
        each_standard_stream([&](const auto& stream, std::size_t i) { at_fork.buffers[i] = synced(stream); });
        return at_fork;
    }

    /// Whether `stream` (the `i`th of the six) may hold bytes of its own, or flush another stream
    /// that may: it no longer has the synced buffer it had at the fork, or it is tied to a stream
    /// other than the standard one its flush would leave alone (std::cerr is tied to std::cout,
    /// which is looked at in its own right).
    template <class Stream> bool must_flush(const Stream& stream, std::size_t i) const noexcept {
        const auto* tie = stream.tie();
        return static_cast<const void*>(stream.rdbuf()) != buffers[i] ||
               (tie != nullptr && static_cast<const void*>(tie) != static_cast<const void*>(&std::cout) &&
                static_cast<const void*>(tie) != static_cast<const void*>(&std::wcout));
    }

private:
    template <class Stream> static const void* synced(const Stream& stream) noexcept {
#if defined(__GLIBCXX__) && defined(__GXX_RTTI)
        using Char = typename Stream::char_type;
        const auto* buffer = stream.rdbuf();
        return buffer != nullptr && typeid(*buffer) == typeid(__gnu_cxx::stdio_sync_filebuf<Char>) ? buffer : nullptr;
#else
        (void)stream;
        return nullptr;
#endif
    }
};

/// A child's flush before it leaves: C stdio, and each C++ standard stream that may hold bytes
/// C stdio does not (SyncedStreams::must_flush). One that still has the synced buffer it had at
/// the fork holds none (they went into C stdio as written), and is not flushed: ostream::flush is
/// library code the child has not run, and a fork does not map a library's code for the child,
/// so its first run there costs page faults — most of what a child's flush cost (11 µs of a
/// 121 µs Process start+join on the 2-core test VM).
inline void flush_stdio_at_exit(const SyncedStreams& synced) noexcept {
    each_standard_stream([&](auto& stream, std::size_t i) {
        if (synced.must_flush(stream, i)) flush_quietly(stream);
    });
    std::fflush(nullptr);
}

/// Before a fork: every stream (no buffer is taken as synced, so each is flushed).
inline void flush_stdio() noexcept { flush_stdio_at_exit(SyncedStreams{}); }

// A fresh child makes its own calls through syscall(), which the parent has bound already (see
// current_tid): a libc function the parent never called (prctl, getppid, _exit) would be bound
// lazily in every child, a symbol lookup and a few copy-on-write faults each time — a large part
// of what a bare child costs beyond fork itself.

/// Ends a child: _exit without the lazy binding.
[[noreturn]] inline void exit_child(int status) noexcept {
    ::syscall(SYS_exit_group, status);
    __builtin_unreachable();
}

/// In a fresh child: die with the parent, even if the parent is already gone.
inline void die_with_parent(pid_t expected_parent) noexcept {
    ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (static_cast<pid_t>(::syscall(SYS_getppid)) != expected_parent) exit_child(128 + SIGKILL);
}

inline pid_t current_tid() noexcept { return static_cast<pid_t>(::syscall(SYS_gettid)); }

/// What a child inherits from the thread it is forked from, carried over when the fork runs on
/// the forker thread on another thread's behalf.
struct ThreadTraits {
    sigset_t mask{};
    cpu_set_t affinity{};
    bool has_affinity = false;
    char name[16] = {};

    static ThreadTraits of_this_thread() noexcept {
        ThreadTraits t;
        ::pthread_sigmask(SIG_SETMASK, nullptr, &t.mask);
        t.has_affinity = ::sched_getaffinity(0, sizeof t.affinity, &t.affinity) == 0;
        ::prctl(PR_GET_NAME, t.name, 0, 0, 0);
        return t;
    }
    /// In the child: become a copy of the asking thread (the mask last: until then every signal
    /// stays blocked, as it was on the forker thread).
    void apply() const noexcept {
        ::prctl(PR_SET_NAME, name, 0, 0, 0);
        if (has_affinity) ::sched_setaffinity(0, sizeof affinity, &affinity);
        ::pthread_sigmask(SIG_SETMASK, &mask, nullptr);
    }
};

/// Every signal blocked in the calling thread while alive; the mask it replaced is `saved`.
struct SignalsBlocked {
    sigset_t saved{};
    SignalsBlocked() noexcept {
        sigset_t all;
        ::sigfillset(&all);
        ::pthread_sigmask(SIG_SETMASK, &all, &saved);
    }
    ~SignalsBlocked() { ::pthread_sigmask(SIG_SETMASK, &saved, nullptr); }
    SignalsBlocked(const SignalsBlocked&) = delete;
    SignalsBlocked& operator=(const SignalsBlocked&) = delete;
};

/// The child's side of a fork. It never returns: it leaves with _exit.
using ChildEntry = void (*)(void* context) noexcept;

/// Forks from the calling thread, with every signal blocked in it from just before the fork until
/// the child is published in children() under `ticket` (a guard's handler on another thread waits
/// for that; none can run on this one). The child arms the parent-death signal, keeps or forgets
/// the parent's guard, forgets the parent's children, takes `traits` (when the fork runs for
/// another thread) or else `child_mask`, and runs entry(context). Returns the child's pid, or
/// -errno if fork failed (the ticket is then released). With `pidfd`, stores there a pidfd of the
/// child (-1 if the kernel has none), opened before the child is published: until then nothing
/// in mproc can reap it, so the pid cannot have been given to another process. The caller has
/// flushed stdio (before blocking signals: a flush into a full pipe must stay interruptible).
/// Forks nothing and returns -ECANCELED once the process is ending (process_ending).
inline pid_t fork_here(ChildEntry entry, void* context, ChildRegistry::Ticket ticket, const ThreadTraits* traits,
                       const sigset_t& child_mask, int* pidfd = nullptr) noexcept {
    const SignalsBlocked blocked;  // until the child is published (the child sets its own mask)
    const pid_t parent = ::getpid();
    const auto refuse = [&] {
        children().release(ticket);
        return -ECANCELED;
    };
    // A process that is ending (its guard ending its children as it dies of a signal or exits,
    // or an mproc child whose target returned) starts no child its cleanup could miss.
    if (process_ending()) return refuse();
    // In mproc's prepare handler, with every fork lock held (so after every other library's
    // handler: the order those locks have always been taken in), the fork is marked under way
    // (begin_fork) and the process looked at again: if it began ending since, the child leaves
    // at once, without running anything, and is reaped here.
    struct Begun {
        ChildRegistry::Ticket ticket;
        bool refused = false;
    } begun{ticket};
    ForkLocks::on_locked(
        [](void* b) noexcept {
            Begun& self = *static_cast<Begun*>(b);
            children().begin_fork(self.ticket);
            self.refused = process_ending();
        },
        &begun);
    const pid_t pid = ::fork();  // its handlers take and release the fork locks
    const int error = errno;
    ForkLocks::on_locked(nullptr, nullptr);
    if (pid < 0) {
        children().release(ticket);
        return -error;
    }
    if (begun.refused) {
        if (pid == 0) exit_child(0);
        while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {}
        return refuse();
    }
    if (pid > 0) {
        if (pidfd) *pidfd = pidfd_of(pid);
        // False when a cleanup stopped waiting for this fork and went on without it: the child,
        // which may have run already, is ended as that cleanup would have, and reported as it ended.
        if (!children().publish(ticket, pid)) children().settle_abandoned(ticket, pid, guard_state().grace_ns.load());
        return pid;
    }
    die_with_parent(parent);
    inherit_guard_after_fork(parent);
    children().clear_after_fork();
    if (traits) traits->apply();
    else ::pthread_sigmask(SIG_SETMASK, &child_mask, nullptr);
    entry(context);
    exit_child(1);  // entry never returns
}

/// The forker thread of this process (see the top of this file).
class Forker {
public:
    /// Forks on the forker thread on behalf of the calling thread; returns what fork_here
    /// returned, or throws what reserving the child's slot threw.
    pid_t fork(ChildEntry entry, void* context, std::uint64_t* serial = nullptr, ChildRole role = ChildRole::other,
               int* pidfd = nullptr) {
        flush_stdio();
        Request request{entry, context, ThreadTraits::of_this_thread()};
        request.role = role;
        request.pidfd = pidfd;
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return pending_ == nullptr; });
        pending_ = &request;
        changed_.notify_all();
        changed_.wait(lock, [&] { return request.done; });
        if (request.error) std::rethrow_exception(request.error);
        if (serial) *serial = request.serial;
        return request.result;
    }

    /// This process's forker, its thread started on first use. A forker inherited through fork
    /// belongs to the parent (its thread does not exist here) and is replaced, not touched.
    static Forker& get() {
        static constinit std::atomic<Forker*> current{nullptr};
        const pid_t self = ::getpid();
        for (;;) {
            Forker* found = current.load(std::memory_order_acquire);
            if (found && found->owner_ == self) return *found;
            auto* fresh = new Forker(self, found);
            try {
                fresh->start();
            } catch (const std::exception& e) {
                delete fresh;
                throw Error(std::string("cannot start mproc's forker thread: ") + e.what());
            }
            if (current.compare_exchange_strong(found, fresh, std::memory_order_acq_rel)) return *fresh;
            fresh->retire();  // another thread started one first; this one's thread deletes it
        }
    }

private:
    struct Request {
        ChildEntry entry;
        void* context;
        ThreadTraits traits;
        pid_t result = 0;
        std::uint64_t serial = 0;  // of the child's record in children()
        ChildRole role = ChildRole::other;
        int* pidfd = nullptr;  // where to store the child's pidfd, if wanted
        std::exception_ptr error{};
        bool done = false;
    };

    Forker(pid_t owner, Forker* inherited) noexcept : owner_(owner), inherited_(inherited) {}

    void start() {
        // The thread starts with every signal blocked: no handler ever runs on it, and what a
        // child inherits is set explicitly from the asking thread.
        sigset_t all, old;
        ::sigfillset(&all);
        ::pthread_sigmask(SIG_SETMASK, &all, &old);
        try {
            std::thread(&Forker::loop, this).detach();
        } catch (...) {
            ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
            throw;
        }
        ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    }

    void retire() {
        std::lock_guard lock(mutex_);
        retired_ = true;
        changed_.notify_all();
    }

    void loop() noexcept {
        ::pthread_setname_np(::pthread_self(), "mproc-forker");
        std::unique_lock lock(mutex_);
        for (;;) {
            changed_.wait(lock, [&] { return retired_ || (pending_ != nullptr && !pending_->done); });
            if (retired_) {
                lock.unlock();
                delete this;
                return;
            }
            Request& request = *pending_;
            lock.unlock();  // a child must not inherit this mutex held by its own thread
            pid_t pid = 0;
            try {
                // Reserved here, where every signal is blocked: a guard's handler never waits for
                // a fork that the thread it interrupted was about to make.
                const ChildRegistry::Ticket ticket = children().reserve(request.role);
                request.serial = children().serial(ticket);
                pid = fork_here(request.entry, request.context, ticket, &request.traits, request.traits.mask,
                                request.pidfd);
            } catch (...) {
                request.error = std::current_exception();
            }
            lock.lock();
            request.result = pid;
            request.done = true;
            pending_ = nullptr;
            changed_.notify_all();
        }
    }

    const pid_t owner_;
    [[maybe_unused]] Forker* const inherited_;  // kept reachable: it is the parent's, never freed here
    std::mutex mutex_;
    std::condition_variable changed_;
    Request* pending_ = nullptr;
    bool retired_ = false;
};

/// What a normal end of this process (exit(), a return from main, an mproc child's target
/// returning) does with the children mproc started that still run. Under a ChildGuard (this
/// process's own or one inherited from its parent), the guard's rule: every one is terminated and
/// reaped. Otherwise Python's rule for Process children: daemon ones are terminated and reaped,
/// the others waited for; with `all`, the other children (a Pool's fork server) are then
/// terminated and reaped too. Statuses are kept for their Process objects.
inline void end_children_normally(bool all) noexcept {
    GuardState& g = guard_state();
    const long long grace_ns = g.grace_ns.load();
    if (g.owner.load() == ::getpid()) {
        children().terminate_and_reap(grace_ns);
        return;
    }
    children().end_process_children(grace_ns);
    if (all) children().terminate_and_reap(grace_ns);
}

/// What fork_child reports of the child beside its pid.
struct ForkOptions {
    /// Where to store the serial number of the child's record in children() (see
    /// child_registry.hpp: it tells this child's record from a newer child's that got its pid).
    std::uint64_t* serial = nullptr;
    /// What the child is, for what a normal exit does with it.
    ChildRole role = ChildRole::other;
    /// Where to store a pidfd of the child (-1 where the kernel has none).
    int* pidfd = nullptr;
};

/// Forks; the child runs `body()` (which returns the exit status) and leaves with _exit.
/// Returns the child's pid in the parent, registered in children() before any signal handler
/// can run, and reports the rest through `options`.
/// From a thread other than the main one, the fork runs on the forker thread, so that the
/// child's parent-death signal does not fire when the asking thread exits.
template <class Body> pid_t fork_child(Body&& body, std::string child_name, const ForkOptions& options) {
    struct Job {
        std::remove_reference_t<Body>* body;
        std::string* name;
        const std::string* parent_name;
        pid_t parent_pid;
        SyncedStreams synced;
    };
    Job job{&body, &child_name, &identity().name, ::getpid(), SyncedStreams::now()};
    const ChildEntry entry = [](void* context) noexcept {
        Job& j = *static_cast<Job*>(context);
        Identity& self = identity();
        try {
            self.parent_name = *j.parent_name;
        } catch (...) {  // a long name is a copy, which may find no memory: then the child has none
            self.parent_name.clear();
        }
        self.parent_pid = j.parent_pid;
        self.name = std::move(*j.name);
        self.pid = ::getpid();
        self.process_counter = 0;
        self.is_child = true;
        int status = 1;
        try {
            status = std::forward<Body>(*j.body)();
        } catch (...) {
            // A body reports its own errors; this only keeps an escapee from running the parent's code.
        }
        flush_stdio_at_exit(j.synced);
        // Children of this child that are still running (held by objects never destroyed, say)
        // would be orphans: end them as a normal exit does rather than leave them to the
        // parent-death signal. From here, another thread of this child starts no more.
        mark_process_ending();
        end_children_normally(/*all=*/true);
        exit_child(status);
    };
    pid_t pid;
    if (current_tid() == ::getpid()) {
        flush_stdio();
        const SignalsBlocked blocked;  // from the slot's reservation until the child is published
        const ChildRegistry::Ticket ticket = children().reserve(options.role);
        if (options.serial) *options.serial = children().serial(ticket);
        pid = fork_here(entry, &job, ticket, nullptr, blocked.saved, options.pidfd);
    } else {
        pid = Forker::get().fork(entry, &job, options.serial, options.role, options.pidfd);
    }
    if (pid < 0) throw ForkFailed(-pid);
    return pid;
}

/// fork_child for a child with no role of its own, optionally reporting its record's serial.
template <class Body> pid_t fork_child(Body&& body, std::string child_name, std::uint64_t* serial = nullptr) {
    return fork_child(std::forward<Body>(body), std::move(child_name), ForkOptions{serial});
}

}  // namespace mproc::detail
