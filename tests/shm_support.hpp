// Helpers for the shared-memory tests (Queue, SharedDict, sync): what /dev/shm holds, how much CPU
// a process has used, checksums, and waiting for a condition without hanging.
#pragma once

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <dirent.h>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <sys/types.h>
#include <thread>
#include <unistd.h>

namespace mproc_test {

/// The names in /dev/shm that mproc could have given a file (every name mproc gives shared memory
/// contains "mproc", in any case); empty if /dev/shm does not exist. Other programs on the machine
/// may create files there while a test runs, so the tests compare only these. The whole-suite
/// check (tests/shm_no_dev_shm.cmake) runs the suites on a /dev/shm of their own where it can,
/// and there any new file at all fails.
inline std::set<std::string> dev_shm_names() {
    std::set<std::string> names;
    if (DIR* dir = ::opendir("/dev/shm")) {
        while (dirent* entry = ::readdir(dir)) {
            std::string lower = entry->d_name;
            for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
            if (lower.find("mproc") != std::string::npos) names.insert(entry->d_name);
        }
        ::closedir(dir);
    }
    return names;
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/<pid>/stat); -1 if gone.
inline long cpu_ticks(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line)) return -1;
    const auto close = line.rfind(')');
    if (close == std::string::npos) return -1;
    std::istringstream rest(line.substr(close + 2));
    std::string field;
    // After "pid (comm) ", the state is field 3; utime and stime are fields 14 and 15.
    long utime = 0, stime = 0;
    for (int index = 3; index <= 15 && rest >> field; ++index) {
        if (index == 14) utime = std::stol(field);
        if (index == 15) stime = std::stol(field);
    }
    return utime + stime;
}

/// FNV-1a over bytes: what the stress tests use to see that a message arrived intact.
inline std::uint64_t checksum(const std::string& bytes) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (const char c : bytes) {
        h ^= static_cast<unsigned char>(c);
        h *= 0x100000001b3ull;
    }
    return h;
}

/// Polls `condition` until it holds (true) or `timeout` passes (false): turns a hang into a failure.
inline bool eventually(const std::function<bool()>& condition,
                       std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (!condition()) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
}

/// True when this build runs under ThreadSanitizer or AddressSanitizer (the stress tests shrink).
constexpr bool under_sanitizer() {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
    return true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
    return true;
#else
    return false;
#endif
#else
    return false;
#endif
}

}  // namespace mproc_test

// ---- Looking inside shared objects (for the robustness and leak tests) ------------------------

#include <cstddef>
#include <pthread.h>
#include <stdexcept>
#include <tuple>
#include <vector>

#include <mproc/detail/shm/registry.hpp>
#include <mproc/detail/shm/robust_mutex.hpp>
#include <mproc/serialize.hpp>

namespace mproc_test {

/// Where the shared object behind `handle` lives in this process: a handle encodes as
/// (segment id, offset), and the registry maps the id to this process's mapping.
template <class Handle> std::byte* object_address(const Handle& handle) {
    const auto bytes = mproc::to_bytes(handle);
    const auto [id, offset] = mproc::from_bytes<std::tuple<std::uint64_t, std::uint64_t>>(bytes);
    const auto segment = mproc::detail::segments().find(id);
    if (!segment) throw std::runtime_error("object_address: segment not mapped here");
    return segment->base() + offset;
}

/// True when the last holder of `mutex` died holding it and no one has locked it since: the
/// kernel marks the futex word FUTEX_OWNER_DIED when it walks a dead thread's robust list.
/// (glibc keeps that word in __data.__lock; a RobustMutex is a pthread_mutex_t and nothing else.)
inline bool died_holding(const mproc::detail::RobustMutex& mutex) {
    static_assert(sizeof(mproc::detail::RobustMutex) == sizeof(pthread_mutex_t));
    const auto* raw = reinterpret_cast<const pthread_mutex_t*>(&mutex);
    return (__atomic_load_n(&raw->__data.__lock, __ATOMIC_ACQUIRE) & 0x40000000) != 0;
}

/// The pathname of every mapping in /proc/<pid>/maps that has one (the sixth field, to the end of
/// the line: "/usr/lib/libc.so.6", "/memfd:mproc-queue (deleted)", "[heap]").
inline std::vector<std::string> mapping_paths(pid_t pid) {
    std::vector<std::string> paths;
    std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
    for (std::string line; std::getline(maps, line);) {
        // address perms offset dev inode, then spaces, then the pathname (which may hold spaces).
        std::size_t at = 0;
        for (int field = 0; field < 5 && at != std::string::npos; ++field) {
            at = line.find(' ', at);
            if (at != std::string::npos) at = line.find_first_not_of(' ', at);
        }
        if (at != std::string::npos) paths.push_back(line.substr(at));
    }
    return paths;
}

/// The mappings of memfds that mproc named `name` ("mproc-queue", "mproc-dict", ...), or every
/// mproc memfd when `name` is "mproc-": the pathname is exactly "/memfd:<name>" (with " (deleted)"),
/// so a build folder or program path that happens to contain "mproc-" never counts.
inline std::vector<std::string> memfd_mappings(pid_t pid, const std::string& name) {
    std::vector<std::string> found;
    const std::string token = "/memfd:" + name;
    for (const std::string& path : mapping_paths(pid)) {
        if (path.compare(0, token.size(), token) != 0) continue;
        const std::string rest = path.substr(token.size());
        const bool exact = rest.empty() || rest == " (deleted)";
        // "mproc-" alone is a prefix: any mproc memfd ("mproc-queue", "mproc-objects", ...).
        const bool any_mproc = name == "mproc-" && rest.find('/') == std::string::npos;
        if (exact || any_mproc) found.push_back(path);
    }
    return found;
}

/// The mappings of files under /dev/shm (POSIX shared memory), by pathname.
inline std::vector<std::string> dev_shm_mappings(pid_t pid) {
    std::vector<std::string> found;
    for (const std::string& path : mapping_paths(pid))
        if (path.rfind("/dev/shm/", 0) == 0) found.push_back(path);
    return found;
}

/// The mappings whose file is named like one of mproc's ("mproc-..." as the last path component,
/// a memfd's "memfd:mproc-..." included): each must be a memfd, never a file anywhere.
inline std::vector<std::string> mproc_named_mappings(pid_t pid) {
    std::vector<std::string> found;
    for (const std::string& path : mapping_paths(pid)) {
        std::string file = path.substr(0, path.find(" (deleted)"));
        file = file.substr(file.rfind('/') + 1);
        if (file.rfind("mproc-", 0) == 0 || file.rfind("memfd:mproc-", 0) == 0) found.push_back(path);
    }
    return found;
}

}  // namespace mproc_test
