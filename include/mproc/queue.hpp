// mproc — Queue: a multi-producer, multi-consumer FIFO between processes.
//
//     mproc::Queue<std::vector<int>> q;            // unbounded;  Queue<T> q(16) holds at most 16 items
//     mproc::Process producer([&] { q.put({42, 7}); });
//     producer.start();
//     auto v = q.get();                            // blocks;  q.get(1s) throws mproc::Empty on timeout
//     q.put(x, 1s);                                // on a full bounded queue: mproc::Full after 1s
//     std::optional<T> item = q.try_get();         // nullopt when empty
//     q.shutdown();                                // put throws mproc::ShutDown; get drains, then throws it
//
//     mproc::JoinableQueue<int> jobs;              // a Queue that counts unfinished items
//     jobs.put(1);  int job = jobs.get();  jobs.task_done();
//     jobs.join();                                 // until every item put has had its task_done()
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
//
// shutdown() and JoinableQueue follow Python 3.13's queue.Queue (shutdown, task_done, join). The
// shut-down flag lives in the queue's cursor and the count of unfinished items is derived from it
// and one counter beside it, so every process sees them, and a process killed in the middle of
// changing them leaves them as before or as after (see detail/shm/queue_ring.hpp).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/os/memory_use.hpp"
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
    explicit Queue(const QueueOptions& options) : Queue(options, 0) {}

    /// Adds `item`; with a bounded queue (or a full ring) waits for room, up to `timeout` if
    /// given, then throws mproc::Full. Serialisation errors surface here. After close(): Error.
    /// Once the queue is shut down (also while waiting for room): mproc::ShutDown.
    void put(const T& item, std::optional<Seconds> timeout = std::nullopt) {
        if (closed_.get()) throw Error("mproc::Queue::put: this handle was closed");
        // From the call on (a NaN timeout is refused before the item's serialize runs).
        const detail::Deadline deadline = detail::deadline_after(timeout);
        if constexpr (detail::is_length_and_bytes_v<T>) {
            // A string, or a vector of numbers: its length, then its own bytes, copied once,
            // straight into the ring (encoded into a buffer first, a large item was copied twice).
            const std::uint64_t length = item.size();
            const detail::ItemBytes msg{std::as_bytes(std::span(&length, 1)), std::as_bytes(std::span(item))};
            if (!queue().put(msg, deadline))
                throw Full("mproc::Queue::put: the queue stayed full for the whole timeout");
            return;
        }
        Buffer& bytes = scratch();
        bytes.clear();
        std::vector<std::uint64_t> ids;  // the segments the item's handles point into
        {
            detail::EncodeCapture handles;
            encode_into(bytes, item);
            if (!handles.segments().empty()) ids = handles.ids();
        }
        if (!queue().put(bytes.bytes(), deadline, ids))
            throw Full("mproc::Queue::put: the queue stayed full for the whole timeout");
    }
    void put_nowait(const T& item) { put(item, Seconds{0}); }

    /// Removes and returns the next item, waiting for one (up to `timeout`, then mproc::Empty).
    /// On a queue that is shut down, once no item is left: mproc::ShutDown (also to a waiting get).
    T get(std::optional<Seconds> timeout = std::nullopt) {
        std::optional<T> item = take(detail::deadline_after(timeout), false, "mproc::Queue::get");
        if (!item) throw Empty("mproc::Queue::get: no item arrived within the timeout");
        return std::move(*item);
    }
    T get_nowait() {
        std::optional<T> item = take(std::nullopt, true, "mproc::Queue::get_nowait");
        if (!item) throw Empty("mproc::Queue::get_nowait: the queue is empty");
        return std::move(*item);
    }
    /// The next item if there is one now (nullopt when there is none, shut down or not).
    std::optional<T> try_get() { return take(std::nullopt, true, nullptr); }

    /// Shuts the queue down for every handle in every process (Python 3.13's Queue.shutdown): put
    /// throws mproc::ShutDown from now on, and get returns what is left, then throws ShutDown
    /// instead of waiting. With `immediate`, what is left is dropped now (its memory freed, the
    /// objects its handles kept alive let go) and counts as done for join(). Either way every put
    /// and get blocked on the queue, in any process, wakes and throws ShutDown (a get that still
    /// finds an item takes it). Calling it again is harmless; an immediate one after a plain one
    /// still drops what is left.
    void shutdown(bool immediate = false) {
        queue().shutdown(immediate);
        detail::segments().sweep();  // the dropped items' handles
    }
    /// True once shutdown() was called, through any handle.
    bool is_shutdown() const { return queue().is_shut_down(); }

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
    void close() noexcept { closed_.set(true); }
    bool closed() const noexcept { return closed_.get(); }

    /// A Queue<T> handle decodes from a Queue<T> or a JoinableQueue<T> (which is a Queue<T>).
    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            decode_handle(ar, std::nullopt, "Queue");
        }
    }

protected:
    /// `joinable`: type_hash<JoinableQueue<T>>() for a JoinableQueue, 0 for a Queue.
    Queue(const QueueOptions& options, std::uint64_t joinable) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::ByteQueue::create(options.buffer_bytes, options.maxsize, detail::type_hash<Queue<T>>(),
                                         joinable);
    }

    /// Reads a handle into this one: a queue of items of type T, and (when `joinable` is given)
    /// one made as that JoinableQueue type. On any error this handle is unchanged.
    void decode_handle(Reader& in, std::optional<std::uint64_t> joinable, const char* what) {
        detail::SharedRef ref;
        ref.decode(in, detail::queue_magic, detail::type_hash<Queue<T>>(), sizeof(detail::QueueHeader), what);
        detail::ByteQueue::check(ref);
        if (joinable && detail::ByteQueue(ref).joinable() != *joinable)
            throw SerializationError(std::string("mproc: the handle does not refer to a ") + what + " of this type");
        ref_ = std::move(ref);
        closed_.set(false);
    }

    detail::ByteQueue queue() const { return detail::ByteQueue(ref_); }

private:
    /// The next item, decoded while the segments its handles point into are still held here.
    /// ShutDown (`caller` in its message) when the queue is shut down and empty, unless `caller`
    /// is null: then nullopt.
    std::optional<T> take(const detail::Deadline& deadline, bool nowait, const char* caller) {
        Buffer& bytes = scratch();
        std::vector<detail::SegmentPtr> pins;
        std::optional<T> item;
        detail::Take taken;
        if constexpr (detail::is_length_and_bytes_v<T>) {
            // A string or vector of numbers is read straight into its own memory: one copy, where
            // decoding from the buffer made two, and its allocation is made before the item is
            // taken, so a get that runs out of memory leaves the item in the queue.
            DirectPlace place;
            bool direct = false;
            taken = queue().get(bytes, deadline, nowait, &pins, place, direct);
            if (taken == detail::Take::item && direct) [[unlikely]] {
                if (place.length != place.value.size())
                    throw SerializationError("mproc::Queue: an item's length field says " +
                                             std::to_string(place.length) + ", its bytes hold " +
                                             std::to_string(place.value.size()));
                item.emplace(std::move(place.value));
                taken = detail::Take::none;  // taken already: not decoded below
            }
        } else {
            // A whole item is decoded before it is taken (ByteQueue::get): a get that runs out of
            // memory decoding it leaves it in the queue. A streamed one is decoded after.
            DecodePlace place;
            bool direct = false;
            taken = queue().get(bytes, deadline, nowait, &pins, place, direct);
            if (taken == detail::Take::item && place.value) {
                item = std::move(place.value);
                taken = detail::Take::none;  // decoded already
            }
        }
        if (taken == detail::Take::item) [[likely]]
            item.emplace(decode<T>(bytes.bytes()));
        else if (taken == detail::Take::shut_down && caller) throw_shut_down(caller);
        pins.clear();
        detail::segments().sweep();  // the queue no longer counts the item's handles
        return item;
    }
    [[noreturn, gnu::cold, gnu::noinline]] static void throw_shut_down(const char* caller) {
        detail::segments().sweep();
        throw ShutDown(std::string(caller) + ": the queue is shut down and empty");
    }
    /// Where a string or vector of numbers is read (ByteQueue::get's `place`): its length field,
    /// then straight into the value's own memory. A record that cannot be one (its bytes
    /// past the length are no whole number of elements) is not taken here: it goes through the
    /// buffer, whose decoding reports it.
    struct DirectPlace {
        std::uint64_t length = 0;
        std::size_t elements = 0;
        T value{};
        static constexpr std::size_t element = sizeof(typename T::value_type);
        static bool takes(std::uint64_t len) noexcept {
            return len >= sizeof(std::uint64_t) && (len - sizeof(std::uint64_t)) % element == 0;
        }
        void reserve(std::uint64_t len) {
            elements = static_cast<std::size_t>((len - sizeof length) / element);
            // After an item dropped half-way (its producer died), a much smaller one must not keep
            // that one's memory.
            if (value.capacity() > 2 * elements + (std::size_t{1} << 20) / element) T().swap(value);
            value.reserve(elements);
            // A large value is a fresh allocation that the copy below writes whole.
            detail::advise_huge_pages(value.data(), value.capacity() * element);
        }
        static void accept(std::span<const std::byte>) noexcept {}  // one it does not take: decoded after
        /// A value of characters is appended to (append_to), so its bytes are written once; a
        /// vector of wider numbers is sized first (a run may end inside an element).
        static constexpr bool appended = std::is_same_v<typename T::value_type, char> ||
                                         std::is_same_v<typename T::value_type, signed char> ||
                                         std::is_same_v<typename T::value_type, unsigned char>;
        detail::ItemPlace place() noexcept {
            const auto head = std::as_writable_bytes(std::span(&length, 1));
            if constexpr (appended) {
                value.clear();
                return {head, {}, &append_to, &value};
            } else {
                value.resize(elements);  // within the capacity reserve() made: nothing to allocate
                return {head, std::as_writable_bytes(std::span(value))};
            }
        }
        /// Within the capacity reserve() made (the runs add up to the record's length, which
        /// reserve() was given): nothing to allocate, nothing to throw.
        static void append_to(void* value, const std::byte* bytes, std::size_t n) noexcept {
            T& v = *static_cast<T*>(value);
            const auto* first = reinterpret_cast<const typename T::value_type*>(bytes);
            if constexpr (std::is_same_v<T, std::string>) v.append(first, n);
            else v.insert(v.end(), first, first + n);
        }
    };

    /// Where any other type is decoded (ByteQueue::get's `place`): a whole item, from the
    /// buffer, before it is taken.
    struct DecodePlace : detail::NoDirectPlace {
        std::optional<T> value;
        void accept(std::span<const std::byte> bytes) { value.emplace(decode<T>(bytes)); }
    };

    static Buffer& scratch() {
        thread_local Buffer buffer;
        return buffer;
    }

    detail::SharedRef ref_;
    /// The handle's closed flag: close() on one thread may meet a put() through the same handle
    /// on another. Copied with the handle.
    class ClosedFlag {
    public:
        ClosedFlag() = default;
        ClosedFlag(const ClosedFlag& other) noexcept : value_(other.get()) {}
        ClosedFlag& operator=(const ClosedFlag& other) noexcept {
            set(other.get());
            return *this;
        }
        ~ClosedFlag() = default;
        bool get() const noexcept { return value_.load(std::memory_order_relaxed); }
        void set(bool closed) noexcept { value_.store(closed, std::memory_order_relaxed); }

    private:
        std::atomic<bool> value_{false};
    };
    ClosedFlag closed_;
};

/// A Queue that counts the items put and not yet processed (Python's JoinableQueue): each
/// consumer calls task_done() once per item it got, and join() waits until every item put has
/// had its task_done(). A handle, like Queue; it is a Queue<T> (a copy of it as a Queue<T> refers
/// to the same queue), but a plain Queue<T> handle does not decode as a JoinableQueue<T>.
///
/// A consumer that dies between get() and task_done() leaves its item unfinished, as in Python:
/// join() then waits for it for ever — give join a timeout where consumers may die.
template <class T> class JoinableQueue : public Queue<T> {
public:
    JoinableQueue() : JoinableQueue(QueueOptions{}) {}
    explicit JoinableQueue(std::size_t maxsize) : JoinableQueue(QueueOptions{.maxsize = maxsize}) {}
    explicit JoinableQueue(const QueueOptions& options) : Queue<T>(options, detail::type_hash<JoinableQueue<T>>()) {}

    /// One item got from the queue has been processed. mproc::Error, changing nothing, when it is
    /// called more times than items were put (Python's ValueError).
    void task_done() { this->queue().task_done(); }

    /// Waits until every item put has had its task_done() (or was dropped by shutdown(true)):
    /// true; false if `timeout` passed first. Waiting uses no CPU.
    bool join(std::optional<Seconds> timeout = std::nullopt) {
        return this->queue().join(detail::deadline_after(timeout));
    }

    /// Items put and not yet marked done (approximate while others work).
    std::size_t unfinished_tasks() const { return this->queue().unfinished(); }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            Queue<T>::serialize(ar);
        } else {
            this->decode_handle(ar, detail::type_hash<JoinableQueue<T>>(), "JoinableQueue");
        }
    }
};

}  // namespace mproc
