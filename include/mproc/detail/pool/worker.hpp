// mproc — a Pool worker's life: run the initializer, then answer tasks until the pool closes.
//
// Tasks arrive on the seat's task ring (large ones on the socket, announced in the ring); each
// result goes back on the result ring (large ones on the socket) as soon as its task is done, so
// a worker that dies loses no finished result. A worker with nothing to do sleeps on a futex.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "../os/clock.hpp"
#include "../os/framing.hpp"
#include "../os/io.hpp"
#include "../os/unique_fd.hpp"
#include "../serialize/remote_exception.hpp"
#include "invoke.hpp"
#include "link.hpp"
#include "ring.hpp"
#include "wire.hpp"

namespace mproc::detail {

struct WorkerConfig {
    std::function<void()> initializer;
    unsigned long max_tasks = 0;  // 0: unlimited
    bool timed = false;
};

/// What one worker talks through: its seat's memory, and its socket for frames too large for a ring.
struct SeatLink {
    SpscRing tasks;
    SpscRing results;
    SeatStatus& status;
    PoolShared& shared;
    int wake_fd;
    UniqueFd socket;
};

inline bool send_frame_blocking(int fd, std::span<const std::byte> left) {
    while (!left.empty()) {
        const ssize_t put = write_some(fd, left.data(), left.size(), /*is_socket=*/true);
        if (put < 0) return false;  // the pool is gone: nothing left to do
        left = left.subspan(static_cast<std::size_t>(put));
    }
    return true;
}

/// Publishes one result frame (with its frame header) and wakes the collector if it sleeps.
inline bool send_result(SeatLink& link, const Buffer& frame) {
    const std::span<const std::byte> body = frame.bytes().subspan(frame_header_size);
    if (body.size() <= link.results.max_payload()) {
        link.results.wait_for_room(body.size());
        link.results.try_push(SpscRing::data, body);
    } else {
        link.results.wait_for_room(0);
        link.results.try_push(SpscRing::socket, {});
        wake_collector(link.shared, link.wake_fd);
        if (!send_frame_blocking(link.socket.get(), frame.bytes())) return false;
    }
    wake_collector(link.shared, link.wake_fd);
    return true;
}

/// Runs one task and writes its result frame into `out` (also used by mproc/mpi.hpp's workers).
/// The status says `running` from the first item to the last, then `delivering`: the time the
/// result then takes to reach the pool is not the task's.
inline void run_task(const TaskView& task, SeatStatus& status, bool timed, Buffer& out) {
    const std::int64_t begun = monotonic_ns();
    Writer w = begin_result_frame(out, task.task_id);
    status.task_id.store(task.task_id, std::memory_order_relaxed);
    status.item.store(0, std::memory_order_relaxed);
    if (timed) status.started_ns.store(begun, std::memory_order_relaxed);
    status.enter(TaskPhase::running);
    Reader r(task.payload);
    ChunkContext context{r, w, status, task.skips, task.task_id, task.count, timed};
    try {
        task.invoker(context);
    } catch (...) {
        // The chunk itself could not be decoded: every item of it fails with the reason.
        fail_every_item(out, task.count, RemoteException::capture());
    }
    status.enter(TaskPhase::delivering);
    finish_result_frame(out, monotonic_ns() - begun);
}

/// The hello frame: task id 0, then the initializer's outcome.
inline void write_hello(Buffer& out, const std::function<void()>& initializer, bool& ok) {
    Writer w = begin_result_frame(out, hello_task_id);
    ok = true;
    try {
        if (initializer) initializer();
        write_void_outcome(w);
    } catch (...) {
        ok = false;
        write_exception_outcome(w, RemoteException::capture());
    }
    finish_result_frame(out, 0);
}

/// The body of a worker process; returns its exit status.
inline int worker_main(SeatLink link, const WorkerConfig& config) {
    Buffer out;
    {
        bool ok = true;
        write_hello(out, config.initializer, ok);
        if (!send_result(link, out) || !ok) return ok ? 0 : 1;
    }

    FrameReader socket_in;
    unsigned long done = 0;
    unsigned since_sleep = 0;  // tasks run since this worker last slept
    for (;;) {
        const auto record = link.tasks.peek(link.tasks.head());
        if (!record) {
            if (link.tasks.closed()) return 0;  // the pool is done with us
            // Tasks arriving in a stream: watch for the next one before sleeping. A lone task
            // (apply, one at a time) does not spin: the CPU is better left to the parent.
            if (since_sleep >= 2 && spin_until([&] { return !link.tasks.empty() || link.tasks.closed(); }, ring_spin))
                continue;
            since_sleep = 0;
            link.tasks.wait_for_data(Clock::now() + recheck_interval);
            continue;
        }
        ++since_sleep;
        link.status.begun.fetch_add(1, std::memory_order_release);
        std::span<const std::byte> body = record->payload;
        const bool on_socket = record->kind == SpscRing::socket;
        if (on_socket) {
            while (!socket_in.buffered_frame()) {
                const ssize_t got = socket_in.fill(link.socket.get());
                if (got <= 0) return 0;
            }
            body = *socket_in.buffered_frame();
        }
        run_task(parse_task(body), link.status, config.timed, out);
        if (on_socket) socket_in.consume(body);
        link.tasks.consume_to(record->end);
        const bool sent = send_result(link, out);
        link.status.enter(TaskPhase::idle);
        if (!sent) return 0;
        if (config.max_tasks != 0 && ++done >= config.max_tasks) return 0;
    }
}

}  // namespace mproc::detail
