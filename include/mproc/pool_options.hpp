// mproc — how a Pool is built (pool.hpp). Its own header so the engine that runs the pool's
// workers can take it without the rest of the Pool.
#pragma once

#include <functional>
#include <optional>

#include "time.hpp"

namespace mproc {

/// How a Pool is built. Every field has a sensible default.
struct PoolOptions {
    /// Worker processes; 0 means cpu_count().
    unsigned processes = 0;
    /// Runs once in every worker when it starts, replacements included.
    std::function<void()> initializer = {};
    /// A worker that has run this many tasks (chunks, as in Python) exits and is replaced; 0: never.
    unsigned long max_tasks_per_child = 0;
    /// An item still running after this long is killed with its worker and fails with TimeoutError.
    std::optional<Seconds> task_timeout = std::nullopt;
};

}  // namespace mproc
