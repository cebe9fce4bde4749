// mproc — the per-process registry of shared-memory segments.
//
// The contract, for code that moves shared objects between processes (Pool workers especially):
//
// * Every shared object (Queue, SharedDict, Lock, Value, ...) lives in a *segment*: one memfd
//   mapping (detail::SharedMemory) with a random 64-bit id. segments().create() makes one and
//   registers {id, base address, size, memfd} here.
// * A handle serialises as (segment id, offset) — never as a pointer. Decoding looks the id up
//   in this process's registry and uses base + offset, so the mapping may sit at a different
//   address in every process.
// * A child made by fork inherits the registry and every mapping at the same addresses, so
//   handles to everything created before the fork decode there with no work.
// * Decoding a handle whose segment this process does not have throws mproc::Error ("... was
//   created after this process was forked, and was not sent to it ..."), unless the segment was
//   adopted: the creating process sends the memfd over a Unix socket (SCM_RIGHTS) and the
//   receiver calls segments().adopt(id, fd). The Pool does this for its tasks: it notes
//   segments().generation() when it forks its fork server, and a task whose arguments name a
//   segment of a later generation is preceded, on its worker's channel, by that segment's memfd
//   (detail/pool/fork_engine.hpp, send_segments_locked; the worker adopts it in worker.hpp).
//   An adopted segment stays mapped until release_adopted(id) (or the process ends); the fds
//   segments_since() returns stay owned by the registry (send them, do not close them).
// * Lifetime: each process counts its own handles per segment (a shared_ptr). When the last
//   handle in a process goes, that process unmaps the segment and closes its memfd; the kernel
//   frees the memory once every process has done so or exited. Nothing is ever shared through
//   the filesystem, so nothing can leak there.
// * Handles stored inside other shared objects. A SharedDict or a Queue (a *container*) keeps, in
//   its own shared memory, a count per segment of the handles its entries or items hold
//   (ContainerView reads it without a lock). When the last handle into a segment goes in a process, the registry asks
//   every container this process maps whether it may hold a handle into that segment; if one
//   may, the segment stays mapped here (*retained*) instead. sweep() — after every container
//   operation, and whenever a segment is unmapped — lets go of every retained segment that no
//   container still reachable in this process (one this process holds a handle to, or one
//   retained itself because such a container refers to it) may refer to. So an object lives in a
//   process while that process holds a handle to it or to a container that holds one, however
//   deep; cycles of containers that nothing else reaches are let go too. Each process decides
//   for itself, from the containers' counts: nobody has to know when "the last" process let go.
//
// The registry is guarded by a std::mutex, which every fork takes first (fork_locks.hpp): a child
// forked while another thread of its parent was using the registry gets it unlocked and whole.
// Letting go of segments runs outside that mutex (a segment's deleter takes it), under a second
// one that every fork also takes (Releasing): a child never copies a segment half let go, held
// for a moment by a thread of the parent's that the child does not have, which would keep it
// mapped there for good.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <pthread.h>
#include <string>
#include <unistd.h>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../os/fork_locks.hpp"
#include "../os/random.hpp"
#include "../os/unique_fd.hpp"
#include "memory.hpp"

namespace mproc::detail {

class SegmentRegistry;
inline SegmentRegistry& segments();

/// How the registry reads a container: a shared object that stores encoded handles.
struct ContainerView {
    /// False only if the container at `base` certainly holds no handle into segment `id`. Reads
    /// the container's shared memory without its lock, so it may err towards true, never false.
    bool (*may_reference)(const std::byte* base, std::uint64_t id) noexcept;
    /// Changes whenever the set of segments the container refers to may have changed.
    std::uint64_t (*version)(const std::byte* base) noexcept;
};

/// One registered mapping. Shared by every handle in this process that points into it.
class Segment {
public:
    Segment(std::uint64_t id, std::uint64_t generation, SharedMemory memory)
        : id_(id), generation_(generation), memory_(std::move(memory)) {}
    Segment(const Segment&) = delete;
    Segment& operator=(const Segment&) = delete;

    std::uint64_t id() const noexcept { return id_; }
    std::uint64_t generation() const noexcept { return generation_; }
    std::byte* base() const noexcept { return memory_.data(); }
    std::size_t size() const noexcept { return memory_.size(); }
    int fd() const noexcept { return memory_.fd(); }
    const SharedMemory& memory() const noexcept { return memory_; }
    /// Non-null when the segment holds a container (set through SegmentRegistry::mark_container).
    const ContainerView* container() const noexcept { return container_; }

private:
    friend class SegmentRegistry;
    std::uint64_t id_;
    std::uint64_t generation_;
    SharedMemory memory_;
    const ContainerView* container_ = nullptr;  // guarded by the registry's mutex
    // A child found its last handle going on a thread of the parent's, which the child does not
    // have (SegmentRegistry::orphan_unsettled); guarded by the registry's mutex.
    bool orphaned_ = false;
};

using SegmentPtr = std::shared_ptr<Segment>;

class SegmentRegistry {
public:
    SegmentRegistry() noexcept {
        ForkLocks::add(ForkLockRank::registry_release, release_mutex_);
        ForkLocks::add(ForkLockRank::registry, mutex_);
        // After ForkLocks' own handlers (registered first, so run first in the child): the
        // registry's mutex is free there.
        ::pthread_atfork(nullptr, nullptr, [] { segments().orphan_unsettled(); });
    }
    SegmentRegistry(const SegmentRegistry&) = delete;
    SegmentRegistry& operator=(const SegmentRegistry&) = delete;

    /// A new zero-filled segment of at least `size` bytes, registered under a fresh id.
    SegmentPtr create(std::size_t size, const char* name) {
        SharedMemory memory = SharedMemory::create(size, name);
        std::lock_guard guard(mutex_);
        std::uint64_t id = random_u64();
        while (id == 0 || live_.count(id) != 0) id = random_u64();
        return register_locked(id, ++generation_, std::move(memory));
    }

    /// The segment with this id, or nullptr if this process does not have it. A segment whose last
    /// handle here is going on another thread is waited for: the registry either keeps it (a
    /// container here refers to it) or lets it go, and until it has decided, its entry is expired
    /// but there (see last_handle_gone).
    SegmentPtr find(std::uint64_t id) {
        std::unique_lock guard(mutex_);
        own_orphans_locked();
        auto it = live_.find(id);
        if (it == live_.end()) return nullptr;
        if (it->second.owner.expired() && letting_go() == nullptr) {
            settled_.wait(guard, [&] {
                it = live_.find(id);
                return it == live_.end() || !it->second.owner.expired();
            });
            if (it == live_.end()) return nullptr;
        }
        SegmentPtr found = it->second.owner.lock();
        // A segment the sweep is letting go of is in use again: it, and what it refers to, stay.
        if (found && sweeping_here()) std::erase(condemned_, id);
        return found;
    }

    /// Counts segment creations in this process (and, after fork, in its parent before it).
    std::uint64_t generation() {
        std::lock_guard guard(mutex_);
        return generation_;
    }

    /// Id and memfd of every live segment created after `generation`. The fds stay owned here.
    std::vector<std::pair<std::uint64_t, int>> segments_since(std::uint64_t generation) {
        std::vector<std::pair<std::uint64_t, int>> found;
        std::vector<SegmentPtr> held;  // let go of after the mutex: one may be the last handle
        std::lock_guard guard(mutex_);
        for (const auto& [id, entry] : live_)
            if (SegmentPtr segment = entry.owner.lock(); segment && segment->generation() > generation) {
                found.emplace_back(id, segment->fd());
                held.push_back(std::move(segment));
            }
        return found;
    }

    /// Maps a segment another process created and sent as a memfd, so handles to it decode
    /// here. Kept mapped until release_adopted(id). Adopting a known id just closes `fd`.
    void adopt(std::uint64_t id, UniqueFd fd) {
        if (SegmentPtr known = find(id)) {
            std::lock_guard guard(mutex_);
            adopted_.emplace(id, std::move(known));
            return;
        }
        SharedMemory memory = SharedMemory::open(std::move(fd));
        SegmentPtr raced;  // let go of after the mutex, should the emplace throw
        std::lock_guard guard(mutex_);
        if (auto it = live_.find(id); it != live_.end()) {
            raced = it->second.owner.lock();
            if (raced) {
                adopted_.emplace(id, std::move(raced));
                return;
            }
        }
        // The entry first: a failure to make it (no memory) comes before the segment exists,
        // whose last owner, gone under this lock, would take it again (see register_locked).
        const auto [entry, inserted] = adopted_.try_emplace(id);
        try {
            entry->second = register_locked(id, ++generation_, std::move(memory));
        } catch (...) {
            if (inserted) adopted_.erase(entry);
            throw;
        }
        std::erase_if(unadopted_, [&](const auto& e) { return e.first == id; });
    }

    /// Notes that segment `id` was sent here and could not be mapped, for `why`: a handle to it
    /// then fails saying so (unadopted_reason). The last few are kept; adopting it forgets it.
    void note_unadopted(std::uint64_t id, std::string why) {
        std::lock_guard guard(mutex_);
        std::erase_if(unadopted_, [&](const auto& e) { return e.first == id; });
        if (unadopted_.size() >= max_unadopted) unadopted_.erase(unadopted_.begin());
        unadopted_.emplace_back(id, std::move(why));
    }
    /// Why segment `id` could not be mapped here, if note_unadopted said so.
    std::optional<std::string> unadopted_reason(std::uint64_t id) {
        std::lock_guard guard(mutex_);
        for (const auto& [known, why] : unadopted_)
            if (known == id) return why;
        return std::nullopt;
    }

    /// Drops the registry's own hold on an adopted segment; handles keep theirs.
    void release_adopted(std::uint64_t id) {
        Releasing releasing(*this);
        SegmentPtr dropped;  // destroyed after the mutex is released
        std::lock_guard guard(mutex_);
        if (auto it = adopted_.find(id); it != adopted_.end()) {
            dropped = std::move(it->second);
            adopted_.erase(it);
        }
    }

    /// Number of segments this process has mapped (for tests and diagnostics).
    std::size_t mapped_count() {
        std::lock_guard guard(mutex_);
        std::size_t n = 0;
        for (const auto& entry : live_) n += entry.second.owner.expired() ? 0 : 1;
        return n;
    }

    /// Number of segments mapped here only because a container refers to them.
    std::size_t retained_count() noexcept { return retained_size_.load(std::memory_order_acquire); }

    /// Records that `segment` holds a container read through `view` (idempotent).
    void mark_container(Segment& segment, const ContainerView* view) {
        std::lock_guard guard(mutex_);
        if (segment.container_) return;
        segment.container_ = view;
        containers_.push_back(&segment);
        ++changes_;
    }

    /// Lets go of every retained segment that no container reachable in this process may refer to
    /// any more (see the top of this file). Cheap when nothing is retained. Never call it with
    /// the registry's mutex held. Best effort: every call runs it once it has made its change or
    /// taken what it returns, which a throw would lose or misreport; a sweep that cannot allocate
    /// leaves its work to the next one.
    void sweep() noexcept {
        if (retained_size_.load(std::memory_order_acquire) == 0 && !orphans_.load(std::memory_order_acquire)) return;
        try {
            sweep_retained();
        } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; the next call's sweep lets go instead
        }
    }

private:
    void sweep_retained() {
        {
            std::lock_guard guard(mutex_);
            if (sweeping_here()) return;  // one sweep at a time: the running one loops until nothing changes
            sweeper_ = ::getpid();
        }
        struct Finish {  // the sweep ends, however it ends
            SegmentRegistry* r;
            ~Finish() {
                std::lock_guard guard(r->mutex_);
                r->condemned_.clear();
                r->sweeper_ = 0;
            }
        } finish{this};
        for (;;) {
            // From the moment what it lets go of leaves retained_ until its deleters have run, no
            // fork: a child would copy `drop` on a stack it never unwinds.
            Releasing releasing(*this);
            std::vector<SegmentPtr> drop;
            {
                std::lock_guard guard(mutex_);
                own_orphans_locked();
                std::uint64_t stamp = changes_;
                for (const Segment* c : containers_) stamp += c->container_->version(c->base());
                if (stamp == swept_stamp_ || (collect_unreachable_locked(drop), drop.empty())) {
                    swept_stamp_ = stamp;
                    return;
                }
                swept_stamp_ = stamp;
                retained_size_.store(retained_.size(), std::memory_order_release);
                ++changes_;
            }
            // Their deleters run here, outside the mutex. Those let go together must not keep each
            // other alive (condemned_), unless find() hands one out again meanwhile.
            drop.clear();
            std::lock_guard guard(mutex_);
            condemned_.clear();
        }
    }

    /// Registers a new segment under `id` (the mutex held). It gets its registry's deleter only
    /// once registered: until then a failure to allocate (the shared_ptr's count, the map's
    /// entry) just deletes it, as the registry's deleter would take the mutex held here.
    SegmentPtr register_locked(std::uint64_t id, std::uint64_t generation, SharedMemory memory) {
        SegmentPtr segment(new Segment(id, generation, std::move(memory)), Deleter{nullptr});
        live_[id] = {segment, segment.get()};
        std::get_deleter<Deleter>(segment)->registry = this;
        return segment;
    }

    /// Runs when the last handle into a segment goes in this process. If a container this
    /// process maps may hold a handle into it, the segment is retained (a fresh owner in
    /// retained_, the same mapping) instead of unmapped. Otherwise it is unregistered and
    /// unmapped; a racing find() waits for that decision (last_handle_gone).
    struct Deleter {
        SegmentRegistry* registry;  // none while register_locked (or own_orphans_locked) has not finished
        bool keep = false;          // with no registry: leave the segment be rather than delete it
        void operator()(Segment* s) const noexcept {
            if (registry) registry->last_handle_gone(s);
            else if (!keep) delete s;
        }
    };
    /// From the moment the last handle's count reached 0, the segment's entry is expired, and
    /// find() waits (settled_) until this decides: kept (the entry holds the new owner) or let go
    /// (the entry erased). The new owner is made before the decision; when the segment does not
    /// stay, dropping that owner comes back here and lets go of it (so does a failure to allocate
    /// the owner or the record).
    void last_handle_gone(Segment* s) noexcept {
        // Both passes: the first one's owner, kept in retained_, has a copy on this stack until
        // it returns, and the second one unregisters the segment before it unmaps it.
        Releasing releasing(*this);
        Segment*& going = letting_go();
        if (going != s) {
            going = s;
            try {
                SegmentPtr again(s, Deleter{this});
                std::lock_guard guard(mutex_);
                if (referenced_locked(*s)) {
                    live_[s->id()] = {again, s};
                    retained_.try_emplace(s->id(), again);
                    retained_size_.store(retained_.size(), std::memory_order_release);
                    ++changes_;
                    settled_.notify_all();
                }
            } catch (...) {}
            going = nullptr;
            return;
        }
        {
            std::lock_guard guard(mutex_);
            auto it = live_.find(s->id());
            if (it != live_.end() && it->second.owner.expired()) live_.erase(it);
            if (s->container_) std::erase(containers_, s);
            ++changes_;
            settled_.notify_all();
        }
        delete s;
        sweep();  // what only this segment's container referred to may go now
    }
    /// Holds release_mutex_ on this thread while the registry lets go of segments (once, however
    /// deeply their deleters nest). Every fork takes it first (fork_locks.hpp), so a child never
    /// copies a segment that a thread of the parent's was letting go of outside the registry's
    /// mutex: out of retained_ but still held by the sweep's `drop`, out of adopted_ but still held
    /// by release_adopted, kept but with a second owner on last_handle_gone's stack, or
    /// unregistered but not yet unmapped. It comes before the registry's mutex: nothing that holds
    /// that mutex lets go of a segment (a last handle's deleter takes both), and no thread that
    /// holds it waits in find() for a decision, which takes it.
    class Releasing {
    public:
        explicit Releasing(SegmentRegistry& registry) : registry_(registry) {
            if (depth() == 0) registry_.release_mutex_.lock();
            ++depth();
        }
        ~Releasing() {
            if (--depth() == 0) registry_.release_mutex_.unlock();
        }
        Releasing(const Releasing&) = delete;
        Releasing& operator=(const Releasing&) = delete;

    private:
        static int& depth() noexcept {
            thread_local int held = 0;
            return held;
        }
        SegmentRegistry& registry_;
    };
    /// The segment whose last handle this thread is letting go of (its find() does not wait).
    static Segment*& letting_go() noexcept {
        thread_local Segment* going = nullptr;
        return going;
    }
    /// In a child just forked (an atfork handler: it allocates and frees nothing): the entries of
    /// segments another thread of the parent was letting go of at the fork stay expired for good
    /// (that thread, which was to decide whether to keep them, is not here). Each such segment is
    /// marked orphaned, and the child's next find() or sweep owns it again (own_orphans_locked),
    /// so that the child decides for itself, as that thread would have: a container that refers
    /// to it keeps it. (Before, the child forgot it, and a handle into it that a Queue's item
    /// carried failed here as if the child had not had it, the item lost.) The segment is whole:
    /// the deciding thread deletes it only after erasing its entry, under the lock the fork held.
    /// The condition variable is made afresh: its copy may count waiters of the parent's, which a
    /// notify here would wait for.
    void orphan_unsettled() noexcept {
        std::lock_guard guard(mutex_);
        new (&settled_) std::condition_variable;
        for (auto& entry : live_) {
            if (!entry.second.owner.expired()) continue;
            entry.second.segment->orphaned_ = true;
            orphans_.store(true, std::memory_order_release);
        }
    }
    /// With the mutex held: owns again, as retained, every segment orphan_unsettled marked orphaned
    /// (its next sweep decides whether it stays). Should memory run out for one, it is forgotten,
    /// its mapping left until the process ends, so that find() does not wait for it.
    void own_orphans_locked() noexcept {
        if (!orphans_.load(std::memory_order_relaxed)) [[likely]]
            return;
        bool forgot = false;
        for (auto& [id, entry] : live_) {
            Segment* orphan = entry.segment;
            if (!entry.owner.expired() || !orphan->orphaned_) continue;
            try {
                const auto [slot, inserted] = retained_.try_emplace(id);
                if (!inserted) continue;  // cannot be: a retained segment is owned
                try {
                    // No registry until made: a failure to allocate leaves the segment be (the
                    // registry's deleter would take the lock held here).
                    SegmentPtr again(orphan, Deleter{nullptr, /*keep=*/true});
                    *std::get_deleter<Deleter>(again) = Deleter{this};
                    entry.owner = again;
                    slot->second = std::move(again);
                    orphan->orphaned_ = false;
                    ++changes_;
                } catch (...) {
                    retained_.erase(slot);
                    throw;
                }
            } catch (...) {
                forgot = true;
            }
        }
        if (forgot) {
            std::erase_if(containers_, [](const Segment* c) { return c->orphaned_; });
            std::erase_if(live_, [](const auto& entry) {
                return entry.second.owner.expired() && entry.second.segment->orphaned_;
            });
        }
        retained_size_.store(retained_.size(), std::memory_order_release);
        orphans_.store(false, std::memory_order_relaxed);
    }

    /// With the mutex held: may a container mapped here (other than `s` itself, and other than
    /// one the sweep is letting go of) hold a handle into `s`?
    bool referenced_locked(const Segment& s) const noexcept {
        for (const Segment* c : containers_)
            if (c != &s && !condemned_locked(c->id()) && c->container_->may_reference(c->base(), s.id())) return true;
        return false;
    }

    /// With the mutex held: moves out of retained_ every segment that no reachable container may
    /// refer to. Reachable: a container this process holds a handle to (one not retained, or
    /// retained and also held by a handle), and, in turn, every retained container that a
    /// reachable one may refer to. (A handle copied meanwhile on another thread can only be a copy
    /// of a handle that already counted.)
    void collect_unreachable_locked(std::vector<SegmentPtr>& drop) {
        std::vector<const Segment*> reachable;
        for (const Segment* c : containers_) {
            auto it = retained_.find(c->id());
            if (it == retained_.end() || it->second.use_count() > 1) reachable.push_back(c);
        }
        auto referenced_by_reachable = [&](const Segment& s) {
            for (const Segment* c : reachable)
                if (c != &s && c->container_->may_reference(c->base(), s.id())) return true;
            return false;
        };
        for (bool grew = true; grew;) {
            grew = false;
            for (const auto& [id, segment] : retained_) {
                if (!segment->container_) continue;
                if (std::find(reachable.begin(), reachable.end(), segment.get()) != reachable.end()) continue;
                if (referenced_by_reachable(*segment)) {
                    reachable.push_back(segment.get());
                    grew = true;
                }
            }
        }
        // The hold is kept only while a reachable container refers to the segment. A segment that
        // also has handles here stays mapped through them once the hold goes (and when they go,
        // its deleter asks the containers again).
        for (auto it = retained_.begin(); it != retained_.end();) {
            if (referenced_by_reachable(*it->second)) {
                ++it;
                continue;
            }
            condemned_.push_back(it->first);
            drop.push_back(std::move(it->second));
            it = retained_.erase(it);
        }
    }

    /// With the mutex held: a sweep of this process is running (a child forked meanwhile
    /// inherits the parent's flag, but not its sweeping thread).
    bool sweeping_here() const noexcept { return sweeper_ != 0 && sweeper_ == ::getpid(); }
    bool condemned_locked(std::uint64_t id) const noexcept {
        return sweeping_here() && std::find(condemned_.begin(), condemned_.end(), id) != condemned_.end();
    }

    std::mutex release_mutex_;  // Releasing: held while segments are let go of, taken by every fork
    std::mutex mutex_;
    std::condition_variable settled_;  // an expired entry of live_ was replaced or erased
    struct LiveEntry {
        std::weak_ptr<Segment> owner;
        Segment* segment;  // what `owner` owned, for a child that finds it expired (orphan_unsettled)
    };
    std::unordered_map<std::uint64_t, LiveEntry> live_;
    std::unordered_map<std::uint64_t, SegmentPtr> adopted_;
    static constexpr std::size_t max_unadopted = 16;
    std::vector<std::pair<std::uint64_t, std::string>> unadopted_;  // note_unadopted, oldest first
    std::unordered_map<std::uint64_t, SegmentPtr> retained_;  // mapped only because a container refers to them
    std::vector<Segment*> containers_;                         // every mapped segment that holds a container
    std::atomic<std::size_t> retained_size_{0};
    std::atomic<bool> orphans_{false};  // orphan_unsettled marked segments orphaned: own_orphans_locked owns them
    std::vector<std::uint64_t> condemned_;  // what the running sweep is letting go of
    pid_t sweeper_ = 0;                     // the process whose sweep runs (0: none)
    std::uint64_t changes_ = 0;      // bumped when retained_ or containers_ change
    std::uint64_t swept_stamp_ = 0;  // changes_ plus the containers' versions at the last sweep
    std::uint64_t generation_ = 0;
};

/// This process's registry. Never destroyed: handles in static objects may outlive main().
inline SegmentRegistry& segments() {
    static SegmentRegistry* registry = new SegmentRegistry;
    return *registry;
}

}  // namespace mproc::detail
