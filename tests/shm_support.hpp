// Helpers for the shared-memory tests (Queue, SharedDict, sync): what /dev/shm holds, how much CPU
// a process has used, checksums, and waiting for a condition without hanging.
#pragma once

#include <algorithm>
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

/// The names in /dev/shm (empty if it does not exist).
inline std::set<std::string> dev_shm_names() {
    std::set<std::string> names;
    if (DIR* dir = ::opendir("/dev/shm")) {
        while (dirent* entry = ::readdir(dir)) {
            const std::string name = entry->d_name;
            if (name != "." && name != "..") names.insert(name);
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

#include <mproc/detail/robust_mutex.hpp>
#include <mproc/detail/shm_registry.hpp>
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

/// The lines of /proc/<pid>/maps that contain `needle`.
inline std::vector<std::string> maps_lines(pid_t pid, const std::string& needle) {
    std::vector<std::string> found;
    std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
    for (std::string line; std::getline(maps, line);)
        if (line.find(needle) != std::string::npos) found.push_back(line);
    return found;
}

}  // namespace mproc_test
