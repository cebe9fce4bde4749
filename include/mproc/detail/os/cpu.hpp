// mproc — how many CPUs this process may run on: what cpu_count() reports and a default Pool's size.
#pragma once

#include <sched.h>
#include <unistd.h>

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

}  // namespace detail

/// The number of CPUs this process may run on (its affinity mask), not merely the machine's.
inline unsigned cpu_count() noexcept { return detail::affinity_cpu_count(); }

}  // namespace mproc
