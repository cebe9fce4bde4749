// mproc — the memory a Pool shares with its workers: per seat, the WorkerSlot and two rings
// (tasks down, results up); for the pool, the collector's "I am asleep" flag.
//
// It is one MAP_SHARED|MAP_ANONYMOUS mapping made before the fork server, so the server and every
// worker inherit it at the same address. Nothing of it is a file: nothing appears in /dev/shm.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <sys/mman.h>
#include <unistd.h>

#include "../../errors.hpp"
#include "../shm/futex.hpp"
#include "wire.hpp"
#include "ring.hpp"

namespace mproc::detail {

struct alignas(64) PoolShared {
    FutexWord collector_sleeping{0};
};

class PoolLink {
public:
    static constexpr std::size_t ring_capacity = std::size_t{256} * 1024;

    PoolLink() = default;
    explicit PoolLink(unsigned seats) : seats_(seats) {
        bytes_ = seat_offset(seats);
        void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw_errno("mmap (pool rings)");
        base_ = static_cast<std::byte*>(p);
        new (base_) PoolShared();
        for (unsigned i = 0; i < seats; ++i) reset_seat(i);
    }
    PoolLink(PoolLink&& o) noexcept
        : base_(std::exchange(o.base_, nullptr)), bytes_(o.bytes_), seats_(o.seats_) {}
    PoolLink& operator=(PoolLink&& o) noexcept {
        if (this != &o) {
            release();
            base_ = std::exchange(o.base_, nullptr);
            bytes_ = o.bytes_;
            seats_ = o.seats_;
        }
        return *this;
    }
    PoolLink(const PoolLink&) = delete;
    PoolLink& operator=(const PoolLink&) = delete;
    ~PoolLink() { release(); }

    PoolShared& shared() const noexcept { return *reinterpret_cast<PoolShared*>(base_); }
    WorkerSlot& slot(unsigned seat) const noexcept { return *reinterpret_cast<WorkerSlot*>(base_ + seat_offset(seat)); }
    SpscRing tasks(unsigned seat) const noexcept { return {base_ + seat_offset(seat) + slot_bytes, ring_capacity}; }
    SpscRing results(unsigned seat) const noexcept {
        return {base_ + seat_offset(seat) + slot_bytes + SpscRing::bytes_for(ring_capacity), ring_capacity};
    }
    /// Fresh slot and empty rings for a seat whose worker is gone (or not yet born).
    void reset_seat(unsigned seat) const noexcept {
        std::byte* at = base_ + seat_offset(seat);
        new (at) WorkerSlot();
        SpscRing::reset(at + slot_bytes);
        SpscRing::reset(at + slot_bytes + SpscRing::bytes_for(ring_capacity));
    }

private:
    static constexpr std::size_t slot_bytes = (sizeof(WorkerSlot) + 63) & ~std::size_t{63};
    static constexpr std::size_t seat_bytes = slot_bytes + 2 * SpscRing::bytes_for(ring_capacity);
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
