// mproc — a Pool worker's life: run the initializer, then answer tasks until the channel closes.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "framing.hpp"
#include "io.hpp"
#include "pool_task.hpp"
#include "remote_exception.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

/// Task id 0 is the worker's hello: an Outcome::value once the initializer has run, or
/// Outcome::exception and the initializer's exception.
inline constexpr std::uint64_t hello_task_id = 0;

struct WorkerConfig {
    std::function<void()> initializer;
    unsigned long max_tasks = 0;  // 0: unlimited
    bool timed = false;
};

inline bool send_frame_blocking(int fd, const Buffer& frame) {
    std::span<const std::byte> left = frame.bytes();
    while (!left.empty()) {
        const ssize_t put = write_some(fd, left.data(), left.size(), /*is_socket=*/true);
        if (put < 0) return false;  // the pool is gone: nothing left to do
        left = left.subspan(static_cast<std::size_t>(put));
    }
    return true;
}

/// The body of a worker process; returns its exit status.
inline int worker_main(UniqueFd channel, WorkerSlot& slot, const WorkerConfig& config) {
    Buffer out;
    {
        begin_frame(out);
        Writer w(out);
        w(hello_task_id, std::int64_t{0});
        try {
            if (config.initializer) config.initializer();
            w.write(Outcome::value);
        } catch (...) {
            w.write(Outcome::exception);
            w.write(RemoteException::capture());
        }
        finish_frame(out);
        if (!send_frame_blocking(channel.get(), out)) return 0;
        if (out.bytes()[frame_header_size + 16] != static_cast<std::byte>(Outcome::value)) return 1;
    }

    FrameReader in;
    unsigned long done = 0;
    for (;;) {
        auto frame = in.buffered_frame();
        if (!frame) {
            const ssize_t got = in.fill(channel.get());
            if (got <= 0) return 0;  // the pool closed the channel: time to go
            continue;
        }
        const TaskView task = parse_task(*frame);
        const std::int64_t begun = monotonic_ns();
        begin_frame(out);
        Writer w(out);
        w(task.task_id, std::int64_t{0});
        const std::size_t header = out.size();
        Reader r(task.payload);
        ChunkContext context{r, w, slot, task.skips, task.task_id, task.count, config.timed};
        try {
            task.invoker(context);
        } catch (...) {
            // The chunk itself could not be decoded: every item of it fails with the reason.
            const RemoteException why = RemoteException::capture();
            out.resize(header);
            for (std::uint32_t i = 0; i < task.count; ++i) w(Outcome::exception, why);
        }
        const std::int64_t spent = monotonic_ns() - begun;
        std::memcpy(out.data() + frame_header_size + 8, &spent, sizeof spent);
        finish_frame(out);
        in.consume(*frame);
        const bool sent = send_frame_blocking(channel.get(), out);
        slot.running.store(0, std::memory_order_release);
        if (!sent) return 0;
        if (config.max_tasks != 0 && ++done >= config.max_tasks) return 0;
    }
}

}  // namespace mproc::detail
