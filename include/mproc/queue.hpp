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
// they point into, and the queue counts them (detail/ref_table.hpp) until the item is taken, so
// each process keeps those objects mapped while the item waits, even once the producer dropped
// its own handles (see detail/shm_registry.hpp).
//
// The ring is a memfd reserved at its full size (buffer_bytes, 1 GiB by default) but sparse:
// memory is used only as items fill it and is handed back as they are read. An item larger
// than the ring streams through it in pieces while a consumer reads it (see docs/shared-memory.md
// for the protocol and for what a process killed mid-put or mid-get leaves behind: nothing torn,
// nothing that blocks the others).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/os/spin.hpp"
#include "detail/shm/futex.hpp"
#include "detail/shm/ref_table.hpp"
#include "detail/shm/robust_mutex.hpp"
#include "detail/shm/memory.hpp"
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

namespace detail {

inline constexpr std::uint32_t queue_magic = 0x6d515545u;  // "mQUE"
/// Marks a record whose payload follows in pieces (a streamed item).
inline constexpr std::uint64_t stream_flag = std::uint64_t{1} << 63;
/// A record word alone: the rest of this lap of the ring is unused, the next record starts the
/// next lap (see ByteQueue::lap_back).
inline constexpr std::uint64_t lap_flag = std::uint64_t{1} << 62;
/// Marks a record whose item holds handles: the word is followed by their number n and n
/// segment ids (counted in the queue's RefTable until the item is taken), then the payload.
inline constexpr std::uint64_t refs_flag = std::uint64_t{1} << 61;
inline constexpr std::uint64_t record_flags = stream_flag | refs_flag;
/// The most bytes copied in or out under the queue's lock at once.
inline constexpr std::size_t queue_piece = std::size_t{1} << 20;
/// Consumed ring memory beyond the first `queue_resident` bytes goes back to the kernel in
/// chunks of `queue_chunk`; the first part stays, as the hot area a busy queue cycles through.
inline constexpr std::size_t queue_chunk = std::size_t{1} << 20;
inline constexpr std::size_t queue_resident = std::size_t{4} << 20;
/// How long a consumer that finds the queue empty watches it before it sleeps (see spin_for_change).
inline constexpr std::chrono::microseconds queue_spin{20};
/// How long a producer waits, at most, for a busy consumer before it writes past the resident
/// part of the ring (see ByteQueue::should_pace); how recent a take makes a consumer busy, and
/// how long producers stop waiting after a wait that did not pay off.
inline constexpr std::chrono::microseconds queue_pace{500};
inline constexpr std::int64_t queue_pace_active_ns = 1'000'000;

/// Where the queue stands. Positions count bytes since the ring was last empty; the byte at
/// position p lives at ring[p % capacity]. Two copies alternate and one store of `current`
/// publishes a new one, so a process that dies while holding the lock leaves either the old
/// state or the new one, never a mix.
struct QueueCursor {
    std::uint64_t head;        // next byte to consume
    std::uint64_t tail;        // end of the committed bytes
    std::uint64_t count;       // items whose record has been committed and not yet taken
    std::uint64_t stream_at;   // record position of the item being streamed in (while writing)
    std::uint64_t write_left;  // its payload bytes not yet committed
    std::uint64_t read_left;   // payload bytes of the streamed item being drained, not yet read
    std::uint32_t writing;     // a producer streams an item in (and holds write_claim)
    std::uint32_t reading;     // a consumer drains a streamed item (and holds read_claim)
    std::uint32_t aborted;     // the item being drained lost its producer: the reader drops it
    std::uint32_t reserved;
};

struct QueueHeader {
    ObjectHeader header;
    std::uint64_t capacity;
    std::uint64_t maxsize;
    std::uint64_t data_offset;
    RobustMutex mutex;        // guards the cursor and the ring
    RobustMutex write_claim;  // held by the producer streaming an item in, across lock holds
    RobustMutex read_claim;   // held by the consumer draining a streamed item
    std::atomic<std::uint32_t> current;
    std::uint32_t reserved;
    std::uint64_t refs;       // segment offset of the RefTable, past the ring
    QueueCursor cursors[2];
    // Futex words: bumped on every change a sleeper of that kind may be waiting for.
    alignas(64) FutexWord items;  // an item can be taken
    FutexWord space;              // a put can start
    FutexWord stream_data;        // more of the streamed item arrived (or it was aborted)
    FutexWord stream_room;        // the streaming producer has room again
    std::atomic<std::uint32_t> item_waiters;   // hints: a wake is needed only when nonzero
    std::atomic<std::uint32_t> space_waiters;
    std::atomic<std::uint32_t> item_wake_sent;  // a wake is on its way to a sleeper (see wait)
    std::atomic<std::uint32_t> space_wake_sent;
    // Hints for a producer deciding whether to wait a moment rather than run ahead (see put):
    alignas(64) std::atomic<std::uint64_t> used;        // tail - head as last published
    std::atomic<std::int64_t> last_take_ns;             // when a consumer last took bytes
    std::atomic<std::int64_t> pace_off_until_ns;        // producers do not wait until then
};

/// The queue's logic on raw bytes; Queue<T> adds (de)serialisation.
class ByteQueue {
public:
    static SharedRef create(const QueueOptions& options, std::uint64_t type) {
        std::size_t capacity = round_up(std::max<std::size_t>(options.buffer_bytes, 4096), page_size());
        if (capacity > queue_resident) capacity = round_up(capacity, queue_chunk);
        if (capacity > (std::size_t{1} << 46))
            throw Error("mproc::Queue: buffer_bytes " + std::to_string(options.buffer_bytes) + " is too large");
        const std::size_t data_offset = round_up(sizeof(QueueHeader), page_size());
        // The RefTable lies past the ring, in pages of its own (sparse: untouched, they cost nothing).
        SharedRef ref = SharedRef::dedicated(data_offset + capacity + sizeof(RefTable), "mproc-queue");
        auto* h = new (ref.address()) QueueHeader;
        h->header = {queue_magic, 0, type};
        h->capacity = capacity;
        h->maxsize = options.maxsize;
        h->data_offset = data_offset;
        h->refs = data_offset + capacity;
        h->mutex.init();
        h->write_claim.init();
        h->read_claim.init();
        segments().mark_container(*ref.segment(), &container_view);
        return ref;
    }

    static void check(const SharedRef& ref) {
        const auto* h = reinterpret_cast<const QueueHeader*>(ref.address());
        const std::size_t size = ref.segment()->size();
        if (ref.offset() != 0 || h->data_offset < sizeof(QueueHeader) || h->data_offset > size ||
            h->capacity > size - h->data_offset || h->refs != h->data_offset + h->capacity ||
            size - h->refs < sizeof(RefTable))
            throw SerializationError("mproc: corrupt Queue handle: its layout does not match its memory");
        segments().mark_container(*ref.segment(), &container_view);
    }

    /// How the registry reads a queue's RefTable (see detail/shm_registry.hpp).
    static constexpr ContainerView container_view{
        [](const std::byte* base, std::uint64_t id) noexcept {
            const auto* h = reinterpret_cast<const QueueHeader*>(base);
            return RefCounts::may_reference(reinterpret_cast<const RefTable*>(base + h->refs), id);
        },
        [](const std::byte* base) noexcept {
            const auto* h = reinterpret_cast<const QueueHeader*>(base);
            return RefCounts::version(reinterpret_cast<const RefTable*>(base + h->refs));
        }};

    explicit ByteQueue(const SharedRef& ref)
        : h_(ref.as<QueueHeader>()), ring_(ref.address() + h_->data_offset), cap_(h_->capacity),
          refs_(reinterpret_cast<RefTable*>(ref.address() + h_->refs)) {}

    /// Copies `msg` into the queue; `ids` are the segments its handles point into. False if
    /// `deadline` passed first (nothing was added). Full, at once, if the queue already counts
    /// handles into as many segments as its RefTable holds.
    bool put(std::span<const std::byte> msg, const Deadline& deadline, std::span<const std::uint64_t> ids = {}) {
        const std::uint64_t len = msg.size();
        if (len >= refs_flag) throw Error("mproc::Queue::put: item too large");
        if (ids.size() > RefTable::max_live) throw Full("mproc::Queue::put: the item holds handles into too many shared objects");
        // The record's header: its word, then (for an item holding handles) n and the n ids.
        const std::uint64_t header = ids.empty() ? 8 : 16 + 8 * ids.size();
        const bool whole = header + len <= std::min<std::uint64_t>(cap_, queue_piece);
        Wakes wakes;
        {
            Guard guard = lock();
            RefCounts counts(refs_);
            counts.reserve(ids, "mproc::Queue::put");
            bool paced = false;
            for (;;) {
                QueueCursor c = cursor();
                if (c.writing && probe_writer(c, wakes)) c = cursor();
                const std::uint64_t room = cap_ - (c.tail - c.head);
                if (!c.writing && (h_->maxsize == 0 || c.count < h_->maxsize) && room >= (whole ? header + len : header)) {
                    if (paced || !should_pace(c, whole ? header + len : header)) break;
                    paced = true;  // once per put: then it goes ahead whatever happened
                    pace(guard, wakes, whole ? header + len : header);
                    continue;
                }
                if (expired(deadline)) {
                    wakes.fire(*h_);
                    return false;
                }
                wait(guard, h_->space, h_->space_waiters, h_->space_wake_sent, deadline, wakes);
                counts.reserve(ids, "mproc::Queue::put");  // others may have counted meanwhile
            }
            QueueCursor c = cursor();
            if (whole) {
                lap_back(c, header + len);
                if (!ids.empty()) {
                    counts.begin();
                    counts.add(ids);
                }
                write_header(c.tail, len, ids);
                copy_in(c.tail + header, msg.data(), len);
                c.tail += header + len;
                ++c.count;
                publish(c);
                if (!ids.empty()) counts.end();
                wakes.items = true;
                guard.unlock();
                wakes.fire(*h_);
                return true;
            }
            // Streamed: claim the ring for this item, commit its record, then pieces as room allows.
            const LockResult claim = h_->write_claim.try_lock();
            if (!holds(claim)) throw Error("mproc::Queue: internal error: the write claim is held with no stream");
            if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
            lap_back(c, header + len);  // an item that fits the free start of the ring streams there
            if (!ids.empty()) {
                counts.begin();
                counts.add(ids);
            }
            write_header(c.tail, len | stream_flag, ids);
            c.stream_at = c.tail;
            c.tail += header;
            ++c.count;
            c.writing = 1;
            c.write_left = len;
            publish(c);
            if (!ids.empty()) counts.end();
            wakes.items = true;
            std::uint64_t sent = 0;
            for (;;) {
                c = cursor();
                const std::uint64_t room = cap_ - (c.tail - c.head);
                const std::uint64_t n = std::min<std::uint64_t>({c.write_left, room, queue_piece});
                if (n > 0) {
                    copy_in(c.tail, msg.data() + sent, n);
                    sent += n;
                    c.tail += n;
                    c.write_left -= n;
                    if (c.write_left == 0) c.writing = 0;
                    publish(c);
                    wakes.data = true;
                    if (c.write_left == 0) {
                        h_->write_claim.unlock();
                        wakes.space = true;  // producers waiting for the stream to end
                        guard.unlock();
                        wakes.fire(*h_);
                        return true;
                    }
                    // Let consumers (and the reader of this item) in between pieces.
                    guard.unlock();
                    wakes.fire(*h_);
                    wakes = Wakes{};
                    guard.lock();
                    continue;
                }
                if (expired(deadline)) {
                    // Withdraw the partial item: a reader that started it drops it.
                    abort_stream(c);
                    publish(c);
                    h_->write_claim.unlock();
                    wakes.data = wakes.space = wakes.items = true;
                    guard.unlock();
                    wakes.fire(*h_);
                    return false;
                }
                const std::uint32_t seen = h_->stream_room.load(std::memory_order_acquire);
                guard.unlock();
                wakes.fire(*h_);
                wakes = Wakes{};
                futex_wait(h_->stream_room, seen, sleep_until_for(deadline));
                guard.lock();
            }
        }
    }

    /// Takes the next item into `out`. False if there was none before `deadline` (or at once,
    /// with `nowait`). Once it has started reading a streamed item it finishes it, whatever the
    /// deadline — unless its producer dies or gives up, which drops the item. The segments the
    /// item's handles point into are put in `pins` (those this process maps) before the queue
    /// stops counting them, so they stay mapped here until the item is decoded.
    bool get(Buffer& out, const Deadline& deadline, bool nowait, std::vector<SegmentPtr>* pins = nullptr) {
        Wakes wakes;
        Guard guard = lock();
        for (;;) {
            QueueCursor c = cursor();
            if (c.reading) {
                // Another consumer drains a streamed item; take it over if that consumer died.
                const LockResult claim = h_->read_claim.try_lock();
                if (holds(claim)) {
                    if (claim == LockResult::owner_died) h_->read_claim.mark_consistent();
                    drain(guard, nullptr, 0, wakes);  // its first part went with the dead reader
                    continue;
                }
            } else if (c.count > 0) {
                const std::uint64_t word = read_word(c.head);
                if (word == lap_flag) {  // the producer went back to the ring's start
                    const std::uint64_t from = c.head;
                    c.head += cap_ - c.head % cap_;
                    // The rest of the lap holds no memory (each chunk past the resident part
                    // was handed back when an earlier lap's reader passed it): only the lap
                    // record's own chunk may, so only it is looked at, not every chunk skipped.
                    consumed(c, c.head, wakes);
                    release_chunk(round_down(from, queue_chunk), c);
                    publish(c);
                    continue;
                }
                const std::uint64_t len = word & ~record_flags;
                const std::vector<std::uint64_t> ids = record_ids(c.head, word);
                const std::uint64_t header = ids.empty() ? 8 : 16 + 8 * ids.size();
                out.resize(static_cast<std::size_t>(len));  // may throw: nothing taken yet
                if (pins)
                    for (std::uint64_t id : ids)
                        if (SegmentPtr segment = segments().find(id)) pins->push_back(std::move(segment));
                RefCounts counts(refs_);
                if (!(word & stream_flag)) {
                    if (!ids.empty()) {
                        counts.begin();
                        counts.remove(ids);
                    }
                    copy_out(c.head + header, out.data(), len);
                    const std::uint64_t from = c.head;
                    c.head += header + len;
                    --c.count;
                    consumed(c, from, wakes);
                    publish(c);
                    if (!ids.empty()) counts.end();
                    if (c.count > 0) wakes.items = true;  // pass the wake-up on
                    guard.unlock();
                    wakes.fire(*h_);
                    return true;
                }
                const LockResult claim = h_->read_claim.try_lock();
                if (!holds(claim)) throw Error("mproc::Queue: internal error: the read claim is held with no reader");
                if (claim == LockResult::owner_died) h_->read_claim.mark_consistent();
                if (!ids.empty()) {
                    counts.begin();
                    counts.remove(ids);
                }
                const std::uint64_t from = c.head;
                c.head += header;
                --c.count;
                c.reading = 1;
                c.read_left = len;
                c.aborted = 0;
                consumed(c, from, wakes);
                publish(c);
                if (!ids.empty()) counts.end();  // the item's handles are this reader's from here
                if (drain(guard, out.data(), len, wakes)) {
                    guard.unlock();
                    wakes.fire(*h_);
                    return true;
                }
                continue;  // its producer died or gave up: wait for the next item
            }
            if (nowait || expired(deadline)) {
                guard.unlock();
                wakes.fire(*h_);
                return false;
            }
            if (spin_for_change(guard, h_->items, wakes)) continue;
            wait(guard, h_->items, h_->item_waiters, h_->item_wake_sent, deadline, wakes);
        }
    }

    std::size_t count() {
        Guard guard = lock();
        return static_cast<std::size_t>(cursor().count);
    }
    std::size_t maxsize() const noexcept { return static_cast<std::size_t>(h_->maxsize); }
    std::size_t capacity() const noexcept { return static_cast<std::size_t>(cap_); }

private:
    struct Repair {
        ByteQueue* q;
        void operator()() const {
            // The cursor is whole (double-buffered). A claim holder that died shows up as a
            // claim whose owner died; check the producer's now, readers' are taken over in get().
            QueueCursor c = q->cursor();
            Wakes wakes;
            if (c.writing) q->probe_writer(c, wakes);
            wakes.fire(*q->h_);
            // A holder killed while counting an item's handles left the RefTable changing:
            // count them again from the records in the ring.
            if (q->refs_->version & 1u) q->recount();
        }
    };

    /// The segment ids a record lists (none without refs_flag). Throws on a corrupt count.
    std::vector<std::uint64_t> record_ids(std::uint64_t pos, std::uint64_t word) const {
        std::vector<std::uint64_t> ids;
        if (!(word & refs_flag)) return ids;
        const std::uint64_t n = read_word(pos + 8);
        if (n == 0 || n > RefTable::max_live) throw Error("mproc::Queue: a record's handle count is corrupted");
        ids.resize(static_cast<std::size_t>(n));
        copy_out(pos + 16, reinterpret_cast<std::byte*>(ids.data()), 8 * n);
        return ids;
    }
    /// Writes a record's header at `pos`: its word (with refs_flag when it lists ids), n, the ids.
    void write_header(std::uint64_t pos, std::uint64_t word, std::span<const std::uint64_t> ids) noexcept {
        if (ids.empty()) {
            write_word(pos, word);
            return;
        }
        write_word(pos, word | refs_flag);
        write_word(pos + 8, ids.size());
        copy_in(pos + 16, reinterpret_cast<const std::byte*>(ids.data()), ids.size_bytes());
    }
    /// With the lock held: the RefTable counted again from every record in the ring. A streamed
    /// item already being drained has been taken (its handles went with its reader); a record
    /// being streamed in is the last, and its header is whole.
    void recount() {
        RefCounts counts(refs_);
        counts.begin();
        counts.clear();
        const QueueCursor c = cursor();
        std::uint64_t pos = c.reading ? c.head + c.read_left : c.head;
        while (pos + 8 <= c.tail) {
            const std::uint64_t word = read_word(pos);
            if (word == lap_flag) {
                pos += cap_ - pos % cap_;
                continue;
            }
            const std::vector<std::uint64_t> ids = record_ids(pos, word);
            counts.reserve(ids, "mproc::Queue");  // they fitted when they were put
            counts.add(ids);
            pos += (ids.empty() ? 8 : 16 + 8 * ids.size()) + (word & ~record_flags);
        }
        counts.end();
    }
    using Guard = RobustGuard<Repair>;
    Guard lock() { return Guard(h_->mutex, Repair{this}); }

    /// Wake-ups decided under the lock and sent after it is released.
    struct Wakes {
        bool items = false, space = false, data = false, room = false;
        void fire(QueueHeader& h) {
            // A wake already sent and not yet taken by its sleeper (woken but not yet running)
            // is not sent again: otherwise every put made meanwhile pays a futile system call.
            if (items && h.item_waiters.load(std::memory_order_seq_cst) != 0 &&
                h.item_wake_sent.exchange(1, std::memory_order_seq_cst) == 0)
                futex_wake(h.items, 1);
            // Producers wait for different amounts of room, so a single wake could pick one
            // that still cannot go while another could: wake them all.
            if (space && h.space_waiters.load(std::memory_order_seq_cst) != 0 &&
                h.space_wake_sent.exchange(1, std::memory_order_seq_cst) == 0)
                futex_wake_all(h.space);
            if (data) futex_wake_all(h.stream_data);
            if (room) futex_wake_all(h.stream_room);
            *this = Wakes{};
        }
    };

    QueueCursor cursor() const noexcept { return h_->cursors[h_->current.load(std::memory_order_relaxed) & 1u]; }
    void publish(const QueueCursor& c) noexcept {
        const std::uint32_t next = (h_->current.load(std::memory_order_relaxed) & 1u) ^ 1u;
        h_->cursors[next] = c;
        h_->current.store(next, std::memory_order_release);
        h_->used.store(c.tail - c.head, std::memory_order_relaxed);
        // Every published change may be what some sleeper waits for: bump all the words; the
        // sleepers re-check their own condition.
        h_->items.fetch_add(1, std::memory_order_relaxed);
        h_->space.fetch_add(1, std::memory_order_relaxed);
        h_->stream_data.fetch_add(1, std::memory_order_relaxed);
        h_->stream_room.fetch_add(1, std::memory_order_relaxed);
    }

    /// A producer about to write past the resident part of the ring, while a consumer is taking
    /// items right now, would only run ahead into memory the kernel must hand out fresh (and take
    /// back once read): a page fault and a page release per 4 KiB, which costs more than the copy.
    /// It waits a moment for the consumer instead. The wait is short and happens once per put, so
    /// a put still never blocks on an unbounded queue: with no consumer busy, it goes ahead at once.
    bool should_pace(const QueueCursor& c, std::uint64_t need) const noexcept {
        if (cap_ <= queue_resident || c.tail - c.head + need <= queue_resident || c.head == c.tail) return false;
        const std::int64_t now = steady_ns();
        return now - h_->last_take_ns.load(std::memory_order_relaxed) < queue_pace_active_ns &&
               now >= h_->pace_off_until_ns.load(std::memory_order_relaxed);
    }
    /// With the lock held: releases it and watches the consumer drain the ring back within the
    /// resident part (or stop taking), for at most queue_pace; the lock is held again on return.
    void pace(Guard& guard, Wakes& wakes, std::uint64_t need) {
        wakes.fire(*h_);
        guard.unlock();
        if (!spin_until([&] { return h_->used.load(std::memory_order_relaxed) + need <= queue_resident; }, queue_pace))
            // The consumer is far behind: stop waiting for it for a while.
            h_->pace_off_until_ns.store(steady_ns() + queue_pace_active_ns, std::memory_order_relaxed);
        guard.lock();
    }

    /// Before a consumer sleeps: watches `word` for a few microseconds with the lock released.
    /// A busy producer publishes again within that time, and a consumer that sees it awake
    /// spares both sides a futex system call (a sleeper costs the producer a wake on every put).
    /// Bounded by queue_spin, so an idle consumer still sleeps at once after it. Returns true
    /// when the word changed (the lock is held again either way).
    bool spin_for_change(Guard& guard, FutexWord& word, Wakes& wakes) {
        wakes.fire(*h_);
        const std::uint32_t seen = word.load(std::memory_order_acquire);
        guard.unlock();
        const bool changed = spin_until([&] { return word.load(std::memory_order_acquire) != seen; }, queue_spin);
        guard.lock();
        return changed;
    }

    /// (Also before a streamed record, for an item that fits there whole.)
    /// Positions only grow, so a queue that never quite empties walks its whole reserved ring:
    /// every page past the resident part is faulted in fresh, read once and handed back — a page
    /// fault and a page release per 4 KiB, which costs more than the copy. A whole record about
    /// to go past the resident part therefore goes back to the start of the ring instead,
    /// when the consumer has already read past the room it needs there: a lap record marks
    /// the rest of this lap unused. A busy queue thus cycles through the same warm pages; the
    /// ring grows past its resident part only when the consumer falls that far behind.
    void lap_back(QueueCursor& c, std::uint64_t need) noexcept {
        if (cap_ <= queue_resident || c.writing) return;
        const std::uint64_t at = c.tail % cap_;
        // The live bytes [head, tail) lie within [need, at) of this lap: [0, need) is free.
        if (at < queue_resident || at + 8 > cap_ || c.tail - c.head + need > at) return;
        write_word(c.tail, lap_flag);
        c.tail += cap_ - at;
    }

    /// Sleeps on `word` with the lock released, until woken or the next re-check is due.
    /// `wake_sent` is set by the waker that wakes this word's sleepers and cleared by each
    /// sleeper that returns, so every other waker holds back only until a woken sleeper runs.
    void wait(Guard& guard, FutexWord& word, std::atomic<std::uint32_t>& waiters,
              std::atomic<std::uint32_t>& wake_sent, const Deadline& deadline, Wakes& wakes) {
        wakes.fire(*h_);
        waiters.fetch_add(1, std::memory_order_seq_cst);
        const std::uint32_t seen = word.load(std::memory_order_acquire);
        guard.unlock();
        futex_wait(word, seen, sleep_until_for(deadline));
        // No longer a sleeper once awake: deregister before taking the lock, or every put made
        // while this waiter waits for the lock would pay for a futile wake.
        waiters.fetch_sub(1, std::memory_order_seq_cst);
        wake_sent.store(0, std::memory_order_seq_cst);
        guard.lock();
    }

    /// With the lock and the read claim held and a streamed item being drained: copies the rest
    /// into `dst` (or drops it when `dst` is null), releasing the lock between pieces. Returns
    /// true when the item is complete, false when it was aborted. Either way the claim is
    /// released and the lock is held on return.
    bool drain(Guard& guard, std::byte* dst, std::uint64_t len, Wakes& wakes) {
        for (;;) {
            QueueCursor c = cursor();
            if (c.aborted || (c.read_left > 0 && c.tail == c.head && !c.writing)) {
                c.aborted = 0;
                c.reading = 0;
                c.read_left = 0;
                consumed(c, c.head, wakes);
                publish(c);
                h_->read_claim.unlock();
                if (c.count > 0) wakes.items = true;
                return false;
            }
            const std::uint64_t n = std::min<std::uint64_t>({c.read_left, c.tail - c.head, queue_piece});
            if (n > 0 || c.read_left == 0) {
                if (dst && n > 0) copy_out(c.head, dst + (len - c.read_left), n);
                const std::uint64_t from = c.head;
                c.head += n;
                c.read_left -= n;
                const bool done = c.read_left == 0;
                if (done) c.reading = 0;
                consumed(c, from, wakes);
                publish(c);
                if (done) {
                    h_->read_claim.unlock();
                    if (c.count > 0) wakes.items = true;
                    return true;
                }
                guard.unlock();
                wakes.fire(*h_);
                guard.lock();
                continue;
            }
            // Waiting for the producer's next piece: is it still alive?
            if (probe_writer(c, wakes)) continue;
            const std::uint32_t seen = h_->stream_data.load(std::memory_order_acquire);
            guard.unlock();
            wakes.fire(*h_);
            futex_wait(h_->stream_data, seen, sleep_until_for(std::nullopt));
            guard.lock();
        }
    }

    /// With the lock held and an item streaming in: if its producer died, withdraws the item
    /// (publishing the change) and returns true.
    bool probe_writer(QueueCursor c, Wakes& wakes) {
        if (!c.writing) return false;
        const LockResult claim = h_->write_claim.try_lock();
        if (claim == LockResult::timed_out || claim == LockResult::would_deadlock) return false;  // alive
        abort_stream(c);
        publish(c);
        if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
        h_->write_claim.unlock();
        wakes.items = wakes.space = wakes.data = true;
        return true;
    }

    /// Withdraws the item being streamed in: cut off if no consumer took it yet (and its
    /// handles no longer counted), otherwise marked aborted so its reader drops what it has.
    void abort_stream(QueueCursor& c) noexcept {
        if (c.reading && c.head > c.stream_at) {
            c.head = c.tail;  // everything after the record is this item's
            c.read_left = 0;
            c.aborted = 1;
        } else {
            const std::uint64_t word = read_word(c.stream_at);
            if (word & refs_flag) {
                const std::uint64_t n = read_word(c.stream_at + 8);
                if (n != 0 && n <= RefTable::max_live) {
                    std::vector<std::uint64_t> ids(static_cast<std::size_t>(n));
                    copy_out(c.stream_at + 16, reinterpret_cast<std::byte*>(ids.data()), 8 * n);
                    RefCounts counts(refs_);
                    counts.begin();
                    counts.remove(ids);
                    counts.end();
                }
            }
            const std::uint64_t written = c.tail;
            c.tail = c.stream_at;
            --c.count;
            if (cap_ > queue_resident)
                for (std::uint64_t chunk = round_up(c.tail, queue_chunk); chunk < written; chunk += queue_chunk)
                    release_chunk(chunk, c);
        }
        c.writing = 0;
        c.write_left = 0;
        if (c.head == c.tail && !c.reading) c.head = c.tail = 0;
    }

    /// Called as [from, c.head) is consumed: rewinds an emptied ring to position 0 (so a queue
    /// that keeps up cycles through the same warm pages) and returns consumed memory beyond
    /// the resident part to the kernel. Producers may be waiting for this room.
    void consumed(QueueCursor& c, std::uint64_t from, Wakes& wakes) noexcept {
        // The time of a take matters to producers only while the ring holds more than its resident
        // part (should_pace): a queue kept short by its consumers need not read the clock per item.
        if (cap_ > queue_resident && c.tail - c.head >= queue_resident / 4)
            h_->last_take_ns.store(steady_ns(), std::memory_order_relaxed);
        wakes.room = c.writing != 0;
        wakes.space = true;
        if (cap_ <= queue_resident) {
            if (c.head == c.tail && !c.writing && !c.reading) c.head = c.tail = 0;
            return;
        }
        for (std::uint64_t chunk = round_down(from, queue_chunk); chunk + queue_chunk <= c.head; chunk += queue_chunk)
            release_chunk(chunk, c);
        if (c.head == c.tail && !c.writing && !c.reading) {
            release_chunk(round_down(c.head, queue_chunk), c);
            c.head = c.tail = 0;
        }
    }
    /// Hands back the ring memory of the chunk at stream position `chunk` unless a live byte
    /// (one in [head, tail)) shares its place in the ring, or it lies in the resident part.
    void release_chunk(std::uint64_t chunk, const QueueCursor& c) noexcept {
        const std::uint64_t at = chunk % cap_;
        if (at < queue_resident) return;
        // Live bytes span at most one capacity, so only the neighbouring laps can overlap.
        for (int lap = -1; lap <= 1; ++lap) {
            if (lap < 0 && chunk < cap_) continue;
            const std::uint64_t lo = lap < 0 ? chunk - cap_ : chunk + static_cast<std::uint64_t>(lap) * cap_;
            if (lo < c.tail && lo + queue_chunk > c.head) return;
        }
        release_pages(ring_ + at, queue_chunk);
    }

    void copy_in(std::uint64_t pos, const std::byte* src, std::uint64_t n) noexcept {
        const std::uint64_t at = pos % cap_;
        const std::uint64_t first = std::min(n, cap_ - at);
        if (first) std::memcpy(ring_ + at, src, first);
        if (n > first) std::memcpy(ring_, src + first, n - first);
    }
    void copy_out(std::uint64_t pos, std::byte* dst, std::uint64_t n) const noexcept {
        const std::uint64_t at = pos % cap_;
        const std::uint64_t first = std::min(n, cap_ - at);
        if (first) std::memcpy(dst, ring_ + at, first);
        if (n > first) std::memcpy(dst + first, ring_, n - first);
    }
    void write_word(std::uint64_t pos, std::uint64_t word) noexcept { copy_in(pos, reinterpret_cast<const std::byte*>(&word), 8); }
    std::uint64_t read_word(std::uint64_t pos) const noexcept {
        std::uint64_t word = 0;
        copy_out(pos, reinterpret_cast<std::byte*>(&word), 8);
        return word;
    }

    QueueHeader* h_;
    std::byte* ring_;
    std::uint64_t cap_;
    RefTable* refs_;
};

}  // namespace detail

/// A FIFO of T between processes: many producers, many consumers. A handle: copies share it.
template <class T>
class Queue {
    static_assert(is_serializable_v<T>, "mproc::Queue<T>: T must be serialisable");

public:
    Queue() : Queue(QueueOptions{}) {}
    explicit Queue(std::size_t maxsize) : Queue(QueueOptions{.maxsize = maxsize}) {}
    explicit Queue(const QueueOptions& options) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::ByteQueue::create(options, detail::type_hash<Queue<T>>());
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
