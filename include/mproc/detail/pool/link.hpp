// mproc — the memory a Pool shares with its workers: per seat, the SeatStatus its worker publishes
// and two rings (tasks down, results up); for the pool, the collector's "I am asleep" flag.
//
// A *seat* is one place for a worker in the pool: the parent's record of it is a Seat
// (fork_engine.hpp), the memory it shares with its worker is here, and the worker's own view of
// that memory is a SeatLink (worker.hpp). A seat outlives its workers: a replacement takes the seat
// of the one that died, with fresh memory.
//
// It is one MAP_SHARED|MAP_ANONYMOUS mapping made before the fork server, so the server and every
// worker inherit it at the same address. Nothing of it is a file: nothing appears in /dev/shm.
#pragma once

#include <atomic>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <new>
#include <sys/mman.h>
#include <unistd.h>
#include <utility>

#include "../../errors.hpp"
#include "../os/futex.hpp"
#include "ring.hpp"

namespace mproc::detail {

/// Where a worker is with the task at the head of its queue.
enum class TaskPhase : std::uint32_t {
    idle = 0,        // between tasks: the next one (if any) is not taken yet
    running = 1,     // running items: task_timeout counts from started_ns
    delivering = 2,  // every item has run; the result frame is on its way (not charged to the task)
    receiving = 3,   // reading the next task's frame from the socket (one too large for the ring):
                     // a worker that dies here (out of memory for it) dies of that task, the first
                     // of those it has not finished
};

/// The signal the pool sends a worker running a task it cancelled (see worker.hpp). A real-time
/// signal: tasks seldom use one, and it queues. The fork server blocks it, so a worker is born with
/// it blocked until its handler is armed.
inline int cancel_signal() noexcept { return SIGRTMIN + 3; }

/// Why a worker ended itself, as it says in its SeatStatus before it goes.
enum class WorkerExit : std::uint32_t {
    none = 0,          // it did not (a crash, a kill, or the pool closed)
    max_tasks = 1,     // it ran max_tasks_per_child tasks
    max_memory = 2,    // its resident memory went past max_memory_per_child after a task
    memory_limit = 3,  // an allocation went past memory_limit
    cancelled = 4,     // the task it was running was cancelled
};

/// What a worker publishes about the task it is running, in memory the pool can read — so when a
/// worker dies, the pool knows which item killed it and why; when an item overstays task_timeout,
/// which one to blame; and when a worker leaves queued tasks untaken, that it has stalled. The
/// pool writes one thing here: the calls it has cancelled, whose tasks the worker must not run.
struct SeatStatus {
    static constexpr std::size_t cancel_slots = 8;

    std::atomic<std::uint64_t> task_id{0};
    std::atomic<std::uint64_t> call{0};  // the call of that task (wire.hpp)
    std::atomic<std::uint32_t> item{0};
    std::atomic<std::uint32_t> phase{0};  // a TaskPhase
    std::atomic<std::int64_t> started_ns{0};
    std::atomic<std::uint64_t> begun{0};     // tasks this worker has taken from its ring
    std::atomic<std::uint32_t> leaving{0};   // a WorkerExit
    std::atomic<std::uint64_t> cancelled[cancel_slots]{};  // written by the pool; 0: a free slot

    TaskPhase current_phase() const noexcept { return static_cast<TaskPhase>(phase.load(std::memory_order_acquire)); }
    void enter(TaskPhase p) noexcept { phase.store(static_cast<std::uint32_t>(p), std::memory_order_release); }
    /// Whether the pool cancelled `c`. Async-signal-safe (the worker's cancel handler asks it).
    bool is_cancelled(std::uint64_t c) const noexcept {
        for (const auto& slot : cancelled)
            if (slot.load(std::memory_order_acquire) == c) return c != 0;
        return false;
    }
    void leave(WorkerExit why) noexcept { leaving.store(static_cast<std::uint32_t>(why), std::memory_order_release); }
    WorkerExit left_because() const noexcept {
        return static_cast<WorkerExit>(leaving.load(std::memory_order_acquire));
    }
};

struct alignas(64) PoolShared {
    FutexWord collector_sleeping{0};
};

class SharedSeats {
public:
    static constexpr std::size_t ring_capacity = std::size_t{256} * 1024;

    SharedSeats() = default;
    explicit SharedSeats(unsigned seats) : seats_(seats) {
        bytes_ = seat_offset(seats);
        void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw_errno("mmap (pool rings)");
        base_ = static_cast<std::byte*>(p);
        new (base_) PoolShared();
        for (unsigned i = 0; i < seats; ++i) reset_seat(i);
    }
    SharedSeats(SharedSeats&& o) noexcept
        : base_(std::exchange(o.base_, nullptr)), bytes_(o.bytes_), seats_(o.seats_) {}
    SharedSeats& operator=(SharedSeats&& o) noexcept {
        if (this != &o) {
            release();
            base_ = std::exchange(o.base_, nullptr);
            bytes_ = o.bytes_;
            seats_ = o.seats_;
        }
        return *this;
    }
    SharedSeats(const SharedSeats&) = delete;
    SharedSeats& operator=(const SharedSeats&) = delete;
    ~SharedSeats() { release(); }

    PoolShared& shared() const noexcept { return *reinterpret_cast<PoolShared*>(base_); }
    SeatStatus& status(unsigned seat) const noexcept {
        return *reinterpret_cast<SeatStatus*>(base_ + seat_offset(seat));
    }
    SpscRing tasks(unsigned seat) const noexcept { return {base_ + seat_offset(seat) + status_bytes, ring_capacity}; }
    SpscRing results(unsigned seat) const noexcept {
        return {base_ + seat_offset(seat) + status_bytes + SpscRing::bytes_for(ring_capacity), ring_capacity};
    }
    /// A fresh status and empty rings for a seat whose worker is gone (or not yet born).
    void reset_seat(unsigned seat) const noexcept {
        std::byte* at = base_ + seat_offset(seat);
        new (at) SeatStatus();
        SpscRing::reset(at + status_bytes);
        SpscRing::reset(at + status_bytes + SpscRing::bytes_for(ring_capacity));
    }

private:
    static constexpr std::size_t status_bytes = (sizeof(SeatStatus) + 63) & ~std::size_t{63};
    static constexpr std::size_t seat_bytes = status_bytes + 2 * SpscRing::bytes_for(ring_capacity);
    static constexpr std::size_t seat_offset(unsigned seat) noexcept { return sizeof(PoolShared) + seat * seat_bytes; }
    void release() noexcept {
        if (base_) ::munmap(base_, bytes_);
        base_ = nullptr;
    }
    std::byte* base_ = nullptr;
    std::size_t bytes_ = 0;
    unsigned seats_ = 0;
};

/// Wakes the collector if it said it sleeps: one write to the pool's eventfd.
inline void wake_collector(PoolShared& shared, int wake_fd) noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (shared.collector_sleeping.load(std::memory_order_relaxed) != 0 &&
        shared.collector_sleeping.exchange(0, std::memory_order_relaxed) != 0) {
        const std::uint64_t one = 1;
        [[maybe_unused]] const ssize_t n = ::write(wake_fd, &one, sizeof one);
    }
}

}  // namespace mproc::detail
