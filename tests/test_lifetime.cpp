// Lifetime: however a program that uses mproc ends — SIGINT, Ctrl-C at a terminal, SIGTERM,
// SIGKILL, exit(0), an exception out of main — no process it started is left alive and none is left
// a zombie, and the program's exit status is the one that ending conventionally gives. Also: the
// program's own signal handlers are chained to, a child forked for a thread outlives that thread,
// active_children() lists exactly the live children, and cpu_count() follows the affinity mask.
//
// The programs are driven from outside: this test starts tests/programs/lifetime_program in a
// process group (or a session on a pseudo-terminal) of its own, and is itself a child subreaper,
// so any process of the tree orphaned before it was reaped is re-parented here, where it is seen.
// After the program has ended, its process group must empty within a generous deadline; for
// every ending but SIGKILL, nothing may have been orphaned at all: each process of the tree was
// reaped by its own parent.
#include <catch2/catch.hpp>
#include <mproc/detail/os/child_registry.hpp>
#include <mproc/detail/os/guard_state.hpp>
#include <mproc/guard.hpp>
#include <mproc/pool.hpp>
#include <mproc/process.hpp>
#include <mproc/queue.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <poll.h>
#include <sched.h>
#include <set>
#include <sstream>
#include <string>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <utility>
#include <vector>

#include "support.hpp"

#ifndef MPROC_LIFETIME_PROGRAM
#error "MPROC_LIFETIME_PROGRAM must name the lifetime_program executable"
#endif

using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

/// Generous: sanitizer builds on a shared, loaded 2-core machine. Only a hang ever waits this long.
constexpr auto ready_limit = 120s;
constexpr auto end_limit = 60s;

void nap() { std::this_thread::sleep_for(5ms); }

/// ThreadSanitizer runs a process's asynchronous signal handlers only at its own interception
/// points, and in a process forked from a multithreaded one it switches those off for good ("in
/// the hope that we will exec soon"): there, a SIGTERM handler never runs. A pool made while
/// another pool's collector thread runs has such a fork server and such workers.
constexpr bool under_tsan() { return mproc_test::under_thread_sanitizer(); }

/// An fd this test owns.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    ~Fd() { reset(); }
    Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    Fd& operator=(Fd&& other) noexcept {
        if (this != &other) {
            reset();
            fd_ = std::exchange(other.fd_, -1);
        }
        return *this;
    }
    int get() const { return fd_; }
    void reset() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
};

std::pair<Fd, Fd> make_pipe() {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    return {Fd(fds[0]), Fd(fds[1])};
}

/// From /proc/<pid>/stat.
struct ProcStat {
    pid_t pid = 0;
    pid_t ppid = 0;
    pid_t pgrp = 0;
    char state = '?';  // 'Z': a zombie
};

std::optional<ProcStat> proc_stat(pid_t pid) {
    std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(file, line)) return std::nullopt;
    const auto close = line.rfind(')');
    if (close == std::string::npos) return std::nullopt;
    std::istringstream rest(line.substr(close + 2));
    ProcStat s;
    s.pid = pid;
    rest >> s.state >> s.ppid >> s.pgrp;
    if (!rest) return std::nullopt;
    return s;
}

/// Every process in process group `pgrp`, zombies included.
std::vector<ProcStat> group_members(pid_t pgrp) {
    std::vector<ProcStat> found;
    DIR* proc = ::opendir("/proc");
    if (!proc) return found;
    while (dirent* entry = ::readdir(proc)) {
        const std::string name = entry->d_name;
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
        if (auto s = proc_stat(static_cast<pid_t>(std::stol(name))); s && s->pgrp == pgrp) found.push_back(*s);
    }
    ::closedir(proc);
    return found;
}

std::string describe(const ProcStat& s) {
    return "pid " + std::to_string(s.pid) + " (parent " + std::to_string(s.ppid) + ", state " + s.state + ")";
}

std::string describe_status(int status) {
    if (WIFEXITED(status)) return "exited with " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return std::string("killed by ") + sigabbrev_np(WTERMSIG(status));
    return "status " + std::to_string(status);
}

/// Orphans re-parented to this process are seen (and must be reaped) here.
void become_subreaper() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0); }

std::vector<std::string> split_lines(const std::string& text) {
    std::vector<std::string> lines;
    std::string line;
    for (char c : text) {
        if (c == '\r') continue;
        if (c == '\n') {
            lines.push_back(line);
            line.clear();
        } else {
            line += c;
        }
    }
    if (!line.empty()) lines.push_back(line);
    return lines;
}

/// How the program is started.
struct Launch {
    std::vector<std::string> args;  // after the program's path
    bool terminal = false;          // on a pseudo-terminal, as a session leader (Ctrl-C goes there)
    bool ignore_sigint = false;     // SIGINT ignored, as for a background job of a script or nohup
    std::vector<std::string> tsan_options{};  // appended to TSAN_OPTIONS for the program
};

/// What happened, once the program and every process of its tree are gone.
struct Ending {
    int status = 0;                                 // the program's wait status
    std::vector<std::pair<pid_t, int>> adopted;     // orphans reaped here, with their wait statuses
    std::vector<std::string> after_ready;           // output lines after "ready"
    std::string errors;                             // stderr (merged into the output on a terminal)
};

/// lifetime_program, running. Its destructor kills whatever is left of it (after a failure).
class Program {
public:
    explicit Program(const Launch& how) : terminal_(how.terminal) {
        become_subreaper();
        std::vector<std::string> args{MPROC_LIFETIME_PROGRAM};
        args.insert(args.end(), how.args.begin(), how.args.end());
        std::vector<char*> argv;
        for (std::string& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        std::vector<std::string> environment;
        std::string tsan = "TSAN_OPTIONS=";
        if (const char* inherited = std::getenv("TSAN_OPTIONS")) tsan += inherited;
        for (const std::string& option : how.tsan_options) tsan += (tsan.back() == '=' ? "" : ":") + option;
        for (char** e = environ; *e; ++e)
            if (std::strncmp(*e, "TSAN_OPTIONS=", 13) != 0) environment.emplace_back(*e);
        environment.push_back(tsan);
        std::vector<char*> envp;
        for (std::string& e : environment) envp.push_back(e.data());
        envp.push_back(nullptr);

        Fd in_read, in_write, out_read, out_write, err, slave;
        if (terminal_) {
            output_ = Fd(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
            REQUIRE(output_.get() >= 0);
            REQUIRE(::grantpt(output_.get()) == 0);
            REQUIRE(::unlockpt(output_.get()) == 0);
            char name[128];
            REQUIRE(::ptsname_r(output_.get(), name, sizeof name) == 0);
            slave = Fd(::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC));
            REQUIRE(slave.get() >= 0);
            termios mode{};
            REQUIRE(::tcgetattr(slave.get(), &mode) == 0);
            mode.c_lflag |= ISIG | NOFLSH;  // Ctrl-C signals; output already written is not dropped
            mode.c_lflag &= ~static_cast<tcflag_t>(ECHO);
            mode.c_cc[VINTR] = 0x03;
            REQUIRE(::tcsetattr(slave.get(), TCSANOW, &mode) == 0);
        } else {
            std::tie(in_read, in_write) = make_pipe();
            std::tie(out_read, out_write) = make_pipe();
            err = Fd(::memfd_create("lifetime-stderr", MFD_CLOEXEC));
            REQUIRE(err.get() >= 0);
        }

        // Between fork and exec: async-signal-safe calls only (this process may have threads).
        const pid_t parent = ::getpid();
        const pid_t pid = ::fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // if this test dies, so does the program
            if (::getppid() != parent) ::_exit(126);
            if (terminal_) {
                ::setsid();
                if (::ioctl(slave.get(), TIOCSCTTY, 0) != 0) ::_exit(125);
                for (int fd = 0; fd < 3; ++fd) ::dup2(slave.get(), fd);
            } else {
                ::setpgid(0, 0);
                ::dup2(in_read.get(), 0);
                ::dup2(out_write.get(), 1);
                ::dup2(err.get(), 2);
            }
            struct sigaction action {};
            ::sigemptyset(&action.sa_mask);
            action.sa_handler = SIG_DFL;
            ::sigaction(SIGTERM, &action, nullptr);
            action.sa_handler = how.ignore_sigint ? SIG_IGN : SIG_DFL;
            ::sigaction(SIGINT, &action, nullptr);
            sigset_t none;
            ::sigemptyset(&none);
            ::sigprocmask(SIG_SETMASK, &none, nullptr);
            ::execve(argv[0], argv.data(), envp.data());
            ::_exit(127);
        }
        pid_ = pid;
        if (!terminal_) {
            ::setpgid(pid, pid);  // also here: whichever runs first, the group exists before we look
            stdin_ = std::move(in_write);
            output_ = std::move(out_read);
            errors_ = std::move(err);
        }
        const int flags = ::fcntl(output_.get(), F_GETFL);
        ::fcntl(output_.get(), F_SETFL, flags | O_NONBLOCK);
        try {
            read_until_ready();
        } catch (...) {
            kill_what_is_left();
            throw;
        }
    }

    ~Program() { kill_what_is_left(); }

    Program(const Program&) = delete;
    Program& operator=(const Program&) = delete;

    pid_t pid() const { return pid_; }
    /// Pids by role, as the program reported them.
    const std::map<std::string, std::vector<pid_t>>& tree() const { return tree_; }
    std::vector<pid_t> all_pids() const {
        std::vector<pid_t> all;
        for (const auto& [role, pids] : tree_) all.insert(all.end(), pids.begin(), pids.end());
        return all;
    }

    void signal(int sig) const { REQUIRE(::kill(pid_, sig) == 0); }
    void signal_group(int sig) const { REQUIRE(::kill(-pid_, sig) == 0); }
    void type(const std::string& keys) const {
        const int fd = terminal_ ? output_.get() : stdin_.get();
        REQUIRE(::write(fd, keys.data(), keys.size()) == static_cast<ssize_t>(keys.size()));
    }

    /// Waits for the program to end and for its whole process group to disappear, reaping the
    /// orphans re-parented here. Fails (and kills what is left) if either takes longer than the limit.
    Ending wait_for_end() {
        Ending end;
        const auto limit = Clock::now() + end_limit;
        for (;;) {
            drain();
            const pid_t got = ::waitpid(pid_, &end.status, WNOHANG);
            if (got == pid_) break;
            if (Clock::now() >= limit) FAIL("the program did not end within the limit; output:\n" << text_);
            nap();
        }
        ended_ = true;
        for (;;) {
            drain();
            const std::vector<ProcStat> left = group_members(pid_);
            if (left.empty()) break;
            for (const ProcStat& s : left) {
                int status = 0;
                if (s.ppid == ::getpid() && ::waitpid(s.pid, &status, WNOHANG) == s.pid)
                    end.adopted.emplace_back(s.pid, status);
            }
            if (Clock::now() >= limit) {
                std::string what;
                for (const ProcStat& s : group_members(pid_)) what += "\n  " + describe(s);
                FAIL("after the program ended (" << describe_status(end.status)
                                                 << "), processes of its tree remain:" << what);
            }
            nap();
        }
        settled_ = true;
        drain();
        const std::vector<std::string> lines = split_lines(text_);
        const auto ready = std::find(lines.begin(), lines.end(), "ready");
        end.after_ready.assign(ready + 1, lines.end());
        if (errors_.get() >= 0) {
            char chunk[4096];
            off_t at = 0;
            ssize_t got;
            while ((got = ::pread(errors_.get(), chunk, sizeof chunk, at)) > 0) {
                end.errors.append(chunk, static_cast<std::size_t>(got));
                at += got;
            }
        }
        return end;
    }

private:
    /// After a failure: SIGKILL to whatever is left of the tree, and every orphan reaped.
    void kill_what_is_left() {
        if (pid_ > 0 && !ended_) {
            ::kill(-pid_, SIGKILL);
            ::kill(pid_, SIGKILL);
            int status;
            ::waitpid(pid_, &status, 0);
        }
        if (pid_ > 0 && !settled_) {  // what was left of the tree, once it dies, is re-parented here
            const auto limit = Clock::now() + end_limit;
            while (Clock::now() < limit) {
                const std::vector<ProcStat> left = group_members(pid_);
                if (left.empty()) break;
                for (const ProcStat& s : left) {
                    ::kill(s.pid, SIGKILL);
                    int status;
                    if (s.ppid == ::getpid()) ::waitpid(s.pid, &status, WNOHANG);
                }
                nap();
            }
        }
    }

    /// Reads what is there of the program's output (never blocks).
    void drain() {
        char chunk[4096];
        for (;;) {
            const ssize_t got = ::read(output_.get(), chunk, sizeof chunk);
            if (got > 0) {
                text_.append(chunk, static_cast<std::size_t>(got));
                continue;
            }
            if (got < 0 && errno == EINTR) continue;
            return;  // nothing now, end of file, or (a terminal with no process left) EIO
        }
    }

    void read_until_ready() {
        const auto limit = Clock::now() + ready_limit;
        for (;;) {
            drain();
            const std::vector<std::string> lines = split_lines(text_);
            if (std::find(lines.begin(), lines.end(), "ready") != lines.end()) {
                for (const std::string& line : lines) {
                    std::istringstream in(line);
                    std::string word, role;
                    pid_t pid = 0;
                    if (in >> word >> pid >> role && word == "pid") tree_[role].push_back(pid);
                }
                return;
            }
            int status = 0;
            if (::waitpid(pid_, &status, WNOHANG) == pid_) {
                ended_ = true;
                FAIL("the program ended (" << describe_status(status) << ") before it was ready; output:\n"
                                           << text_ << error_text());
            }
            if (Clock::now() >= limit) FAIL("the program was not ready within the limit; output:\n" << text_);
            pollfd p{output_.get(), POLLIN, 0};
            ::poll(&p, 1, 50);
        }
    }

    std::string error_text() const {
        if (errors_.get() < 0) return "";
        std::string out;
        char chunk[4096];
        const ssize_t got = ::pread(errors_.get(), chunk, sizeof chunk, 0);
        if (got > 0) out.assign(chunk, static_cast<std::size_t>(got));
        return out;
    }

    bool terminal_;
    pid_t pid_ = -1;
    bool ended_ = false;
    bool settled_ = false;  // the program ended and its group emptied
    Fd stdin_, output_, errors_;
    std::string text_;
    std::map<std::string, std::vector<pid_t>> tree_;
};

/// The roles each mode reports, with their counts.
std::map<std::string, std::size_t> expected_roles(const std::string& mode) {
    if (mode == "pool") return {{"main", 1}, {"server", 1}, {"worker", 4}};
    if (mode == "pool_busy") return {{"main", 1}, {"server", 2}, {"worker", 5}};
    if (mode == "tree" || mode == "nested" || mode == "stubborn")
        return {{"main", 1}, {"child", 1}, {"grandchild", 1}, {"great-grandchild", 1}};
    return {{"main", 1}, {"consumer", 1}};
}

/// The program reported the whole tree, every process of it runs, and all share its process group.
void check_tree(const Program& program, const std::string& mode) {
    const auto expected = expected_roles(mode);
    REQUIRE(program.tree().size() == expected.size());
    for (const auto& [role, count] : expected) {
        CAPTURE(role);
        REQUIRE(program.tree().count(role) == 1);
        REQUIRE(program.tree().at(role).size() == count);
    }
    REQUIRE(program.tree().at("main").front() == program.pid());
    for (pid_t pid : program.all_pids()) {
        CAPTURE(pid);
        const auto s = proc_stat(pid);
        REQUIRE(s);
        CHECK(s->state != 'Z');
        CHECK(s->pgrp == program.pid());
    }
    CHECK(group_members(program.pid()).size() == program.all_pids().size());
}

std::string role_of(const Program& program, pid_t pid) {
    for (const auto& [role, pids] : program.tree())
        if (std::find(pids.begin(), pids.end(), pid) != pids.end()) return role;
    return "unreported";
}

/// Nothing of the tree was orphaned: every process was reaped by its own parent.
void check_nothing_orphaned(const Program& program, const Ending& end) {
    for (const auto& [pid, status] : end.adopted)
        FAIL_CHECK("pid " << pid << " (" << role_of(program, pid) << ") outlived its parent (then "
                          << describe_status(status) << ")");
}

void check_quiet(const Ending& end) {
    for (const std::string& line : end.after_ready) FAIL_CHECK("unexpected output: " << line);
    CHECK(end.errors.empty());
}

const char* const all_modes[] = {"pool", "tree", "nested", "queue", "pipe"};

}  // namespace

TEST_CASE("SIGINT to the program: every process of its tree is reaped, and it dies of SIGINT (130)") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "wait"}});
    check_tree(program, mode);
    program.signal(SIGINT);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGINT);
    check_nothing_orphaned(program, end);
    check_quiet(end);
}

TEST_CASE("SIGINT to the whole process group, as Ctrl-C sends it: same, and no worker says a word") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "wait"}});
    check_tree(program, mode);
    program.signal_group(SIGINT);
    Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGINT);
    check_nothing_orphaned(program, end);
    // Under TSan a level of the tree may never run its handler, as in a process forked from a
    // multithreaded one (see under_tsan): the signal kills its child, and it outlives it and says
    // so (level 2, 1 run in about 1,000 under load; still alive 200 ms after its child died).
    if (under_tsan())
        std::erase_if(end.after_ready, [](const std::string& line) {
            return line.starts_with("level ") && line.ends_with(": child ended");
        });
    check_quiet(end);
}

TEST_CASE("Ctrl-C typed at a terminal stops the program with every child gone") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "wait"}, /*terminal=*/true});
    check_tree(program, mode);
    program.type("\x03");
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status));
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGINT);
    check_nothing_orphaned(program, end);
    check_quiet(end);  // on a terminal, stderr is there too: nothing from any worker or child
}

TEST_CASE("SIGTERM: every process of the tree is reaped, and the program dies of SIGTERM (143)") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "wait"}});
    check_tree(program, mode);
    program.signal(SIGTERM);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGTERM);
    check_nothing_orphaned(program, end);
    check_quiet(end);
}

TEST_CASE(
    "SIGTERM or SIGINT while another thread is using a pool: the guard's path wins, the program dies of the signal") {
    // The guard ends the children; the other thread's pool call then fails with an mproc::Error it
    // does not catch. The program must still end by the signal (143 / 130), not by std::terminate.
    const int sig = GENERATE(SIGTERM, SIGINT);
    const int rounds = under_tsan() ? 2 : 4;  // under TSan each round waits out the guard's grace
    for (int round = 0; round < rounds; ++round) {
        CAPTURE(sig, round);
        Program program({{"pool_busy", "wait"}});
        check_tree(program, "pool_busy");
        std::this_thread::sleep_for(std::chrono::milliseconds(20 * round));  // at varied moments of the loop
        program.signal(sig);
        const Ending end = program.wait_for_end();
        CAPTURE(describe_status(end.status), end.errors);
        CHECK(WIFSIGNALED(end.status));
        CHECK(WTERMSIG(end.status) == sig);
        if (!under_tsan()) {
            check_nothing_orphaned(program, end);
            continue;
        }
        // Under TSan the second pool's server and worker were forked while the first pool's
        // collector thread ran: their guard's handler cannot run (see under_tsan), so the
        // program's guard ends them with SIGKILL after its grace, and the worker dies by the
        // parent-death signal. They must still die, and nothing else may be orphaned.
        const pid_t busy_server = program.tree().at("server").back();
        const pid_t busy_worker = program.tree().at("worker").back();
        for (const auto& [pid, status] : end.adopted) {
            CAPTURE(pid, describe_status(status));
            if (pid == busy_server || pid == busy_worker) CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
            else FAIL_CHECK("pid " << pid << " (" << role_of(program, pid) << ") outlived its parent");
        }
    }
}

TEST_CASE(
    "a great-grandchild that only SIGKILL ends: each level still reaps its own before its parent's grace is over") {
    // Every level's guard waits out its grace for the great-grandchild, which blocks SIGINT and
    // SIGTERM. A child ends its own children within a shorter grace than its parent gives it, so
    // it has killed and reaped them and ended before its parent's SIGKILL would orphan them.
    const bool group = GENERATE(false, true);
    CAPTURE(group);
    Program program({{"stubborn", "wait"}});
    check_tree(program, "stubborn");
    if (group) program.signal_group(SIGINT);
    else program.signal(SIGTERM);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == (group ? SIGINT : SIGTERM));
    check_nothing_orphaned(program, end);
    check_quiet(end);
}

TEST_CASE("SIGKILL: no handler runs, yet every child dies with its parent (the parent-death signal)") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "wait"}});
    check_tree(program, mode);
    program.signal(SIGKILL);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGKILL);
    // The orphans came here (as they would to init) and were reaped; each died of the signal its
    // parent's death sent it, and none of them lingered: the group emptied.
    std::set<pid_t> reaped;
    for (const auto& [pid, status] : end.adopted) {
        CAPTURE(pid, describe_status(status));
        CHECK(WIFSIGNALED(status));
        CHECK(WTERMSIG(status) == SIGKILL);
        reaped.insert(pid);
    }
    for (pid_t pid : program.all_pids())
        if (pid != program.pid()) CHECK(reaped.count(pid) == 1);
    check_quiet(end);
}

TEST_CASE("exit(0): every process of the tree is reaped, and the program exits with 0") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    // exit() destroys nothing in main: the Pool there is never destroyed, so its collector thread,
    // which ends once the guard has ended the pool's processes, is never joined. ThreadSanitizer
    // calls that a thread leak (and exits with 66); it is the program's choice, not a fault.
    Program program({{mode, "exit"}, false, false, {"report_thread_leaks=0"}});
    check_tree(program, mode);
    program.type("go\n");
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFEXITED(end.status));
    CHECK(WEXITSTATUS(end.status) == 0);
    check_nothing_orphaned(program, end);
    check_quiet(end);
}

TEST_CASE("an exception out of main: every process of the tree is reaped, then the usual abort") {
    const std::string mode = GENERATE(from_range(std::begin(all_modes), std::end(all_modes)));
    CAPTURE(mode);
    Program program({{mode, "throw"}});
    check_tree(program, mode);
    program.type("go\n");
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGABRT);
    // The terminate handler that was there before the guard still ran: it names the exception.
    CHECK(end.errors.find("thrown out of main") != std::string::npos);
    check_nothing_orphaned(program, end);
    for (const std::string& line : end.after_ready) FAIL_CHECK("unexpected output: " << line);
}

TEST_CASE("the program's own SIGINT/SIGTERM handler runs after the guard has reaped every child") {
    const std::string style = GENERATE(as<std::string>{}, "plain", "siginfo", "after");
    const std::string mode = GENERATE(as<std::string>{}, "pool", "tree");
    const int sig = GENERATE(SIGINT, SIGTERM);
    CAPTURE(style, mode, sig);
    Program program({{mode, "wait", style}});
    check_tree(program, mode);
    program.signal(sig);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    // The handler saw no child left, not even a zombie, and main then returned 40 + the signal
    // (unwinding the Pool and Process objects whose children the guard had already reaped).
    REQUIRE(end.after_ready.size() == 1);
    CHECK(end.after_ready[0] == "handler " + std::to_string(sig) + " none");
    CHECK(WIFEXITED(end.status));
    CHECK(WEXITSTATUS(end.status) == 40 + sig);
    check_nothing_orphaned(program, end);
    CHECK(end.errors.empty());
}

TEST_CASE("a SIGINT that was ignored when the guard was made stays ignored (nohup, background jobs)") {
    const std::string mode = GENERATE(as<std::string>{}, "pool", "tree");
    CAPTURE(mode);
    Program program({{mode, "wait"}, /*terminal=*/false, /*ignore_sigint=*/true});
    check_tree(program, mode);
    // Sent together: a pending SIGINT would be delivered first, so a guard that handled it would
    // make the program die of SIGINT. It must die of the SIGTERM.
    program.signal_group(SIGINT);
    program.signal(SIGTERM);
    const Ending end = program.wait_for_end();
    CAPTURE(describe_status(end.status), end.errors);
    CHECK(WIFSIGNALED(end.status));
    CHECK(WTERMSIG(end.status) == SIGTERM);
    check_nothing_orphaned(program, end);
    check_quiet(end);
}

namespace {

/// A child body that tells the parent it runs, then waits for signals forever.
auto sleeper(mproc_test::ReadySignal& ready) {
    return [&ready] {
        mproc_test::default_fatal_signals();
        ready.notify();
        for (;;) ::pause();
    };
}

int nothing(int x) { return x; }

std::set<pid_t> as_set(const std::vector<pid_t>& pids) { return {pids.begin(), pids.end()}; }

/// Waits (without reaping) until `pid`, a child of this process, has ended.
void await_end_unreaped(pid_t pid) {
    siginfo_t info{};
    int rc;
    do rc = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT);
    while (rc != 0 && errno == EINTR);
    REQUIRE(rc == 0);
}

}  // namespace

TEST_CASE("active_children() lists exactly the live children mproc started, from any thread") {
    std::vector<std::unique_ptr<mproc_test::ReadySignal>> readies;
    std::vector<mproc::Process> processes;
    for (int i = 0; i < 3; ++i) {
        readies.push_back(std::make_unique<mproc_test::ReadySignal>());
        processes.emplace_back(sleeper(*readies.back()));
        processes.back().start();
    }
    // One more, started by another thread (forked on mproc's forker thread).
    readies.push_back(std::make_unique<mproc_test::ReadySignal>());
    processes.emplace_back(sleeper(*readies.back()));
    std::thread([&] { processes.back().start(); }).join();
    for (auto& r : readies) REQUIRE(r->wait());

    std::set<pid_t> expected;
    for (mproc::Process& p : processes) expected.insert(p.pid());
    CHECK(as_set(mproc::active_children()) == expected);

    {
        mproc::Pool pool(2);
        CHECK(pool.apply(nothing, 5) == 5);
        // The pool adds one direct child, its fork server; its workers are the server's children.
        const std::vector<pid_t> with_pool = mproc::active_children();
        REQUIRE(with_pool.size() == expected.size() + 1);
        for (pid_t pid : expected) CHECK(std::count(with_pool.begin(), with_pool.end(), pid) == 1);
        pool.close();
        pool.join();
    }
    CHECK(as_set(mproc::active_children()) == expected);

    // One ends: it is no longer listed, active_children() reaped it, and its Process still has the status.
    processes[1].kill();
    await_end_unreaped(processes[1].pid());
    expected.erase(processes[1].pid());
    CHECK(as_set(mproc::active_children()) == expected);
    CHECK(mproc_test::child_count() == expected.size());  // no zombie
    CHECK(processes[1].exitcode() == -SIGKILL);

    for (mproc::Process& p : processes) p.terminate();
    for (mproc::Process& p : processes) REQUIRE(p.join(60s));
    CHECK(mproc::active_children().empty());
    CHECK(processes[0].exitcode() == -SIGTERM);
    CHECK(processes[1].exitcode() == -SIGKILL);
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE(
    "more than 4096 children that ended and were never joined: every start succeeds, and each Process keeps its exit "
    "status") {
    // active_children() reaps the ended ones as the program goes, as Python's does; their Process
    // objects are kept, unjoined, and must still tell how each ended.
    constexpr int n = 4500;
    std::vector<mproc::Process> processes;
    processes.reserve(n);
    for (int i = 0; i < n; ++i) {
        processes.emplace_back([i] { std::_Exit(i % 100); });
        REQUIRE_NOTHROW(processes.back().start());
        if (i % 64 == 63) (void)mproc::active_children();
    }
    const auto give_up = Clock::now() + 120s;
    while (!mproc::active_children().empty() && Clock::now() < give_up) std::this_thread::sleep_for(1ms);
    REQUIRE(mproc::active_children().empty());
    CHECK(mproc_test::child_count() == 0);  // every one reaped: no zombie left
    int wrong = 0;
    for (int i = 0; i < n; ++i) wrong += processes[static_cast<std::size_t>(i)].exitcode() == i % 100 ? 0 : 1;
    CHECK(wrong == 0);
    for (auto& p : processes) REQUIRE(p.join(60s));
    processes.clear();
    // The records are gone with their owners: as many again start, and are joined, as before.
    for (int i = 0; i < 8; ++i) {
        mproc::Process p([] {});
        p.start();
        REQUIRE(p.join(60s));
        CHECK(p.exitcode() == 0);
    }
}

TEST_CASE(
    "a child's pid reused by a newer child after active_children() reaped it: each Process still gets its own child's "
    "status") {
    // The kernel may give a reaped child's pid to a new child before the first one's Process
    // collected its status. Simulated: a record for a new live child with the same pid, in the
    // slot a joined process freed (so that a lookup by pid alone would find it first).
    mproc::Process first([] { std::_Exit(3); });
    mproc::Process reaped([] { std::_Exit(7); });
    first.start();
    reaped.start();
    REQUIRE(first.join(60s));  // frees the record before `reaped`'s
    await_end_unreaped(reaped.pid());
    CHECK(mproc::active_children().empty());  // reaps `reaped`, keeping its status
    mproc::detail::children().add(reaped.pid());  // "the kernel reused the pid" for a live child
    CHECK(reaped.exitcode() == 7);
    REQUIRE(reaped.join(1s));
    mproc::detail::children().forget(reaped.pid());  // the simulated child's record
    CHECK(mproc::active_children().empty());
    CHECK(mproc_test::child_count() == 0);
}

TEST_CASE("in a child, active_children() lists the child's own children, never its parent's") {
    mproc_test::ReadySignal ready;
    mproc::Process sibling(sleeper(ready));
    sibling.start();
    REQUIRE(ready.wait());
    REQUIRE(mproc::active_children().size() == 1);

    mproc::Process child([] {
        if (!mproc::active_children().empty()) std::_Exit(10);
        mproc::Process grandchild([] {});
        grandchild.start();
        const std::vector<pid_t> mine = mproc::active_children();
        // Ended or not, the grandchild is the only one that can be listed.
        if (mine.size() > 1 || (mine.size() == 1 && mine[0] != grandchild.pid())) std::_Exit(11);
        if (!grandchild.join() || grandchild.exitcode() != 0) std::_Exit(12);
        if (!mproc::active_children().empty()) std::_Exit(13);
        std::_Exit(0);
    });
    child.start();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == 0);
    sibling.kill();
    REQUIRE(sibling.join(60s));
}

TEST_CASE("a ChildGuard's end terminates and reaps the children left, and Process still reports how they ended") {
    SECTION("a child that ends on SIGTERM") {
        mproc_test::ReadySignal ready;
        mproc::Process polite(sleeper(ready));
        {
            mproc::ChildGuard guard(mproc::Seconds{60});  // generous: it ends at once on SIGTERM
            polite.start();
            REQUIRE(ready.wait());
            REQUIRE(mproc_test::child_count() == 1);
        }
        CHECK(mproc_test::child_count() == 0);  // reaped, not merely signalled
        CHECK(mproc::active_children().empty());
        CHECK_FALSE(polite.is_alive());
        CHECK(polite.exitcode() == -SIGTERM);
        REQUIRE(polite.join());
    }
    SECTION("a child that ignores SIGTERM gets SIGKILL once the grace period is over") {
        mproc_test::ReadySignal ready;
        mproc::Process stubborn([&] {
            ::signal(SIGTERM, SIG_IGN);
            ready.notify();
            for (;;) ::pause();
        });
        {
            mproc::ChildGuard guard(mproc::Seconds{0.2});
            stubborn.start();
            REQUIRE(ready.wait());
        }
        CHECK(mproc_test::child_count() == 0);
        CHECK(mproc::active_children().empty());
        CHECK(stubborn.exitcode() == -SIGKILL);
    }
}

TEST_CASE("a child forked for a thread outlives that thread (the parent-death signal's thread rule)") {
    mproc_test::ReadySignal ready;
    mproc::Process child(sleeper(ready));
    pid_t thread_id = 0;
    std::thread([&] {
        thread_id = static_cast<pid_t>(::gettid());
        child.start();
    }).join();
    REQUIRE(ready.wait());
    // Once the thread is fully gone from the kernel, any parent-death signal tied to it was sent.
    const std::string task = "/proc/self/task/" + std::to_string(thread_id);
    const auto limit = Clock::now() + end_limit;
    while (::access(task.c_str(), F_OK) == 0) {
        REQUIRE(Clock::now() < limit);
        nap();
    }
    siginfo_t info{};
    info.si_pid = 0;
    REQUIRE(::waitid(P_PID, static_cast<id_t>(child.pid()), &info, WEXITED | WNOHANG | WNOWAIT) == 0);
    CHECK(info.si_pid == 0);  // still running
    CHECK(child.is_alive());
    child.terminate();
    REQUIRE(child.join(60s));
    CHECK(child.exitcode() == -SIGTERM);
}

TEST_CASE("a child started while other threads make and destroy guards is guarded whole or not at all") {
    // A guard sets its owner before it installs its handlers, and puts the handlers back before it
    // clears the owner; forks did not wait for it. A child forked in between was guarded with no
    // handler for SIGTERM, which then killed it outright instead of letting it end its own
    // children first. Found by an audit (16 of 3,000 children in its probe).
    std::atomic<bool> stop{false};
    const auto churn = [&] {
        while (!stop) mproc::ChildGuard guard(mproc::Seconds{0});
    };
    std::thread first(churn), second(churn);
    int torn = 0;
    std::string example;
    const int rounds = under_tsan() ? 300 : 5000;
    for (int k = 0; k < rounds; ++k) {
        mproc::Process child([] {
            const bool owner = mproc::detail::guard_state().owner.load() == ::getpid();
            const bool sigint = mproc::detail::guard_handles(SIGINT), sigterm = mproc::detail::guard_handles(SIGTERM);
            std::_Exit(
                owner == sigint && sigint == sigterm ? 0 : 1 + (owner ? 4 : 0) + (sigint ? 2 : 0) + (sigterm ? 1 : 0));
        });
        child.start();
        REQUIRE(child.join(end_limit));
        // A guard ending on another thread may have ended the child first (-SIGTERM, -SIGKILL).
        if (const int code = child.exitcode().value_or(0); code > 0) {
            ++torn;
            if (example.empty())
                example = "owner " + std::to_string((code - 1) >> 2) + ", SIGINT handled " +
                          std::to_string(((code - 1) >> 1) & 1) + ", SIGTERM handled " + std::to_string((code - 1) & 1);
        }
    }
    stop = true;
    first.join();
    second.join();
    INFO("the first torn child: " << example);
    CHECK(torn == 0);
}

TEST_CASE("a child keeps the handlers the program put in place of its guard's") {
    // A handler installed after the guard replaces the guard's: a child started then has the
    // program's handler, not the guard's (a change that mended torn children by installing the
    // guard's handler wherever it was missing overwrote these).
    mproc::ChildGuard guard;
    struct sigaction user {
    }, back_to_default{}, saved_int{}, saved_term{};
    user.sa_handler = +[](int) {};
    back_to_default.sa_handler = SIG_DFL;
    REQUIRE(::sigaction(SIGINT, &user, &saved_int) == 0);
    REQUIRE(::sigaction(SIGTERM, &back_to_default, &saved_term) == 0);
    mproc::Process child([] {
        struct sigaction sigint {
        }, sigterm{};
        ::sigaction(SIGINT, nullptr, &sigint);
        ::sigaction(SIGTERM, nullptr, &sigterm);
        const bool users = !(sigint.sa_flags & SA_SIGINFO) && sigint.sa_handler != SIG_DFL &&
                           sigint.sa_handler != SIG_IGN;
        const bool default_term = !(sigterm.sa_flags & SA_SIGINFO) && sigterm.sa_handler == SIG_DFL;
        std::_Exit(users && default_term ? 0 : 1);
    });
    child.start();
    const bool ended = child.join(end_limit);
    ::sigaction(SIGINT, &saved_int, nullptr);
    ::sigaction(SIGTERM, &saved_term, nullptr);
    REQUIRE(ended);
    CHECK(child.exitcode() == 0);
}

TEST_CASE("cpu_count() honours the CPU affinity mask") {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    REQUIRE(::sched_getaffinity(0, sizeof allowed, &allowed) == 0);
    CHECK(mproc::cpu_count() == static_cast<unsigned>(CPU_COUNT(&allowed)));

    int first = 0;
    while (!CPU_ISSET(first, &allowed)) ++first;
    // In a child restricted to one CPU: cpu_count() is 1, and so is a default Pool's size.
    mproc::Process one([first] {
        cpu_set_t only;
        CPU_ZERO(&only);
        CPU_SET(first, &only);
        if (::sched_setaffinity(0, sizeof only, &only) != 0) std::_Exit(10);
        if (mproc::cpu_count() != 1) std::_Exit(11);
        mproc::Pool pool;
        if (pool.processes() != 1) std::_Exit(12);
        pool.close();
        pool.join();
        std::_Exit(0);
    });
    one.start();
    REQUIRE(one.join(120s));
    CHECK(one.exitcode() == 0);

    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    if (CPU_COUNT(&allowed) >= 2) {
        // Two of the allowed CPUs: 2, whatever the machine has online.
        mproc::Process two([first, &allowed] {
            cpu_set_t pair;
            CPU_ZERO(&pair);
            CPU_SET(first, &pair);
            int second = first + 1;
            while (!CPU_ISSET(second, &allowed)) ++second;
            CPU_SET(second, &pair);
            if (::sched_setaffinity(0, sizeof pair, &pair) != 0) std::_Exit(10);
            std::_Exit(mproc::cpu_count() == 2 ? 0 : 11);
        });
        two.start();
        REQUIRE(two.join(60s));
        CHECK(two.exitcode() == 0);
    }
    CHECK(online >= 1);
}

TEST_CASE(
    "the first process of a pid namespace (a container's entry point) ends on SIGTERM with 143, its children gone") {
    // A namespace's first process is not killed by a signal's default action, so the guard's
    // handler, having ended the children, would return and let the program run on — to park for
    // ever in its next exit(), which waits for the death it took for granted.
    mproc::Process outer([] {
        if (::unshare(CLONE_NEWPID) != 0) std::_Exit(77);
        const pid_t init = ::fork();
        if (init == 0) {  // pid 1 of the new namespace
            for (int sig : {SIGINT, SIGTERM}) ::signal(sig, SIG_DFL);  // not the test runner's handlers
            mproc::ChildGuard guard;
            mproc::Process child([] {
                for (;;) ::pause();
            });
            child.start();
            ::kill(::getpid(), SIGTERM);  // as `docker stop` sends it
            std::exit(child.exitcode() == -SIGTERM ? 20 : 21);  // here only if the guard did not end this process
        }
        if (init < 0) std::_Exit(3);
        int status = 0;
        for (int waited_ms = 0; ::waitpid(init, &status, WNOHANG) != init; waited_ms += 10) {
            if (waited_ms >= 60'000) {
                ::kill(init, SIGKILL);
                while (::waitpid(init, &status, 0) < 0 && errno == EINTR) {}
                std::_Exit(4);  // it hung
            }
            ::usleep(10'000);
        }
        std::_Exit(WIFEXITED(status) ? WEXITSTATUS(status) : 5);
    });
    outer.start();
    REQUIRE(outer.join(120s));
    if (outer.exitcode() == 77) {
        WARN("skipped: this process may not make a pid namespace (CI runs as root, where it may)");
        return;
    }
    CHECK(outer.exitcode() == 128 + SIGTERM);
}

TEST_CASE(
    "a Process destroyed under a guard: its child kills and reaps a grandchild that only SIGKILL ends before it is killed itself") {
    // ~Process waits for its child after SIGTERM, then sends SIGKILL. The child, guarded, first
    // ends its own children within its share of the guard's grace: the destructor must wait at
    // least that long, or the grandchild is orphaned (here, to this test's process, a subreaper).
    if (under_tsan()) {  // the child's signal handlers never run there (see under_tsan)
        WARN("skipped under ThreadSanitizer: a child forked from this multithreaded process runs no signal handler");
        return;
    }
    mproc::Process outer([] {
        if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) std::_Exit(2);
        mproc::ChildGuard guard;
        int ready[2];
        if (::pipe2(ready, O_CLOEXEC) != 0) std::_Exit(3);
        {
            mproc::Process child([w = ready[1]] {
                mproc::Process grandchild([w] {
                    sigset_t both;
                    sigemptyset(&both);
                    sigaddset(&both, SIGINT);
                    sigaddset(&both, SIGTERM);
                    ::pthread_sigmask(SIG_BLOCK, &both, nullptr);
                    const char byte = 1;
                    if (::write(w, &byte, 1) != 1) std::_Exit(4);
                    for (;;) ::pause();
                });
                grandchild.start();
                grandchild.join();
            });
            child.start();
            char byte = 0;
            if (::read(ready[0], &byte, 1) != 1) std::_Exit(5);
        }  // ~Process: SIGTERM, a grace, SIGKILL
        // An orphan came here: it shows as a child that ended (it died by the parent-death signal).
        for (int waited_ms = 0; waited_ms < 2'000; waited_ms += 10) {
            siginfo_t info{};
            if (::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) != 0) std::_Exit(errno == ECHILD ? 0 : 6);
            if (info.si_pid != 0) std::_Exit(1);
            ::usleep(10'000);
        }
        std::_Exit(7);
    });
    outer.start();
    REQUIRE(outer.join(120s));
    CHECK(outer.exitcode().value_or(-1) == 0);  // 1: the grandchild was orphaned
}

TEST_CASE("once the last guard is gone, terminate_children gives the default grace, not that guard's") {
    if (under_tsan()) {  // the child's signal handlers never run there (see under_tsan)
        WARN("skipped under ThreadSanitizer: a child forked from this multithreaded process runs no signal handler");
        return;
    }
    { mproc::ChildGuard brief(mproc::Seconds{0}); }
    int ready[2];
    REQUIRE(::pipe2(ready, O_CLOEXEC) == 0);
    mproc::Process child([w = ready[1]] {
        ::signal(SIGTERM, [](int) { ::_exit(3); });  // ends on SIGTERM, well within a second
        const char byte = 1;
        if (::write(w, &byte, 1) != 1) std::_Exit(4);
        for (;;) ::pause();
    });
    child.start();
    ::close(ready[1]);
    char byte = 0;
    REQUIRE(::read(ready[0], &byte, 1) == 1);
    ::close(ready[0]);
    mproc::ChildGuard::terminate_children();  // a grace of 0 would send SIGKILL right after SIGTERM
    REQUIRE(child.join(60s));
    CHECK(child.exitcode().value_or(-1) == 3);
}

TEST_CASE("terminate_children on a thread holding one of mproc's fork locks does not wait for a fork blocked on it") {
    // A guard's handler runs on whatever thread the signal interrupted, which may hold one of the
    // locks every fork takes (here the one a ChildGuard is made under). A fork on another thread
    // then waits for that lock: the cleanup must not wait for that fork (it waited 5 s, its cap,
    // and a parent's SIGKILL could come meanwhile), and the fork goes ahead once the lock is free.
    mproc::detail::guard_transition().lock();
    std::atomic<bool> asked{false};
    int exitcode = -100;
    std::thread other([&] {
        mproc::Process p([] { std::_Exit(6); });
        asked = true;
        try {
            p.start();  // its fork waits for the lock
            if (p.join(60s)) exitcode = p.exitcode().value_or(-101);
        } catch (const mproc::Error& e) {
            exitcode = -102;
        }
    });
    while (!asked) std::this_thread::sleep_for(1ms);
    std::this_thread::sleep_for(200ms);  // into the fork, waiting for the lock
    const auto start = std::chrono::steady_clock::now();
    mproc::ChildGuard::terminate_children();
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    mproc::detail::guard_transition().unlock();
    other.join();
    CHECK(took < 2.5);  // 5.0 before the fix
    CHECK(exitcode == 6);
}

namespace {
void let_the_fork_go_at_exit() {
    mproc::detail::guard_transition().unlock();
    std::this_thread::sleep_for(300ms);  // the other thread's fork goes ahead, or is refused
}
}  // namespace

TEST_CASE("a fork that was waiting for a lock while the guard ended the children at exit is refused, not orphaned") {
    // The guard's exit hook no longer waits for a fork that waits for a fork lock (the thread
    // that exits may hold it). Such a fork, let go afterwards, must not make a child that the
    // cleanup missed: it would be orphaned. Here the lock is let go by an exit hook that runs
    // after the guard's; the orphan would come to `outer`, a subreaper.
    mproc::Process outer([] {
        if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) std::_Exit(2);
        mproc::Process exiting([] {
            if (std::atexit(let_the_fork_go_at_exit) != 0) std::_Exit(3);  // runs after the guard's hook
            mproc::ChildGuard guard;  // never destroyed: exit() does not unwind
            mproc::detail::guard_transition().lock();
            static std::atomic<bool> asked{false};
            std::thread([] {
                mproc::Process late([] {
                    for (;;) ::pause();
                });
                asked = true;
                try {
                    late.start();  // waits for the lock, then is refused: the process is ending
                } catch (const mproc::Error&) {}
                for (;;) ::pause();
            }).detach();
            while (!asked) std::this_thread::sleep_for(1ms);
            std::this_thread::sleep_for(100ms);  // into the fork, waiting for the lock
            std::exit(0);
        });
        exiting.start();
        if (!exiting.join(60s)) std::_Exit(4);
        for (int waited_ms = 0; waited_ms < 2'000; waited_ms += 10) {
            siginfo_t info{};
            if (::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) != 0) std::_Exit(errno == ECHILD ? 0 : 6);
            if (info.si_pid != 0) std::_Exit(1);  // an orphan
            ::usleep(10'000);
        }
        std::_Exit(7);
    });
    outer.start();
    REQUIRE(outer.join(120s));
    CHECK(outer.exitcode().value_or(-1) == 0);  // 1: a child born after the cleanup was orphaned
}

namespace {
std::mutex library_lock;  // a library's, which its own fork handlers take
}  // namespace

TEST_CASE("a library's fork handler and mproc's locks: a fork never takes them in the order that deadlocks") {
    // Another library's pthread_atfork prepare handler, registered after mproc's, runs before it
    // and takes that library's lock; a thread holding that lock then makes a Queue (mproc's
    // registry lock). mproc's locks must be taken after the library's, as its prepare handler
    // runs last: a fork that took them first waited for the library's lock while that thread
    // waited for mproc's.
    mproc::Process sandbox([] {
        ::alarm(60);  // a deadlock ends as SIGALRM
        { mproc::Queue<int> warm; }
        ::pthread_atfork([] { library_lock.lock(); }, [] { library_lock.unlock(); }, [] { library_lock.unlock(); });
        std::thread holder([] {
            const std::lock_guard hold(library_lock);
            std::this_thread::sleep_for(200ms);  // the main thread is in its fork by now
            mproc::Queue<int> q;
        });
        std::this_thread::sleep_for(50ms);
        mproc::Process p([] { std::_Exit(5); });
        p.start();
        const bool ended = p.join(60s);
        holder.join();
        std::_Exit(ended && p.exitcode() == 5 ? 0 : 1);
    });
    sandbox.start();
    REQUIRE(sandbox.join(120s));
    CHECK(sandbox.exitcode().value_or(-1) == 0);  // -SIGALRM: deadlocked
}

TEST_CASE("a child whose target returns while another of its threads starts processes leaves none of them to init") {
    // The child's normal end ends its own children; from then on no new one may start there (it
    // would be born after that cleanup, and orphaned). The orphans would come to `sandbox`.
    mproc::Process sandbox([] {
        if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) std::_Exit(2);
        mproc::ChildGuard guard(mproc::Seconds{0.2});  // the child's cleanup: 0.15 s for the stubborn one
        mproc::Process child([] {
            static std::atomic<int> started{0};
            std::thread([] {
                auto* kept = new std::vector<mproc::Process>;  // never destroyed: the target's return ends them
                kept->reserve(100'000);
                for (int i = 0; i < 100'000; ++i) {  // until refused: the process is ending
                    kept->emplace_back([stubborn = i == 0] {
                        if (stubborn) {  // the cleanup waits out its grace for this one
                            sigset_t term;
                            sigemptyset(&term);
                            sigaddset(&term, SIGTERM);
                            ::pthread_sigmask(SIG_BLOCK, &term, nullptr);
                        }
                        for (;;) ::pause();
                    });
                    try {
                        kept->back().start();
                    } catch (const mproc::Error&) {
                        break;  // refused: this process is ending
                    }
                    ++started;
                }
            }).detach();
            while (started < 10) std::this_thread::sleep_for(1ms);  // return with the starts going on
        });
        child.start();
        if (!child.join(60s)) std::_Exit(3);
        int orphans = 0;
        for (;;) {
            siginfo_t info{};
            if (::waitid(P_ALL, 0, &info, WEXITED) != 0) break;  // ECHILD: none left
            ++orphans;
        }
        std::_Exit(orphans == 0 ? 0 : 1);
    });
    sandbox.start();
    REQUIRE(sandbox.join(120s));
    CHECK(sandbox.exitcode().value_or(-1) == 0);  // 1: some were orphaned
}
