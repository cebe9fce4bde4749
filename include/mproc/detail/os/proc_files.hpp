// mproc — reading the small files of /proc: what a process's memory use (memory_use.hpp) and a
// Pool's stall check (how long a worker receiving a large task has run) are read from.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

namespace mproc::detail {

/// Reads a small /proc file into `text` (NUL-terminated); false when it cannot be read.
inline bool read_proc_file(const char* path, char* text, std::size_t size) noexcept {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    std::size_t got = 0;
    while (got + 1 < size) {
        const ssize_t n = ::read(fd, text + got, size - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    text[got] = '\0';
    return got > 0;
}

/// How long the main thread of process `pid` has run on a CPU, in nanoseconds, from
/// /proc/<pid>/schedstat; -1 when it cannot be read (the process is gone). It moves while the
/// thread runs, whatever it does, and stands still while it sleeps or is stopped.
inline std::int64_t run_time_ns(pid_t pid) noexcept {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/schedstat", static_cast<int>(pid));
    char text[128];
    if (!read_proc_file(path, text, sizeof text)) return -1;
    return static_cast<std::int64_t>(std::strtoull(text, nullptr, 10));
}

}  // namespace mproc::detail
