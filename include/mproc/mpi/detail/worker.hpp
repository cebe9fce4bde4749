// mproc — what a worker rank does: serve the pools of rank 0 until the program ends.
//
// A worker keeps the task batches rank 0 sent it, runs their tasks one after another through the
// local Pool's run_task (the same invokers, the same result frames), and sends the results back
// in batches: when it has nothing else queued, or every 100 µs of work, so rank 0 can refill its
// window while it works. Between two tasks it looks for new messages without waiting; with nothing
// to do it waits with a Backoff (mpi_comm.hpp), never in a blocking MPI call.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/clock.hpp"
#include "../../detail/os/framing.hpp"
#include "../../detail/pool/wire.hpp"
#include "../../detail/pool/worker.hpp"
#include "../../detail/serialize/remote_exception.hpp"
#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "address.hpp"
#include "comm.hpp"

namespace mproc::mpi::detail {

using mproc::detail::Outcome;
using mproc::detail::RemoteException;

class WorkerRank {
public:
    WorkerRank(MPI_Comm comm, int rank) : comm_(comm), rank_(rank), resolver_(rank) {}

    /// Serves until rank 0 says the program is over.
    void serve() {
        Backoff::tighten_timer_slack();
        Backoff backoff;
        for (;;) {
            bool busy = false;
            while (auto m = try_receive(comm_, 0, to_worker)) {
                busy = true;
                if (!handle(std::move(*m))) {
                    flush();
                    return;
                }
            }
            if (auto body = next_task()) {
                run(*body);
                busy = true;
            }
            if (!results_.empty() && (batches_.empty() || mproc::detail::Clock::now() - first_result_ > flush_every ||
                                      results_.size() > flush_bytes))
                flush();
            if (busy) backoff.reset();
            else backoff.pause();
        }
    }

private:
    static constexpr std::chrono::microseconds flush_every{100};
    static constexpr std::size_t flush_bytes = 1 << 20;

    struct Batch {
        Message message;
        FrameCursor cursor;
    };

    /// Returns false on `exit`.
    bool handle(Message m) {
        switch (m.kind) {
            case Kind::modules: {
                Reader in(m.payload());
                std::uint32_t first = 0;
                std::vector<ModuleName> names;
                in(first, names);
                resolver_.add_modules(first, std::move(names));
                return true;
            }
            case Kind::open: {
                batches_.clear();
                results_.clear();
                pool_ = m.pool;
                Reader in(m.payload());
                std::uint64_t initializer = 0;
                in(initializer);
                Buffer hello;
                begin_message(hello, Kind::hello, pool_);
                Writer w(hello);
                try {
                    if (initializer != 0)
                        reinterpret_cast<void (*)()>(resolver_.resolve(initializer, CodeResolver::Use::code))();
                    mproc::detail::write_void_outcome(w);
                    refused_ = false;
                } catch (...) {
                    mproc::detail::write_exception_outcome(w, RemoteException::capture());
                    refused_ = true;  // rank 0 breaks the pool; what it sent meanwhile is dropped
                }
                send(comm_, 0, to_master, hello);
                return true;
            }
            case Kind::tasks: {
                const auto payload = m.payload();
                if (payload.size() < tasks_stamp_bytes)
                    throw SerializationError("mproc::mpi: a tasks message too short");
                // The newest batch's stamp goes back with the next results (see comm.hpp).
                echo_ns_ = stamp_at(payload, 0);
                echo_arrived_ns_ = mproc::detail::monotonic_ns();
                if (m.pool == pool_ && !refused_)
                    batches_.push_back(Batch{std::move(m), FrameCursor(payload.subspan(tasks_stamp_bytes))});
                return true;
            }
            case Kind::cancel: {
                if (m.pool == pool_) {
                    batches_.clear();
                    results_.clear();
                }
                Buffer answer;
                begin_message(answer, Kind::cancelled, m.pool);
                send(comm_, 0, to_master, answer);
                return true;
            }
            case Kind::exit: return false;
            default: throw SerializationError(fmt::format("mproc::mpi: rank {} got a message of unknown kind", rank_));
        }
    }

    std::optional<std::span<std::byte>> next_task() {
        while (!batches_.empty()) {
            if (auto body = batches_.front().cursor.next()) {
                // The bytes are this rank's own (the message's buffer): make_local rewrites them.
                return std::span<std::byte>(const_cast<std::byte*>(body->data()), body->size());
            }
            batches_.pop_front();
        }
        return std::nullopt;
    }

    void run(std::span<std::byte> body) {
        try {
            resolver_.make_local(body);
            mproc::detail::run_task(mproc::detail::parse_task(body), status_, /*timed=*/false, out_);
            if (out_.size() + message_header > max_message)
                throw Error(
                    fmt::format("mproc::mpi: a task's results take {} bytes, more than one MPI message "
                                "carries ({} bytes)",
                                out_.size(), max_message));
        } catch (...) {
            mproc::detail::failed_task_frame(out_, body, RemoteException::capture());
        }
        if (!results_.empty() && results_.size() + out_.size() > max_message) flush();
        if (results_.empty()) {
            begin_message(results_, Kind::results, pool_);
            results_.extend(results_stamp_bytes);  // echo_ns, held_ns: filled in by flush()
            first_result_ = mproc::detail::Clock::now();
        }
        results_.append(out_.data(), out_.size());
    }

    void flush() {
        if (results_.empty()) return;
        const std::int64_t stamps[2] = {echo_ns_, echo_ns_ ? mproc::detail::monotonic_ns() - echo_arrived_ns_ : 0};
        std::memcpy(results_.data() + message_header, stamps, sizeof stamps);
        echo_ns_ = 0;  // each tasks message is answered once
        send(comm_, 0, to_master, results_);
        results_.clear();
    }

    MPI_Comm comm_;
    int rank_;
    CodeResolver resolver_;
    std::uint64_t pool_ = 0;
    bool refused_ = false;
    std::int64_t echo_ns_ = 0;          // the sent_ns of the newest tasks message not yet answered
    std::int64_t echo_arrived_ns_ = 0;  // when it arrived (this rank's clock)
    std::deque<Batch> batches_;
    Buffer results_;
    Buffer out_;
    mproc::detail::Clock::time_point first_result_{};
    mproc::detail::SeatStatus status_;
};

}  // namespace mproc::mpi::detail
