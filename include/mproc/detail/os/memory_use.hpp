// mproc — how much memory a process uses, and a cap on what it may allocate: what a Pool's
// memory options (PoolOptions::max_memory_per_child, memory_limit) and its stats() read and set;
// and a hint that a large buffer about to be filled should get huge pages.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <unistd.h>

#include "proc_files.hpp"

namespace mproc::detail {

/// The size from which a private buffer that is about to be written whole asks for huge pages.
inline constexpr std::size_t huge_buffer_bytes = std::size_t{4} << 20;

/// Asks the kernel for transparent huge pages in the whole 2 MiB pages inside [data, data +
/// bytes), for a freshly allocated buffer that is about to be written whole (a large item a
/// Queue's get copies into its value): one fault per 2 MiB instead of 512. Below
/// huge_buffer_bytes it does nothing. Only a hint: where huge pages are off (or the range is not
/// anonymous memory), madvise fails or is ignored, and the buffer gets small pages as before.
inline void advise_huge_pages(void* data, std::size_t bytes) noexcept {
    if (bytes < huge_buffer_bytes) return;
    constexpr std::uintptr_t huge = std::uintptr_t{2} << 20;
    const auto begin = reinterpret_cast<std::uintptr_t>(data);
    const std::uintptr_t first = (begin + huge - 1) & ~(huge - 1);
    const std::uintptr_t last = (begin + bytes) & ~(huge - 1);
    // NOLINTNEXTLINE(performance-no-int-to-ptr): page arithmetic on an address we were given
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

/// The resident memory of process `pid` (0: this one) in bytes, from /proc/<pid>/statm; 0 when
/// it cannot be read (the process is gone).
inline std::size_t resident_bytes(pid_t pid = 0) noexcept {
    char path[64];
    if (pid == 0) std::snprintf(path, sizeof path, "/proc/self/statm");
    else std::snprintf(path, sizeof path, "/proc/%d/statm", static_cast<int>(pid));
    char text[256];
    if (!read_proc_file(path, text, sizeof text)) return 0;
    char* end = nullptr;
    (void)std::strtoull(text, &end, 10);  // the size; the resident pages follow
    const unsigned long long pages = std::strtoull(end, nullptr, 10);
    return static_cast<std::size_t>(pages) * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

/// This process's data segment as RLIMIT_DATA counts it (private writable mappings and the heap),
/// in bytes, from VmData in /proc/self/status; 0 when it cannot be read.
inline std::size_t data_bytes() noexcept {
    char text[4096];
    if (!read_proc_file("/proc/self/status", text, sizeof text)) return 0;
    const char* line = std::strstr(text, "VmData:");
    if (!line) return 0;
    return static_cast<std::size_t>(std::strtoull(line + 7, nullptr, 10)) * 1024;  // in kB
}

/// Lets this process allocate at most `bytes` more than it holds now: RLIMIT_DATA set to its data
/// segment plus `bytes`. An allocation past it fails (malloc returns null, operator new throws or
/// calls the new-handler). Returns false when the limit cannot be set.
inline bool limit_new_data(std::size_t bytes) noexcept {
    const std::size_t now = data_bytes();
    rlimit limit{};
    if (::getrlimit(RLIMIT_DATA, &limit) != 0) return false;
    // A limit past what the counter holds is no limit (the sum would wrap below `now`).
    const rlim_t wanted = bytes >= RLIM_INFINITY - static_cast<rlim_t>(now)
                              ? RLIM_INFINITY
                              : static_cast<rlim_t>(now) + static_cast<rlim_t>(bytes);
    limit.rlim_cur = limit.rlim_max == RLIM_INFINITY ? wanted : (wanted < limit.rlim_max ? wanted : limit.rlim_max);
    return ::setrlimit(RLIMIT_DATA, &limit) == 0;
}

}  // namespace mproc::detail
