// mproc — the Queue's ring in shared memory: its layout, its records, and every change to its cursor.
//
// This is the queue's arithmetic, kept apart from its blocking (detail/shm/byte_queue.hpp decides
// when to wait and whom to wake). Each change here is made under the queue's lock, reads the
// cursor, computes the new one and publishes it with one store, and reports in a QueueWakes which
// sleepers the change concerns; nothing here waits.
//
// The ring is a memfd reserved at its full size but sparse: memory is used only as records fill
// it, and consumed memory past the resident part is handed back (see docs/shared-memory.md for the
// protocol and for what a process killed mid-put or mid-get leaves behind).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "futex.hpp"
#include "memory.hpp"
#include "ref_table.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

inline constexpr std::uint32_t queue_magic = 0x6d515545u;  // "mQUE"
/// Marks a record whose payload follows in pieces (a streamed item).
inline constexpr std::uint64_t stream_flag = std::uint64_t{1} << 63;
/// A record word alone: the rest of this lap of the ring is unused, the next record starts the
/// next lap (see QueueRing::lap_back).
inline constexpr std::uint64_t lap_flag = std::uint64_t{1} << 62;
/// Marks a record whose item holds handles: the word is followed by their number n and n
/// segment ids (counted in the queue's RefTable until the item is taken), then the payload.
inline constexpr std::uint64_t refs_flag = std::uint64_t{1} << 61;
inline constexpr std::uint64_t record_flags = stream_flag | refs_flag;
/// The most bytes of a streamed item reserved and copied at once: the copy itself runs with the
/// lock released, so producer and consumer copy different pieces at the same time.
inline constexpr std::size_t queue_piece = std::size_t{256} << 10;
/// Consumed ring memory beyond the first `resident` bytes goes back to the kernel in chunks of
/// `queue_chunk`; the first part stays, as the hot area a busy queue cycles through. It is
/// `queue_resident`, raised while items larger than half of it stream through (room for three of
/// them — one being read, one being written, one written ahead — up to `queue_resident_max`) and lowered again once the ring empties more than
/// `queue_resident_hold_ns` after the last such item started.
inline constexpr std::size_t queue_chunk = std::size_t{1} << 20;
inline constexpr std::size_t queue_resident = std::size_t{4} << 20;
inline constexpr std::size_t queue_resident_max = std::size_t{256} << 20;
inline constexpr std::int64_t queue_resident_hold_ns = 1'000'000'000;

/// Where the queue stands. Positions count bytes since the ring was last empty; the byte at
/// position p lives at ring[p % capacity]. Two copies alternate and one store of `current`
/// publishes a new one, so a process that dies while holding the lock leaves either the old
/// state or the new one, never a mix.
struct QueueCursor {
    std::uint64_t head;  // next byte to consume
    std::uint64_t tail;  // end of the committed bytes
    std::uint64_t count;  // items whose record has been committed and not yet taken
    std::uint64_t stream_at;  // record position of the item being streamed in (while writing)
    std::uint64_t write_left;  // its payload bytes not yet committed
    std::uint64_t read_left;  // payload bytes of the streamed item being drained, not yet read
    std::uint32_t writing;  // a producer streams an item in (and holds write_claim)
    std::uint32_t reading;  // a consumer drains a streamed item (and holds read_claim)
    std::uint32_t aborted;  // the item being drained lost its producer: the reader drops it
    std::uint32_t shut_down;  // shutdown() was called: puts are refused, gets end once it is empty
};
// Every put and get copies a cursor: a larger one costs every call (a 72-byte one, a few percent).
static_assert(sizeof(QueueCursor) == 64, "a cursor is one cache line");

// The header's layout follows who writes what: every put and get takes the mutex, reads the live
// cursor, writes the idle one, stores `current` (and a get `taken`) and bumps `items`, each line
// moving to the other side's core in turn. So the mutex, `current` and `taken` share one line,
// each cursor has a line of its own, and the fields written once (or rarely) share none with them.
struct QueueHeader {
    ObjectHeader header;
    std::uint64_t capacity;
    std::uint64_t maxsize;
    std::uint64_t data_offset;
    std::uint64_t refs;  // segment offset of the RefTable, past the ring
    std::uint64_t joinable;  // type_hash<JoinableQueue<T>>() for a JoinableQueue, 0 for a Queue
    // The resident part of the ring (see queue_resident), and when an item last needed it raised.
    std::atomic<std::uint64_t> resident;  // changed under the lock; read without it by a pacing producer
    std::int64_t resident_raised_ns;
    alignas(64) RobustMutex mutex;  // guards the cursor and the ring
    std::atomic<std::uint32_t> current;
    std::uint32_t reserved;
    // Items got and not yet marked done, less task_done() calls made ahead of a get (so it may be
    // negative). With the cursor it makes the count of a JoinableQueue's unfinished items (see
    // QueueRing::unfinished_signed). Changed only under the lock, by one store, and by a get on
    // every queue (a test of `joinable` would cost each get more than the add).
    std::int64_t taken;
    alignas(64) RobustMutex write_claim;  // held by the producer streaming an item in, across lock holds
    RobustMutex read_claim;  // held by the consumer draining a streamed item
    alignas(64) QueueCursor cursors[2];
    // Futex words: bumped on every change a sleeper of that kind may be waiting for. `items` and
    // `space` count in steps of 2: their low bit (wake_wanted) is a sleeper's request for a wake.
    alignas(64) FutexWord items;  // an item can be taken
    FutexWord space;  // a put can start
    FutexWord stream_data;  // more of the streamed item arrived (or it was aborted)
    FutexWord stream_room;  // the streaming producer has room again
    std::atomic<std::uint32_t> item_waiters;  // sleepers on `items` and on `space` (see QueueLock::wait)
    std::atomic<std::uint32_t> space_waiters;
    FutexWord tasks_done;  // every item put is done (unfinished reached 0), or shut down
    std::atomic<std::uint32_t> join_waiters;  // hint: JoinableQueue::join callers asleep on tasks_done
    // Hints for a producer deciding whether to wait a moment rather than run ahead (see ByteQueue::put):
    alignas(64) std::atomic<std::uint64_t> used;  // tail - head as last published (see QueueRing::note_used)
    std::atomic<std::int64_t> last_take_ns;  // when a consumer last took bytes
    std::atomic<std::int64_t> pace_off_until_ns;  // producers do not wait until then
};

/// The low bit of the `items` and `space` futex words: set by a sleeper before it sleeps, taken
/// (cleared) by each waker that then wakes (see send_wakes and QueueLock::wait).
inline constexpr std::uint32_t wake_wanted = 1;

/// The sleepers a published change concerns: decided under the lock, woken after it is released
/// (byte_queue.hpp).
struct QueueWakes {
    bool items = false, space = false, data = false, room = false;
};

/// The bytes of a record before its payload: its word, then (for an item holding handles) n and
/// the n segment ids.
inline constexpr std::uint64_t record_header_bytes(std::size_t ids) noexcept { return ids == 0 ? 8 : 16 + 8 * ids; }

/// An item's bytes as a put copies them into the ring: `head`, then `body`. An item encoded into
/// one buffer has no body; a large string or vector of numbers goes as its encoded length (the
/// head) and its own characters or elements (the body), which are copied once, straight into the
/// ring (see Queue::put).
struct ItemBytes {
    std::span<const std::byte> head;
    std::span<const std::byte> body = {};
    std::uint64_t size() const noexcept { return head.size() + body.size(); }
};

/// Where a get copies a taken item: `head`, then `body` (ItemBytes' other side: a large string or
/// vector of numbers is read straight into its own memory, see Queue::take).
struct ItemPlace {
    std::span<std::byte> head;
    std::span<std::byte> body = {};
};

/// A record as read at the head of the ring.
struct QueueRecord {
    std::uint64_t len;  // payload bytes
    bool streamed;  // its payload follows in pieces
    std::vector<std::uint64_t> ids;  // the segments its item's handles point into
    std::uint64_t header_bytes() const noexcept { return record_header_bytes(ids.size()); }
};

/// How far a streamed item got in one step (QueueRing's reserve_ and commit_ write and read pieces).
enum class StreamStep {
    blocked,  // nothing reserved: the ring is full (writing) or holds none of the item yet (reading)
    more,  // a piece was reserved (reserve_), or committed and more is to come (commit_)
    done,  // the item is complete (its claim released)
    dropped,  // the item lost its producer (reading), or was dropped by shutdown(immediate) (writing);
    // the claim released
};

/// A piece of a streamed item, reserved under the lock and copied with it released: `n` bytes at
/// stream position `pos`, which are bytes [at, at + n) of the item's payload.
struct StreamPiece {
    std::uint64_t pos = 0;
    std::uint64_t at = 0;
    std::uint64_t n = 0;
};

/// The ring and its cursor, on raw bytes. Everything but create() and check() requires the
/// queue's lock.
class QueueRing {
public:
    static SharedRef create(std::size_t buffer_bytes, std::size_t maxsize, std::uint64_t type, std::uint64_t joinable) {
        std::size_t capacity = round_up(std::max<std::size_t>(buffer_bytes, 4096), page_size());
        if (capacity > queue_resident) capacity = round_up(capacity, queue_chunk);
        if (capacity > (std::size_t{1} << 46))
            throw Error("mproc::Queue: buffer_bytes " + std::to_string(buffer_bytes) + " is too large");
        const std::size_t data_offset = round_up(sizeof(QueueHeader), page_size());
        // The RefTable lies past the ring, in pages of its own (sparse: untouched, they cost nothing).
        SharedRef ref = SharedRef::dedicated(data_offset + capacity + sizeof(RefTable), "mproc-queue");
        auto* h = new (ref.address()) QueueHeader;
        h->header = {queue_magic, 0, type};
        h->capacity = capacity;
        h->maxsize = maxsize;
        h->data_offset = data_offset;
        h->refs = data_offset + capacity;
        h->joinable = joinable;
        h->resident.store(std::min<std::uint64_t>(capacity, queue_resident), std::memory_order_relaxed);
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
            h->resident.load(std::memory_order_relaxed) > h->capacity || size - h->refs < sizeof(RefTable))
            throw SerializationError("mproc: corrupt Queue handle: its layout does not match its memory");
        segments().mark_container(*ref.segment(), &container_view);
    }

    /// How the registry reads a queue's RefTable (see detail/shm/registry.hpp).
    static constexpr ContainerView container_view{
        [](const std::byte* base, std::uint64_t id) noexcept {
            const auto* h = reinterpret_cast<const QueueHeader*>(base);
            return RefCounts::may_reference(reinterpret_cast<const RefTable*>(base + h->refs), id);
        },
        [](const std::byte* base) noexcept {
            const auto* h = reinterpret_cast<const QueueHeader*>(base);
            return RefCounts::version(reinterpret_cast<const RefTable*>(base + h->refs));
        }};

    explicit QueueRing(const SharedRef& ref)
        : h_(ref.as<QueueHeader>()), ring_(ref.address() + h_->data_offset), cap_(h_->capacity),
          refs_(reinterpret_cast<RefTable*>(ref.address() + h_->refs)) {}

    QueueHeader& header() const noexcept { return *h_; }
    std::uint64_t capacity() const noexcept { return cap_; }
    QueueCursor cursor() const noexcept { return h_->cursors[h_->current.load(std::memory_order_relaxed) & 1u]; }
    /// The JoinableQueue type this queue was made as (0: a plain Queue). Needs no lock: set once.
    std::uint64_t joinable() const noexcept { return h_->joinable; }

    // ---- what a put may do ----

    /// True when an item of `bytes` (record header included) goes in one piece; a larger one streams.
    bool fits_whole(std::uint64_t bytes) const noexcept { return bytes <= std::min<std::uint64_t>(cap_, queue_piece); }

    /// True when a put that needs `need` bytes of the ring now may start: no item streams in,
    /// the queue holds fewer than maxsize items and the ring has the room.
    bool admits(const QueueCursor& c, std::uint64_t need) const noexcept {
        return !c.writing && (h_->maxsize == 0 || c.count < h_->maxsize) && cap_ - (c.tail - c.head) >= need;
    }

    /// True when `need` more bytes would take the ring past its resident part while a consumer
    /// has something to take: the case in which a producer may wait for the consumer (ByteQueue::should_pace).
    bool runs_past_resident(const QueueCursor& c, std::uint64_t need) const noexcept {
        return cap_ > queue_resident && c.tail - c.head + need > resident() && c.head != c.tail;
    }

    /// Throws Full, changing nothing, unless the RefTable can count `ids` once more.
    void reserve_refs(std::span<const std::uint64_t> ids) {
        RefCounts counts(refs_);
        counts.reserve(ids, "mproc::Queue::put");
    }

    /// Commits a whole record of `msg` (whose handles point into `ids`) and publishes it.
    void put_whole(const ItemBytes& msg, std::span<const std::uint64_t> ids, QueueWakes& wakes) noexcept {
        QueueCursor c = cursor();
        const std::uint64_t header = record_header_bytes(ids.size());
        const std::uint64_t len = msg.size();
        lap_back(c, header + len);
        RefCounts counts(refs_);
        if (!ids.empty()) {
            counts.begin();
            counts.add(ids);
        }
        write_header(c.tail, len, ids);
        copy_item_in(c.tail + header, msg, 0, len);
        c.tail += header + len;
        ++c.count;
        publish(c);
        if (!ids.empty()) counts.end();
        wakes.items = true;
    }

    /// Streamed: claims the ring for this item and commits its record, published so a consumer
    /// can start on it at once; its payload follows piece by piece (reserve_write_piece).
    void start_stream(std::uint64_t len, std::span<const std::uint64_t> ids, QueueWakes& wakes) {
        const LockResult claim = h_->write_claim.try_lock();
        if (!holds(claim)) throw Error("mproc::Queue: internal error: the write claim is held with no stream");
        if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
        QueueCursor c = cursor();
        const std::uint64_t header = record_header_bytes(ids.size());
        raise_resident(header + len);
        lap_back(c, header + len);  // an item that fits the free start of the ring streams there
        RefCounts counts(refs_);
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
    }

    /// With the stream of an item started: reserves its next piece in `piece`, as much as the
    /// ring has room for (more), or none (blocked). The piece is the producer's alone — no other
    /// put starts while it streams, no consumer reads past the tail, no memory past the tail is
    /// handed back — so it copies with the lock released (copy_piece_in), then commits it. If
    /// shutdown(immediate) withdrew the item meanwhile, releases the claim and reports it dropped.
    StreamStep reserve_write_piece(std::uint64_t len, StreamPiece& piece) noexcept {
        const QueueCursor c = cursor();
        if (!c.writing) {  // only shut_down() clears it under a live producer: the item was dropped
            h_->write_claim.unlock();
            return StreamStep::dropped;
        }
        const std::uint64_t n = std::min<std::uint64_t>({c.write_left, cap_ - (c.tail - c.head), queue_piece});
        if (n == 0) return StreamStep::blocked;
        piece = {c.tail, len - c.write_left, n};
        return StreamStep::more;
    }
    /// Copies a reserved piece of the item `msg` in; needs no lock.
    void copy_piece_in(const StreamPiece& piece, const ItemBytes& msg) noexcept {
        copy_item_in(piece.pos, msg, piece.at, piece.n);
    }
    /// Commits the piece copied in, and publishes it. The last piece releases the write claim. If
    /// shutdown(immediate) withdrew the item while the piece was copied, releases the claim (and
    /// the memory the copy touched) and reports it dropped.
    StreamStep commit_write_piece(const StreamPiece& piece, QueueWakes& wakes) noexcept {
        QueueCursor c = cursor();
        if (!c.writing) {
            release_all_but(c);
            h_->write_claim.unlock();
            return StreamStep::dropped;
        }
        c.tail += piece.n;  // the producer alone moves the tail while it streams: it is piece.pos
        c.write_left -= piece.n;
        if (c.write_left == 0) c.writing = 0;
        publish(c);
        wakes.data = true;
        if (c.write_left != 0) return StreamStep::more;
        h_->write_claim.unlock();
        wakes.space = true;  // producers waiting for the stream to end
        return StreamStep::done;
    }

    /// The streaming producer gives up: withdraws its partial item (a reader that started it
    /// drops it) and releases the write claim.
    void withdraw_stream(QueueWakes& wakes) noexcept {
        QueueCursor c = cursor();
        abort_stream(c);
        publish(c);
        h_->write_claim.unlock();
        wakes.data = wakes.space = wakes.items = true;
    }

    /// With an item streaming in: if its producer died, withdraws the item (publishing the
    /// change) and returns true.
    bool probe_writer(QueueWakes& wakes) {
        QueueCursor c = cursor();
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

    // ---- what a get may do ----

    std::uint64_t word_at(std::uint64_t pos) const noexcept { return read_word(pos); }

    /// The record at `pos` whose word is `word` (not a lap record). Throws on a corrupt count.
    QueueRecord record_at(std::uint64_t pos, std::uint64_t word) const {
        return {word & ~record_flags, (word & stream_flag) != 0, record_ids(pos, word)};
    }

    /// Passes the lap record at the head (cursor `c`): the producer went back to the ring's start.
    void skip_lap(QueueCursor c, QueueWakes& wakes) noexcept {
        const std::uint64_t from = c.head;
        c.head += cap_ - c.head % cap_;
        // The rest of the lap holds no memory (each chunk past the resident part
        // was handed back when an earlier lap's reader passed it): only the lap
        // record's own chunk may, so only it is looked at, not every chunk skipped.
        consumed(c, c.head, wakes);
        release_chunk(round_down(from, queue_chunk), c);
        publish(c);
    }

    /// Takes the whole record `r` at the head (cursor `c`) into `dst`, publishes, and stops
    /// counting its handles.
    void take_whole(QueueCursor c, const QueueRecord& r, std::byte* dst, QueueWakes& wakes) noexcept {
        RefCounts counts(refs_);
        if (!r.ids.empty()) {
            counts.begin();
            counts.remove(r.ids);
        }
        copy_out(c.head + r.header_bytes(), dst, r.len);
        const std::uint64_t from = c.head;
        c.head += r.header_bytes() + r.len;
        --c.count;
        consumed(c, from, wakes);
        publish(c);
        ++h_->taken;  // after the publish: a taker killed between leaves its item done, not stuck
        if (!r.ids.empty()) counts.end();
        if (c.count > 0) wakes.items = true;  // pass the wake-up on
    }

    /// Starts draining the streamed record `r` at the head (cursor `c`): takes the read claim
    /// and the record, and publishes; its payload follows piece by piece (reserve_read_piece).
    void start_read(QueueCursor c, const QueueRecord& r, QueueWakes& wakes) {
        const LockResult claim = h_->read_claim.try_lock();
        if (!holds(claim)) throw Error("mproc::Queue: internal error: the read claim is held with no reader");
        if (claim == LockResult::owner_died) h_->read_claim.mark_consistent();
        RefCounts counts(refs_);
        if (!r.ids.empty()) {
            counts.begin();
            counts.remove(r.ids);
        }
        const std::uint64_t from = c.head;
        c.head += r.header_bytes();
        --c.count;
        c.reading = 1;
        c.read_left = r.len;
        c.aborted = 0;
        consumed(c, from, wakes);
        publish(c);
        if (!r.ids.empty()) counts.end();  // the item's handles are this reader's from here
    }

    /// With another consumer draining a streamed item: takes its read claim over if that
    /// consumer died (true); the caller then drains the rest away.
    bool take_over_read() {
        const LockResult claim = h_->read_claim.try_lock();
        if (!holds(claim)) return false;
        if (claim == LockResult::owner_died) h_->read_claim.mark_consistent();
        return true;
    }

    /// With the read claim held and a streamed item of `len` bytes being drained: reserves its
    /// next piece in `piece`, as much as has arrived (more; possibly none, when nothing is left to
    /// read), or none yet (blocked). The piece is the reader's alone — the head moves only with
    /// it, and memory is handed back only behind the head — so it copies with the lock released
    /// (copy_piece_out), then commits it. Finding the item aborted releases the read claim
    /// (dropped).
    StreamStep reserve_read_piece(std::uint64_t len, StreamPiece& piece, QueueWakes& wakes) noexcept {
        const QueueCursor c = cursor();
        if (c.aborted || (c.read_left > 0 && c.tail == c.head && !c.writing)) return drop_read(c, wakes);
        const std::uint64_t n = std::min<std::uint64_t>({c.read_left, c.tail - c.head, queue_piece});
        if (n == 0 && c.read_left != 0) return StreamStep::blocked;
        piece = {c.head, len - c.read_left, n};
        return StreamStep::more;
    }
    /// Copies a reserved piece of the item out; needs no lock.
    void copy_piece_out(const StreamPiece& piece, const ItemPlace& place) const noexcept {
        copy_item_out(piece.pos, place, piece.at, piece.n);
    }
    /// Commits the piece read (`kept`: copied out; false when draining away the item of a reader
    /// that died), and publishes. The last piece — or finding the item aborted while the piece
    /// was copied — releases the read claim.
    StreamStep commit_read_piece(const StreamPiece& piece, bool kept, QueueWakes& wakes) noexcept {
        QueueCursor c = cursor();
        if (c.aborted) return drop_read(c, wakes);
        const std::uint64_t from = c.head;
        c.head += piece.n;
        c.read_left -= piece.n;
        const bool done = c.read_left == 0;
        if (done) c.reading = 0;
        consumed(c, from, wakes);
        publish(c);
        if (!done) return StreamStep::more;
        // It counted as unfinished by `reading` until now; drained away (the reader that took it
        // died), it is lost with that reader and done.
        if (kept) ++h_->taken;
        h_->read_claim.unlock();
        if (c.count > 0 || c.shut_down) wakes.items = true;  // the next item, or ShutDown
        return StreamStep::done;
    }

    // ---- shutdown and tasks ----

    /// Shuts the queue down: from now on puts are refused, and gets end once it is empty. With
    /// `immediate`, every item not yet taken is dropped now — an item streaming in is withdrawn
    /// (its producer finds out at its next piece; a reader that started it drops it) — and counts
    /// as done, as queue.Queue.shutdown(immediate=True) does; an item a consumer is draining whole
    /// stays that consumer's. Published by one store; the dropped items' memory goes back after.
    void shut_down(bool immediate) noexcept {
        QueueCursor c = cursor();
        c.shut_down = 1;
        if (!immediate) {
            publish(c);
            return;
        }
        if (c.writing && c.reading && c.head > c.stream_at) {
            // The item streaming in is the one being drained: everything after its record is
            // its own. Its reader drops it (as when its producer dies).
            c.head = c.tail;
            c.read_left = 0;
            c.aborted = 1;
        } else if (c.reading) {
            c.tail = c.head + c.read_left;  // the item being drained is whole: it stays its reader's
        } else {
            c.head = c.tail = 0;
        }
        c.count = 0;
        c.writing = 0;
        c.write_left = 0;
        // No item left holds handles (the one being drained was uncounted when it was taken).
        RefCounts counts(refs_);
        const bool uncount = counts.live() != 0;
        if (uncount) {
            counts.begin();
            counts.clear();
        }
        publish(c);
        if (uncount) counts.end();
        settle_unfinished();  // each dropped item counts as done, down to none unfinished
        h_->tasks_done.fetch_add(1, std::memory_order_relaxed);
        // The dropped items' memory goes back, past the base resident part too: a shut-down ring
        // does not empty again to lower a part that large items raised.
        if (resident() > queue_resident) h_->resident.store(queue_resident, std::memory_order_relaxed);
        release_all_but(c);
    }

    /// Items put and not yet marked done (JoinableQueue): the items in the ring — less one still
    /// streaming in, whose put has not returned — plus one being drained, plus those got and not
    /// yet marked done (`taken`). Each change keeps it as it is, but a put that completes (+1) and
    /// a task_done (-1); below 0 only for a moment (see settle_unfinished), read as 0.
    std::int64_t unfinished_signed() const noexcept {
        const QueueCursor c = cursor();
        return static_cast<std::int64_t>(c.count) + (c.reading && !c.aborted ? 1 : 0) - (c.writing ? 1 : 0) + h_->taken;
    }
    std::uint64_t unfinished() const noexcept {
        const std::int64_t n = unfinished_signed();
        return n > 0 ? static_cast<std::uint64_t>(n) : 0;
    }

    /// A consumer finished an item (JoinableQueue::task_done): false, changing nothing, when no
    /// item put is unfinished. Reaching none bumps tasks_done (the caller wakes the joiners).
    bool task_done() noexcept {
        const std::int64_t n = unfinished_signed();
        if (n <= 0) return false;
        --h_->taken;
        if (n == 1) h_->tasks_done.fetch_add(1, std::memory_order_relaxed);
        return true;
    }

    /// Brings the count of unfinished items up to 0 if it is below: after items were dropped (by
    /// shutdown(true), or with a consumer killed between taking an item and counting it got)
    /// that task_done() calls made ahead of their get had already counted.
    void settle_unfinished() noexcept {
        const std::int64_t n = unfinished_signed();
        if (n < 0) h_->taken -= n;
    }

    // ---- repair ----

    /// True when a holder was killed while counting an item's handles (the RefTable is left changing).
    bool refs_changing() const noexcept { return (refs_->version & 1u) != 0; }

    /// The RefTable counted again from every record in the ring. A streamed item already being
    /// drained has been taken (its handles went with its reader); a record being streamed in is
    /// the last, and its header is whole.
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
            pos += record_header_bytes(ids.size()) + (word & ~record_flags);
        }
        counts.end();
    }

private:
    /// The item being drained lost its producer (or was dropped by shutdown(immediate)): the
    /// reader lets it go, and the read claim.
    StreamStep drop_read(QueueCursor c, QueueWakes& wakes) noexcept {
        c.aborted = 0;
        c.reading = 0;
        c.read_left = 0;
        consumed(c, c.head, wakes);
        publish(c);
        h_->read_claim.unlock();
        if (c.count > 0 || c.shut_down) wakes.items = true;  // the next item, or ShutDown
        return StreamStep::dropped;
    }

    void publish(const QueueCursor& c) noexcept {
        const std::uint32_t live = h_->current.load(std::memory_order_relaxed) & 1u;
        const QueueCursor& was = h_->cursors[live];
        const bool streams = c.writing || c.reading || was.writing || was.reading;
        const bool item_for_consumer = c.count > was.count || (was.reading && !c.reading) ||
                                       (c.shut_down && (!was.shut_down || c.count < was.count));
        h_->cursors[live ^ 1u] = c;
        h_->current.store(live ^ 1u, std::memory_order_release);
        note_used(c.tail - c.head);
        // A published change may be what some sleeper waits for: bump the words of those that
        // may wait; each re-checks its own condition. Each bump is a write to a line the other
        // side reads, so only the words someone can be waiting on are bumped:
        // - `items` when a waiting consumer may now go on: a consumer waits while the queue holds
        //   no item, or while another consumer drains a streamed one, until it is shut down and
        //   empty — so when `count` grows, `reading` ends, the queue is shut down, or a shut-down
        //   queue loses an item (shutdown(true), a withdrawn stream). (A consumer that watches
        //   before it sleeps, QueueLock::watch, looks for any change of the word with no request
        //   set, so a request cannot stand in for this test.) A take, which lets no other consumer
        //   go, thus leaves the line alone, and the producer's next bump finds it where it was.
        // - `space` when a producer asked for a wake: a producer sleeps on it only after setting
        //   its wake_wanted bit under this lock (QueueLock::wait), and the bit stays until a waker
        //   takes it and wakes; without the bit no producer is on its way to sleep.
        // - `stream_data` and `stream_room` when an item streams, before or after this change:
        //   only a reader draining one (`reading`) and a producer streaming one (`writing`) sleep
        //   on them, and only they clear those flags — but for a withdrawal, whose cursor before
        //   had the flag.
        if (item_for_consumer) h_->items.fetch_add(2, std::memory_order_relaxed);  // keeps wake_wanted
        if (h_->space.load(std::memory_order_relaxed) & wake_wanted) h_->space.fetch_add(2, std::memory_order_relaxed);
        if (streams) {
            h_->stream_data.fetch_add(1, std::memory_order_relaxed);
            h_->stream_room.fetch_add(1, std::memory_order_relaxed);
        }
    }

    /// Keeps the `used` hint (what a pacing producer watches, ByteQueue::should_pace) where it
    /// matters: pacing starts only past a quarter of the resident part, so below that the hint
    /// is written only to bring it down there — not on every item of a queue that keeps up, as
    /// the write would move its cache line between producer and consumer each time.
    void note_used(std::uint64_t used) noexcept {
        const std::uint64_t quarter = resident() / 4;
        if (used >= quarter || h_->used.load(std::memory_order_relaxed) >= quarter)
            h_->used.store(used, std::memory_order_relaxed);
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
        if (at + need <= resident() || at + 8 > cap_ || c.tail - c.head + need > at) return;
        write_word(c.tail, lap_flag);
        c.tail += cap_ - at;
    }

    std::uint64_t resident() const noexcept { return h_->resident.load(std::memory_order_relaxed); }

    /// Before an item of `need` bytes streams in: a large item raises the resident part to hold
    /// three of them (within queue_resident_max), so that a stream of such items cycles through the
    /// same pages instead of faulting each one in fresh and handing it back once read.
    void raise_resident(std::uint64_t need) noexcept {
        if (cap_ <= queue_resident || need <= queue_resident / 2) return;
        const std::uint64_t want = std::min<std::uint64_t>({cap_, queue_resident_max, round_up(3 * need, queue_chunk)});
        if (want > resident()) h_->resident.store(want, std::memory_order_relaxed);
        h_->resident_raised_ns = monotonic_ns();
    }
    /// With the ring empty: a resident part raised by items none of which started in the last
    /// queue_resident_hold_ns goes back to queue_resident, and its pages to the kernel.
    void lower_resident() noexcept {
        const std::uint64_t r = resident();
        if (r <= queue_resident || monotonic_ns() - h_->resident_raised_ns < queue_resident_hold_ns) return;
        h_->resident.store(queue_resident, std::memory_order_relaxed);
        release_pages(ring_ + queue_resident, r - queue_resident);
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
            // What its producer wrote, a piece it was copying included (it is gone, or it is
            // the caller, between pieces): all of it goes back.
            const std::uint64_t written = live_end(c);
            c.tail = c.stream_at;
            --c.count;
            c.writing = 0;
            c.write_left = 0;
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
    void consumed(QueueCursor& c, std::uint64_t from, QueueWakes& wakes) noexcept {
        // The time of a take matters to producers only while the ring holds more than its resident
        // part (ByteQueue::should_pace): a queue kept short by its consumers need not read the clock per item.
        if (cap_ > queue_resident && c.tail - c.head >= resident() / 4)
            h_->last_take_ns.store(monotonic_ns(), std::memory_order_relaxed);
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
            lower_resident();
        }
    }
    /// Hands back the memory of every chunk of the ring past the resident part that holds no live
    /// byte of `c` (at most two ranges, however large the ring: one system call each).
    void release_all_but(const QueueCursor& c) noexcept {
        if (cap_ <= queue_resident) return;  // then cap_ is a whole number of chunks (create())
        std::uint64_t from = 0, to = cap_;  // the free chunks, [from, to) cyclically in the ring
        if (c.head != live_end(c)) {
            const std::uint64_t live = round_up(live_end(c), queue_chunk) - round_down(c.head, queue_chunk);
            if (live >= cap_) return;
            to = round_down(c.head, queue_chunk) % cap_;
            from = (to + live) % cap_;
        }
        const auto release = [&](std::uint64_t lo, std::uint64_t hi) {
            lo = std::max<std::uint64_t>(lo, resident());
            if (lo < hi) release_pages(ring_ + lo, hi - lo);
        };
        if (from < to) {
            release(from, to);
        } else {
            release(from, cap_);
            release(0, to);
        }
    }
    /// Hands back the ring memory of the chunk at stream position `chunk` unless a live byte
    /// (one in [head, tail)) shares its place in the ring, or it lies in the resident part.
    void release_chunk(std::uint64_t chunk, const QueueCursor& c) noexcept {
        const std::uint64_t at = chunk % cap_;
        if (at < resident()) return;
        const std::uint64_t end = live_end(c);
        // Live bytes span at most one capacity, so only the neighbouring laps can overlap.
        for (int lap = -1; lap <= 1; ++lap) {
            if (lap < 0 && chunk < cap_) continue;
            const std::uint64_t lo = lap < 0 ? chunk - cap_ : chunk + static_cast<std::uint64_t>(lap) * cap_;
            if (lo < end && lo + queue_chunk > c.head) return;
        }
        release_pages(ring_ + at, queue_chunk);
    }
    /// The end of the bytes no memory may be handed back under: the committed ones, and while an
    /// item streams in, the piece its producer may be copying past the tail with the lock
    /// released (reserve_write_piece: at most queue_piece, at most what is left of the item).
    static std::uint64_t live_end(const QueueCursor& c) noexcept {
        return c.writing ? c.tail + std::min<std::uint64_t>(c.write_left, queue_piece) : c.tail;
    }

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

    /// Copies bytes [from, from + n) of `msg` (its head, then its body) to stream position `pos`.
    void copy_item_in(std::uint64_t pos, const ItemBytes& msg, std::uint64_t from, std::uint64_t n) noexcept {
        const std::uint64_t head = msg.head.size();
        if (from < head) {
            const std::uint64_t k = std::min(n, head - from);
            copy_in(pos, msg.head.data() + from, k);
            pos += k;
            from += k;
            n -= k;
        }
        if (n != 0) copy_in(pos, msg.body.data() + (from - head), n);
    }
    /// Copies n bytes from stream position `pos` to bytes [to, to + n) of `place` (its head, then
    /// its body).
    void copy_item_out(std::uint64_t pos, const ItemPlace& place, std::uint64_t to, std::uint64_t n) const noexcept {
        const std::uint64_t head = place.head.size();
        if (to < head) {
            const std::uint64_t k = std::min(n, head - to);
            copy_out(pos, place.head.data() + to, k);
            pos += k;
            to += k;
            n -= k;
        }
        if (n != 0) copy_out(pos, place.body.data() + (to - head), n);
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
    void write_word(std::uint64_t pos, std::uint64_t word) noexcept {
        copy_in(pos, reinterpret_cast<const std::byte*>(&word), 8);
    }
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

}  // namespace mproc::detail
