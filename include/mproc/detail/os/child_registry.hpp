// mproc — the live children of this process, for reaping, active_children() and ChildGuard.
//
// A table of atomics, not a locked container: ChildGuard reads it from a signal handler, and a
// child forked while another thread was mid-update must be able to wipe its copy. Statuses that
// one caller reaps are kept for the owner, so active_children() never steals a Process's exit code.
// The table remembers the process it belongs to: a copy inherited through a fork that did not go
// through fork_child (which wipes it) lists another process's children and is treated as empty.
//
// A record lives from the fork until its owner has the child's status (Process::join, is_alive,
// exitcode or destruction; the Pool's reaping of its fork server): a child reaped by someone else
// (active_children(), a guard) keeps its status in its record until then. So the records are the
// live children plus the ended ones whose Process has not looked yet, and there is no fixed limit:
// the table grows in chunks of 1,024 records, allocated outside any signal handler and never
// freed (a signal handler only ever reads chunk pointers), up to 4,194,304 records — the most
// processes the kernel can number (PID_MAX_LIMIT). Each record has a serial number as well as the
// pid: once a child is reaped the kernel may give its pid to a newer child while the first one's
// status still waits for its owner, and the serial tells the two records apart.
//
// Each record also has a role: a Process child is joined or terminated at a normal exit according
// to its daemon flag (end_process_children); other children (a Pool's fork server, its workers)
// are left to the other rules.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <optional>
#include <sched.h>
#include <string>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../../errors.hpp"

namespace mproc::detail {

/// A pidfd for `pid` (close-on-exec, readable once the process ends), or -1 where the kernel has
/// none (before Linux 5.3). Async-signal-safe.
inline int pidfd_of(pid_t pid) noexcept {
#ifdef SYS_pidfd_open
    return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
    (void)pid;
    return -1;
#endif
}

/// What a child is to the process that started it, for what a normal exit does with it.
enum class ChildRole : int {
    other = 0,    ///< a Pool's fork server or worker: ended by the guard or the parent-death signal
    joined = 1,   ///< a Process that is not a daemon: a normal exit waits for it
    daemon = 2,   ///< a daemon Process: a normal exit terminates it
};

/// Whether this process's children are reaped by the kernel as they end, their statuses
/// discarded: SIGCHLD is ignored (SIG_IGN, or SA_NOCLDWAIT).
inline bool sigchld_ignored() noexcept {
    struct sigaction now {};
    if (::sigaction(SIGCHLD, nullptr, &now) != 0) return false;
    return now.sa_handler == SIG_IGN || (now.sa_flags & SA_NOCLDWAIT) != 0;
}

class ChildRegistry {
public:
    /// Which records an operation applies to: every one, or those of one role.
    static constexpr int any_role = -1;

    static constexpr std::size_t chunk_slots = 1024;
    static constexpr std::size_t max_chunks = 4096;
    /// Records at most: the kernel's largest pid_max (PID_MAX_LIMIT, 2^22).
    static constexpr std::size_t capacity = chunk_slots * max_chunks;

    /// A slot claimed for a fork about to happen: while it is claimed, the fork is in flight and
    /// terminate_and_reap() waits for it, so that no child is ever born unseen by the guard.
    class Ticket {
    public:
        Ticket() = default;
        explicit operator bool() const noexcept { return slot_ != 0; }

    private:
        friend class ChildRegistry;
        explicit Ticket(std::size_t slot) noexcept : slot_(slot + 1) {}
        std::size_t slot_ = 0;  // index + 1; 0: none
    };

    /// Claims a slot for a fork about to happen, growing the table when every slot is taken.
    /// Throws when the table holds `capacity` records.
    Ticket reserve(ChildRole role = ChildRole::other) {
        adopt();
        for (std::size_t c = 0; c < max_chunks; ++c) {
            Slot* chunk = chunk_at(c);
            if (!chunk) chunk = grow(c);
            for (std::size_t j = 0; j < chunk_slots; ++j) {
                Slot& slot = chunk[j];
                int expected = free_;
                if (slot.state.load(std::memory_order_relaxed) == free_ &&
                    slot.state.compare_exchange_strong(expected, claiming_, std::memory_order_acq_rel)) {
                    const std::size_t i = c * chunk_slots + j;
                    slot.serial.store(next_serial_.fetch_add(1, std::memory_order_relaxed) + 1,
                                      std::memory_order_relaxed);
                    slot.role.store(static_cast<int>(role), std::memory_order_relaxed);
                    std::size_t high = high_water_.load(std::memory_order_relaxed);
                    while (high < i + 1 && !high_water_.compare_exchange_weak(high, i + 1)) {}
                    return Ticket(i);
                }
            }
        }
        throw Error("mproc: more than " + std::to_string(capacity) +
                    " children that are running or whose Process has not collected their exit status");
    }

    /// The serial number of the child `ticket` is for (never 0): with the pid, it names that
    /// child's record even after the kernel gave its pid to another child.
    std::uint64_t serial(Ticket ticket) const noexcept {
        return ticket ? slot_at(ticket.slot_ - 1).serial.load(std::memory_order_relaxed) : 0;
    }

    /// Async-signal-safe, from the forking thread with every signal blocked and every fork lock
    /// held (fork_here), just before fork(2): the fork of `ticket` is under way. From here, a
    /// terminate_and_reap waits for its child to be published (await_forks_in_flight) and ends it
    /// with the rest. Sequentially consistent, for fork_here's look at whether the process is
    /// ending, which comes after it, while a guard marks it ending before it ends the children.
    void begin_fork(Ticket ticket) noexcept {
        if (ticket) slot_at(ticket.slot_ - 1).state.store(forking_);
    }

    /// Async-signal-safe: the fork of `ticket` made child `pid`, now a live child. False when a
    /// cleanup stopped waiting for that fork and went on without it (abandoned): the caller then
    /// ends the child itself (settle_abandoned).
    bool publish(Ticket ticket, pid_t pid) noexcept {
        if (!ticket) return true;
        Slot& slot = slot_at(ticket.slot_ - 1);
        slot.pid.store(pid, std::memory_order_relaxed);
        slot.status.store(0, std::memory_order_relaxed);
        int state = slot.state.load();
        for (;;) {
            if (state == abandoned_) return false;
            if (slot.state.compare_exchange_weak(state, live_)) return true;
        }
    }
    /// Async-signal-safe: child `pid` of `ticket`, which a cleanup went on without (publish), is
    /// ended as that cleanup would have: SIGTERM, up to `grace_ns`, SIGKILL; reaped, its status
    /// kept for its Process.
    void settle_abandoned(Ticket ticket, pid_t pid, long long grace_ns) noexcept {
        Slot& slot = slot_at(ticket.slot_ - 1);
        slot.state.store(live_, std::memory_order_release);  // reap_slot's, as any child's
        ::kill(pid, SIGTERM);
        const long long start = monotonic_now_ns();
        while (reap_slot(slot, pid, false)) {
            if (monotonic_now_ns() - start >= grace_ns) {
                if (::kill(pid, SIGKILL) != 0 && errno == EPERM) return;  // not ours to end: it stays live
                reap_slot(slot, pid, true);
                break;
            }
            const timespec nap{0, 1'000'000};
            ::nanosleep(&nap, nullptr);
        }
        if (!await_status(slot)) mark_gone(slot);  // reaped outside mproc: its status is lost (see reap)
    }

    /// Async-signal-safe: the fork of `ticket` failed; the slot is free again.
    void release(Ticket ticket) noexcept {
        if (ticket) slot_at(ticket.slot_ - 1).state.store(free_, std::memory_order_release);
    }

    /// Records a child forked without a ticket. Throws when the table is full.
    void add(pid_t pid) { publish(reserve(), pid); }

    /// Reaps `pid` if it has ended (or waits for it when `block`), keeping its wait status.
    /// Returns the status, or nullopt while the child runs. `serial` (from fork_child), when not
    /// 0, picks this child's record among records of the same pid.
    std::optional<int> reap(pid_t pid, bool block, std::uint64_t serial = 0) {
        Slot* slot = find(pid, serial);
        if (slot && slot->state.load(std::memory_order_acquire) == reaped_)
            return slot->status.load(std::memory_order_relaxed);
        // A child known to be gone is never waited for again: its pid may be another's by now.
        if (slot && slot->state.load(std::memory_order_acquire) == gone_) throw_reaped_elsewhere(pid);
        int status = 0;
        pid_t got;
        do got = ::waitpid(pid, &status, block ? 0 : WNOHANG);
        while (got < 0 && errno == EINTR);
        if (got == pid) {
            if (slot) {
                slot->status.store(status, std::memory_order_relaxed);
                slot->state.store(reaped_, std::memory_order_release);
            }
            return status;
        }
        if (got < 0 && errno == ECHILD) {
            // Unless the kernel reaped it (this process ignores SIGCHLD), another thread (or
            // ChildGuard's signal handler) may have: its status is being stored.
            if (slot && !sigchld_ignored() && await_status(*slot)) return slot->status.load(std::memory_order_relaxed);
            // Nobody in mproc reaped it. Its record stays, as gone (mark_gone): never signalled,
            // waited for or reported live again, since its pid may be another process's by now;
            // and each join of its Process says what happened, without looking at that pid.
            if (slot) mark_gone(*slot);
            throw_reaped_elsewhere(pid);
        }
        if (got < 0) throw_errno("waitpid(" + std::to_string(pid) + ")");
        return std::nullopt;
    }

    /// What reap says of a child whose status nobody in mproc took: the kernel discarded it
    /// (this process ignores SIGCHLD) or something outside mproc reaped it.
    [[noreturn]] static void throw_reaped_elsewhere(pid_t pid) {
        if (sigchld_ignored())  // the kernel reaps the children of such a process, and keeps no status
            throw Error("mproc: child " + std::to_string(pid) +
                        " was reaped by the kernel and its exit status discarded: this process ignores "
                        "SIGCHLD (SIG_IGN or SA_NOCLDWAIT), or did when the child ended; leave SIGCHLD at "
                        "its default to join children");
        throw Error("mproc: child " + std::to_string(pid) +
                    " was reaped outside mproc (a waitpid(-1), a SIGCHLD handler that reaps, or SIGCHLD "
                    "ignored when it ended), and its exit status with it");
    }

    /// Drops the record once its owner has the status (`serial` as for reap).
    void forget(pid_t pid, std::uint64_t serial = 0) noexcept {
        if (Slot* slot = find(pid, serial)) slot->state.store(free_, std::memory_order_release);
    }
    /// Drops the record if its child is gone (reaped outside mproc: see reap), when its owner
    /// will ask no more.
    void forget_if_gone(pid_t pid, std::uint64_t serial) noexcept {
        Slot* slot = find(pid, serial);
        int expected = gone_;
        if (slot) slot->state.compare_exchange_strong(expected, free_, std::memory_order_acq_rel);
    }

    /// Children that have not ended; reaps (and keeps the status of) those that have.
    std::vector<pid_t> live() {
        std::vector<pid_t> alive;
        if (!ours()) return alive;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i) {
            if (slot_at(i).state.load(std::memory_order_acquire) != live_) continue;
            const pid_t pid = slot_at(i).pid.load(std::memory_order_relaxed);
            if (reap_slot(slot_at(i), pid, false)) alive.push_back(pid);
        }
        return alive;
    }

    /// Calls fn(pid) for each child not yet reaped. Async-signal-safe if fn is.
    template <class Fn> void for_each_live(Fn&& fn) const noexcept {
        if (!ours()) return;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i)
            if (slot_at(i).state.load(std::memory_order_acquire) == live_)
                fn(slot_at(i).pid.load(std::memory_order_relaxed));
    }

    /// Async-signal-safe: sends `sig` to every child not yet reaped (of `role`, when not any_role).
    void signal_live(int sig, int role = any_role) const noexcept {
        if (!ours()) return;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i)
            if (live_in(slot_at(i), role)) ::kill(slot_at(i).pid.load(std::memory_order_relaxed), sig);
    }

    /// Async-signal-safe: reaps every child that has ended (of `role`, when not any_role), keeping
    /// its status for its owner. Returns how many still run.
    std::size_t reap_ended(int role = any_role) noexcept {
        std::size_t running = 0;
        if (!ours()) return running;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i) {
            if (!live_in(slot_at(i), role)) continue;
            if (reap_slot(slot_at(i), slot_at(i).pid.load(std::memory_order_relaxed), false)) ++running;
        }
        return running;
    }

    /// Async-signal-safe: SIGKILL to every child not yet reaped (of `role`, when not any_role),
    /// then waits for each and keeps its status. A child that SIGKILL cannot reach (EPERM: it runs
    /// a set-user-ID program) is not waited for.
    void kill_and_reap(int role = any_role) noexcept {
        if (!ours()) return;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i) {
            if (!live_in(slot_at(i), role)) continue;
            const pid_t pid = slot_at(i).pid.load(std::memory_order_relaxed);
            if (::kill(pid, SIGKILL) != 0 && errno == EPERM) continue;
            reap_slot(slot_at(i), pid, true);
        }
    }

    /// Async-signal-safe: SIGTERM to every live child (of `role`, when not any_role), up to
    /// `grace_ns` for them to end, SIGKILL to the rest; every one is reaped and its status kept for
    /// its owner.
    void terminate_and_reap(long long grace_ns, int role = any_role,
                            long long fork_wait_ns = default_fork_wait_ns) noexcept {
        if (!ours()) return;
        const long long start = monotonic_now_ns();
        await_forks_in_flight(fork_wait_ns, role);
        end_live(grace_ns, role, start);  // the grace counts from the start: waiting for forks takes from it
        // Forks that began meanwhile (in a process that is ending they were refused, and their
        // threads reap what they forked) and forks abandoned above, which their threads end.
        await_forks_in_flight(fork_wait_ns, role);
    }

    /// How long terminate_and_reap waits for a fork under way, unless told otherwise: a fork takes
    /// far less, unless it waits for a lock the calling thread holds — which only a signal
    /// handler's thread can (ChildGuard's handler, for a fatal signal, waits less).
    static constexpr long long default_fork_wait_ns = 5'000'000'000LL;

    /// terminate_and_reap's own work, once no fork is under way; SIGKILL at `start` + the grace.
    void end_live(long long grace_ns, int role, long long start) noexcept {
        if (reap_ended(role) == 0) return;
        signal_live(SIGTERM, role);
        long nap_ns = 100'000;  // children usually end at once: look again soon, then less often
        while (reap_ended(role) != 0) {
            if (monotonic_now_ns() - start >= grace_ns) {
                kill_and_reap(role);
                return;
            }
            const timespec nap{0, nap_ns};
            ::nanosleep(&nap, nullptr);
            nap_ns = nap_ns * 2 < 10'000'000L ? nap_ns * 2 : 10'000'000L;
        }
    }

    /// What a normal exit does with the Process children still running, as Python's does: the
    /// daemon ones are terminated (SIGTERM, up to `grace_ns`, SIGKILL) and reaped, then the others
    /// are waited for, however long they take. Every status is kept for its Process. Other
    /// children are left alone. Async-signal-safe.
    void end_process_children(long long grace_ns) noexcept {
        if (!ours()) return;
        terminate_and_reap(grace_ns, static_cast<int>(ChildRole::daemon));
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i)
            if (live_in(slot_at(i), static_cast<int>(ChildRole::joined)))
                reap_slot(slot_at(i), slot_at(i).pid.load(std::memory_order_relaxed), true);
    }

    /// In a freshly forked child: the parent's children are not ours.
    void clear_after_fork() noexcept {
        wipe();
        owner_.store(::getpid(), std::memory_order_release);
    }

private:
    // claiming_: reserved, its fork not under way yet; forking_: begin_fork passed; gone_: ended
    // and reaped outside mproc, its status lost (reap).
    // abandoned_: under way when a cleanup stopped waiting for it (await_forks_in_flight).
    static constexpr int free_ = 0, claiming_ = 1, live_ = 2, reaped_ = 3, forking_ = 4, gone_ = 5, abandoned_ = 6;
    struct Slot {
        std::atomic<int> state{free_};
        std::atomic<pid_t> pid{0};
        std::atomic<int> status{0};
        std::atomic<std::uint64_t> serial{0};
        std::atomic<int> role{static_cast<int>(ChildRole::other)};
    };

    /// Async-signal-safe: whether `slot` holds a live child of `role` (any_role: of any).
    static bool live_in(const Slot& slot, int role) noexcept {
        if (slot.state.load(std::memory_order_acquire) != live_) return false;
        return role == any_role || slot.role.load(std::memory_order_relaxed) == role;
    }

    /// Async-signal-safe: chunk `c`, or nullptr if it was never allocated. Chunk 0 is part of the
    /// registry itself (constant-initialised); the others are allocated by grow() and never freed.
    Slot* chunk_at(std::size_t c) const noexcept {
        if (c == 0) return const_cast<Slot*>(first_);
        return chunks_[c].load(std::memory_order_acquire);
    }
    /// Async-signal-safe: slot `i`, which lies below the high-water mark (so its chunk exists).
    Slot& slot_at(std::size_t i) const noexcept { return chunk_at(i / chunk_slots)[i % chunk_slots]; }

    /// Allocates chunk `c` (never from a signal handler: only reserve() grows the table).
    Slot* grow(std::size_t c) {
        auto* fresh = new Slot[chunk_slots];
        Slot* expected = nullptr;
        if (chunks_[c].compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) return fresh;
        delete[] fresh;  // another thread grew it first
        return expected;
    }

    bool ours() const noexcept { return owner_.load(std::memory_order_acquire) == ::getpid(); }

    /// Async-signal-safe: waits until no fork is under way (begin_fork passed, the child not yet
    /// published) nor abandoned (its thread ending its child), up to `limit_ns`. The thread of
    /// such a fork has every signal blocked and every fork lock held (fork.hpp), so this never
    /// waits for a fork that the waiting thread itself interrupted, nor for one that waits for a
    /// lock of mproc's the interrupted thread holds (a guard's handler runs on any thread). A fork
    /// not under way yet is not waited for: once the process is ending it is refused (fork_here),
    /// and otherwise it is a child born after this. On time out, the forks still under way whose
    /// children are of `role` are abandoned: their threads end their children (publish,
    /// settle_abandoned).
    void await_forks_in_flight(long long limit_ns, int role) noexcept {
        const long long start = monotonic_now_ns();
        for (;;) {
            bool in_flight = false;
            const std::size_t high = high_water_.load();
            for (std::size_t i = 0; i < high && !in_flight; ++i) {
                const int state = slot_at(i).state.load();
                in_flight = state == forking_ || state == abandoned_;
            }
            if (!in_flight) return;
            if (monotonic_now_ns() - start > limit_ns) {
                for (std::size_t i = 0; i < high; ++i) {
                    Slot& slot = slot_at(i);
                    if (role != any_role && slot.role.load(std::memory_order_relaxed) != role) continue;
                    int expected = forking_;
                    slot.state.compare_exchange_strong(expected, abandoned_);
                }
                return;
            }
            const timespec nap{0, 200'000};
            ::nanosleep(&nap, nullptr);
        }
    }

    static long long monotonic_now_ns() noexcept {
        timespec now{};
        ::clock_gettime(CLOCK_MONOTONIC, &now);
        return static_cast<long long>(now.tv_sec) * 1'000'000'000LL + now.tv_nsec;
    }

    /// Makes the table this process's: a stale copy (inherited through a plain fork) is wiped.
    void adopt() noexcept {
        const pid_t self = ::getpid();
        pid_t owner = owner_.load(std::memory_order_acquire);
        if (owner == self) return;
        if (owner_.compare_exchange_strong(owner, self, std::memory_order_acq_rel) && owner != 0) wipe();
    }

    void wipe() noexcept {
        // Only the slots ever used: the others are free already, and writing them would make a
        // fresh child copy the whole table (48 KiB, a dozen copy-on-write faults) for nothing.
        const std::size_t high = high_water_.load(std::memory_order_relaxed);
        for (std::size_t i = 0; i < high; ++i) slot_at(i).state.store(free_, std::memory_order_relaxed);
        high_water_.store(0, std::memory_order_relaxed);
    }

    /// Async-signal-safe: waitpid for one live slot's child; stores the status if this call reaped
    /// it. Returns true while the child runs. ECHILD means another caller reaped it (and stores
    /// the status): it has ended.
    bool reap_slot(Slot& slot, pid_t pid, bool block) noexcept {
        int status = 0;
        pid_t got;
        do got = ::waitpid(pid, &status, block ? 0 : WNOHANG);
        while (got < 0 && errno == EINTR);
        if (got == 0) return true;
        if (got == pid) {
            slot.status.store(status, std::memory_order_relaxed);
            slot.state.store(reaped_, std::memory_order_release);
        }
        // ECHILD: reaped by another caller in mproc (which stores the status now) or outside
        // mproc. Either way it has ended; its Process's join tells which (reap).
        return false;
    }

    /// After ECHILD with no status stored by anyone in mproc: the child's record becomes gone,
    /// unless a reaper stored its status meanwhile (then reaped_ stands). Async-signal-safe.
    static void mark_gone(Slot& slot) noexcept {
        int expected = live_;
        slot.state.compare_exchange_strong(expected, gone_, std::memory_order_acq_rel);
    }

    /// After ECHILD: whoever reaped the child stores its status right after its waitpid returned.
    /// Waits (up to about a second) for that store; false if it never comes (something outside
    /// mproc reaped the child, e.g. waitpid(-1)).
    static bool await_status(const Slot& slot) noexcept {
        for (int i = 0; i < 1100; ++i) {
            if (slot.state.load(std::memory_order_acquire) == reaped_) return true;
            if (i < 100) {
                ::sched_yield();
            } else {
                const timespec nap{0, 1'000'000};
                ::nanosleep(&nap, nullptr);
            }
        }
        return slot.state.load(std::memory_order_acquire) == reaped_;
    }
    /// The record of child `pid` (with `serial`, when not 0). Without a serial, a live record
    /// comes before a reaped one of the same pid (whose child is gone: the pid is now the live one's).
    Slot* find(pid_t pid, std::uint64_t serial = 0) noexcept {
        Slot* reaped = nullptr;
        const std::size_t high = high_water_.load(std::memory_order_acquire);
        for (std::size_t i = 0; i < high; ++i) {
            Slot& slot = slot_at(i);
            const int state = slot.state.load(std::memory_order_acquire);
            if ((state != live_ && state != reaped_ && state != gone_) ||
                slot.pid.load(std::memory_order_relaxed) != pid)
                continue;
            if (serial != 0) {
                if (slot.serial.load(std::memory_order_relaxed) == serial) return &slot;
            } else if (state == live_) {
                return &slot;
            } else if (!reaped) {
                reaped = &slot;
            }
        }
        return reaped;
    }
    Slot first_[chunk_slots];
    std::atomic<Slot*> chunks_[max_chunks]{};  // chunks_[0] unused: chunk 0 is first_
    std::atomic<std::size_t> high_water_{0};
    std::atomic<std::uint64_t> next_serial_{0};
    std::atomic<pid_t> owner_{0};  // the process these children belong to (0: none yet)
};

inline ChildRegistry& children() noexcept {
    static constinit ChildRegistry registry;  // constant-initialised: safe to touch from a signal handler
    return registry;
}

/// exitcode() from a wait status: N for exit(N), -N for death by signal N.
inline int exit_code_of(int status) noexcept {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return -1;
}

}  // namespace mproc::detail
