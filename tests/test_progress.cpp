// mproc::progress draws a bar on a terminal, and nothing elsewhere.
#include <catch2/catch.hpp>
#include <mproc/pool.hpp>
#include <mproc/progress.hpp>

#include <cerrno>
#include <poll.h>
#include <pty.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

int square(int x) { return x * x; }

/// Runs `body` in a child whose stderr is the slave side of a fresh pseudo-terminal (or, when
/// `terminal` is false, a pipe) and returns everything it wrote there.
template <class Body> std::string stderr_of(Body body, bool terminal) {
    int master = -1;
    int fds[2] = {-1, -1};
    pid_t pid;
    if (terminal) {
        pid = ::forkpty(&master, nullptr, nullptr, nullptr);
    } else {
        REQUIRE(::pipe(fds) == 0);
        pid = ::fork();
    }
    REQUIRE(pid >= 0);
    if (pid == 0) {
        if (!terminal) {
            ::dup2(fds[1], STDERR_FILENO);
            ::close(fds[0]);
        }
        body();
        ::_exit(0);
    }
    const int reader = terminal ? master : fds[0];
    if (!terminal) ::close(fds[1]);
    std::string out;
    char chunk[4096];
    for (;;) {
        pollfd p{reader, POLLIN, 0};
        if (::poll(&p, 1, 60'000) <= 0) break;  // a hang fails the test below instead of the suite
        const ssize_t n = ::read(reader, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;  // EIO on a pty once the child has gone
        out.append(chunk, static_cast<std::size_t>(n));
    }
    ::close(reader);
    int status = 0;
    ::waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    return out;
}

std::string last_line(const std::string& text) {
    std::string line;
    std::size_t end = text.find_last_not_of("\r\n");
    if (end == std::string::npos) return line;
    std::size_t begin = text.find_last_of('\r', end);
    return text.substr(begin == std::string::npos ? 0 : begin + 1,
                       end - (begin == std::string::npos ? 0 : begin + 1) + 1);
}

}  // namespace

TEST_CASE("progress draws a bar through a pseudo-terminal and ends at the total") {
    const std::string out = stderr_of(
        [] {
            mproc::Pool pool(2);
            std::vector<int> xs(200);
            for (int i = 0; i < 200; ++i) xs[static_cast<std::size_t>(i)] = i;
            long sum = 0;
            for (int v : mproc::progress(pool.imap(square, xs), xs.size())) sum += v;
            if (sum != 2646700) ::_exit(3);
        },
        true);
    const std::string final_line = last_line(out);
    INFO(out);
    CHECK(final_line.find("100%|") == 0);
    CHECK(final_line.find("| 200/200 [") != std::string::npos);
    CHECK(final_line.find("it/s]") != std::string::npos);
    CHECK(out.find('\n') != std::string::npos);
}

TEST_CASE("progress given the pool shows how busy its workers are") {
    const std::string out = stderr_of(
        [] {
            mproc::Pool pool(2);
            std::vector<int> xs(100);
            for (int i = 0; i < 100; ++i) xs[static_cast<std::size_t>(i)] = i;
            long sum = 0;
            for (int v : mproc::progress(pool.imap(square, xs), xs.size(), pool)) sum += v;
            if (sum != 328350) ::_exit(3);
        },
        true);
    const std::string final_line = last_line(out);
    INFO(out);
    CHECK(final_line.find("| 100/100 [") != std::string::npos);
    CHECK(final_line.find("/2 workers, ") != std::string::npos);
    CHECK(final_line.find("% since start") != std::string::npos);
}

TEST_CASE("progress is silent when stderr is not a terminal") {
    const std::string out = stderr_of(
        [] {
            std::vector<int> xs(50, 1);
            int n = 0;
            for (int v : mproc::progress(xs)) n += v;
            if (n != 50) ::_exit(3);
        },
        false);
    CHECK(out.empty());
}

TEST_CASE("progress_line formats count, percentage, rate and ETA") {
    const std::string line = mproc::detail::progress_line(370, 1000, 1.0);
    CHECK(line.find(" 37%|") == 0);
    CHECK(line.find("| 370/1000 [00:01<00:02, 370.00it/s]") != std::string::npos);
}
