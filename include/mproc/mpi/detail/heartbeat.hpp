// mproc — how rank 0 and the worker ranks notice a peer gone silent: mproc::mpi's heartbeat.
//
// MPI does not tell: over TCP, Open MPI learns that a host is gone from the kernel's keepalive,
// after minutes, and a beat sent as an MPI message would queue behind any large message in flight
// to the same rank and move only while some thread calls into MPI. So each worker rank keeps one
// TCP connection of mproc's own to rank 0, beside MPI, and one thread on each side — it never
// calls MPI — sends a byte on it every fifth of the timeout and watches for the other side's.
// A side that hears nothing for the timeout, or sees the connection close, takes the peer for
// lost: rank 0 fails the live pool with mpi::RankLost (Master::mark_lost), a worker leaves at once
// (nothing of the job must be left on a host cut off from it).
//
// Setup, in Init, on every rank: rank 0 listens on a port the kernel picks, on every address, and
// its thread starts accepting; the port, rank 0's IPv4 addresses and a random token reach the
// workers in one MPI_Bcast; each worker connects to all the addresses at once and keeps the first
// that acknowledges its token and rank. Bytes on a connection:
//     worker → rank 0: u64 token | i32 rank          (once, then beats)
//     rank 0 → worker: 'a'                            (acknowledged, then beats)
//     either way:      'b'                            (a beat)
//     rank 0 → worker: 'x'                            (the job ends normally: stop watching)
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/clock.hpp"
#include "../../detail/os/unique_fd.hpp"
#include "../../errors.hpp"

namespace mproc::mpi::detail {

using mproc::detail::UniqueFd;

/// What rank 0 broadcasts to every rank in Init (plain bytes: one MPI_Bcast).
struct HeartbeatSetup {
    static constexpr std::size_t max_addresses = 16;
    std::int64_t timeout_ms = 0;  // 0: no heartbeat
    std::uint64_t token = 0;
    std::uint32_t addresses[max_addresses] = {};  // IPv4, network byte order
    std::uint32_t count = 0;
    std::uint16_t port = 0;  // 0: rank 0 could not listen (no heartbeat)
};

/// Every fifth of the timeout, one beat (so four may be lost or late before a peer is suspected).
inline std::int64_t beat_interval_ns(std::int64_t timeout_ms) noexcept { return timeout_ms * 1'000'000 / 5; }

inline constexpr char beat_ack = 'a';
inline constexpr char beat_byte = 'b';
inline constexpr char beat_goodbye = 'x';
inline constexpr std::size_t beat_hello_size = sizeof(std::uint64_t) + sizeof(std::int32_t);

/// Sends one byte without waiting and without SIGPIPE. False when the connection is broken; a
/// full buffer is not (the peer is not reading: its silence will tell).
inline bool send_beat(int fd, char byte) noexcept {
    for (;;) {
        if (::send(fd, &byte, 1, MSG_NOSIGNAL | MSG_DONTWAIT) == 1) return true;
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK;
    }
}

/// Milliseconds for poll() until `deadline_ns` (monotonic), rounded up, at least 0.
inline int poll_ms_until(std::int64_t deadline_ns, std::int64_t now_ns) noexcept {
    if (deadline_ns <= now_ns) return 0;
    return static_cast<int>(std::min<std::int64_t>((deadline_ns - now_ns + 999'999) / 1'000'000, 60'000));
}

/// poll(), again after a signal with what is left of `timeout_ms` (a signal that comes often
/// would otherwise put the deadline off for ever).
inline int poll_retrying(pollfd* fds, std::size_t n, int timeout_ms) noexcept {
    const std::int64_t deadline = mproc::detail::monotonic_ns() + std::int64_t{timeout_ms} * 1'000'000;
    for (;;) {
        const int rc = ::poll(fds, static_cast<nfds_t>(n), timeout_ms);
        if (rc >= 0 || errno != EINTR) return rc;
        if (timeout_ms > 0) timeout_ms = poll_ms_until(deadline, mproc::detail::monotonic_ns());
    }
}

/// Reads what is there without waiting: > 0 bytes, 0 at the end of the stream, -1 with errno
/// (EAGAIN: nothing there).
inline ssize_t read_nowait(int fd, void* dst, std::size_t n) noexcept {
    for (;;) {
        const ssize_t got = ::recv(fd, dst, n, MSG_DONTWAIT);
        if (got >= 0 || errno != EINTR) return got;
    }
}

/// This machine's IPv4 addresses, loopback last: where workers may reach rank 0.
inline std::vector<std::uint32_t> local_ipv4_addresses() {
    std::vector<std::uint32_t> outside, loopback;
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) == 0) {
        for (const ifaddrs* a = list; a; a = a->ifa_next) {
            if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET || !(a->ifa_flags & IFF_UP)) continue;
            sockaddr_in in{};
            std::memcpy(&in, a->ifa_addr, sizeof in);
            auto& to = (a->ifa_flags & IFF_LOOPBACK) ? loopback : outside;
            if (std::find(to.begin(), to.end(), in.sin_addr.s_addr) == to.end()) to.push_back(in.sin_addr.s_addr);
        }
        ::freeifaddrs(list);
    }
    if (loopback.empty()) loopback.push_back(htonl(INADDR_LOOPBACK));
    outside.insert(outside.end(), loopback.begin(), loopback.end());
    return outside;
}

/// The stop signal of a heartbeat thread: an eventfd its poll() watches.
class Doorbell {
public:
    Doorbell() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
        if (!fd_) throw Error(fmt::format("mproc::mpi: eventfd for the heartbeat failed: {}", std::strerror(errno)));
    }
    int fd() const noexcept { return fd_.get(); }
    void ring() noexcept {
        const std::uint64_t one = 1;
        while (::write(fd_.get(), &one, sizeof one) < 0 && errno == EINTR) {}
    }

private:
    UniqueFd fd_;
};

/// Rank 0's side: accepts the workers' connections, beats to them, and reports each one that
/// falls silent or whose connection closes — once — through `lost(rank, why)`, on its thread.
class HeartbeatHub {
public:
    using Lost = std::function<void(int rank, std::string why)>;

    /// Listens and starts the thread. With timeout 0, or when no socket can be made (setup()
    /// then says port 0, and the workers do not connect), there is no heartbeat and no thread.
    HeartbeatHub(std::chrono::milliseconds timeout, int ranks, Lost lost)
        : timeout_ms_(timeout.count()), ranks_(ranks), lost_(std::move(lost)) {
        setup_.timeout_ms = timeout_ms_;
        if (timeout_ms_ == 0 || ranks_ < 2) return;
        UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        sockaddr_in any{};
        any.sin_family = AF_INET;
        any.sin_addr.s_addr = htonl(INADDR_ANY);
        socklen_t length = sizeof any;
        if (!listener || ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&any), sizeof any) != 0 ||
            ::listen(listener.get(), std::max(ranks_, 16)) != 0 ||
            ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&any), &length) != 0) {
            why_not_ = fmt::format("rank 0 cannot listen on a TCP port: {}", std::strerror(errno));
            return;
        }
        const auto addresses = local_ipv4_addresses();
        setup_.count = static_cast<std::uint32_t>(std::min(addresses.size(), HeartbeatSetup::max_addresses));
        std::copy_n(addresses.begin(), setup_.count, setup_.addresses);
        setup_.port = ntohs(any.sin_port);
        setup_.token = std::random_device{}();
        setup_.token = setup_.token << 32 | std::random_device{}();
        listener_ = std::move(listener);
        peers_.resize(static_cast<std::size_t>(ranks_));
        thread_ = std::thread([this] { run(); });
    }
    HeartbeatHub(const HeartbeatHub&) = delete;
    HeartbeatHub& operator=(const HeartbeatHub&) = delete;
    ~HeartbeatHub() { goodbye(); }

    const HeartbeatSetup& setup() const noexcept { return setup_; }
    /// Why there is no heartbeat although one was asked for (empty: there is, or none was asked).
    const std::string& why_not() const noexcept { return why_not_; }

    /// Every rank has said whether it connected (Init, after the gather): the listener closes,
    /// a rank without a heartbeat is never reported lost (its connection, if rank 0 took one the
    /// worker gave up on, closes), and every rank's silence is timed from now.
    void settle(const std::vector<bool>& beating) {
        std::lock_guard lock(mutex_);
        beating_ = beating;
        settled_ = true;
    }

    /// Stops the thread: no loss is reported after it returns. Idempotent.
    void stop() noexcept {
        if (!thread_.joinable()) return;
        stop_.ring();
        thread_.join();
    }
    /// The job ends normally: the thread stops, and every worker is told to stop watching (the
    /// connections stay open until this process ends).
    void goodbye() noexcept {
        stop();
        if (said_goodbye_) return;
        said_goodbye_ = true;
        for (Peer& p : peers_)
            if (p.fd && !p.lost) send_beat(p.fd.get(), beat_goodbye);
    }

private:
    struct Peer {
        UniqueFd fd;
        std::int64_t heard_ns = 0;
        bool lost = false;
        std::string early_why;  // a loss before settle()
    };
    struct Newcomer {
        UniqueFd fd;
        std::int64_t since_ns = 0;
        unsigned char hello[beat_hello_size] = {};
        std::size_t got = 0;
    };

    void run() noexcept {
        const std::int64_t timeout_ns = timeout_ms_ * 1'000'000;
        const std::int64_t interval_ns = beat_interval_ns(timeout_ms_);
        std::int64_t next_beat = mproc::detail::monotonic_ns();
        std::vector<pollfd> fds;
        std::vector<int> who;  // for each pollfd: -2 doorbell, -1 listener, >= 0 peer, <= -3 newcomer -3-i
        std::int64_t ran = next_beat;
        bool settled = false;
        for (;;) {
            try {
                std::int64_t now = mproc::detail::monotonic_ns();
                if (!settled) {
                    std::lock_guard lock(mutex_);
                    if (settled_) {
                        settled = true;
                        listener_.reset();
                        newcomers_.clear();
                        for (std::size_t r = 1; r < peers_.size(); ++r) {
                            Peer& p = peers_[r];
                            p.heard_ns = now;
                            if (r >= beating_.size() || !beating_[r]) {
                                p.fd.reset();  // the worker gave up on it: it is not watched
                                p.lost = true;
                            } else if (p.lost) {
                                lost_(static_cast<int>(r), std::move(p.early_why));  // lost during Init
                            }
                        }
                    }
                }
                if (now - ran > timeout_ns / 2) {
                    // This process was stopped (SIGSTOP, a debugger) or starved: the silence was
                    // ours, not the workers'. Each gets a whole timeout from now.
                    for (Peer& p : peers_) p.heard_ns = now;
                }
                ran = now;
                if (now >= next_beat) {
                    for (std::size_t r = 0; r < peers_.size(); ++r) {
                        Peer& p = peers_[r];
                        if (p.fd && !p.lost && !send_beat(p.fd.get(), beat_byte))
                            lose(static_cast<int>(r),
                                 fmt::format("its heartbeat connection broke ({})", std::strerror(errno)));
                    }
                    next_beat = now + interval_ns;
                }
                std::int64_t wake_at = next_beat;
                for (std::size_t r = 0; r < peers_.size(); ++r) {
                    Peer& p = peers_[r];
                    if (!p.fd || p.lost) continue;
                    if (now - p.heard_ns > timeout_ns) {
                        lose(static_cast<int>(r),
                             fmt::format("not heard from for {:.1f} s", static_cast<double>(now - p.heard_ns) / 1e9));
                        continue;
                    }
                    wake_at = std::min(wake_at, p.heard_ns + timeout_ns + 1);
                }
                // A connection that has not said who it is within the timeout is dropped.
                std::erase_if(newcomers_, [&](const Newcomer& n) { return now - n.since_ns > timeout_ns; });
                fds.clear();
                who.clear();
                fds.push_back({stop_.fd(), POLLIN, 0});
                who.push_back(-2);
                if (listener_) {
                    fds.push_back({listener_.get(), POLLIN, 0});
                    who.push_back(-1);
                }
                for (std::size_t i = 0; i < newcomers_.size(); ++i) {
                    fds.push_back({newcomers_[i].fd.get(), POLLIN, 0});
                    who.push_back(-3 - static_cast<int>(i));
                }
                for (std::size_t r = 0; r < peers_.size(); ++r) {
                    if (!peers_[r].fd || peers_[r].lost) continue;
                    fds.push_back({peers_[r].fd.get(), POLLIN, 0});
                    who.push_back(static_cast<int>(r));
                }
                if (poll_retrying(fds.data(), fds.size(), poll_ms_until(wake_at, now)) < 0) continue;
                now = mproc::detail::monotonic_ns();
                bool accept_now = false;
                std::vector<std::size_t> greeted;
                for (std::size_t i = 0; i < fds.size(); ++i) {
                    if (fds[i].revents == 0) continue;
                    if (who[i] == -2) return;
                    if (who[i] == -1) accept_now = true;
                    else if (who[i] <= -3) greeted.push_back(static_cast<std::size_t>(-3 - who[i]));
                    else hear(who[i], now);
                }
                // Newcomers last, from the highest index down: finishing one removes it.
                for (auto it = greeted.rbegin(); it != greeted.rend(); ++it) greet(*it, now);
                if (accept_now) accept_all(now);
            } catch (...) {
                // No memory (for the words saying why a rank is lost, or the list of descriptors
                // to watch): nothing was marked, and the turn is tried again in a moment.
                if (stopped_within(10)) return;
            }
        }
    }

    /// Waits up to `ms` for stop(); true when it came.
    bool stopped_within(int ms) noexcept {
        pollfd stop{stop_.fd(), POLLIN, 0};
        return poll_retrying(&stop, 1, ms) > 0;
    }

    void hear(int rank, std::int64_t now) {
        Peer& p = peers_[static_cast<std::size_t>(rank)];
        char bytes[64];
        const ssize_t got = read_nowait(p.fd.get(), bytes, sizeof bytes);
        if (got > 0) p.heard_ns = now;
        else if (got == 0) lose(rank, "its heartbeat connection closed: the rank's process ended");
        else if (errno != EAGAIN && errno != EWOULDBLOCK)
            lose(rank, fmt::format("its heartbeat connection broke ({})", std::strerror(errno)));
    }

    void accept_all(std::int64_t now) {
        for (;;) {
            UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
            if (!fd) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) return;
                // Out of descriptors or memory: the connection stays queued and poll() would
                // report it again at once. The listener goes (the workers not in by now are
                // told, after the gather, that they have no heartbeat).
                listener_.reset();
                return;
            }
            if (newcomers_.size() >= static_cast<std::size_t>(ranks_) * 2) return;  // not ours: ignored
            Newcomer& n = newcomers_.emplace_back();
            n.fd = std::move(fd);
            n.since_ns = now;
        }
    }

    void greet(std::size_t i, std::int64_t now) {
        Newcomer& n = newcomers_[i];
        const ssize_t got = read_nowait(n.fd.get(), n.hello + n.got, beat_hello_size - n.got);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (got <= 0) {
            newcomers_.erase(newcomers_.begin() + static_cast<std::ptrdiff_t>(i));
            return;
        }
        n.got += static_cast<std::size_t>(got);
        if (n.got < beat_hello_size) return;
        std::uint64_t token = 0;
        std::int32_t rank = 0;
        std::memcpy(&token, n.hello, sizeof token);
        std::memcpy(&rank, n.hello + sizeof token, sizeof rank);
        UniqueFd fd = std::move(n.fd);
        newcomers_.erase(newcomers_.begin() + static_cast<std::ptrdiff_t>(i));
        if (token != setup_.token || rank < 1 || rank >= ranks_) return;  // not one of this job's ranks
        Peer& p = peers_[static_cast<std::size_t>(rank)];
        if (p.fd || !send_beat(fd.get(), beat_ack)) return;
        int one = 1;
        ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        p.fd = std::move(fd);
        p.heard_ns = now;
        if (++connected_ == ranks_ - 1) listener_.reset();  // everyone is in
    }

    /// Reports a loss — once every rank has said whether it connected; before, a worker may
    /// have given up on a connection rank 0 took, and settle() reports only the others.
    void lose(int rank, std::string why) {
        Peer& p = peers_[static_cast<std::size_t>(rank)];
        if (p.lost) return;
        p.lost = true;
        std::unique_lock lock(mutex_);
        if (!settled_) {
            p.early_why = std::move(why);
            return;
        }
        lock.unlock();
        lost_(rank, std::move(why));
    }

    std::int64_t timeout_ms_;
    int ranks_;
    Lost lost_;
    HeartbeatSetup setup_;
    std::string why_not_;
    UniqueFd listener_;
    Doorbell stop_;
    std::vector<Peer> peers_;  // by rank (0 unused)
    std::vector<Newcomer> newcomers_;
    int connected_ = 0;
    bool said_goodbye_ = false;
    std::mutex mutex_;           // guards beating_ and settled_, set by settle()
    std::vector<bool> beating_;  // by rank: connected (only once settled_)
    bool settled_ = false;
    std::thread thread_;
};

/// Connects a worker to rank 0's heartbeat: to every address at once, keeping the first that
/// acknowledges. An empty fd (and `why` set) when none did within `patience`.
inline UniqueFd connect_heartbeat(const HeartbeatSetup& setup, int rank, std::chrono::milliseconds patience,
                                  std::string& why) {
    struct Try {
        UniqueFd fd;
        bool connected = false;
        std::size_t sent = 0;
    };
    std::vector<Try> tries;
    unsigned char hello[beat_hello_size];
    const auto rank32 = static_cast<std::int32_t>(rank);
    std::memcpy(hello, &setup.token, sizeof setup.token);
    std::memcpy(hello + sizeof setup.token, &rank32, sizeof rank32);
    why = "no address of rank 0 answered";
    for (std::uint32_t i = 0; i < std::min<std::uint32_t>(setup.count, HeartbeatSetup::max_addresses); ++i) {
        UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        if (!fd) {
            why = fmt::format("socket failed: {}", std::strerror(errno));
            continue;
        }
        sockaddr_in to{};
        to.sin_family = AF_INET;
        to.sin_port = htons(setup.port);
        to.sin_addr.s_addr = setup.addresses[i];
        if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&to), sizeof to) != 0 && errno != EINPROGRESS)
            continue;  // refused at once: not this address
        tries.push_back(Try{std::move(fd)});
    }
    const std::int64_t deadline = mproc::detail::monotonic_ns() + patience.count() * 1'000'000;
    std::vector<pollfd> fds;
    while (!tries.empty()) {
        const std::int64_t now = mproc::detail::monotonic_ns();
        if (now >= deadline) break;
        fds.clear();
        for (const Try& t : tries) fds.push_back({t.fd.get(), static_cast<short>(t.connected ? POLLIN : POLLOUT), 0});
        if (poll_retrying(fds.data(), fds.size(), poll_ms_until(deadline, now)) < 0) break;
        for (std::size_t i = fds.size(); i-- > 0;) {
            if (fds[i].revents == 0) continue;
            Try& t = tries[i];
            bool drop = false;
            if (!t.connected) {
                int error = 0;
                socklen_t length = sizeof error;
                ::getsockopt(t.fd.get(), SOL_SOCKET, SO_ERROR, &error, &length);
                if (error == 0) {
                    t.connected = true;
                    const ssize_t sent = ::send(t.fd.get(), hello, sizeof hello, MSG_NOSIGNAL | MSG_DONTWAIT);
                    drop = sent != static_cast<ssize_t>(sizeof hello);  // 12 bytes fit any fresh socket
                } else {
                    drop = true;
                }
            } else {
                char answer = 0;
                const ssize_t got = read_nowait(t.fd.get(), &answer, 1);
                if (got == 1 && answer == beat_ack) {
                    int one = 1;
                    ::setsockopt(t.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    why.clear();
                    return std::move(t.fd);
                }
                drop = !(got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
            }
            if (drop) tries.erase(tries.begin() + static_cast<std::ptrdiff_t>(i));
        }
    }
    if (!tries.empty()) why = fmt::format("rank 0 did not answer within {} ms", patience.count());
    return UniqueFd{};
}

/// A worker's side: beats to rank 0 and watches for its beats; when rank 0 falls silent for the
/// timeout, or its connection closes without a goodbye, calls `lost(why)` — which must not
/// return (the worker leaves: Init's handler writes a line and _exits).
class HeartbeatLine {
public:
    using Lost = void (*)(const std::string& why);

    HeartbeatLine(UniqueFd fd, std::chrono::milliseconds timeout, Lost lost)
        : fd_(std::move(fd)), timeout_ms_(timeout.count()), lost_(lost) {
        thread_ = std::thread([this] { run(); });
    }
    HeartbeatLine(const HeartbeatLine&) = delete;
    HeartbeatLine& operator=(const HeartbeatLine&) = delete;
    ~HeartbeatLine() { stop(); }

    /// Stops watching (the job ends normally). Idempotent.
    void stop() noexcept {
        if (!thread_.joinable()) return;
        stop_.ring();
        thread_.join();
    }

private:
    void run() noexcept {
        const std::int64_t timeout_ns = timeout_ms_ * 1'000'000;
        const std::int64_t interval_ns = beat_interval_ns(timeout_ms_);
        std::int64_t heard = mproc::detail::monotonic_ns();
        std::int64_t next_beat = heard;
        std::int64_t ran = heard;
        for (;;) {
            try {
                std::int64_t now = mproc::detail::monotonic_ns();
                if (now - ran > timeout_ns / 2) heard = now;  // this rank was stopped: the silence was its own
                ran = now;
                if (now >= next_beat) {
                    if (!send_beat(fd_.get(), beat_byte))
                        lost_(fmt::format("the heartbeat connection to rank 0 broke ({})", std::strerror(errno)));
                    next_beat = now + interval_ns;
                }
                if (now - heard > timeout_ns)
                    lost_(
                        fmt::format("rank 0 was not heard from for {:.1f} s", static_cast<double>(now - heard) / 1e9));
                pollfd fds[2] = {{stop_.fd(), POLLIN, 0}, {fd_.get(), POLLIN, 0}};
                if (poll_retrying(fds, 2, poll_ms_until(std::min(next_beat, heard + timeout_ns + 1), now)) < 0)
                    continue;
                if (fds[0].revents) return;
                if (!fds[1].revents) continue;
                char bytes[64];
                const ssize_t got = read_nowait(fd_.get(), bytes, sizeof bytes);
                if (got > 0) {
                    if (std::memchr(bytes, beat_goodbye, static_cast<std::size_t>(got))) return;
                    heard = mproc::detail::monotonic_ns();
                } else if (got == 0) {
                    lost_("rank 0's heartbeat connection closed: rank 0's process ended");
                } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    lost_(fmt::format("the heartbeat connection to rank 0 broke ({})", std::strerror(errno)));
                }
            } catch (...) {
                // No memory for the words saying how rank 0 was lost (the only thing here that
                // needs any): this rank leaves all the same.
                lost_(lost_without_memory_);
            }
        }
    }

    UniqueFd fd_;
    std::int64_t timeout_ms_;
    Lost lost_;
    const std::string lost_without_memory_ = "rank 0 was lost (no memory left to say how)";
    Doorbell stop_;
    std::thread thread_;
};

}  // namespace mproc::mpi::detail
