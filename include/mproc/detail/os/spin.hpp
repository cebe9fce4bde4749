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
#include "cpu.hpp"

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
/// iterations it yields, so a thread that shares this CPU (the one that would publish) runs. A
/// thread that may run on one CPU only yields at every look instead: its peer is then either on
/// that CPU and runs at once, or on another and the yield returns at once (a few hundred pauses
/// between yields cost a peer on the same CPU about 10 µs per wait on this VM). The price, for a
/// waiter pinned to one CPU whose peer is pinned to another: a system call per look instead of a
/// pause, so it notices a publish a fraction of a microsecond later.
template <class Ready> bool spin_until(Ready&& ready, std::chrono::microseconds budget) noexcept {
    const auto start = Clock::now();
    const auto until = start + budget;
    if (on_one_cpu(std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count())) {
        for (;;) {
            if (ready()) return true;
            if (Clock::now() >= until) return ready();
            ::sched_yield();
        }
    }
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
