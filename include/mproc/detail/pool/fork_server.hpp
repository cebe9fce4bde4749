// mproc — the fork server: a single-threaded child that forks a Pool's workers.
//
// A Pool forks its fork server once, from the constructing thread, before it starts any thread of
// its own. Every worker — the first ones and every replacement — is then forked by the server,
// which has exactly one thread, so no worker is ever born holding a lock that another thread of
// the parent held at the moment of fork. The server is the workers' parent: it reaps them and
// reports each exit status to the Pool, which is how the Pool learns how a worker died.
//
// Protocol (SOCK_SEQPACKET, one fixed-size ControlMessage per packet):
//   pool -> server: spawn{seat} + the worker's end of its channel (SCM_RIGHTS);
//                   kill{seat, pid, signal}; terminate{} (SIGKILL every worker, reap, exit).
//   server -> pool: spawned{seat, pid}; exited{seat, pid, wait status};
//                   spawn_failed{seat, errno} (fork itself failed, or the channel did not come:
//                   no worker was born).
// End of stream on the control socket means "no more workers": the server waits for the ones it
// has (they end when the pool shuts their channels) — `exit_grace` at most: a worker still there
// then (stopped, or stuck in code of its own) is killed — reaps them and exits.
//
// Descriptors: the server starts by closing every close-on-exec descriptor it inherited but its
// control socket, those the pool names (the collector's eventfd) and mproc's shared memory
// (memfds). Close-on-exec marks a descriptor as its program's own — every descriptor mproc opens
// has it, a Pipe's ends included — so a Pipe made before the pool reaches EOF when the program
// closes its ends, whatever the pool's processes do. Descriptors without it (stdin, stdout,
// stderr, and what the program opened to be inherited, as by a program it would exec) stay, and
// tasks may use them.
#pragma once

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <functional>
#include <iterator>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "../../errors.hpp"
#include "../os/fd_passing.hpp"
#include "../os/fork.hpp"
#include "../os/unique_fd.hpp"
#include "../os/wait.hpp"
#include "link.hpp"

namespace mproc::detail {

struct ControlMessage {
    enum Op : std::int32_t { spawn, kill, terminate, spawned, exited, spawn_failed };
    std::int32_t op = spawn;
    std::int32_t seat = -1;
    std::int32_t pid = 0;
    std::int32_t value = 0;  // the signal for kill, the wait status for exited, errno for spawn_failed
};

/// What a worker runs: given its seat and its channel, returns the exit status.
using WorkerMain = std::function<int(int seat, UniqueFd channel)>;

class ForkServer {
public:
    /// How long the workers have to exit once the pool has closed the control socket.
    static constexpr Seconds exit_grace{5.0};

    ForkServer() = default;

    /// Forks the server. `worker_main` is copied into it and runs in every worker; the server and
    /// its workers keep, of the descriptors this process has open, only `keep` and those named at
    /// the top of this file.
    ForkServer(WorkerMain worker_main, std::string name, std::vector<int> keep) {
        int fds[2];
        if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) throw_errno("socketpair");
        control_.reset(fds[0]);
        UniqueFd server_end(fds[1]);
        keep.push_back(server_end.get());
        pid_ = fork_child(
            [&]() -> int {
                close_all_but(keep);
                return serve(server_end.get(), worker_main);
            },
            std::move(name));
        server_end.reset();
        pidfd_ = open_pidfd(pid_);
    }

    ForkServer(ForkServer&&) noexcept = default;
    ForkServer& operator=(ForkServer&&) noexcept = default;

    /// Asks for a worker on `seat` that talks over `channel` (the worker's end). Returns 0, or
    /// the errno of a request not sent: EPIPE and the like when the server is gone; ETOOMANYREFS,
    /// ENOBUFS, ENOMEM when the kernel would not take the descriptor now (the server is there).
    int spawn(int seat, const UniqueFd& channel) {
        ControlMessage m{ControlMessage::spawn, seat, 0, 0};
        const ssize_t sent = send_some_with_fd(control_.get(), &m, sizeof m, channel.get());
        if (sent == static_cast<ssize_t>(sizeof m)) return 0;
        return sent < 0 ? errno : EPIPE;
    }
    bool kill(int seat, pid_t pid, int sig) {
        ControlMessage m{ControlMessage::kill, seat, pid, sig};
        return send_with_fd(control_.get(), &m, sizeof m);
    }
    bool terminate_workers() {
        ControlMessage m{ControlMessage::terminate, -1, 0, 0};
        return send_with_fd(control_.get(), &m, sizeof m);
    }
    /// No more requests: the server exits once its workers have.
    void finish() noexcept {
        if (control_) ::shutdown(control_.get(), SHUT_RDWR);
    }

    /// One report from the server, without waiting. nullopt when none is ready; throws when the
    /// server is gone.
    std::optional<ControlMessage> next_report() {
        ControlMessage m;
        const ssize_t got = recv_with_fd(control_.get(), &m, sizeof m, nullptr, /*nonblocking=*/true);
        if (got == static_cast<ssize_t>(sizeof m)) return m;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return std::nullopt;
        throw Error("the pool's fork server (pid " + std::to_string(pid_) + ") is gone");
    }

    /// Waits for the server to exit, SIGKILLing it (and so its workers, through their parent-death
    /// signal) after `grace`; reaps it. Changes nothing of this object: call forget() after.
    void wait_exit(Seconds grace) const {
        if (pid_ == 0) return;
        if (!ended_by(deadline_after(grace))) {
            ::kill(pid_, SIGKILL);
            (void)ended_by(std::nullopt);
        }
        children().forget(pid_);
    }
    /// Reaps the server if it exits by `deadline`; false, changing nothing, if it is still there
    /// (wait_exit then waits for it again).
    bool wait_exit_until(Clock::time_point deadline) {
        if (pid_ == 0) return true;
        if (!ended_by(deadline)) return false;
        children().forget(pid_);
        pid_ = 0;
        return true;
    }
    /// Reaps the server if it ends by `deadline` (none: waits for it); false if it still runs. Where
    /// this process ignores SIGCHLD the kernel reaps the server itself and keeps no status, which
    /// the pool does not need: the server has ended once its pidfd is readable, or its pid is gone.
    bool ended_by(const Deadline& deadline) const {
        if (!sigchld_ignored()) return wait_child(pid_, deadline).has_value();
        if (pidfd_) return wait_for(pidfd_.get(), POLLIN, deadline) > 0;
        return nap_until([this] { return ::kill(pid_, 0) != 0 && errno == ESRCH; }, deadline);
    }

    /// After wait_exit: this object no longer names a server.
    void forget() noexcept {
        pid_ = 0;
        control_.reset();
        pidfd_.reset();
    }
    /// wait_exit, then forget.
    void reap(Seconds grace) {
        wait_exit(grace);
        forget();
    }

    int control_fd() const noexcept { return control_.get(); }
    /// Readable once the server has exited (-1 where the kernel has no pidfds).
    int pidfd() const noexcept { return pidfd_.get(); }
    pid_t pid() const noexcept { return pid_; }

    /// In a fresh child: closes every close-on-exec descriptor but `keep` and mproc's memfds.
    /// Allocates nothing (there may be no memory to spare; opendir would allocate): the
    /// directory is read with getdents64 into a buffer on the stack, and the descriptors are
    /// closed a batch at a time, after each look through it, until a look finds less than a batch.
    static void close_all_but(const std::vector<int>& keep) noexcept {
        int doomed[256];
        for (bool more = true; more;) {
            more = false;
            std::size_t n = 0;
            const UniqueFd dir(::open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
            if (!dir) return;
            alignas(8) char entries[4096];
            for (;;) {
                const long got = ::syscall(SYS_getdents64, dir.get(), entries, sizeof entries);
                if (got <= 0) break;
                for (long at = 0; at < got && !more;) {
                    // The kernel's records are laid out as glibc's dirent64 (only the layout is used).
                    unsigned short length = 0;
                    std::memcpy(&length, entries + at + offsetof(dirent64, d_reclen), sizeof length);
                    const char* name = entries + at + offsetof(dirent64, d_name);
                    at += length;
                    char* end = nullptr;
                    const long fd = std::strtol(name, &end, 10);
                    if (end == name || *end != '\0' || fd <= 2 || fd == dir.get()) continue;
                    if (std::find(keep.begin(), keep.end(), static_cast<int>(fd)) != keep.end()) continue;
                    const int flags = ::fcntl(static_cast<int>(fd), F_GETFD);
                    if (flags < 0 || !(flags & FD_CLOEXEC)) continue;  // meant to be inherited
                    if (is_mproc_memfd(static_cast<int>(fd))) continue;
                    if (n == std::size(doomed)) {  // a full batch: close it and look again
                        more = true;
                        break;
                    }
                    doomed[n++] = static_cast<int>(fd);
                }
                if (more) break;
            }
            for (std::size_t i = 0; i < n; ++i) ::close(doomed[i]);
        }
    }
    static bool is_mproc_memfd(int fd) noexcept {
        char path[64];
        std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        char target[64] = {};
        const ssize_t n = ::readlink(path, target, sizeof target - 1);
        static constexpr char prefix[] = "/memfd:mproc-";
        return n >= static_cast<ssize_t>(sizeof prefix - 1) && std::memcmp(target, prefix, sizeof prefix - 1) == 0;
    }

private:
    struct Worker {
        pid_t pid;
        int seat;
        UniqueFd pidfd;
    };

    // The server's whole life. Single-threaded by construction: it is a fresh fork.
    static int serve(int control, const WorkerMain& worker_main) {
        std::signal(SIGINT, SIG_IGN);  // the parent (its ChildGuard) decides what Ctrl-C does
        // The server reports how each worker ended, so it reaps them itself: where the program
        // ignores SIGCHLD (SIG_IGN, or SA_NOCLDWAIT), the kernel would reap them and discard their
        // statuses. Each worker gets the program's disposition back before it runs tasks.
        struct sigaction program_sigchld {};
        {
            struct sigaction reaped_here {};
            reaped_here.sa_handler = SIG_DFL;
            ::sigemptyset(&reaped_here.sa_mask);
            ::sigaction(SIGCHLD, &reaped_here, &program_sigchld);
        }
        {
            // Workers are born with it blocked: one signalled before it arms its handler must not
            // die of the default action (a worker unblocks it in arm_worker, worker.hpp).
            sigset_t cancel;
            ::sigemptyset(&cancel);
            ::sigaddset(&cancel, cancel_signal());
            ::pthread_sigmask(SIG_BLOCK, &cancel, nullptr);
        }
        std::vector<Worker> workers;
        bool open = true;
        std::vector<pollfd> fds;
        Deadline closing;  // once the pool is done: until when the workers may take to exit
        for (;;) {
            if (!open && workers.empty()) return 0;
            if (!open && !closing) closing = deadline_after(exit_grace);
            if (closing && expired(closing)) {
                for (const Worker& w : workers) ::kill(w.pid, SIGKILL);
                for (const Worker& w : workers) {
                    int status;
                    while (::waitpid(w.pid, &status, 0) < 0 && errno == EINTR) {}
                    children().forget(w.pid);
                }
                return 0;
            }
            fds.clear();
            if (open) fds.push_back({control, POLLIN, 0});
            bool blind = false;  // a worker without a pidfd: poll its status on a timer
            for (const Worker& w : workers) {
                if (w.pidfd) fds.push_back({w.pidfd.get(), POLLIN, 0});
                else blind = true;
            }
            int timeout = blind ? 10 : -1;
            if (closing) timeout = std::min(timeout < 0 ? INT_MAX : timeout, poll_timeout_ms(closing));
            const int ready = ::poll(fds.data(), fds.size(), timeout);
            if (ready < 0 && errno != EINTR) return 1;

            for (std::size_t i = 0; i < workers.size();) {
                int status = 0;
                const pid_t got = ::waitpid(workers[i].pid, &status, WNOHANG);
                if (got == workers[i].pid || (got < 0 && errno == ECHILD)) {
                    if (open) {
                        ControlMessage m{ControlMessage::exited, workers[i].seat, workers[i].pid, status};
                        send_with_fd(control, &m, sizeof m);
                    }
                    children().forget(workers[i].pid);
                    workers.erase(workers.begin() + static_cast<std::ptrdiff_t>(i));
                } else {
                    ++i;
                }
            }
            if (!open || fds.empty() || !(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;

            ControlMessage m;
            UniqueFd channel;
            const ssize_t got = recv_with_fd(control, &m, sizeof m, &channel, /*nonblocking=*/true);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            if (got != static_cast<ssize_t>(sizeof m)) {  // the pool is done (or gone)
                open = false;
                continue;
            }
            switch (m.op) {
                case ControlMessage::spawn: {
                    const int seat = m.seat;
                    if (!channel) {
                        // The worker's channel did not come with the request (the kernel dropped
                        // it: this process is at its descriptor limit). A worker without one
                        // could take no task too large for its ring: none is born, and the pool
                        // tries again, as after a failed fork.
                        ControlMessage r{ControlMessage::spawn_failed, seat, 0, EMFILE};
                        send_with_fd(control, &r, sizeof r);
                        break;
                    }
                    const int channel_fd = channel.get();
                    pid_t pid = 0;
                    try {
                        pid = fork_child(
                            [&]() -> int {
                                ::close(control);
                                for (Worker& w : workers) w.pidfd.reset();
                                ::sigaction(SIGCHLD, &program_sigchld, nullptr);
                                return worker_main(seat, UniqueFd(channel_fd));
                            },
                            "PoolWorker-" + std::to_string(seat + 1));
                    } catch (const ForkFailed& e) {
                        // fork failed (EAGAIN at RLIMIT_NPROC, ENOMEM): no worker; the pool tries again
                        ControlMessage r{ControlMessage::spawn_failed, seat, 0, e.error()};
                        send_with_fd(control, &r, sizeof r);
                        break;
                    } catch (...) {
                        ControlMessage r{ControlMessage::spawn_failed, seat, 0, ENOMEM};
                        send_with_fd(control, &r, sizeof r);
                        break;
                    }
                    channel.reset();
                    workers.push_back({pid, seat, open_pidfd(pid)});
                    ControlMessage r{ControlMessage::spawned, seat, pid, 0};
                    send_with_fd(control, &r, sizeof r);
                    break;
                }
                case ControlMessage::kill:
                    for (const Worker& w : workers)
                        if (w.pid == m.pid) ::kill(w.pid, m.value);
                    break;
                case ControlMessage::terminate:
                    for (const Worker& w : workers) ::kill(w.pid, SIGKILL);
                    for (const Worker& w : workers) {
                        int status;
                        while (::waitpid(w.pid, &status, 0) < 0 && errno == EINTR) {}
                    }
                    return 0;
                default: break;
            }
        }
    }

    UniqueFd control_;
    UniqueFd pidfd_;
    pid_t pid_ = 0;
};

}  // namespace mproc::detail
