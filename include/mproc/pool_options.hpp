// mproc — how a Pool is built (pool.hpp). Its own header so the engine that runs the pool's
// workers can take it without the rest of the Pool.
#pragma once

#include <cstddef>
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
    /// Soft memory cap, in bytes: after a task, a worker whose resident memory is above it exits
    /// and is replaced (a leaking task cannot grow a worker without end). 0: none.
    std::size_t max_memory_per_child = 0;
    /// Hard memory cap, in bytes: what a worker may allocate beyond what it inherited from the
    /// parent. An allocation past it ends the worker; its item fails with MemoryLimitExceeded
    /// (or runs again, see max_retries) and the worker is replaced. 0: none.
    std::size_t memory_limit = 0;
    /// How many times an item whose worker was lost (killed by a signal, exited, went past
    /// memory_limit) runs again on a fresh worker before it fails. Not for an exception the task
    /// threw, a task_timeout, or a cancel. Per call: CallOptions::max_retries.
    unsigned max_retries = 0;
    /// Watchdog: when work is pending and for this long no task finishes and no worker moves on
    /// to another item, the pending results fail with TimeoutError naming the stuck workers (which
    /// are replaced), instead of the pool hanging. Unset: none.
    std::optional<Seconds> stall_timeout = std::nullopt;
};

/// Options of one Pool call (apply_async, map, imap, ...), overriding the pool's own.
struct CallOptions {
    /// PoolOptions::max_retries for this call's items.
    std::optional<unsigned> max_retries = std::nullopt;
};

}  // namespace mproc
