// mproc — waiting a few microseconds for another process, awake, before sleeping.
//
// A peer that is busy publishes again within microseconds; catching that awake spares both sides
// a futex system call (and the context switches behind it). The Queue watches its ring this way
// before a consumer sleeps and while a producer paces itself, and the Pool's rings do before a side
// sleeps. Every such watch is bounded, so an idle waiter still sleeps at once after it.
#pragma once

#include <chrono>
#include <sched.h>

#include "clock.hpp"

namespace mproc::detail {

/// Tells the CPU this thread is in a spin-wait loop (a hint that frees the core's resources for
/// its sibling hyperthread and saves power); nothing on other architectures.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

/// Busy-waits until `ready()` or `budget` has passed; returns ready(). Every few hundred
/// iterations it yields, so a thread that shares this CPU (the one that would publish) runs.
template <class Ready> bool spin_until(Ready&& ready, std::chrono::microseconds budget) noexcept {
    const auto until = Clock::now() + budget;
    for (unsigned i = 1;; ++i) {
        if (ready()) return true;
        cpu_relax();
        if (i % 64 == 0) {
            if (Clock::now() >= until) return ready();
            if (i % 256 == 0) ::sched_yield();
        }
    }
}

}  // namespace mproc::detail
