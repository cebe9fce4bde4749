// mproc — Queue: a multi-producer, multi-consumer FIFO between processes.
//
//     mproc::Queue<std::vector<int>> q;            // unbounded;  Queue<T> q(16) holds at most 16 items
//     mproc::Process producer([&] { q.put({42, 7}); });
//     producer.start();
//     auto v = q.get();                            // blocks;  q.get(1s) throws mproc::Empty on timeout
//     q.put(x, 1s);                                // on a full bounded queue: mproc::Full after 1s
//     std::optional<T> item = q.try_get();         // nullopt when empty
//
// There is no feeder thread: put() serialises the item and copies it into a byte ring in shared
// memory before it returns, so an error surfaces in put(), and an item is in the queue — safe from
// its producer's exit or death — as soon as put() returns. A producer can put and exit, and the
// parent can join it before reading, with no deadlock.
//
// An item may hold handles (a Queue, a Lock, a SharedDict, ...): its record lists the segments
// they point into, and the queue counts them (detail/shm/ref_table.hpp) until the item is taken,
// so each process keeps those objects mapped while the item waits, even once the producer dropped
// its own handles (see detail/shm/registry.hpp).
//
// The ring is a memfd reserved at its full size (buffer_bytes, 1 GiB by default) but sparse:
// memory is used only as items fill it and is handed back as they are read. An item larger
// than the ring streams through it in pieces while a consumer reads it (see docs/shared-memory.md
// for the protocol and for what a process killed mid-put or mid-get leaves behind: nothing torn,
// nothing that blocks the others). The byte queue beneath Queue<T> is detail/shm/queue_ring.hpp
// (the ring and its cursor) and detail/shm/byte_queue.hpp (waiting and waking).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/shm/byte_queue.hpp"
#include "detail/shm/queue_ring.hpp"
#include "detail/shm/shared_object.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

/// How a Queue is made: `mproc::Queue<T> q({.maxsize = 100, .buffer_bytes = 64 << 20});`
struct QueueOptions {
    /// At most this many items at once (put waits, or throws Full after its timeout); 0: no limit.
    std::size_t maxsize = 0;
    /// Capacity of the shared byte ring. Address space is reserved up front; memory is used only
    /// as items fill it. An item that does not fit streams through while a consumer reads it.
    std::size_t buffer_bytes = std::size_t{1} << 30;
};

/// A FIFO of T between processes: many producers, many consumers. A handle: copies share it.
template <class T> class Queue {
    static_assert(is_serializable_v<T>, "mproc::Queue<T>: T must be serialisable");

public:
    Queue() : Queue(QueueOptions{}) {}
    explicit Queue(std::size_t maxsize) : Queue(QueueOptions{.maxsize = maxsize}) {}
    explicit Queue(const QueueOptions& options) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::ByteQueue::create(options.buffer_bytes, options.maxsize, detail::type_hash<Queue<T>>());
    }

    /// Adds `item`; with a bounded queue (or a full ring) waits for room, up to `timeout` if
    /// given, then throws mproc::Full. Serialisation errors surface here. After close(): Error.
    void put(const T& item, std::optional<Seconds> timeout = std::nullopt) {
        if (closed_) throw Error("mproc::Queue::put: this handle was closed");
        Buffer& bytes = scratch();
        bytes.clear();
        std::vector<std::uint64_t> ids;  // the segments the item's handles point into
        {
            detail::EncodeCapture handles;
            encode_into(bytes, item);
            if (!handles.segments().empty()) ids = handles.ids();
        }
        if (!queue().put(bytes.bytes(), detail::deadline_after(timeout), ids))
            throw Full("mproc::Queue::put: the queue stayed full for the whole timeout");
    }
    void put_nowait(const T& item) { put(item, Seconds{0}); }

    /// Removes and returns the next item, waiting for one (up to `timeout`, then mproc::Empty).
    T get(std::optional<Seconds> timeout = std::nullopt) {
        std::optional<T> item = take(detail::deadline_after(timeout), false);
        if (!item) throw Empty("mproc::Queue::get: no item arrived within the timeout");
        return std::move(*item);
    }
    T get_nowait() {
        std::optional<T> item = take(std::nullopt, true);
        if (!item) throw Empty("mproc::Queue::get_nowait: the queue is empty");
        return std::move(*item);
    }
    /// The next item if there is one now.
    std::optional<T> try_get() { return take(std::nullopt, true); }

    /// Items in the queue (approximate while others put and get).
    std::size_t qsize() const {
        const std::size_t n = queue().count();
        detail::segments().sweep();  // every call notices what other processes let go
        return n;
    }
    bool empty() const { return qsize() == 0; }
    /// True when a bounded queue holds maxsize items.
    bool full() const {
        const std::size_t limit = queue().maxsize();
        return limit != 0 && qsize() >= limit;
    }
    std::size_t maxsize() const { return queue().maxsize(); }
    /// The ring's capacity in bytes.
    std::size_t buffer_bytes() const { return queue().capacity(); }
    /// Memory the queue holds right now, in bytes (touched pages not yet handed back).
    std::size_t memory_in_use() const { return ref_ ? ref_.segment()->memory().resident_bytes() : 0; }

    /// This handle puts no more: put() on it throws mproc::Error. Other handles are unaffected.
    void close() noexcept { closed_ = true; }
    bool closed() const noexcept { return closed_; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::queue_magic, detail::type_hash<Queue<T>>(), sizeof(detail::QueueHeader), "Queue");
            detail::ByteQueue::check(ref_);
            closed_ = false;
        }
    }

private:
    /// The next item, decoded while the segments its handles point into are still held here.
    std::optional<T> take(const detail::Deadline& deadline, bool nowait) {
        Buffer& bytes = scratch();
        std::vector<detail::SegmentPtr> pins;
        std::optional<T> item;
        if (queue().get(bytes, deadline, nowait, &pins)) item.emplace(decode<T>(bytes.bytes()));
        pins.clear();
        detail::segments().sweep();  // the queue no longer counts the item's handles
        return item;
    }
    detail::ByteQueue queue() const { return detail::ByteQueue(ref_); }
    static Buffer& scratch() {
        thread_local Buffer buffer;
        return buffer;
    }

    detail::SharedRef ref_;
    bool closed_ = false;
};

}  // namespace mproc
