// mproc — how many CPUs this process may run on: what cpu_count() reports, a default Pool's size,
// and whether a short watch for a peer should yield at every look (on_one_cpu).
#pragma once

#include <cstdint>
#include <sched.h>
#include <unistd.h>

#include "clock.hpp"

namespace mproc {

namespace detail {

/// The CPUs in this process's affinity mask; the online CPUs if the mask cannot be read.
inline unsigned affinity_cpu_count() noexcept {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return static_cast<unsigned>(n);
    }
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? static_cast<unsigned>(n) : 1u;
}

/// True when the calling thread may run on one CPU only (its affinity mask): then whoever would
/// publish what it waits for runs on that CPU too, or elsewhere, but never beside a spin of its own
/// on the same core. `now` is monotonic_ns() as the caller just read it; the mask is looked up
/// again at most every 100 ms (a thread's mask rarely changes; the system call costs about as
/// much as the wait it would shorten).
inline bool on_one_cpu(std::int64_t now) noexcept {
    thread_local std::int64_t looked_ns = 0;
    thread_local bool one = false;
    if (looked_ns == 0 || now - looked_ns >= 100'000'000) {
        one = affinity_cpu_count() == 1;
        looked_ns = now;
    }
    return one;
}
inline bool on_one_cpu() noexcept { return on_one_cpu(monotonic_ns()); }

}  // namespace detail

/// The number of CPUs this process may run on (its affinity mask), not merely the machine's.
inline unsigned cpu_count() noexcept { return detail::affinity_cpu_count(); }

}  // namespace mproc
