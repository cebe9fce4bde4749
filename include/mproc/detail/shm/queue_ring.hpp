// mproc — the Queue's ring in shared memory: its layout, its records, and every change to its cursor.
//
// This is the queue's arithmetic, kept apart from its blocking (detail/shm/byte_queue.hpp decides
// when to wait and whom to wake). The cursor has two halves, each with its own lock: producers
// change the write half (`tail`, records put, the item streaming in) under `mutex`, consumers the
// read half (`head`, records taken, the item being drained) under `read_mutex`, so a put and a get
// run at the same time and a one-to-one queue's two locks never change cores. Each change reads its
// own half, computes the new one and publishes it with one store; the other half it reads as last
// published. What changes both halves together — a withdrawn stream, shutdown(immediate), the
// counts of the items' handles — holds both locks, `mutex` first. Each change reports in a
// QueueWakes which sleepers it concerns; nothing here waits.
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
#include <iterator>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "../../errors.hpp"
#include "../os/clock.hpp"
#include "../os/futex.hpp"
#include "crash_points.hpp"
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
/// them — one being read, one being written, one written ahead — up to `queue_resident_max`) and
/// lowered again once the ring empties more than `queue_resident_hold_ns` after the last such item
/// started. A ring that large keeps one chunk free between the producers and the consumers (see
/// QueueRing::room): a consumer hands back a chunk it has read past without the producers' lock,
/// and that chunk's place in the ring must not be the one a producer writes meanwhile.
inline constexpr std::size_t queue_chunk = std::size_t{1} << 20;
inline constexpr std::size_t queue_resident = std::size_t{4} << 20;
inline constexpr std::size_t queue_resident_max = std::size_t{256} << 20;
inline constexpr std::int64_t queue_resident_hold_ns = 1'000'000'000;

/// The producers' half of the cursor, changed only under the queue's `mutex`. Positions count
/// bytes since the queue was made; the byte at position p lives at ring[p % capacity].
struct WriteState {
    std::uint64_t tail;  // end of the committed bytes
    std::uint64_t puts;  // records committed (less those withdrawn), since the queue was made
    std::uint64_t stream_at;  // record position of the item being streamed in (while writing)
    std::uint64_t write_left;  // its payload bytes not yet committed
    std::uint64_t writing;  // a producer streams an item in (and holds write_claim)
};
/// The consumers' half, changed only under `read_mutex`.
struct ReadState {
    std::uint64_t head;  // next byte to consume
    std::uint64_t takes;  // records taken, since the queue was made
    // Items got and not yet marked done, less task_done() calls made ahead of a get (so it may be
    // negative). With the rest it makes the count of a JoinableQueue's unfinished items (see
    // QueueRing::unfinished_signed). Counted on every get of every queue, in the same publish as
    // the take (a test of `joinable` would cost each get more than the add).
    std::int64_t taken;
    // Payload bytes of the streamed item being drained, not yet read; once it is aborted, the
    // bytes its reader passes when it drops it (those its producer committed past the head).
    std::uint64_t read_left;
    std::uint64_t reading;  // a consumer drains a streamed item (and holds read_claim)
    std::uint64_t aborted;  // the item being drained lost its producer: the reader drops it
    // 1 + the position of the first chunk behind the head that a consumer is handing back to the
    // kernel (0: none). Until it is done, producers count the ring as held from there (see
    // QueueCursor::held and QueueRing::hand_back).
    std::uint64_t handing_back;
};

/// One half of the cursor as its side publishes it. Two copies alternate: the side's lock holder
/// writes the idle one and publishes it with one store of `seq` (copies[seq & 1] is live), so a
/// process that dies while holding the lock leaves the old state or the new one, never a mix.
/// The other side reads it without the lock (snapshot): a copy read while `seq` did not move is
/// whole, since the writer writes only the copy that is not live.
template <class State> struct Published {
    static constexpr std::size_t words = sizeof(State) / 8;
    static_assert(sizeof(State) % 8 == 0);

    std::atomic<std::uint64_t> seq;
    std::atomic<std::uint64_t> copies[2][words];

    /// The live copy; needs the side's lock.
    State own() const noexcept { return read(copies[seq.load(std::memory_order_relaxed) & 1u]); }
    /// The live copy, from any thread or process.
    State snapshot() const noexcept {
        for (;;) {
            const std::uint64_t before = seq.load(std::memory_order_acquire);
            const State s = read(copies[before & 1u]);
            std::atomic_thread_fence(std::memory_order_acquire);
            if (seq.load(std::memory_order_relaxed) == before) return s;
        }
    }
    /// Makes `s` the live copy; needs the side's lock.
    void publish(const State& s) noexcept {
        const std::uint64_t now = seq.load(std::memory_order_relaxed);
        // The idle copy was live two publishes ago: a reader that reads what is written here
        // must also see `seq` past that publish (and so try again).
        std::atomic_thread_fence(std::memory_order_release);
        std::uint64_t w[words] = {};
        std::memcpy(w, &s, sizeof s);
        for (std::size_t i = 0; i < words; ++i) copies[(now + 1) & 1u][i].store(w[i], std::memory_order_relaxed);
        seq.store(now + 1, std::memory_order_release);
    }

private:
    static State read(const std::atomic<std::uint64_t> (&copy)[words]) noexcept {
        std::uint64_t w[words] = {};
        for (std::size_t i = 0; i < words; ++i) w[i] = copy[i].load(std::memory_order_relaxed);
        State s;
        std::memcpy(&s, w, sizeof s);
        return s;
    }
};

/// The whole cursor as one caller sees it: its own half as it is, the other as last seen (or both
/// as they are, with both locks held).
struct QueueCursor {
    WriteState w;
    ReadState r;
    bool shut_down;  // shutdown() was called: puts are refused, gets end once it is empty
    /// Items whose record has been committed and not yet taken.
    std::uint64_t count() const noexcept { return w.puts - r.takes; }
    /// Where the consumers' hold on the ring starts: the head, or the chunk behind it that a
    /// consumer is handing back. A producer writes less than a capacity past it.
    std::uint64_t held() const noexcept { return r.handing_back != 0 ? r.handing_back - 1 : r.head; }
};

// The header's layout follows who writes what: each lock shares its cache line with what only its
// holders write, each published half has lines of its own (its side writes them, the other reads
// them), and the fields written once (or rarely) share none with them.
struct QueueHeader {
    ObjectHeader header;
    std::uint64_t capacity;
    std::uint64_t maxsize;
    std::uint64_t data_offset;
    std::uint64_t refs;  // segment offset of the RefTable, past the ring
    std::uint64_t joinable;  // type_hash<JoinableQueue<T>>() for a JoinableQueue, 0 for a Queue
    // The resident part of the ring (see queue_resident), and when an item last needed it raised.
    std::atomic<std::uint64_t> resident;  // changed under `mutex`; read without it
    std::atomic<std::int64_t> resident_raised_ns;
    std::atomic<std::uint32_t> shut_down;  // set once, holding both locks
    alignas(64) RobustMutex mutex;  // the producers' lock: guards `write` and the ring past `tail`
    ReadState read_seen;  // `read` as a producer last read it (under `mutex`)
    alignas(64) Published<WriteState> write;
    alignas(64) RobustMutex read_mutex;  // the consumers' lock: guards `read`
    WriteState write_seen;  // `write` as a consumer last read it (under `read_mutex`)
    alignas(64) Published<ReadState> read;
    alignas(64) RobustMutex write_claim;  // held by the producer streaming an item in, across lock holds
    RobustMutex read_claim;  // held by the consumer draining a streamed item
    // Futex words: each sleeper sets its word's low bit (wake_wanted) before it sleeps; a change a
    // sleeper of that kind may be waiting for takes the bit and wakes (see send_wakes).
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

/// The low bit of a futex word: set by a sleeper before it sleeps, taken (cleared) by each waker
/// that then wakes (see send_wakes and QueueLock::wait).
inline constexpr std::uint32_t wake_wanted = 1;

/// The sleepers a published change concerns: decided under a lock, woken after it is released
/// (byte_queue.hpp).
struct QueueWakes {
    bool items = false, space = false, data = false, room = false;
    bool tasks = false;  // tasks_done was bumped: wake JoinableQueue::join callers
};

/// The bytes of a record before its payload: its word, then (for an item holding handles) n and
/// the n segment ids.
inline constexpr std::uint64_t record_header_bytes(std::size_t ids) noexcept { return ids == 0 ? 8 : 16 + 8 * ids; }

/// An item's bytes as a put copies them into the ring: `head`, then `body`. An item encoded into
/// one buffer has no body; a string or vector of numbers goes as its encoded length (the head)
/// and its own characters or elements (the body), which are copied once, straight into the
/// ring (see Queue::put).
struct ItemBytes {
    std::span<const std::byte> head;
    std::span<const std::byte> body = {};
    std::uint64_t size() const noexcept { return head.size() + body.size(); }
};

/// Where a get copies a taken item: `head`, then `body` (ItemBytes' other side: a string or vector
/// of numbers is read straight into its own memory, see Queue::take). With `append`, the body's
/// bytes go to `value` through it instead, in order, a contiguous run at a time, and `body` is
/// empty: a string is then copied into the room reserved for it, never first filled with zeros
/// to be sized and then copied over.
struct ItemPlace {
    std::span<std::byte> head;
    std::span<std::byte> body = {};
    void (*append)(void* value, const std::byte* bytes, std::size_t n) noexcept = nullptr;
    void* value = nullptr;
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

/// A piece of a streamed item, reserved under a lock and copied with it released: `n` bytes at
/// stream position `pos`, which are bytes [at, at + n) of the item's payload.
struct StreamPiece {
    std::uint64_t pos = 0;
    std::uint64_t at = 0;
    std::uint64_t n = 0;
};

/// The ring and its cursor, on raw bytes. Each call says which of the queue's locks it needs:
/// `mutex` (a producer's calls), `read_mutex` (a consumer's), or both.
class QueueRing {
public:
    static SharedRef create(std::size_t buffer_bytes, std::size_t maxsize, std::uint64_t type, std::uint64_t joinable) {
        // Checked before it is rounded up: near SIZE_MAX the rounding wraps to 0.
        if (buffer_bytes > (std::size_t{1} << 46))
            throw Error("mproc::Queue: buffer_bytes " + std::to_string(buffer_bytes) + " is too large");
        std::size_t capacity = round_up(std::max<std::size_t>(buffer_bytes, 4096), page_size());
        if (capacity > queue_resident) capacity = round_up(capacity, queue_chunk);
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
        h->read_mutex.init();
        h->write_claim.init();
        h->read_claim.init();
        segments().mark_container(*ref.segment(), &container_view);
        return ref;
    }

    static void check(const SharedRef& ref) {
        const auto* h = reinterpret_cast<const QueueHeader*>(ref.address());
        const std::size_t size = ref.segment()->size();
        // The capacity is as create() makes it — whole pages, at least 4096 bytes — or a position's
        // place in the ring (place) is no place in it.
        if (ref.offset() != 0 || h->data_offset < sizeof(QueueHeader) || h->data_offset > size || h->capacity < 4096 ||
            h->capacity % page_size() != 0 || h->capacity > size - h->data_offset ||
            h->refs != h->data_offset + h->capacity || h->resident.load(std::memory_order_relaxed) > h->capacity ||
            size - h->refs < sizeof(RefTable))
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
          mask_((cap_ & (cap_ - 1)) == 0 ? cap_ - 1 : 0), refs_(reinterpret_cast<RefTable*>(ref.address() + h_->refs)) {
    }

    QueueHeader& header() const noexcept { return *h_; }
    std::uint64_t capacity() const noexcept { return cap_; }
    /// The JoinableQueue type this queue was made as (0: a plain Queue). Needs no lock: set once.
    std::uint64_t joinable() const noexcept { return h_->joinable; }
    /// Needs no lock. Read before the write half a decision pairs it with (read_view_fresh): once
    /// it reads set, every put that will ever be published is.
    bool shut() const noexcept { return h_->shut_down.load(std::memory_order_acquire) != 0; }

    // ---- the cursor as each side sees it ----

    /// With `mutex` held: the write half as it is, the read half as a producer last read it.
    QueueCursor write_view() const noexcept { return {h_->write.own(), h_->read_seen, shut()}; }
    /// With `mutex` held: as write_view, the read half read again.
    QueueCursor write_view_fresh() noexcept {
        h_->read_seen = h_->read.snapshot();
        return write_view();
    }
    /// With `read_mutex` held: the read half as it is, the write half as a consumer last read it.
    QueueCursor read_view() const noexcept { return {h_->write_seen, h_->read.own(), shut()}; }
    /// With `read_mutex` held: as read_view, the write half (and the shutdown flag, first) read again.
    QueueCursor read_view_fresh() noexcept {
        const bool down = shut();
        h_->write_seen = h_->write.snapshot();
        return {h_->write_seen, h_->read.own(), down};
    }
    /// With both locks held: both halves as they are.
    QueueCursor both_view() noexcept {
        h_->read_seen = h_->read.own();
        h_->write_seen = h_->write.own();
        return {h_->write_seen, h_->read_seen, shut()};
    }
    /// With no lock: each half as last published (each whole, the two perhaps of different moments;
    /// the read half is read first, so the count is never below 0). For tests and hints.
    QueueCursor cursor() const noexcept {
        const ReadState r = h_->read.snapshot();
        return {h_->write.snapshot(), r, shut()};
    }

    // ---- what a put may do (with `mutex` held; an item holding handles, both locks) ----

    /// True when an item of `bytes` (record header included) goes in one piece; a larger one streams.
    bool fits_whole(std::uint64_t bytes) const noexcept { return bytes <= std::min<std::uint64_t>(cap_, queue_piece); }

    /// The bytes a producer may still write past the tail: the free ones, less (in a ring larger
    /// than its resident part) one chunk, which keeps a producer out of the chunk a consumer may be
    /// handing back (see consumed).
    std::uint64_t room(const QueueCursor& c) const noexcept {
        const std::uint64_t usable = cap_ > queue_resident ? cap_ - queue_chunk : cap_;
        const std::uint64_t used = c.w.tail - c.held();
        return used >= usable ? 0 : usable - used;
    }

    /// True when the head a producer last saw is so far behind the tail that pacing and laps,
    /// which go by it, would misjudge: a quarter of the resident part.
    bool stale(const QueueCursor& c) const noexcept { return c.w.tail - c.held() > resident() / 4; }

    /// True when a put that needs `need` bytes of the ring now may start: no item streams in,
    /// the queue holds fewer than maxsize items and the ring has the room.
    bool admits(const QueueCursor& c, std::uint64_t need) const noexcept {
        return !c.w.writing && (h_->maxsize == 0 || c.count() < h_->maxsize) && room(c) >= need;
    }

    /// True when `need` more bytes would take the ring past its resident part while a consumer
    /// has something to take: the case in which a producer may wait for the consumer (ByteQueue::should_pace).
    bool runs_past_resident(const QueueCursor& c, std::uint64_t need) const noexcept {
        return cap_ > queue_resident && c.w.tail - c.held() + need > resident() && c.r.head != c.w.tail;
    }

    /// True when the ring was empty when last seen and its tail is far into the resident part
    /// (leaves_resident): then both ends may go back to the ring's start together (rewind), where a
    /// lap record alone (lap_back) would leave the rest of this lap unusable until a consumer
    /// passes it — by a producer that runs ahead of idle consumers, nearly all the ring.
    bool rewind_due(const QueueCursor& c, std::uint64_t need) const noexcept {
        return leaves_resident(c, need) && !c.w.writing && !c.r.reading && c.r.head == c.w.tail;
    }
    /// The first test of rewind_due, on the write half alone (a put makes it before it reads the
    /// read half again): the tail is past half the resident part, or the put would leave it. So a
    /// queue that keeps up starts a lap again about every half of its resident part, with one hold
    /// of both locks, and a consumer that stops taking finds the most room ahead.
    bool leaves_resident(const QueueCursor& c, std::uint64_t need) const noexcept {
        const std::uint64_t at = place(c.w.tail);
        return cap_ > queue_resident && at != 0 && at + 8 <= cap_ && (at >= resident() / 2 || at + need > resident());
    }
    /// Both locks: if the ring is empty, moves both ends to the start of the next lap, past a lap
    /// record (the write half is published first: a holder killed before the read half leaves the
    /// record for a consumer to pass), and hands back the memory of the chunk they left.
    void rewind(std::uint64_t need) noexcept {
        QueueCursor c = both_view();
        if (!rewind_due(c, need)) return;
        const QueueCursor was = c;
        const std::uint64_t from = c.w.tail;
        write_word(c.w.tail, lap_flag);
        c.w.tail += cap_ - place(from);
        c.r.head = c.w.tail;
        publish_both(c, was);
        release_chunk(round_down(from, queue_chunk), c);
    }

    /// Both locks: throws Full, changing nothing, unless the RefTable can count `ids` once more.
    void reserve_refs(std::span<const std::uint64_t> ids) {
        RefCounts counts(refs_);
        counts.reserve(ids, "mproc::Queue::put");
    }

    /// Commits a whole record of `msg` (whose handles point into `ids`: then with both locks) and
    /// publishes it.
    void put_whole(const ItemBytes& msg, std::span<const std::uint64_t> ids, QueueWakes& wakes) noexcept {
        QueueCursor c = write_view();
        const std::uint64_t header = record_header_bytes(ids.size());
        const std::uint64_t len = msg.size();
        lap_back(c, header + len);
        RefCounts counts(refs_);
        if (!ids.empty()) {
            counts.begin();
            counts.add(ids);
        }
        write_header(c.w.tail, len, ids);
        copy_item_in(c.w.tail + header, msg, 0, len);
        c.w.tail += header + len;
        ++c.w.puts;
        publish_write(c);
        if (!ids.empty()) counts.end();
        wakes.items = true;
    }

    /// Streamed: claims the ring for this item and commits its record, published so a consumer
    /// can start on it at once; its payload follows piece by piece (reserve_write_piece). False,
    /// changing nothing, when the claim is held: no stream is on (admits), but a prober holds it
    /// for a moment (writer_gone, which a consumer calls without this lock), and the caller waits
    /// for it with the lock released (QueueLock::await_claim), then looks again.
    bool start_stream(std::uint64_t len, std::span<const std::uint64_t> ids, QueueWakes& wakes) {
        const LockResult claim = h_->write_claim.try_lock();
        if (claim == LockResult::timed_out) return false;
        if (!holds(claim)) throw Error("mproc::Queue: internal error: the write claim is held by this thread");
        if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
        QueueCursor c = write_view();
        const std::uint64_t header = record_header_bytes(ids.size());
        raise_resident(header + len);
        lap_back(c, header + len);  // an item that fits the free start of the ring streams there
        RefCounts counts(refs_);
        if (!ids.empty()) {
            counts.begin();
            counts.add(ids);
        }
        write_header(c.w.tail, len | stream_flag, ids);
        c.w.stream_at = c.w.tail;
        c.w.tail += header;
        ++c.w.puts;
        c.w.writing = 1;
        c.w.write_left = len;
        publish_write(c);
        if (!ids.empty()) counts.end();
        wakes.items = true;
        return true;
    }

    /// With the stream of an item started: reserves its next piece in `piece`, as much as the
    /// ring has room for (more), or none (blocked). The piece is the producer's alone — no other
    /// put starts while it streams, no consumer reads past the tail, no memory past the tail is
    /// handed back — so it copies with the lock released (copy_piece_in), then commits it. If
    /// shutdown(immediate) withdrew the item meanwhile, releases the claim and reports it dropped.
    StreamStep reserve_write_piece(std::uint64_t len, StreamPiece& piece) noexcept {
        QueueCursor c = write_view();
        if (!c.w.writing) {  // only shut_down() clears it under a live producer: the item was dropped
            h_->write_claim.unlock();
            return StreamStep::dropped;
        }
        if (room(c) < std::min<std::uint64_t>(c.w.write_left, queue_piece)) c = write_view_fresh();
        const std::uint64_t n = std::min<std::uint64_t>({c.w.write_left, room(c), queue_piece});
        if (n == 0) return StreamStep::blocked;
        piece = {c.w.tail, len - c.w.write_left, n};
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
        QueueCursor c = write_view();
        if (!c.w.writing) {
            // No put starts on a shut-down queue and consumers read only below the tail, so what
            // lies past it (the piece) may go back; an older head only keeps more.
            release_all_but(write_view_fresh());
            h_->write_claim.unlock();
            return StreamStep::dropped;
        }
        c.w.tail += piece.n;  // the producer alone moves the tail while it streams: it is piece.pos
        c.w.write_left -= piece.n;
        if (c.w.write_left == 0) c.w.writing = 0;
        publish_write(c);
        wakes.data = true;
        if (c.w.write_left != 0) return StreamStep::more;
        h_->write_claim.unlock();
        wakes.space = true;  // producers waiting for the stream to end
        return StreamStep::done;
    }

    /// Both locks: the streaming producer gives up: withdraws its partial item (a reader that
    /// started it drops it) and releases the write claim.
    void withdraw_stream(QueueWakes& wakes) noexcept {
        abort_stream();
        h_->write_claim.unlock();
        wakes.data = wakes.room = wakes.space = wakes.items = true;
    }

    /// One lock or both, cheap: true when an item is streaming in (as last seen, then as it is)
    /// and its producer is gone — its claim can be taken. The caller then takes both locks and
    /// calls probe_writer.
    bool writer_gone() {
        const LockResult claim = h_->write_claim.try_lock();
        if (!holds(claim)) return false;  // held: the producer is alive (or it is this thread)
        if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
        // A producer publishes `writing` cleared before it lets the claim go: taken now, the flag
        // still set means it died (or had died, its claim marked consistent by another prober).
        const bool gone = h_->write.snapshot().writing != 0;
        h_->write_claim.unlock();
        return gone;
    }

    /// Both locks: with an item streaming in, if its producer is gone, withdraws the item
    /// (publishing the change) and returns true.
    bool probe_writer(QueueWakes& wakes) {
        QueueCursor c = both_view();
        if (!c.w.writing) return false;
        const LockResult claim = h_->write_claim.try_lock();
        if (claim == LockResult::timed_out || claim == LockResult::would_deadlock) return false;  // alive
        abort_stream();
        if (claim == LockResult::owner_died) h_->write_claim.mark_consistent();
        h_->write_claim.unlock();
        wakes.items = wakes.space = wakes.data = wakes.room = true;
        return true;
    }

    // ---- what a get may do (with `read_mutex` held; an item holding handles, both locks) ----

    std::uint64_t word_at(std::uint64_t pos) const noexcept { return read_word(pos); }

    /// The record at `pos` whose word is `word` (not a lap record). Throws on a corrupt count.
    QueueRecord record_at(std::uint64_t pos, std::uint64_t word) const {
        return {word & ~record_flags, (word & stream_flag) != 0, record_ids(pos, word)};
    }

    /// Passes the lap record at the head (cursor `c`): the producer went back to the ring's start.
    void skip_lap(QueueCursor c, QueueWakes& wakes) noexcept {
        const std::uint64_t chunk = round_down(c.r.head, queue_chunk);
        c.r.head += cap_ - place(c.r.head);
        note_take(c, wakes);
        // The rest of the lap holds no memory (each chunk past the resident part was handed back
        // when an earlier lap's reader passed it): only the lap record's own chunk may, so only it
        // is handed back, not every chunk skipped.
        mark_hand_back(c, chunk, chunk + queue_chunk);
        publish_read(c);
        hand_back(c, chunk + queue_chunk);
    }

    /// Copies the whole record `r` at the head (cursor `c`) into `dst`, taking nothing.
    void copy_whole(const QueueCursor& c, const QueueRecord& r, const ItemPlace& dst) const noexcept {
        copy_item_out(c.r.head + r.header_bytes(), dst, 0, r.len);
    }
    /// Takes the whole record `r` at the head (cursor `c`; copied out first: copy_whole),
    /// publishes, and stops counting its handles (an item holding them: with both locks).
    void take_whole(QueueCursor c, const QueueRecord& r, QueueWakes& wakes) noexcept {
        RefCounts counts(refs_);
        if (!r.ids.empty()) {
            counts.begin();
            counts.remove(r.ids);
        }
        const std::uint64_t from = c.r.head;
        c.r.head += r.header_bytes() + r.len;
        ++c.r.takes;
        ++c.r.taken;  // in the same publish: a taker killed at any point leaves the item taken and done, or neither
        consumed(c, from, wakes);
        publish_read(c);
        if (!r.ids.empty()) counts.end();
        hand_back(c);
        pass_on(c, wakes);
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
        const std::uint64_t from = c.r.head;
        c.r.head += r.header_bytes();
        ++c.r.takes;
        c.r.reading = 1;
        c.r.read_left = r.len;
        c.r.aborted = 0;
        consumed(c, from, wakes);
        publish_read(c);
        if (!r.ids.empty()) counts.end();  // the item's handles are this reader's from here
        hand_back(c);
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
        const QueueCursor c = read_view_fresh();
        if (c.r.aborted || (c.r.read_left > 0 && c.w.tail == c.r.head && !c.w.writing)) return drop_read(c, wakes);
        const std::uint64_t n = std::min<std::uint64_t>({c.r.read_left, c.w.tail - c.r.head, queue_piece});
        if (n == 0 && c.r.read_left != 0) return StreamStep::blocked;
        piece = {c.r.head, len - c.r.read_left, n};
        return StreamStep::more;
    }
    /// Copies a reserved piece of the item out; needs no lock.
    void copy_piece_out(const StreamPiece& piece, const ItemPlace& into) const noexcept {
        copy_item_out(piece.pos, into, piece.at, piece.n);
    }
    /// Commits the piece read (`kept`: copied out; false when draining away the item of a reader
    /// that died), and publishes. The last piece — or finding the item aborted while the piece
    /// was copied — releases the read claim.
    StreamStep commit_read_piece(const StreamPiece& piece, bool kept, QueueWakes& wakes) noexcept {
        QueueCursor c = read_view();
        if (c.r.aborted) return drop_read(c, wakes);
        const std::uint64_t from = c.r.head;
        c.r.head += piece.n;
        c.r.read_left -= piece.n;
        const bool done = c.r.read_left == 0;
        if (done) c.r.reading = 0;
        // It counted as unfinished by `reading` until now; drained away (the reader that took it
        // died), it is lost with that reader and done — which join() may be waiting for.
        if (done && kept) ++c.r.taken;
        consumed(c, from, wakes);
        publish_read(c);
        hand_back(c);
        if (!done) return StreamStep::more;
        h_->read_claim.unlock();
        wakes.items = true;  // the consumers behind the drain: the next item, or ShutDown
        if (!kept) {
            h_->tasks_done.fetch_add(1, std::memory_order_relaxed);
            wakes.tasks = true;
        }
        return StreamStep::done;
    }

    /// True when large items raised the resident part (needs no lock): the cheap first test of
    /// lower_due, made before a cursor is built for it.
    bool resident_raised() const noexcept { return resident() > queue_resident; }
    /// With `read_mutex` held, after a take left the ring empty (`c`): true when the resident part
    /// was raised by items none of which started in the last queue_resident_hold_ns, so it may go
    /// back down (lower_resident, with both locks).
    bool lower_due(const QueueCursor& c) const noexcept {
        return resident() > queue_resident && c.r.head == c.w.tail && !c.w.writing && !c.r.reading &&
               monotonic_ns() - h_->resident_raised_ns.load(std::memory_order_relaxed) >= queue_resident_hold_ns;
    }
    /// Both locks: if lower_due, lowers the resident part to queue_resident and hands its pages back.
    void lower_resident() noexcept {
        if (!lower_due(both_view())) return;
        const std::uint64_t r = resident();
        h_->resident.store(queue_resident, std::memory_order_relaxed);
        release_pages(ring_ + queue_resident, r - queue_resident);
    }

    // ---- shutdown and tasks (both locks) ----

    /// Shuts the queue down: from now on puts are refused, and gets end once it is empty. With
    /// `immediate`, every item not yet taken is dropped now — an item streaming in is withdrawn
    /// (its producer finds out at its next piece; a reader that started it drops it) — and counts
    /// as done, as queue.Queue.shutdown(immediate=True) does; an item a consumer is draining whole
    /// stays that consumer's. The dropped items' memory goes back after.
    void shut_down(bool immediate) noexcept {
        QueueCursor c = both_view();
        const QueueCursor was = c;
        h_->shut_down.store(1, std::memory_order_release);
        if (!immediate) return;
        if (c.w.writing && c.r.reading && c.r.head > c.w.stream_at) {
            // The item streaming in is the one being drained: everything after its record is
            // its own. Its reader drops it (as when its producer dies).
            c.r.read_left = c.w.tail - c.r.head;
            c.r.aborted = 1;
        } else if (c.r.reading) {
            c.w.tail = c.r.head + c.r.read_left;  // the item being drained is whole: it stays its reader's
        } else {
            c.r.head = c.w.tail;
        }
        c.w.puts = c.r.takes;
        c.w.writing = 0;
        c.w.write_left = 0;
        // No item left holds handles (the one being drained was uncounted when it was taken).
        RefCounts counts(refs_);
        const bool uncount = counts.live() != 0;
        if (uncount) {
            counts.begin();
            counts.clear();
        }
        publish_both(c, was);
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
    /// yet marked done (`taken`). Each change keeps it as it is, but a put that completes (+1), a
    /// dead reader's item drained away (-1) and a task_done (-1); below 0 only for a moment (see
    /// settle_unfinished), read as 0.
    std::int64_t unfinished_signed() noexcept {
        const QueueCursor c = both_view();
        return static_cast<std::int64_t>(c.count()) + (c.r.reading && !c.r.aborted ? 1 : 0) - (c.w.writing ? 1 : 0) +
               c.r.taken;
    }
    std::uint64_t unfinished() noexcept {
        const std::int64_t n = unfinished_signed();
        return n > 0 ? static_cast<std::uint64_t>(n) : 0;
    }

    /// A consumer finished an item (JoinableQueue::task_done): false, changing nothing, when no
    /// item put is unfinished. Reaching none bumps tasks_done (the caller wakes the joiners).
    bool task_done() noexcept {
        const std::int64_t n = unfinished_signed();
        if (n <= 0) return false;
        QueueCursor c = both_view();
        --c.r.taken;
        publish_read(c);
        if (n == 1) h_->tasks_done.fetch_add(1, std::memory_order_relaxed);
        return true;
    }

    /// Brings the count of unfinished items up to 0 if it is below: after items were dropped by
    /// shutdown(true) that task_done() calls made ahead of their get had already counted.
    void settle_unfinished() noexcept {
        const std::int64_t n = unfinished_signed();
        if (n >= 0) return;
        QueueCursor c = both_view();
        c.r.taken -= n;
        publish_read(c);
    }

    // ---- repair ----

    /// Both locks, after a holder of `mutex` died: puts back what only a change of both halves
    /// keeps true. A withdrawal publishes the write half first: one killed before the read half
    /// leaves a reader draining an item that will never be whole, which is marked aborted here
    /// (before any put can append to it).
    void repair_halves(QueueWakes& wakes) noexcept {
        QueueCursor c = both_view();
        if (c.r.reading && !c.r.aborted && !c.w.writing && c.r.head + c.r.read_left > c.w.tail) {
            c.r.read_left = c.w.tail - c.r.head;
            c.r.aborted = 1;
            publish_read(c);
            wakes.data = wakes.space = wakes.room = true;
        }
    }

    /// With `read_mutex` held, after a holder of it died: finishes a hand-back it published and did
    /// not end (hand_back).
    void finish_hand_back(QueueWakes& wakes) noexcept {
        QueueCursor c = read_view();
        if (c.r.handing_back == 0) return;
        hand_back(c);
        wakes.room = wakes.space = true;  // producers that went to sleep on the marked half
    }

    /// True when a holder was killed while counting an item's handles (the RefTable is left changing).
    bool refs_changing() const noexcept { return (refs_->version & 1u) != 0; }

    /// Both locks: the RefTable counted again from every record in the ring. A streamed item
    /// already being drained has been taken (its handles went with its reader); a record being
    /// streamed in is the last, and its header is whole. Only the records the count says are
    /// there: a shutdown(true) killed between its two publishes left the dropped ones behind the
    /// head, not counted.
    void recount() {
        RefCounts counts(refs_);
        counts.begin();
        counts.clear();
        const QueueCursor c = both_view();
        std::uint64_t pos = c.r.reading ? c.r.head + c.r.read_left : c.r.head;
        std::uint64_t left = c.count();
        while (left > 0 && pos + 8 <= c.w.tail) {
            const std::uint64_t word = read_word(pos);
            if (word == lap_flag) {
                pos += cap_ - place(pos);
                continue;
            }
            --left;
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
        const std::uint64_t from = c.r.head;
        if (c.r.aborted) c.r.head += c.r.read_left;  // the bytes its producer committed
        c.r.aborted = 0;
        c.r.reading = 0;
        c.r.read_left = 0;
        consumed(c, from, wakes);
        publish_read(c);
        hand_back(c);
        h_->read_claim.unlock();
        wakes.items = true;  // the consumers behind the drain: the next item, or ShutDown
        return StreamStep::dropped;
    }

    void publish_write(const QueueCursor& c) noexcept {
        h_->write.publish(c.w);
        note_used(c);
    }
    void publish_read(const QueueCursor& c) noexcept {
        h_->read.publish(c.r);
        note_used(c);
    }
    /// Both locks: publishes the halves that changed, the write half first (see repair_halves).
    void publish_both(const QueueCursor& c, const QueueCursor& was) noexcept {
        if (std::memcmp(&c.w, &was.w, sizeof c.w) != 0) h_->write.publish(c.w);
        if (std::memcmp(&c.r, &was.r, sizeof c.r) != 0) h_->read.publish(c.r);
        h_->write_seen = c.w;
        h_->read_seen = c.r;
        note_used(c);
    }

    /// After a take: the consumers asleep may go on when items are left. The count as last seen
    /// may be behind: read again when someone sleeps (one woken while others sleep sets the
    /// request again, QueueLock::wait, and the taker passes it on).
    void pass_on(const QueueCursor& c, QueueWakes& wakes) noexcept {
        if (c.count() > 0) wakes.items = true;
        else if (h_->item_waiters.load(std::memory_order_relaxed) != 0 && read_view_fresh().count() > 0)
            wakes.items = true;
    }

    /// Keeps the `used` hint (what a pacing producer watches, ByteQueue::should_pace) where it
    /// matters: pacing starts only past a quarter of the resident part, so below that the hint
    /// is written only to bring it down there — not on every item of a queue that keeps up, as
    /// the write would move its cache line between producer and consumer each time.
    void note_used(const QueueCursor& c) noexcept {
        const std::uint64_t used = c.w.tail - c.r.head;
        const std::uint64_t quarter = resident() / 4;
        if (used >= quarter || h_->used.load(std::memory_order_relaxed) >= quarter)
            h_->used.store(used, std::memory_order_relaxed);
    }

    /// (Also before a streamed record, for an item that fits there whole.)
    /// Positions only grow, so a queue that never quite empties walks its whole reserved ring:
    /// every page past the resident part is faulted in fresh, read once and handed back — a page
    /// fault and a page release per 4 KiB, which costs more than the copy. A whole record about
    /// to go past the resident part therefore goes back to the start of the ring instead,
    /// when the consumer has already read past the room it needs there (and the chunk kept free,
    /// see room): a lap record marks the rest of this lap unused. A busy queue thus cycles through
    /// the same warm pages; the ring grows past its resident part only when the consumer falls that
    /// far behind. The head may be older than it is: that only keeps the record where it is.
    void lap_back(QueueCursor& c, std::uint64_t need) noexcept {
        if (cap_ <= queue_resident || c.w.writing) return;
        const std::uint64_t at = place(c.w.tail);
        if (at + need <= resident()) return;
        c.r = h_->read_seen = h_->read.snapshot();  // once a lap: the head as it is
        // The live bytes [head, tail) lie within [need + chunk, at) of this lap: [0, need) is free.
        // And the head is past half the resident part: until a consumer passes the lap record, a
        // producer has the room below the head, and a consumer that is not taking now (its head
        // lower) keeps it there — the ring then goes on past the resident part instead.
        const std::uint64_t below = std::max<std::uint64_t>(need + queue_chunk, resident() / 2);
        if (at + need <= resident() || at + 8 > cap_ || c.w.tail - c.held() + below > at) return;
        write_word(c.w.tail, lap_flag);
        c.w.tail += cap_ - at;
    }

    std::uint64_t resident() const noexcept { return h_->resident.load(std::memory_order_relaxed); }

    /// Before an item of `need` bytes streams in: a large item raises the resident part to hold
    /// three of them (within queue_resident_max), so that a stream of such items cycles through the
    /// same pages instead of faulting each one in fresh and handing it back once read.
    void raise_resident(std::uint64_t need) noexcept {
        if (cap_ <= queue_resident || need <= queue_resident / 2) return;
        const std::uint64_t want = std::min<std::uint64_t>({cap_, queue_resident_max, round_up(3 * need, queue_chunk)});
        if (want > resident()) h_->resident.store(want, std::memory_order_relaxed);
        h_->resident_raised_ns.store(monotonic_ns(), std::memory_order_relaxed);
    }

    /// Both locks: withdraws the item being streamed in, and publishes. If a consumer started it,
    /// it is marked aborted: its reader drops it, passing the bytes its producer committed (the
    /// reader may be copying a piece of them with the lock released, so the head stays until it
    /// lets them go). Otherwise its record is cut off, its handles no longer counted, and the
    /// memory its producer wrote goes back. Each step leaves what the next locker repairs: the
    /// RefTable is marked changing until the cut is published (a recount from the ring), and a
    /// holder killed before the hand-back leaves only memory in use.
    void abort_stream() noexcept {
        QueueCursor c = both_view();
        const QueueCursor was = c;
        // What its producer wrote, a piece it was copying included (it is gone, or it is the
        // caller, between pieces): what lies past the committed tail goes back either way.
        const std::uint64_t written = live_end(c);
        if (c.r.reading && c.r.head > c.w.stream_at) {
            c.r.read_left = c.w.tail - c.r.head;  // everything after the record is this item's
            c.r.aborted = 1;
            c.w.writing = 0;
            c.w.write_left = 0;
            publish_both(c, was);
            release_written(c, written);
            return;
        }
        RefCounts counts(refs_);
        const std::uint64_t word = read_word(c.w.stream_at);
        const bool uncount = (word & refs_flag) != 0;
        if (uncount) {
            const std::uint64_t n = read_word(c.w.stream_at + 8);
            counts.begin();
            if (n != 0 && n <= RefTable::max_live) {
                // A few at a time, from the ring: nothing here may need memory (it cannot fail).
                std::uint64_t ids[64];
                for (std::uint64_t done = 0; done < n;) {
                    const std::uint64_t k = std::min<std::uint64_t>(n - done, std::size(ids));
                    copy_out(c.w.stream_at + 16 + 8 * done, reinterpret_cast<std::byte*>(ids), 8 * k);
                    counts.remove(std::span<const std::uint64_t>(ids, static_cast<std::size_t>(k)));
                    done += k;
                }
            }
        }
        crash_point("queue.withdraw.uncounted");
        c.w.tail = c.w.stream_at;
        --c.w.puts;
        c.w.writing = 0;
        c.w.write_left = 0;
        publish_both(c, was);
        crash_point("queue.withdraw.published");
        if (uncount) counts.end();
        crash_point("queue.withdraw.counted");
        release_written(c, written);
    }
    /// Both locks, after a withdrawal published `c`: hands back the chunks past the tail up to
    /// `written` (what the withdrawn item's producer may have written), but those holding live bytes.
    void release_written(const QueueCursor& c, std::uint64_t written) noexcept {
        if (cap_ > queue_resident)
            for (std::uint64_t chunk = round_up(c.w.tail, queue_chunk); chunk < written; chunk += queue_chunk)
                release_chunk(chunk, c);
    }

    /// A consumer took bytes: producers waiting for room (a put, or the stream's next piece) may go on.
    void note_take(const QueueCursor& c, QueueWakes& wakes) noexcept {
        // The time of a take matters to producers only while the ring holds more than its resident
        // part (ByteQueue::should_pace): a queue kept short by its consumers need not read the clock per item.
        if (cap_ > queue_resident && c.w.tail - c.r.head >= resident() / 4)
            h_->last_take_ns.store(monotonic_ns(), std::memory_order_relaxed);
        wakes.room = true;
        wakes.space = true;
    }
    /// Called as [from, c.r.head) is consumed, before the new head is published: notes the take,
    /// and marks the chunks the head passed for hand_back when any lies beyond the resident part.
    void consumed(QueueCursor& c, std::uint64_t from, QueueWakes& wakes) noexcept {
        note_take(c, wakes);
        mark_hand_back(c, round_down(from, queue_chunk), round_down(c.r.head, queue_chunk));
    }
    /// Marks the chunks [first, until) behind the head for hand_back, when any of them lies beyond
    /// the resident part (and no hand-back is marked already).
    void mark_hand_back(QueueCursor& c, std::uint64_t first, std::uint64_t until) const noexcept {
        if (cap_ <= queue_resident || c.r.handing_back != 0 || until <= first) return;
        if (place(first) + (until - first) > resident()) c.r.handing_back = first + 1;
    }
    /// With `read_mutex` held, after publishing a head that marked chunks for hand-back: hands
    /// their memory back to the kernel (beyond the resident part), then publishes again with the
    /// mark cleared. Meanwhile producers count the ring as held from the first of them (room), so
    /// none writes in their places: a chunk's next place lies a capacity on, and a producer stays
    /// below the held position plus the capacity less a chunk. A consumer killed in between
    /// leaves the mark, and the next one finishes the hand-back (finish_hand_back) — the head
    /// itself always stands on memory no one handed back.
    void hand_back(QueueCursor& c) noexcept { hand_back(c, round_down(c.r.head, queue_chunk)); }
    /// As above, for the chunks before `until` only (skip_lap: the lap record's chunk; the rest of
    /// the lap holds no memory). A repair hands back all the chunks the head passed: some more
    /// system-call work for a lap, the same memory.
    void hand_back(QueueCursor& c, std::uint64_t until) noexcept {
        if (c.r.handing_back == 0) return;
        crash_point("queue.hand_back.published");
        release_between(c.r.handing_back - 1, until);
        crash_point("queue.hand_back.released");
        c.r.handing_back = 0;
        publish_read(c);
    }
    /// Hands back the memory of the ring between stream positions `from` and `to` (whole chunks,
    /// at most a capacity apart), past the resident part: at most two system calls.
    void release_between(std::uint64_t from, std::uint64_t to) noexcept {
        if (to <= from) return;
        const std::uint64_t lo = place(from), n = to - from;
        const auto release = [&](std::uint64_t a, std::uint64_t b) {
            a = std::max<std::uint64_t>(a, resident());
            if (a < b) release_pages(ring_ + a, b - a);
        };
        if (lo + n <= cap_) {
            release(lo, lo + n);
        } else {
            release(lo, cap_);
            release(0, lo + n - cap_);
        }
    }
    /// Hands back the memory of every chunk of the ring past the resident part that holds no live
    /// byte of `c` (at most two ranges, however large the ring: one system call each).
    void release_all_but(const QueueCursor& c) noexcept {
        if (cap_ <= queue_resident) return;  // then cap_ is a whole number of chunks (create())
        if (c.held() == live_end(c)) return release_between(0, cap_);
        const std::uint64_t end = round_up(live_end(c), queue_chunk), start = round_down(c.held(), queue_chunk);
        if (end - start < cap_) release_between(end, start + cap_);
    }
    /// Both locks: hands back the ring memory of the chunk at stream position `chunk` unless a live
    /// byte (one in [head, tail)) shares its place in the ring, or it lies in the resident part.
    void release_chunk(std::uint64_t chunk, const QueueCursor& c) noexcept {
        const std::uint64_t at = place(chunk);
        if (at < resident()) return;
        const std::uint64_t end = live_end(c);
        // Live bytes span at most one capacity, so only the neighbouring laps can overlap.
        for (int lap = -1; lap <= 1; ++lap) {
            if (lap < 0 && chunk < cap_) continue;
            const std::uint64_t lo = lap < 0 ? chunk - cap_ : chunk + static_cast<std::uint64_t>(lap) * cap_;
            if (lo < end && lo + queue_chunk > c.held()) return;
        }
        release_pages(ring_ + at, queue_chunk);
    }
    /// The end of the bytes no memory may be handed back under: the committed ones, and while an
    /// item streams in, the piece its producer may be copying past the tail with the lock
    /// released (reserve_write_piece: at most queue_piece, at most what is left of the item).
    static std::uint64_t live_end(const QueueCursor& c) noexcept {
        return c.w.writing ? c.w.tail + std::min<std::uint64_t>(c.w.write_left, queue_piece) : c.w.tail;
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
    /// Copies n bytes from stream position `pos` to bytes [to, to + n) of `into` (its head, then
    /// its body).
    void copy_item_out(std::uint64_t pos, const ItemPlace& into, std::uint64_t to, std::uint64_t n) const noexcept {
        const std::uint64_t head = into.head.size();
        if (to < head) {
            const std::uint64_t k = std::min(n, head - to);
            copy_out(pos, into.head.data() + to, k);
            pos += k;
            to += k;
            n -= k;
        }
        if (n == 0) return;
        if (!into.append) {
            copy_out(pos, into.body.data() + (to - head), n);
            return;
        }
        const std::uint64_t at = place(pos);
        const std::uint64_t first = std::min(n, cap_ - at);
        if (first) into.append(into.value, ring_ + at, first);
        if (n > first) into.append(into.value, ring_, n - first);
    }
    void copy_in(std::uint64_t pos, const std::byte* src, std::uint64_t n) noexcept {
        const std::uint64_t at = place(pos);
        const std::uint64_t first = std::min(n, cap_ - at);
        if (first) std::memcpy(ring_ + at, src, first);
        if (n > first) std::memcpy(ring_, src + first, n - first);
    }
    void copy_out(std::uint64_t pos, std::byte* dst, std::uint64_t n) const noexcept {
        const std::uint64_t at = place(pos);
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

    /// Where stream position `pos` lives in the ring: pos % capacity, by a mask when the capacity
    /// is a power of two (the default 1 GiB is), since a division costs tens of cycles and a put
    /// or a get makes several.
    std::uint64_t place(std::uint64_t pos) const noexcept { return mask_ != 0 ? pos & mask_ : pos % cap_; }

    QueueHeader* h_;
    std::byte* ring_;
    std::uint64_t cap_;
    std::uint64_t mask_;  // capacity - 1 when the capacity is a power of two, else 0
    RefTable* refs_;
};

}  // namespace mproc::detail
