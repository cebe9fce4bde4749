// mproc — a single-producer, single-consumer ring of frames in shared memory.
//
// A Pool passes tasks to a worker, and results back, through two of these per worker: while both
// sides are busy a task costs no system call at all, only a copy and a few atomic operations.
// A side sleeps only when its ring is empty (or full), and the other side wakes it only when it
// has said it sleeps — the flag is set, then the ring re-checked, with a full fence on both
// sides, so a wake-up is never lost.
//
// Records are 8-byte aligned and contiguous: [u32 length][u32 kind][payload][pad]. A record
// never wraps; when one does not fit before the end, a `wrap` record fills the gap. A frame too
// large for the ring travels on the worker's socket instead, announced in order by a `socket`
// record, so the reader keeps the sender's order without the ring ever holding big data.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <span>

#include "../os/futex.hpp"
#include "../os/spin.hpp"

namespace mproc::detail {

/// How long a side that finds its ring empty keeps looking before it sleeps. A busy peer
/// publishes again within microseconds; catching that awake spares the peer a futex wake (a
/// system call and a context switch on each side) per task. Bounded, so an idle side sleeps.
inline constexpr std::chrono::microseconds ring_spin{30};

/// The ring's control words; its data area follows it in the same shared mapping.
struct RingHeader {
    alignas(64) std::atomic<std::uint64_t> head{0};  // consumer position, in bytes
    alignas(64) std::atomic<std::uint64_t> tail{0};  // producer position, in bytes
    alignas(64) FutexWord data_seq{0};               // bumped to wake a consumer asleep on it
    FutexWord consumer_sleeping{0};
    FutexWord space_seq{0};                          // bumped to wake a producer waiting for room
    FutexWord producer_sleeping{0};
    FutexWord closed{0};                             // the producer will publish nothing more
};

class SpscRing {
public:
    // data: a frame in the record; socket: a frame on the socket; adopt: a segment's id, its memfd
    // on the socket (a descriptor frame); release: a segment's id, adopted before and no longer
    // needed (fork_engine.hpp, send_segments_locked).
    enum Kind : std::uint32_t { data = 0, wrap = 1, socket = 2, adopt = 3, release = 4 };
    struct Record {
        Kind kind;
        std::span<const std::byte> payload;
        std::uint64_t end;  // the head position after this record
    };

    SpscRing() = default;
    /// Views a ring whose header and `capacity` bytes of data (a power of two) live at `memory`.
    SpscRing(void* memory, std::size_t capacity) noexcept
        : header_(static_cast<RingHeader*>(memory)), data_(static_cast<std::byte*>(memory) + sizeof(RingHeader)),
          capacity_(capacity) {}

    static constexpr std::size_t bytes_for(std::size_t capacity) noexcept { return sizeof(RingHeader) + capacity; }
    /// Sets up a fresh ring in `memory` (no one else may be using it).
    static void reset(void* memory) noexcept { new (memory) RingHeader(); }

    /// The largest payload a record may carry; larger frames go by socket.
    std::size_t max_payload() const noexcept { return capacity_ / 4; }

    // ---- producer ----

    /// Appends a record if it fits now. Does not wake the consumer (see notify_consumer).
    bool try_push(Kind kind, std::span<const std::byte> payload) noexcept {
        const std::size_t need = record_size(payload.size());
        std::uint64_t t = header_->tail.load(std::memory_order_relaxed);
        const std::uint64_t h = header_->head.load(std::memory_order_acquire);
        const std::size_t pos = static_cast<std::size_t>(t & (capacity_ - 1));
        const std::size_t to_end = capacity_ - pos;
        if (need > to_end) {
            if (t + to_end + need - h > capacity_) return false;
            write_header(pos, 0, wrap);
            t += to_end;
        } else if (t + need - h > capacity_) {
            return false;
        }
        const std::size_t at = static_cast<std::size_t>(t & (capacity_ - 1));
        write_header(at, static_cast<std::uint32_t>(payload.size()), kind);
        if (!payload.empty()) std::memcpy(data_ + at + record_header, payload.data(), payload.size());
        header_->tail.store(t + need, std::memory_order_release);
        return true;
    }

    /// Wakes the consumer if it said it sleeps. Returns true when it did.
    bool notify_consumer() noexcept {
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (header_->consumer_sleeping.load(std::memory_order_relaxed) == 0) return false;
        header_->consumer_sleeping.store(0, std::memory_order_relaxed);
        header_->data_seq.fetch_add(1, std::memory_order_release);
        futex_wake(header_->data_seq, 1);
        return true;
    }

    /// Blocks until there is room for a payload of `n` bytes (a producer that may wait).
    void wait_for_room(std::size_t n) noexcept {
        while (!has_room(n)) {
            const std::uint32_t seq = header_->space_seq.load(std::memory_order_acquire);
            header_->producer_sleeping.store(1, std::memory_order_relaxed);
            std::atomic_thread_fence(std::memory_order_seq_cst);
            if (has_room(n)) break;
            futex_wait(header_->space_seq, seq, Clock::now() + recheck_interval());
        }
        header_->producer_sleeping.store(0, std::memory_order_relaxed);
    }

    /// Tells the consumer nothing more is coming, waking it if it sleeps.
    void close() noexcept {
        header_->closed.store(1, std::memory_order_release);
        header_->data_seq.fetch_add(1, std::memory_order_release);
        futex_wake(header_->data_seq, 1);
    }

    // ---- consumer ----

    /// The record at `position` (the head, or the end of the last record peeked), if published.
    std::optional<Record> peek(std::uint64_t position) const noexcept {
        for (;;) {
            const std::uint64_t t = header_->tail.load(std::memory_order_acquire);
            if (position == t) return std::nullopt;
            const std::size_t at = static_cast<std::size_t>(position & (capacity_ - 1));
            std::uint32_t length = 0, kind = 0;
            std::memcpy(&length, data_ + at + length_at, sizeof length);
            std::memcpy(&kind, data_ + at + kind_at, sizeof kind);
            if (kind == wrap) {
                position += capacity_ - at;
                continue;
            }
            return Record{
                static_cast<Kind>(kind), {data_ + at + record_header, length}, position + record_size(length)};
        }
    }
    std::uint64_t head() const noexcept { return header_->head.load(std::memory_order_relaxed); }
    bool empty() const noexcept {
        return header_->head.load(std::memory_order_relaxed) == header_->tail.load(std::memory_order_acquire);
    }
    bool closed() const noexcept { return header_->closed.load(std::memory_order_acquire) != 0; }

    /// Releases everything before `position`, and wakes a producer waiting for room.
    void consume_to(std::uint64_t position) noexcept {
        header_->head.store(position, std::memory_order_release);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (header_->producer_sleeping.load(std::memory_order_relaxed) != 0) {
            header_->space_seq.fetch_add(1, std::memory_order_release);
            futex_wake(header_->space_seq, 1);
        }
    }

    /// Sleeps (up to `until`) while the ring is empty and open. The producer's notify_consumer()
    /// ends the sleep.
    void wait_for_data(Clock::time_point until) noexcept {
        const std::uint32_t seq = header_->data_seq.load(std::memory_order_acquire);
        header_->consumer_sleeping.store(1, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (empty() && !closed()) futex_wait(header_->data_seq, seq, until);
        header_->consumer_sleeping.store(0, std::memory_order_relaxed);
    }

private:
    // A record: u32 payload length, u32 kind, the payload, padding to 8 bytes.
    static constexpr std::size_t length_at = 0;
    static constexpr std::size_t kind_at = 4;
    static constexpr std::size_t record_header = 8;
    static constexpr std::size_t record_size(std::size_t payload) noexcept {
        return record_header + ((payload + 7) & ~std::size_t{7});
    }
    bool has_room(std::size_t n) const noexcept {
        const std::size_t need = record_size(n);
        const std::uint64_t t = header_->tail.load(std::memory_order_relaxed);
        const std::uint64_t h = header_->head.load(std::memory_order_acquire);
        const std::size_t to_end = capacity_ - static_cast<std::size_t>(t & (capacity_ - 1));
        const std::size_t worst = need > to_end ? to_end + need : need;
        return t + worst - h <= capacity_;
    }
    void write_header(std::size_t at, std::uint32_t length, std::uint32_t kind) noexcept {
        std::memcpy(data_ + at + length_at, &length, sizeof length);
        std::memcpy(data_ + at + kind_at, &kind, sizeof kind);
    }

    RingHeader* header_ = nullptr;
    std::byte* data_ = nullptr;
    std::size_t capacity_ = 0;
};

}  // namespace mproc::detail
