// mproc — a Pool worker's life: run the initializer, then answer tasks until the pool closes.
//
// Tasks arrive on the seat's task ring (large ones on the socket, announced in the ring); each
// result goes back on the result ring (large ones on the socket) as soon as its task is done, so
// a worker that dies loses no finished result. A worker with nothing to do sleeps on a futex.
//
// Cancel: the pool writes a cancelled call into the worker's SeatStatus, then sends the worker
// cancel_signal(). A worker about to run a task of a cancelled call skips it (every item
// "skipped"); the signal's handler ends a worker that is running one — the worker itself looks at
// what it runs, so a task that has finished, or the next one, is never the one ended.
#pragma once

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <new>
#include <span>
#include <unistd.h>

#include "../os/clock.hpp"
#include "../os/fork.hpp"
#include "../os/framing.hpp"
#include "../os/io.hpp"
#include "../os/memory_use.hpp"
#include "../os/unique_fd.hpp"
#include "../serialize/remote_exception.hpp"
#include "../shm/registry.hpp"
#include "invoke.hpp"
#include "link.hpp"
#include "ring.hpp"
#include "wire.hpp"

namespace mproc::detail {

struct WorkerConfig {
    std::function<void()> initializer;
    unsigned long max_tasks = 0;  // 0: unlimited
    std::size_t max_memory = 0;   // resident bytes after a task above which the worker leaves; 0: none
    std::size_t memory_limit = 0;  // bytes the worker may allocate beyond what it inherited; 0: none
    bool timed = false;
};

/// This worker's status, for its signal handler and new-handler (set once, as the worker starts).
inline std::atomic<SeatStatus*>& worker_status() noexcept {
    static std::atomic<SeatStatus*> status{nullptr};
    return status;
}

/// cancel_signal()'s handler: ends the worker if the task it is running is of a cancelled call.
/// Anything else (between tasks, delivering a result, another call's task) goes on untouched.
inline void on_cancel_signal(int) noexcept {
    SeatStatus* status = worker_status().load(std::memory_order_relaxed);
    if (!status || status->current_phase() != TaskPhase::running) return;
    if (!status->is_cancelled(status->call.load(std::memory_order_relaxed))) return;
    status->leave(WorkerExit::cancelled);
    ::kill(::getpid(), SIGKILL);
}

/// The new-handler of a worker with a memory_limit: an allocation past the limit ends the worker,
/// which says why first; the pool fails the item with MemoryLimitExceeded (or runs it again, see
/// max_retries) and replaces the worker. Ending the worker, not throwing std::bad_alloc, is what
/// makes the limit hard: nothing in the task can catch it and go on in a half-failed state.
inline void on_memory_limit() {
    if (SeatStatus* status = worker_status().load(std::memory_order_relaxed)) status->leave(WorkerExit::memory_limit);
    exit_child(3);
}

/// Arms the worker's cancel handler, and its memory limit when it has one.
inline void arm_worker(SeatStatus& status, const WorkerConfig& config) {
    worker_status().store(&status, std::memory_order_relaxed);
    struct sigaction action {};
    action.sa_handler = &on_cancel_signal;
    action.sa_flags = SA_RESTART;
    ::sigemptyset(&action.sa_mask);
    ::sigaction(cancel_signal(), &action, nullptr);
    sigset_t mine;
    ::sigemptyset(&mine);
    ::sigaddset(&mine, cancel_signal());
    ::pthread_sigmask(SIG_UNBLOCK, &mine, nullptr);
    if (config.memory_limit != 0) {
        std::set_new_handler(&on_memory_limit);
        limit_new_data(config.memory_limit);
    }
}

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
/// result then takes to reach the pool is not the task's. A task of a cancelled call is not run:
/// its items come back skipped.
inline void run_task(const TaskView& task, SeatStatus& status, bool timed, Buffer& out) {
    const std::int64_t begun = monotonic_ns();
    Writer w = begin_result_frame(out, task.task_id);
    status.task_id.store(task.task_id, std::memory_order_relaxed);
    status.call.store(task.call, std::memory_order_relaxed);
    status.item.store(0, std::memory_order_relaxed);
    status.started_ns.store(begun, std::memory_order_relaxed);
    status.enter(TaskPhase::running);
    // Running from here: a cancel the pool writes from now on is this worker's handler's to act
    // on; one written before is seen here (the pool writes it before it sends the signal).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (status.is_cancelled(task.call)) {
        for (std::uint32_t i = 0; i < task.count; ++i) write_skipped_outcome(w);
        status.enter(TaskPhase::delivering);
        finish_result_frame(out, 0);
        return;
    }
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

/// The hello frame: task id 0, this worker's pid, then the initializer's outcome.
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
    result_frame::worker_pid::set(body_of(out), ::getpid());
    finish_frame(out);
}

/// An `adopt` record: the segment's memfd follows on the socket (a descriptor frame) and is
/// mapped here, so the tasks after it can use the objects in it; a `release` record: the registry
/// lets go of a segment it adopted (handles still alive keep it). A segment that cannot be mapped
/// (its descriptor could not be received, or no memory to map it) is left out: the tasks naming it
/// fail with the registry's error, and `notice` gets the not-adopted frame that tells the pool
/// to send it again with the next task that names it.
/// Returns false when the socket is closed, or its stream is out of step with the ring.
inline bool take_segment(const SpscRing::Record& record, int socket, FrameReader& socket_in,
                         DescriptorQueue& descriptors, Buffer& notice) {
    std::uint64_t id = 0;
    if (record.payload.size() != sizeof id) return false;
    std::memcpy(&id, record.payload.data(), sizeof id);
    if (record.kind == SpscRing::release) {
        segments().release_adopted(id);
        return true;
    }
    while (!socket_in.buffered_frame())
        if (socket_in.fill(socket, false, &descriptors) <= 0) return false;
    const auto frame = *socket_in.buffered_frame();
    if (!socket_in.next_is_descriptor()) return false;
    socket_in.consume(frame);
    const auto not_adopted = [&](std::string why) {
        try {
            segments().note_unadopted(id, std::move(why));  // for the error of the tasks that name it
        } catch (...) {}
        write_not_adopted(notice, id);
    };
    if (descriptors.empty()) {
        not_adopted(
            "its descriptor did not arrive: no descriptor number free under this process's "
            "RLIMIT_NOFILE, or no memory to queue it");
        return true;
    }
    UniqueFd fd = std::move(descriptors.front());
    descriptors.pop_front();
    try {
        segments().adopt(id, std::move(fd));
    } catch (...) {
        not_adopted(describe_current_exception());
    }
    return true;
}

/// The body of a worker process; returns its exit status.
inline int worker_main(SeatLink link, const WorkerConfig& config) {
    arm_worker(link.status, config);
    Buffer out;
    {
        bool ok = true;
        write_hello(out, config.initializer, ok);
        if (!send_result(link, out) || !ok) return ok ? 0 : 1;
    }

    FrameReader socket_in;
    DescriptorQueue descriptors;  // memfds of segments to adopt, received with the socket's bytes
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
            link.tasks.wait_for_data(Clock::now() + recheck_interval());
            continue;
        }
        if (record->kind == SpscRing::adopt || record->kind == SpscRing::release) {
            out.clear();
            if (!take_segment(*record, link.socket.get(), socket_in, descriptors, out)) return 0;
            link.tasks.consume_to(record->end);
            if (!out.empty() && !send_result(link, out)) return 0;
            continue;
        }
        ++since_sleep;
        link.status.begun.fetch_add(1, std::memory_order_release);
        std::span<const std::byte> body = record->payload;
        const bool on_socket = record->kind == SpscRing::socket;
        if (on_socket) {
            // The frame's room is made as it comes: a worker that cannot hold it dies of its task.
            link.status.enter(TaskPhase::receiving);
            while (!socket_in.buffered_frame()) {
                const ssize_t got = socket_in.fill(link.socket.get(), false, &descriptors);
                if (got <= 0) {
                    link.status.enter(TaskPhase::idle);  // the pool is done with us: no task's fault
                    return 0;
                }
            }
            body = *socket_in.buffered_frame();
        }
        run_task(parse_task(body), link.status, config.timed, out);
        if (on_socket) socket_in.consume(body);
        link.tasks.consume_to(record->end);
        const bool sent = send_result(link, out);
        link.status.enter(TaskPhase::idle);
        if (!sent) return 0;
        if (config.max_tasks != 0 && ++done >= config.max_tasks) {
            link.status.leave(WorkerExit::max_tasks);
            return 0;
        }
        if (config.max_memory != 0 && resident_bytes() > config.max_memory) {
            link.status.leave(WorkerExit::max_memory);
            return 0;
        }
    }
}

}  // namespace mproc::detail
