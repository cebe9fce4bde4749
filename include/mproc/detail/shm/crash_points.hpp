// mproc — named points between the steps of a change to shared state, where a test may kill the
// process that makes it.
//
// A process can be killed at any instruction, and what it leaves in shared memory must be put
// right by the next one to take the lock. The places where that matters are the boundaries between
// the steps a change makes (a publish, a hand-back of memory, an update of the RefTable), and each
// is marked with crash_point("name"). A test installs a hook in a child (crash_hook), which kills
// itself at a chosen point, and then checks what the next process finds. In every other program
// the hook is null and a point costs one relaxed load; the points sit on the paths a change takes
// rarely (a chunk handed back, a stream withdrawn), not on an item's.
#pragma once

#include <atomic>

namespace mproc::detail {

/// Called at every crash point with its name, when set (tests only).
inline std::atomic<void (*)(const char*)> crash_hook{nullptr};

inline void crash_point(const char* name) noexcept {
    if (void (*hook)(const char*) = crash_hook.load(std::memory_order_relaxed)) hook(name);
}

}  // namespace mproc::detail
