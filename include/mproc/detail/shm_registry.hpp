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
//   created after this process was forked ...; create it before the Pool"), unless the
//   segment was adopted: the creating process sends the memfd over a Unix socket (SCM_RIGHTS)
//   and the receiver calls segments().adopt(id, fd). The Pool does this with:
//       const std::uint64_t g = segments().generation();    // in the parent, when it forks workers
//       ... later, before sending a task:
//       for (auto [id, fd] : segments().segments_since(g))   // segments created after the fork,
//           send id + fd (SCM_RIGHTS) to each worker;         // still alive in the parent
//       // in the worker: segments().adopt(id, std::move(received_fd));
//   An adopted segment stays mapped until release_adopted(id) (or the process ends); the fds
//   segments_since() returns stay owned by the registry (send them, do not close them).
// * Lifetime: each process counts its own handles per segment (a shared_ptr). When the last
//   handle in a process goes, that process unmaps the segment and closes its memfd; the kernel
//   frees the memory once every process has done so or exited. Nothing is ever shared through
//   the filesystem, so nothing can leak there.
//
// The registry is guarded by a std::mutex, which every fork takes first (fork_locks.hpp): a child
// forked while another thread of its parent was using the registry gets it unlocked and whole.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <string>
#include <sys/random.h>
#include <unistd.h>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "fork_locks.hpp"
#include "shared_memory.hpp"
#include "unique_fd.hpp"

namespace mproc::detail {

class SegmentRegistry;

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

private:
    std::uint64_t id_;
    std::uint64_t generation_;
    SharedMemory memory_;
};

using SegmentPtr = std::shared_ptr<Segment>;

class SegmentRegistry {
public:
    SegmentRegistry() noexcept { ForkLocks::add(ForkLockRank::registry, mutex_); }
    SegmentRegistry(const SegmentRegistry&) = delete;
    SegmentRegistry& operator=(const SegmentRegistry&) = delete;

    /// A new zero-filled segment of at least `size` bytes, registered under a fresh id.
    SegmentPtr create(std::size_t size, const char* name) {
        SharedMemory memory = SharedMemory::create(size, name);
        std::lock_guard guard(mutex_);
        std::uint64_t id = random_id();
        while (id == 0 || live_.count(id) != 0) id = random_id();
        return register_locked(id, ++generation_, std::move(memory));
    }

    /// The segment with this id, or nullptr if this process does not have it.
    SegmentPtr find(std::uint64_t id) {
        std::lock_guard guard(mutex_);
        auto it = live_.find(id);
        return it == live_.end() ? nullptr : it->second.lock();
    }

    /// Counts segment creations in this process (and, after fork, in its parent before it).
    std::uint64_t generation() {
        std::lock_guard guard(mutex_);
        return generation_;
    }

    /// Id and memfd of every live segment created after `generation`. The fds stay owned here.
    std::vector<std::pair<std::uint64_t, int>> segments_since(std::uint64_t generation) {
        std::vector<std::pair<std::uint64_t, int>> found;
        std::lock_guard guard(mutex_);
        for (const auto& [id, weak] : live_)
            if (SegmentPtr segment = weak.lock(); segment && segment->generation() > generation)
                found.emplace_back(id, segment->fd());
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
        std::lock_guard guard(mutex_);
        if (auto it = live_.find(id); it != live_.end())
            if (SegmentPtr raced = it->second.lock()) {
                adopted_.emplace(id, std::move(raced));
                return;
            }
        adopted_.emplace(id, register_locked(id, 0, std::move(memory)));
    }

    /// Drops the registry's own hold on an adopted segment; handles keep theirs.
    void release_adopted(std::uint64_t id) {
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
        for (const auto& entry : live_) n += entry.second.expired() ? 0 : 1;
        return n;
    }

private:
    SegmentPtr register_locked(std::uint64_t id, std::uint64_t generation, SharedMemory memory) {
        // The deleter unregisters before unmapping; a racing find() sees an expired weak_ptr.
        SegmentPtr segment(new Segment(id, generation, std::move(memory)), [this](Segment* s) {
            {
                std::lock_guard guard(mutex_);
                auto it = live_.find(s->id());
                if (it != live_.end() && it->second.expired()) live_.erase(it);
            }
            delete s;
        });
        live_[id] = segment;
        return segment;
    }

    static std::uint64_t random_id() noexcept {
        std::uint64_t id = 0;
        if (::getrandom(&id, sizeof id, GRND_NONBLOCK) == static_cast<ssize_t>(sizeof id)) return id;
        // No entropy yet (early boot): pid, time and a counter are unique enough within a machine.
        static std::atomic<std::uint64_t> counter{0};
        timespec now{};
        ::clock_gettime(CLOCK_MONOTONIC, &now);
        return (static_cast<std::uint64_t>(::getpid()) << 40) ^ (static_cast<std::uint64_t>(now.tv_nsec) << 8) ^
               static_cast<std::uint64_t>(now.tv_sec) ^ (counter.fetch_add(1) << 20);
    }

    std::mutex mutex_;
    std::unordered_map<std::uint64_t, std::weak_ptr<Segment>> live_;
    std::unordered_map<std::uint64_t, SegmentPtr> adopted_;
    std::uint64_t generation_ = 0;
};

/// This process's registry. Never destroyed: handles in static objects may outlive main().
inline SegmentRegistry& segments() {
    static SegmentRegistry* registry = new SegmentRegistry;
    return *registry;
}

}  // namespace mproc::detail
