// mproc — the MPI layer of mproc::mpi::Pool: errors, the messages ranks exchange, and waiting.
//
// Every message is one MPI message of bytes on mproc's own communicator (a duplicate of
// MPI_COMM_WORLD, so the user's own MPI traffic never meets it):
//     u8 kind | u64 pool | payload
// Rank 0 sends on tag `to_worker` (modules, open, tasks, cancel, exit, cancel_call), a worker answers on tag
// `to_master` (hello, results, cancelled). MPI keeps two messages between the same pair of ranks
// in order, so a worker sees a pool's `open` before its tasks and a `cancel` after them.
// A batch of tasks or results is a run of mproc frames (u64 length | body) in one message, so a
// large argument travels as one message, never piece by piece; in a batch of tasks each frame
// follows its TaskNote (what the rank's local pool needs of the call). A batch of tasks starts with the
// time rank 0 sent it (its steady clock), and a batch of results with the last such time the
// worker received and how long it held that batch before answering: rank 0 learns the round trip
// to each worker from them (as TCP's timestamps do), and sizes the worker's window to it.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <deque>
#include <memory>
#include <optional>
#include <sched.h>
#include <span>
#include <string>
#include <sys/prctl.h>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/framing.hpp"
#include "../../errors.hpp"
#include "../../serialize.hpp"

namespace mproc::mpi::detail {

using mproc::detail::frame_header_size;

enum Tag : int { to_worker = 0x6d70, to_master = 0x6d71 };

enum class Kind : std::uint8_t {
    modules = 1,    // rank 0 → worker: u32 first id | names... (code objects tasks refer to)
    open = 2,       // rank 0 → worker: u64 initializer (portable address, 0: none) | LocalPoolSpec
    tasks = 3,      // rank 0 → worker: i64 sent_ns | (TaskNote | task frame)...
    cancel = 4,     // rank 0 → worker: drop the pool's tasks, answer `cancelled`
    exit = 5,       // rank 0 → worker: the program is over
    hello = 6,      // worker → rank 0: u8 outcome | RemoteException (the initializer's) | u32 capacity
    results = 7,    // worker → rank 0: i64 echo_ns | i64 held_ns | result frames, in any order
    cancelled = 8,  // worker → rank 0: nothing of the pool is left on this rank
    cancel_call = 9,  // rank 0 → worker: u64 call — stop that call's tasks (they answer as usual)
};

// A message: u8 kind, u64 pool id, then the kind's payload.
inline constexpr std::size_t message_kind_at = 0;
inline constexpr std::size_t message_pool_at = 1;
inline constexpr std::size_t message_header = message_pool_at + sizeof(std::uint64_t);

/// How a worker rank runs its tasks: in `processes` local worker processes of its own (a Pool
/// forked on the rank, so a task that crashes fails alone with WorkerLost), or in the rank's own
/// process (`in_rank`). The local pool's options are those of mpi::PoolOptions.
struct LocalPoolSpec {
    std::uint32_t processes = 0;  // 0: the CPUs of the rank's affinity
    std::uint8_t in_rank = 0;
    std::uint64_t max_tasks_per_child = 0;
    double task_timeout_s = 0;  // 0: none
    std::uint64_t max_memory_per_child = 0;
    std::uint64_t memory_limit = 0;
    std::uint32_t max_retries = 0;
    double stall_timeout_s = 0;  // 0: none

    template <class Archive> void serialize(Archive& ar) {
        ar(processes, in_rank, max_tasks_per_child, task_timeout_s, max_memory_per_child, memory_limit, max_retries,
           stall_timeout_s);
    }
};

/// The stamps before the frames of a tasks message (sent_ns) and of a results message (echo_ns,
/// held_ns; echo_ns 0: no tasks message arrived since the last results message).
inline constexpr std::size_t tasks_stamp_bytes = sizeof(std::int64_t);
inline constexpr std::size_t results_stamp_bytes = 2 * sizeof(std::int64_t);

/// The i64 at `at` of `bytes`, which must hold it (checked by the caller).
inline std::int64_t stamp_at(std::span<const std::byte> bytes, std::size_t at) noexcept {
    std::int64_t v = 0;
    std::memcpy(&v, bytes.data() + at, sizeof v);
    return v;
}

/// What rank 0 says of each task before its frame: where its items start in its call (for error
/// messages), and the call's CallOptions::max_retries (`pool_retries`: the pool's own).
struct TaskNote {
    static constexpr std::uint32_t pool_retries = 0xFFFFFFFF;
    std::uint64_t first = 0;
    std::uint32_t max_retries = pool_retries;
};
inline constexpr std::size_t task_note_bytes = sizeof(std::uint64_t) + sizeof(std::uint32_t);

inline void append_task_note(Buffer& out, const TaskNote& note) {
    out.append(&note.first, sizeof note.first);
    out.append(&note.max_retries, sizeof note.max_retries);
}

/// The tasks of a tasks payload (after its stamp), one at a time: each note and frame body.
class TaskCursor {
public:
    explicit TaskCursor(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}
    struct Entry {
        TaskNote note;
        std::span<const std::byte> body;
    };
    /// The next task, or nothing at the end. Throws SerializationError on a torn one.
    std::optional<Entry> next() {
        if (bytes_.empty()) return std::nullopt;
        if (bytes_.size() < task_note_bytes + frame_header_size)
            throw SerializationError("mproc::mpi: a torn task note");
        Entry e;
        std::memcpy(&e.note.first, bytes_.data(), sizeof e.note.first);
        std::memcpy(&e.note.max_retries, bytes_.data() + sizeof e.note.first, sizeof e.note.max_retries);
        bytes_ = bytes_.subspan(task_note_bytes);
        std::uint64_t length = 0;
        std::memcpy(&length, bytes_.data(), sizeof length);
        if (length > bytes_.size() - frame_header_size) throw SerializationError("mproc::mpi: a torn task frame");
        e.body = bytes_.subspan(frame_header_size, static_cast<std::size_t>(length));
        bytes_ = bytes_.subspan(frame_header_size + static_cast<std::size_t>(length));
        return e;
    }

private:
    std::span<const std::byte> bytes_;
};

/// The largest message one MPI call carries: counts are `int`.
inline constexpr std::size_t max_message = static_cast<std::size_t>(INT_MAX);

/// Throws, when a result frame of `frame_bytes` is too large to go back in one results message,
/// the mproc::Error that fails its task (rather than the rank: see worker.hpp).
inline void check_result_fits(std::size_t frame_bytes) {
    if (frame_bytes + message_header + results_stamp_bytes <= max_message) return;
    throw Error(fmt::format("mproc::mpi: a task's results take {} bytes, more than one MPI message carries ({} bytes)",
                            frame_bytes, max_message));
}

/// Throws mproc::Error when an MPI call failed.
inline void check(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    MPI_Error_string(rc, text, &length);
    throw Error(fmt::format("mproc::mpi: {} failed: {}", call, std::string(text, static_cast<std::size_t>(length))));
}

/// Starts a message in `out`.
inline void begin_message(Buffer& out, Kind kind, std::uint64_t pool) {
    out.clear();
    const auto k = static_cast<std::uint8_t>(kind);
    out.append(&k, 1);
    out.append(&pool, sizeof pool);
}

/// A received message: its kind, its pool, and what follows.
struct Message {
    int source = 0;
    Kind kind{};
    std::uint64_t pool = 0;
    Buffer bytes;
    std::span<const std::byte> payload() const noexcept { return bytes.bytes().subspan(message_header); }
};

/// Receives the next message on `tag` from `source`, if one is there; never waits.
inline std::optional<Message> try_receive(MPI_Comm comm, int source, int tag) {
    int found = 0;
    MPI_Message handle;
    MPI_Status status;
    check(MPI_Improbe(source, tag, comm, &found, &handle, &status), "MPI_Improbe");
    if (!found) return std::nullopt;
    int count = 0;
    check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
    Message m;
    m.source = status.MPI_SOURCE;
    m.bytes.resize(static_cast<std::size_t>(count));
    check(MPI_Mrecv(m.bytes.data(), count, MPI_BYTE, &handle, MPI_STATUS_IGNORE), "MPI_Mrecv");
    if (m.bytes.size() < message_header) throw SerializationError("mproc::mpi: a message shorter than its header");
    std::uint8_t kind = 0;
    std::memcpy(&kind, m.bytes.data() + message_kind_at, sizeof kind);
    std::memcpy(&m.pool, m.bytes.data() + message_pool_at, sizeof m.pool);
    m.kind = static_cast<Kind>(kind);
    return m;
}

/// Messages on one tag from any rank, received without ever waiting: a message whose bytes are
/// still arriving stays pending (MPI_Imrecv) and later looks test it, so a large message from a
/// rank whose host was cut off mid-way can never block the receiving thread. Each rank's messages
/// come out in the order that rank sent them. Receives start while those in progress hold less
/// than `budget` bytes (or none are in progress): large results wait in their workers, as they
/// would for a blocking receive, rather than all at once in rank 0's memory.
class Inbox {
public:
    static constexpr std::size_t budget = std::size_t{256} << 20;

    Inbox(MPI_Comm comm, int tag, int ranks) : comm_(comm), tag_(tag), arriving_(static_cast<std::size_t>(ranks)) {}

    /// The next message that has wholly arrived, if any.
    std::optional<Message> next() {
        for (int n = 0; n < 64; ++n) {  // start receiving what has been announced
            int found = 0;
            MPI_Status status;
            check(MPI_Iprobe(MPI_ANY_SOURCE, tag_, comm_, &found, &status), "MPI_Iprobe");
            if (!found) break;
            int count = 0;
            check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
            if (receiving_bytes_ != 0 && receiving_bytes_ + static_cast<std::size_t>(count) > budget) break;
            // This thread alone receives on the tag: the source's first message is the one seen.
            MPI_Message handle;
            check(MPI_Improbe(status.MPI_SOURCE, tag_, comm_, &found, &handle, &status), "MPI_Improbe");
            if (!found) break;
            check(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count");
            auto a = std::make_unique<Arriving>();
            a->message.source = status.MPI_SOURCE;
            a->message.bytes.resize(static_cast<std::size_t>(count));
            check(MPI_Imrecv(a->message.bytes.data(), count, MPI_BYTE, &handle, &a->request), "MPI_Imrecv");
            arriving_.at(static_cast<std::size_t>(status.MPI_SOURCE)).push_back(std::move(a));
            ++pending_;
            receiving_bytes_ += static_cast<std::size_t>(count);
        }
        if (pending_ == 0) return std::nullopt;
        // One rank after another, from where the last look stopped: no rank starves the others.
        for (std::size_t i = 0; i < arriving_.size(); ++i) {
            const std::size_t source = (next_source_ + i) % arriving_.size();
            auto& queue = arriving_[source];
            if (queue.empty()) continue;
            int done = 0;
            check(MPI_Test(&queue.front()->request, &done, MPI_STATUS_IGNORE), "MPI_Test");
            if (!done) continue;
            Message m = std::move(queue.front()->message);
            queue.pop_front();
            --pending_;
            receiving_bytes_ -= m.bytes.size();
            next_source_ = source + 1;
            if (m.bytes.size() < message_header)
                throw SerializationError("mproc::mpi: a message shorter than its header");
            std::uint8_t kind = 0;
            std::memcpy(&kind, m.bytes.data() + message_kind_at, sizeof kind);
            std::memcpy(&m.pool, m.bytes.data() + message_pool_at, sizeof m.pool);
            m.kind = static_cast<Kind>(kind);
            return m;
        }
        return std::nullopt;
    }

    /// Whether a message is still arriving (announced, not wholly received).
    bool receiving() const noexcept { return pending_ != 0; }

private:
    struct Arriving {
        MPI_Request request = MPI_REQUEST_NULL;
        Message message;
    };
    MPI_Comm comm_;
    int tag_;
    std::vector<std::deque<std::unique_ptr<Arriving>>> arriving_;  // by source
    std::size_t pending_ = 0;
    std::size_t receiving_bytes_ = 0;  // of the receives in progress
    std::size_t next_source_ = 0;
};

/// Sends a whole message and waits until MPI has taken it.
inline void send(MPI_Comm comm, int dest, int tag, const Buffer& message) {
    if (message.size() > max_message)
        throw Error(fmt::format("mproc::mpi: a message of {} bytes exceeds MPI's limit of {} bytes", message.size(),
                                max_message));
    check(MPI_Send(message.data(), static_cast<int>(message.size()), MPI_BYTE, dest, tag, comm), "MPI_Send");
}

/// The frames of a tasks/results payload, one at a time.
class FrameCursor {
public:
    explicit FrameCursor(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}
    /// The next frame's body, or nothing at the end. Throws SerializationError on a torn frame.
    std::optional<std::span<const std::byte>> next() {
        if (bytes_.empty()) return std::nullopt;
        std::uint64_t length = 0;
        if (bytes_.size() < frame_header_size) throw SerializationError("mproc::mpi: a torn frame header");
        std::memcpy(&length, bytes_.data(), sizeof length);
        if (length > bytes_.size() - frame_header_size) throw SerializationError("mproc::mpi: a torn frame");
        auto body = bytes_.subspan(frame_header_size, static_cast<std::size_t>(length));
        bytes_ = bytes_.subspan(frame_header_size + static_cast<std::size_t>(length));
        return body;
    }
    bool empty() const noexcept { return bytes_.empty(); }

private:
    std::span<const std::byte> bytes_;
};

/// How long to wait between two looks at MPI that found nothing: a few immediate retries (each
/// yields the core), then sleeps that double from 16 µs to 128 µs while the quiet has lasted less
/// than 50 ms (work is likely to come back soon), then 1 ms sleeps. Anything found resets it. MPI
/// has no descriptor to sleep on, and its own blocking calls spin, so mproc never makes a blocking
/// MPI call while it waits for work: an idle rank wakes at most 1000 times a second.
class Backoff {
public:
    static constexpr std::chrono::microseconds busy_longest{128};
    static constexpr std::chrono::microseconds longest{1000};
    static constexpr std::chrono::milliseconds busy_for{50};

    void reset() noexcept { idle_ = 0; }
    /// The pause before the next look (zero: just yield).
    std::chrono::microseconds next() noexcept {
        if (idle_++ == 0) quiet_since_ = std::chrono::steady_clock::now();
        if (idle_ <= spins) return std::chrono::microseconds{0};
        if (std::chrono::steady_clock::now() - quiet_since_ > busy_for) return longest;
        const unsigned doublings = idle_ - spins - 1;
        return doublings >= 3 ? busy_longest : std::chrono::microseconds{16 << doublings};
    }
    /// Sleeps (or yields) for next().
    void pause() noexcept {
        const auto d = next();
        if (d.count() == 0) {
            ::sched_yield();
            return;
        }
        timespec ts{0, static_cast<long>(d.count()) * 1000};
        while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    }

    /// Short sleeps mean what they say for this thread (the default slack is 50 µs).
    static void tighten_timer_slack() noexcept { ::prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL); }

private:
    static constexpr unsigned spins = 8;
    unsigned idle_ = 0;
    std::chrono::steady_clock::time_point quiet_since_{};
};

/// How long a thread that feeds workers may leave MPI unread while they hold plenty of work:
/// `share` of `held_ns` (that work, in time), at most 250 µs; not at all while tasks take less than
/// 20 µs (their results come back in batches that keep the thread busy anyway). Each look at MPI
/// polls every socket (Open MPI's TCP transport progresses on every call): over TCP, with 200 µs
/// tasks whose results come one by one, looking again every few microseconds took 40 % of a core
/// on rank 0 and a quarter of one on a worker rank, from workers sharing those cores. Used by
/// rank 0's MPI thread (engine.hpp) and a worker rank's (worker.hpp), each with its own share.
inline std::chrono::microseconds look_away_for(double task_ns, double held_ns, double share) noexcept {
    constexpr double shortest_task_ns = 20'000;
    constexpr double longest_ns = 250'000;
    if (task_ns < shortest_task_ns || held_ns <= 0) return std::chrono::microseconds{0};
    return std::chrono::microseconds{static_cast<long>(std::min(held_ns * share, longest_ns) / 1000)};
}

}  // namespace mproc::mpi::detail
