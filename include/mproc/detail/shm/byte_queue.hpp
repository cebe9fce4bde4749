// mproc — the Queue on raw bytes: when a put or a get waits, and whom it wakes.
//
// Two parts, as a ring buffer between processes wants them apart: QueueRing (queue_ring.hpp) does
// the arithmetic — every change to the cursor, published under the lock — and this file does the
// blocking — the lock and its repair, sleeping on the futex words, the short watches before a
// sleep, and the wake-ups, sent once the lock is released. QueueLock is the one hold of the lock a
// put or a get makes; whichever way either leaves it, the lock is released and the wakes that
// its published changes call for are sent.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "../os/clock.hpp"
#include "../os/futex.hpp"
#include "../os/spin.hpp"
#include "queue_ring.hpp"
#include "ref_table.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

/// How long a consumer that finds the queue empty watches it before it sleeps (see QueueLock::watch).
inline constexpr std::chrono::microseconds queue_spin{20};
/// How long a producer waits, at most, for a busy consumer before it writes past the resident
/// part of the ring (see ByteQueue::should_pace); how recent a take makes a consumer busy, and
/// how long producers stop waiting after a wait that did not pay off.
inline constexpr std::chrono::microseconds queue_pace{500};
inline constexpr std::int64_t queue_pace_active_ns = 1'000'000;
/// The least a streamed put waits for a write claim a prober holds for a moment (see QueueLock::await_claim).
inline constexpr std::chrono::milliseconds queue_claim_wait{1};

/// Takes a sleeper's request for a wake on `word` (its wake_wanted bit): true when this caller
/// cleared it, and so must wake. The bit is cleared by adding 1 (W|1 becomes W+2), so the word
/// never goes back to a value it had: a request taken and then made again by another sleeper
/// reads W+3, not W|1, and a sleeper still on its way to sleep on W|1 finds it changed.
inline bool take_wake_request(FutexWord& word) noexcept {
    std::uint32_t seen = word.load(std::memory_order_relaxed);
    while ((seen & wake_wanted) != 0)
        if (word.compare_exchange_weak(seen, seen + 1, std::memory_order_seq_cst, std::memory_order_relaxed))
            return true;
    return false;
}

/// Sends the wakes decided under a lock (call it with the locks released, or about to be) and
/// clears them.
inline void send_wakes(QueueHeader& h, QueueWakes& wakes) noexcept {
    if (!(wakes.items || wakes.space || wakes.data || wakes.room || wakes.tasks)) return;
    // A sleeper sets its request, then looks at the other side's half; the waker published its
    // half, then looks for a request. The fence makes one of them see the other: the sleeper the
    // change (it does not sleep), or the waker the request (it wakes).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // Only a waker that takes a sleeper's request wakes: while a woken sleeper is on its way
    // (woken, not yet running) the puts made meanwhile find no request and make no futile system
    // call. The request is part of the word the sleeper sleeps on, so no waker can take it
    // without either waking that sleeper or making its futex_wait return at once.
    if (wakes.items && take_wake_request(h.items)) futex_wake(h.items, 1);
    // Producers wait for different amounts of room, so a single wake could pick one
    // that still cannot go while another could: wake them all.
    if (wakes.space && take_wake_request(h.space)) futex_wake_all(h.space);
    if (wakes.data && take_wake_request(h.stream_data)) futex_wake_all(h.stream_data);
    if (wakes.room && take_wake_request(h.stream_room)) futex_wake_all(h.stream_room);
    // Joiners re-check the count themselves: a bump that finds it above 0 costs them a look.
    if (wakes.tasks && h.join_waiters.load(std::memory_order_seq_cst) != 0) futex_wake_all(h.tasks_done);
    wakes = QueueWakes{};
}

/// A hold of a queue's locks by one put or get (or both locks, for what changes both halves):
/// taken on construction (repairing what a holder that died left), released at the end of the
/// scope, after which the wakes collected in `wakes` are sent. Its other calls let the locks go
/// for a while — to let others in, to sleep or to watch — sending the wakes first, and hold them
/// again when they return. The locks are always taken `mutex` first, then `read_mutex`.
class QueueLock {
public:
    enum class Side { producer, consumer };

    QueueLock(QueueRing& ring, Side side)
        : ring_(ring), write_(ring.header().mutex, WriteRepair{&ring}, WriteGuard::Deferred{}),
          read_(ring.header().read_mutex, ReadRepair{&ring}, ReadGuard::Deferred{}) {
        if (side == Side::producer) write_.lock();
        else read_.lock();
    }
    ~QueueLock() {
        read_.unlock();
        write_.unlock();
        send_wakes(ring_.header(), wakes);
    }
    QueueLock(const QueueLock&) = delete;
    QueueLock& operator=(const QueueLock&) = delete;

    /// The sleepers the changes published under this hold concern.
    QueueWakes wakes;

    /// Holds both locks from here on. True when it had to let the consumers' lock go to take them
    /// in order: then anything may have changed, and the caller looks again.
    bool both() {
        if (write_.held() && read_.held()) return false;
        if (write_.held()) {
            read_.lock();
            return false;
        }
        read_.unlock();
        send_wakes(ring_.header(), wakes);
        write_.lock();
        read_.lock();
        return true;
    }
    bool holds_both() const noexcept { return write_.held() && read_.held(); }

    /// Runs `copy` (a copy of a reserved piece of a streamed item) with the locks released, after
    /// sending the wakes collected so far.
    template <class Copy> void unlocked(Copy&& copy) {
        const Held held = release();
        copy();
        retake(held);
    }

    /// Sleeps on `word` (`items` or `space`) with the locks released, until woken or the next
    /// re-check is due — unless `ready()`, asked once the request is made, finds the change
    /// already there (a waker on the other side publishes without this lock). It sets the word's
    /// wake_wanted bit and sleeps on the value with the bit set; a waker wakes only when it clears
    /// the bit (send_wakes). `waiters` counts the sleepers: one woken while others still sleep sets
    /// the bit again, as the wake it took was for one.
    template <class Ready>
    void wait(FutexWord& word, std::atomic<std::uint32_t>& waiters, const Deadline& deadline, Ready&& ready) {
        waiters.fetch_add(1, std::memory_order_seq_cst);
        wait_stream(word, deadline, std::forward<Ready>(ready));
        if (waiters.fetch_sub(1, std::memory_order_seq_cst) > 1) word.fetch_or(wake_wanted, std::memory_order_seq_cst);
    }

    /// As wait, without the waiter count (what wait adds around it): for a stream's word, which has
    /// one sleeper at most (stream_data, stream_room).
    template <class Ready> void wait_stream(FutexWord& word, const Deadline& deadline, Ready&& ready) {
        send_wakes(ring_.header(), wakes);
        const std::uint32_t seen = word.fetch_or(wake_wanted, std::memory_order_seq_cst) | wake_wanted;
        std::atomic_thread_fence(std::memory_order_seq_cst);  // the request, then ready()'s reads (send_wakes)
        if (ready()) return;
        const Held held = release();
        futex_wait(word, seen, sleep_until_for(deadline));
        retake(held);
    }

    /// Sleeps on `word` with the locks released, until woken or the next re-check is due; `waiters`
    /// counts the sleepers, so that a waker makes a system call only when one sleeps (join, which
    /// holds both locks: its condition cannot change before it sleeps).
    void sleep(FutexWord& word, std::atomic<std::uint32_t>& waiters, const Deadline& deadline) {
        send_wakes(ring_.header(), wakes);
        waiters.fetch_add(1, std::memory_order_seq_cst);
        const std::uint32_t seen = word.load(std::memory_order_acquire);
        const Held held = release();
        futex_wait(word, seen, sleep_until_for(deadline));
        waiters.fetch_sub(1, std::memory_order_seq_cst);
        retake(held);
    }

    /// Waits with the locks released until the write claim, held by a consumer probing whether a
    /// streaming producer lives (QueueRing::writer_gone), is let go — or `deadline` passes (false).
    /// A probe holds it for a few instructions, so even a put with no time to wait (put_nowait)
    /// waits up to queue_claim_wait for it, rather than report a queue with room as full; only a
    /// prober stopped in that moment (SIGSTOP) makes it wait longer, and then no longer than its
    /// deadline. The locks are held again on return, and the caller looks at everything again.
    bool await_claim(const Deadline& deadline) {
        RobustMutex& claim = ring_.header().write_claim;
        Deadline until = deadline;
        if (until) until = std::max(*until, Clock::now() + queue_claim_wait);
        const Held held = release();
        const LockResult r = claim.lock_until(until);
        if (holds(r)) {
            if (r == LockResult::owner_died) claim.mark_consistent();  // a prober died: it guards nothing
            claim.unlock();
        }
        retake(held);
        if (r == LockResult::would_deadlock)
            throw Error("mproc::Queue: internal error: the write claim is held by this thread");
        return holds(r);
    }

    /// Before a consumer sleeps: watches the queue for a few microseconds with the locks released.
    /// A busy producer publishes again within that time, and a consumer that sees it awake spares
    /// both sides a futex system call (a sleeper costs the producer a wake on every put). Bounded
    /// by queue_spin, so an idle consumer still sleeps at once after it. Returns true when either
    /// half was published again, or the queue shut down (the locks are held again either way).
    bool watch() {
        QueueHeader& h = ring_.header();
        const auto changed = [&h, w = h.write.seq.load(std::memory_order_acquire),
                              r = h.read.seq.load(std::memory_order_acquire)] {
            return h.write.seq.load(std::memory_order_acquire) != w ||
                   h.read.seq.load(std::memory_order_acquire) != r || h.shut_down.load(std::memory_order_acquire) != 0;
        };
        const Held held = release();
        const bool seen = spin_until(changed, queue_spin);
        retake(held);
        // A change published after the watch's last look, while this one waited for the lock, counts
        // too: the caller would otherwise make its request after it, and that change's waker found
        // no request to take.
        return seen || changed();
    }

    /// Releases the locks and watches the consumer drain the ring back within the resident part
    /// (or stop taking) for at most queue_pace, for a put of `need` bytes (see ByteQueue::should_pace).
    void pace(std::uint64_t need) {
        QueueHeader& h = ring_.header();
        const Held held = release();
        if (!spin_until(
                [&] {
                    return h.used.load(std::memory_order_relaxed) + need <= h.resident.load(std::memory_order_relaxed);
                },
                queue_pace))
            // The consumer is far behind: stop waiting for it for a while.
            h.pace_off_until_ns.store(monotonic_ns() + queue_pace_active_ns, std::memory_order_relaxed);
        retake(held);
    }

private:
    struct ReadRepair {
        QueueRing* ring;
        void operator()() const {
            // The read half is whole (double-buffered). The consumers' view of the write half may
            // be torn (a holder of both locks killed while copying it): read it again. A reader
            // that died draining shows up as a claim whose owner died, taken over in get().
            QueueHeader& h = ring->header();
            h.write_seen = h.write.snapshot();
            // A taker killed while handing back memory it passed.
            QueueWakes wakes;
            ring->finish_hand_back(wakes);
            send_wakes(h, wakes);
        }
    };
    using ReadGuard = RobustGuard<ReadRepair>;
    struct WriteRepair {
        QueueRing* ring;
        void operator()() const {
            // The write half is whole (double-buffered). What a holder killed while changing both
            // halves (it held both locks) may have left half done is put right with the
            // consumers' lock held too (taken in order: this one is held, that one is not).
            ReadGuard read(ring->header().read_mutex, ReadRepair{ring});
            QueueWakes wakes;
            ring->repair_halves(wakes);
            // A holder killed while counting an item's handles left the RefTable changing: count
            // them again from the records in the ring — before anything changes the counts again
            // (and marks the table whole).
            if (ring->refs_changing()) ring->recount();
            // A claim holder that died shows up as a claim whose owner died: a dead streaming producer.
            ring->probe_writer(wakes);
            // A holder killed between dropping items and settling the count of unfinished ones.
            ring->settle_unfinished();
            read.unlock();
            send_wakes(ring->header(), wakes);
        }
    };
    using WriteGuard = RobustGuard<WriteRepair>;

    struct Held {
        bool write, read;
    };
    Held release() noexcept {
        const Held held{write_.held(), read_.held()};
        read_.unlock();
        write_.unlock();
        send_wakes(ring_.header(), wakes);
        return held;
    }
    void retake(Held held) {
        if (held.write) write_.lock();
        if (held.read) read_.lock();
    }

    QueueRing& ring_;
    WriteGuard write_;
    ReadGuard read_;
};

/// What ByteQueue::get found.
enum class Take {
    item,       // an item, in `out`
    none,       // none before the deadline (or now, with nowait)
    shut_down,  // none, and none will come: the queue is shut down and empty
};

/// Thrown by a put on a queue that is shut down (out of line: put's hot path only tests a flag).
[[noreturn, gnu::cold, gnu::noinline]] inline void throw_shut_down(const char* what) {
    throw ShutDown(std::string("mproc::Queue::put: ") + what);
}

/// ByteQueue::get's place for no item: every item goes to the buffer.
struct NoDirectPlace {
    static bool takes(std::uint64_t) noexcept { return false; }
    static void reserve(std::uint64_t) noexcept {}
    static ItemPlace place() noexcept { return {}; }
    static void accept(std::span<const std::byte>) noexcept {}
};

/// The queue's logic on raw bytes; Queue<T> adds (de)serialisation.
class ByteQueue {
public:
    /// `joinable`: type_hash<JoinableQueue<T>>() for a JoinableQueue, 0 for a Queue.
    static SharedRef create(std::size_t buffer_bytes, std::size_t maxsize, std::uint64_t type,
                            std::uint64_t joinable = 0) {
        return QueueRing::create(buffer_bytes, maxsize, type, joinable);
    }
    static void check(const SharedRef& ref) { QueueRing::check(ref); }

    explicit ByteQueue(const SharedRef& ref) : ring_(ref) {}

    /// Copies `msg` into the queue; `ids` are the segments its handles point into. False if
    /// `deadline` passed first (nothing was added). Full, at once, if the queue already counts
    /// handles into as many segments as its RefTable holds. ShutDown, adding nothing, once the
    /// queue is shut down — also while waiting for room, or streaming in when it is shut down
    /// immediately.
    bool put(std::span<const std::byte> msg, const Deadline& deadline, std::span<const std::uint64_t> ids = {}) {
        return put(ItemBytes{msg}, deadline, ids);
    }
    /// As above, for an item given as a head and a body (see ItemBytes).
    bool put(const ItemBytes& msg, const Deadline& deadline, std::span<const std::uint64_t> ids = {}) {
        if (msg.size() >= refs_flag) throw Error("mproc::Queue::put: item too large");
        if (ids.size() > RefTable::max_live)
            throw Full("mproc::Queue::put: the item holds handles into too many shared objects");
        const std::uint64_t header = record_header_bytes(ids.size());
        const bool whole = ring_.fits_whole(header + msg.size());
        QueueLock lock(ring_, QueueLock::Side::producer);
        if (!ids.empty()) lock.both();  // the RefTable changes with both locks
        for (;;) {
            if (!wait_for_room(lock, whole ? header + msg.size() : header, ids, deadline)) return false;
            if (ring_.leaves_resident(ring_.write_view(), header + msg.size()) &&
                ring_.rewind_due(ring_.write_view_fresh(), header + msg.size())) {
                lock.both();  // the producers' lock is held: nothing moved
                ring_.rewind(header + msg.size());
            }
            if (whole) {
                ring_.put_whole(msg, ids, lock.wakes);
                return true;
            }
            // Streamed: claim the ring for this item, commit its record, then pieces as room allows.
            if (ring_.start_stream(msg.size(), ids, lock.wakes)) return stream_in(lock, msg, deadline);
            if (!lock.await_claim(deadline)) return false;  // a prober holds the claim for a moment
        }
    }

    /// Takes the next item into `out`. Take::none if there was none before `deadline` (or at once,
    /// with `nowait`); Take::shut_down if there is none and the queue is shut down. Once it has
    /// started reading a streamed item it finishes it, whatever the deadline — unless its producer
    /// dies or gives up, or the queue is shut down immediately, which drops the item. The segments
    /// the item's handles point into are put in `pins` (those this process maps) before the queue
    /// stops counting them, so they stay mapped here until the item is decoded.
    Take get(Buffer& out, const Deadline& deadline, bool nowait, std::vector<SegmentPtr>* pins = nullptr) {
        NoDirectPlace none;
        bool direct = false;
        return get(out, deadline, nowait, pins, none, direct);
    }

    /// As above, but an item that `place` takes goes where it says rather than into `out`, and
    /// `direct` tells which was done. `place.takes(len)`: whether it takes an item of `len` bytes;
    /// `place.reserve(len)`, with the lock held and nothing taken yet, may throw (the item stays,
    /// so a get that cannot allocate the value loses nothing); `place.place()` gives its ItemPlace
    /// and must not throw: for a streamed item with the lock released and the item claimed by
    /// this get, for a whole one (at most queue_piece) under the lock, just before the copy. The
    /// copy it saves — into `out`, then out of it when decoding — is the larger part of a get of
    /// a few KiB. `direct` means something only when the result is Take::item.
    /// A whole item that goes into `out` is handed to `place.accept(bytes)` under the lock before
    /// it is taken (Queue<T> decodes it there): std::bad_alloc from it leaves the item in the
    /// queue; any other exception takes the item (it cannot be decoded) and goes on.
    template <class Place>
    Take get(Buffer& out, const Deadline& deadline, bool nowait, std::vector<SegmentPtr>* pins, Place& place,
             bool& direct) {
        QueueHeader& h = ring_.header();
        QueueLock lock(ring_, QueueLock::Side::consumer);
        for (;;) {
            QueueCursor c = ring_.read_view();
            if (c.r.reading) {
                // Another consumer drains a streamed item; take it over if that consumer died.
                if (ring_.take_over_read()) {
                    drain(lock, nullptr, 0);  // its first part went with the dead reader: dropped
                    continue;
                }
                if (nowait || expired(deadline)) return Take::none;
                // Its reader wakes the consumers behind it when it is done (the read half cannot
                // change before this one sleeps: it holds the consumers' lock).
                lock.wait(h.items, h.item_waiters, deadline, [] { return false; });
                continue;
            }
            if (c.count() == 0) c = ring_.read_view_fresh();
            if (c.count() > 0) {
                const std::uint64_t word = ring_.word_at(c.r.head);
                if (word == lap_flag) {  // the producer went back to the ring's start
                    ring_.skip_lap(c, lock.wakes);
                    continue;
                }
                const QueueRecord record = ring_.record_at(c.r.head, word);
                // The RefTable changes with both locks: take the producers' too (in order, so
                // the consumers' is let go and taken again, and all is looked at again).
                if (!record.ids.empty() && !lock.holds_both()) {
                    lock.both();
                    continue;
                }
                direct = place.takes(record.len);
                // May throw: nothing taken yet.
                if (direct) place.reserve(record.len);
                else out.resize(static_cast<std::size_t>(record.len));
                if (pins)
                    for (std::uint64_t id : record.ids)
                        if (SegmentPtr segment = segments().find(id)) pins->push_back(std::move(segment));
                if (!record.streamed) {
                    ItemPlace into;
                    if (direct) into = place.place();
                    else into.head = {out.data(), static_cast<std::size_t>(record.len)};
                    ring_.copy_whole(c, record, into);
                    if (!direct) {
                        try {
                            place.accept(std::span<const std::byte>(into.head));
                        } catch (const std::bad_alloc&) {
                            throw;  // nothing taken: the item stays for the next get
                        } catch (...) {
                            ring_.take_whole(c, record, lock.wakes);  // it cannot be decoded: it goes, with the error
                            lower_if_due(lock);
                            throw;
                        }
                    }
                    ring_.take_whole(c, record, lock.wakes);
                    lower_if_due(lock);
                    return Take::item;
                }
                ring_.start_read(c, record, lock.wakes);
                ItemPlace into;
                if (direct) lock.unlocked([&] { into = place.place(); });
                else into.head = {out.data(), static_cast<std::size_t>(record.len)};
                if (drain(lock, &into, record.len)) {
                    lower_if_due(lock);
                    return Take::item;
                }
                continue;  // its producer died or gave up: wait for the next item
            }
            if (c.shut_down) return Take::shut_down;  // read before the write half: nothing more comes
            if (nowait || expired(deadline)) return Take::none;
            if (lock.watch()) continue;
            lock.wait(h.items, h.item_waiters, deadline, [&] {
                const QueueCursor now = ring_.read_view_fresh();
                return now.count() > 0 || now.shut_down;
            });
        }
    }

    std::size_t count() {
        QueueLock lock(ring_, QueueLock::Side::producer);
        lock.both();
        return static_cast<std::size_t>(ring_.both_view().count());
    }

    /// Refuses every put from now on; gets take what is left, then find the queue shut down. With
    /// `immediate`, what is left is dropped now (and counts as done). Either way every sleeper
    /// in every process is woken to look again.
    void shutdown(bool immediate) {
        QueueHeader& h = ring_.header();
        {
            QueueLock lock(ring_, QueueLock::Side::producer);
            lock.both();
            ring_.shut_down(immediate);
        }
        // Each word moves on (by 2, keeping a request), so a sleeper that made its request before
        // the flag was set and is on its way to sleep finds its value gone; then all are woken.
        for (FutexWord* word : {&h.items, &h.space, &h.stream_data, &h.stream_room}) {
            word->fetch_add(2, std::memory_order_seq_cst);
            futex_wake_all(*word);
        }
        if (h.join_waiters.load(std::memory_order_seq_cst) != 0) futex_wake_all(h.tasks_done);
    }
    bool is_shut_down() const noexcept { return ring_.shut(); }

    /// One item taken has been processed (JoinableQueue). mproc::Error, changing nothing, when
    /// every item put has been marked done already.
    void task_done() {
        QueueHeader& h = ring_.header();
        {
            QueueLock lock(ring_, QueueLock::Side::producer);
            lock.both();
            if (!ring_.task_done())
                throw Error("mproc::JoinableQueue::task_done: called more times than there were items put");
            if (ring_.unfinished() != 0) return;
        }
        if (h.join_waiters.load(std::memory_order_seq_cst) != 0) futex_wake_all(h.tasks_done);
    }
    /// Waits until every item put has been marked done: true, or false if `deadline` passed first.
    bool join(const Deadline& deadline) {
        QueueHeader& h = ring_.header();
        QueueLock lock(ring_, QueueLock::Side::producer);
        lock.both();
        for (;;) {
            if (ring_.unfinished() == 0) return true;
            if (expired(deadline)) return false;
            lock.sleep(h.tasks_done, h.join_waiters, deadline);
        }
    }
    /// Items put and not yet marked done.
    std::size_t unfinished() {
        QueueLock lock(ring_, QueueLock::Side::producer);
        lock.both();
        return static_cast<std::size_t>(ring_.unfinished());
    }
    std::uint64_t joinable() const noexcept { return ring_.joinable(); }

    std::size_t maxsize() const noexcept { return static_cast<std::size_t>(ring_.header().maxsize); }
    std::size_t capacity() const noexcept { return static_cast<std::size_t>(ring_.capacity()); }

private:
    /// Holding the producers' lock (both, for an item holding handles), waits until a put that
    /// needs `need` bytes of the ring may start, or `deadline` passes (false). Each round checks
    /// first whether the queue is shut down (ShutDown), then whether a producer streaming an item
    /// in has died (which frees the ring). The consumers' half is read again only when the one last
    /// seen leaves no room. Always inlined: every put passes through it, and as a call it cost a
    /// small put a tenth more instructions.
    [[gnu::always_inline]] bool wait_for_room(QueueLock& lock, std::uint64_t need, std::span<const std::uint64_t> ids,
                                              const Deadline& deadline) {
        QueueHeader& h = ring_.header();
        reserve_refs(ids);
        bool paced = false;
        for (;;) {
            QueueCursor c = ring_.write_view();
            if (c.shut_down) [[unlikely]]
                throw_shut_down("the queue is shut down");
            if (c.w.writing && withdrew_dead_writer(lock)) [[unlikely]]
                continue;
            // The head last seen is read again when it leaves no room, or lies a quarter of the
            // resident part behind (what pacing and laps go by): about once a MiB of items.
            if (!ring_.admits(c, need) || ring_.stale(c)) c = ring_.write_view_fresh();
            if (ring_.admits(c, need)) {
                if (paced || !should_pace(c, need)) return true;
                paced = true;  // once per put: then it goes ahead whatever happened
                lock.pace(need);
                continue;
            }
            if (expired(deadline)) return false;
            lock.wait(h.space, h.space_waiters, deadline, [&] {
                const QueueCursor now = ring_.write_view_fresh();
                return now.shut_down || ring_.admits(now, need);
            });
            reserve_refs(ids);  // others may have counted meanwhile
        }
    }

    /// With an item streaming in (as last seen): if its producer is gone, takes both locks (a
    /// consumer lets its own go first) and withdraws the item. True when it did: then the caller
    /// looks at everything again.
    bool withdrew_dead_writer(QueueLock& lock) {
        if (!ring_.writer_gone()) return false;
        lock.both();
        ring_.probe_writer(lock.wakes);
        return true;
    }

    /// Throws Full, changing nothing, unless the RefTable can count `ids` once more — or ShutDown
    /// first, if the queue is shut down (as a put of an item holding no handles would).
    void reserve_refs(std::span<const std::uint64_t> ids) {
        if (ids.empty()) return;
        if (ring_.shut()) throw_shut_down("the queue is shut down");
        ring_.reserve_refs(ids);
    }

    /// After a take that left the ring empty: lowers a resident part that large items raised, once
    /// it is due (with both locks: rare, at most once a queue_resident_hold_ns).
    void lower_if_due(QueueLock& lock) {
        if (!ring_.resident_raised() || !ring_.lower_due(ring_.read_view())) return;
        lock.both();
        ring_.lower_resident();
    }

    /// With the stream of `msg` started: commits its payload piece by piece, each copied with the
    /// lock released (so consumers, and the reader of this item, go on meanwhile), sleeping while
    /// the ring is full. If `deadline` passes first, withdraws the partial item (a reader that
    /// started it drops it) and returns false.
    bool stream_in(QueueLock& lock, const ItemBytes& msg, const Deadline& deadline) {
        for (;;) {
            StreamPiece piece;
            StreamStep step = ring_.reserve_write_piece(msg.size(), piece);
            if (step == StreamStep::more) {
                lock.unlocked([&] { ring_.copy_piece_in(piece, msg); });
                step = ring_.commit_write_piece(piece, lock.wakes);
                if (step == StreamStep::done) return true;
                if (step == StreamStep::more) continue;
            }
            if (step == StreamStep::dropped)
                throw_shut_down("the queue was shut down immediately while the item streamed in");
            if (expired(deadline)) {
                lock.both();  // the producers' lock is held: nothing moved
                ring_.withdraw_stream(lock.wakes);
                return false;
            }
            lock.wait_stream(ring_.header().stream_room, deadline, [&] {
                const QueueCursor now = ring_.write_view_fresh();
                return !now.w.writing || ring_.room(now) > 0;
            });
        }
    }

    /// With the read claim held and a streamed item being drained: copies the rest into `dst`
    /// (or drops it when `dst` is null) piece by piece, each with the lock released. Returns true
    /// when the item is complete, false when it was aborted. Either way the claim is released and
    /// the lock is held on return.
    bool drain(QueueLock& lock, const ItemPlace* dst, std::uint64_t len) {
        QueueHeader& h = ring_.header();
        for (;;) {
            StreamPiece piece;
            StreamStep step = ring_.reserve_read_piece(len, piece, lock.wakes);
            if (step == StreamStep::more) {
                if (dst && piece.n > 0) lock.unlocked([&] { ring_.copy_piece_out(piece, *dst); });
                step = ring_.commit_read_piece(piece, dst != nullptr, lock.wakes);
                if (step == StreamStep::more) continue;
            }
            if (step == StreamStep::done) return true;
            if (step == StreamStep::dropped) return false;
            // Waiting for the producer's next piece: is it still alive? A producer copying its
            // next piece commits it within a copy's time: watch for it before sleeping.
            if (withdrew_dead_writer(lock)) continue;
            if (lock.watch()) continue;
            lock.wait_stream(h.stream_data, std::nullopt, [&] {
                const QueueCursor now = ring_.read_view_fresh();
                return now.r.aborted || !now.w.writing || now.w.tail != now.r.head;
            });
        }
    }
    /// A producer about to write past the resident part of the ring, while a consumer is taking
    /// items right now, would only run ahead into memory the kernel must hand out fresh (and take
    /// back once read): a page fault and a page release per 4 KiB, which costs more than the copy.
    /// It waits a moment for the consumer instead. The wait is short and happens once per put, so
    /// a put still never blocks on an unbounded queue: with no consumer busy, it goes ahead at once.
    bool should_pace(const QueueCursor& c, std::uint64_t need) const noexcept {
        if (!ring_.runs_past_resident(c, need)) return false;
        const QueueHeader& h = ring_.header();
        const std::int64_t now = monotonic_ns();
        return now - h.last_take_ns.load(std::memory_order_relaxed) < queue_pace_active_ns &&
               now >= h.pace_off_until_ns.load(std::memory_order_relaxed);
    }

    QueueRing ring_;
};

}  // namespace mproc::detail
