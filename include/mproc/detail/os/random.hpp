// mproc — random numbers for ids and seeds that must not repeat across processes.
#pragma once

#include <atomic>
#include <cstdint>
#include <ctime>
#include <sys/random.h>
#include <unistd.h>

namespace mproc::detail {

/// 64 random bits from the kernel. With no entropy yet (early boot), the process id, the time
/// and a counter: unique enough within one machine, which is all its callers need.
inline std::uint64_t random_u64() noexcept {
    std::uint64_t value = 0;
    if (::getrandom(&value, sizeof value, GRND_NONBLOCK) == static_cast<ssize_t>(sizeof value)) return value;
    static std::atomic<std::uint64_t> counter{0};
    timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC, &now);
    return (static_cast<std::uint64_t>(::getpid()) << 40) ^ (static_cast<std::uint64_t>(now.tv_nsec) << 8) ^
           static_cast<std::uint64_t>(now.tv_sec) ^ (counter.fetch_add(1, std::memory_order_relaxed) << 20);
}

}  // namespace mproc::detail
