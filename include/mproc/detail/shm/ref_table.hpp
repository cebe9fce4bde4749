// mproc — what a container (a SharedDict, a Queue) holds handles into: a count per segment, in
// shared memory.
//
// A SharedDict entry whose key or value holds handles (a Queue, a Lock, another dict, ...) keeps the
// ids of the segments they point into beside its bytes, and so does a Queue record in its header;
// the container keeps, in this table, how many of its entries or items point into each segment.
// Every change is made by the container's lock holder; every process reads the table without the
// lock (SegmentRegistry asks "may this container hold a handle into segment X?" when the last
// handle into X goes in that process, to keep X mapped if so).
//
// A sequence lock makes those lock-free reads safe: the writer makes `version` odd before it
// changes anything and even again after; a reader that saw an odd version, or a different one
// after reading, answers "maybe" — it errs only towards keeping a segment. A writer killed halfway
// leaves the version odd (every reader keeps everything) until the next lock holder repairs the
// container and recounts the table from its entries or records.
//
// Open addressing over a fixed number of slots (ids are random 64-bit numbers). A slot keeps its
// id once used; a count that drops to 0 leaves it for the same id, and the table is compacted in
// place when used slots pass 3/4. More distinct segments than that at once is an mproc::Full,
// raised before the container changes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../../errors.hpp"

namespace mproc::detail {

struct RefSlot {
    std::uint64_t id;     // 0: never used
    std::uint64_t count;  // handles into segment `id` that the container's entries hold
};

struct RefTable {
    static constexpr std::size_t slots = 4096;
    static constexpr std::size_t max_live = slots / 4 * 3;

    std::uint64_t version;  // odd while a writer changes the table (std::atomic_ref)
    std::uint64_t used;     // slots with an id
    std::uint64_t live;     // slots with a nonzero count
    std::uint64_t reserved;
    RefSlot slot[slots];
};

/// A view of a RefTable. The writer's calls need the container's lock.
class RefCounts {
public:
    explicit RefCounts(RefTable* table) noexcept : t_(table) {}

    /// Lock-free, from any process: false only if no entry holds a handle into segment `id`.
    static bool may_reference(const RefTable* table, std::uint64_t id) noexcept {
        const std::uint64_t before = load(table->version, std::memory_order_acquire);
        if (before & 1u) return true;
        bool found = false;
        for (std::size_t i = home(id), probes = 0; probes < RefTable::slots; i = (i + 1) % RefTable::slots, ++probes) {
            const std::uint64_t at = load(table->slot[i].id, std::memory_order_relaxed);
            if (at == 0) break;
            if (at == id) {
                found = load(table->slot[i].count, std::memory_order_relaxed) != 0;
                break;
            }
        }
        std::atomic_thread_fence(std::memory_order_acquire);
        return found || load(table->version, std::memory_order_relaxed) != before;
    }
    static std::uint64_t version(const RefTable* table) noexcept {
        return load(table->version, std::memory_order_acquire);
    }

    /// Throws mproc::Full, changing nothing, unless `ids` can all be counted.
    void reserve(std::span<const std::uint64_t> ids, const char* owner) {
        std::size_t fresh = 0;
        for (std::uint64_t id : ids)
            if (count_of(id) == 0) ++fresh;
        if (fresh == 0) return;
        if (t_->live + fresh > RefTable::max_live)
            throw Full(std::string(owner) + ": it holds handles into " + std::to_string(t_->live) +
                       " shared objects with memory of their own already, and at most " +
                       std::to_string(RefTable::max_live) + " at once; nothing was changed");
        if (t_->used + fresh > RefTable::max_live) compact();
    }

    /// A writer's changes go between begin() and end().
    void begin() noexcept {
        store(t_->version, t_->version | 1u, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_release);
    }
    void end() noexcept { store(t_->version, (t_->version | 1u) + 1, std::memory_order_release); }

    /// Counts `ids` once more (after reserve()).
    void add(std::span<const std::uint64_t> ids) noexcept {
        for (std::uint64_t id : ids) {
            RefSlot* s = find_or_claim(id);
            if (!s) continue;  // reserve() made room: cannot happen
            if (s->count == 0) ++t_->live;
            store(s->count, s->count + 1, std::memory_order_relaxed);
        }
    }
    /// Counts `ids` once less.
    void remove(std::span<const std::uint64_t> ids) noexcept {
        for (std::uint64_t id : ids) {
            RefSlot* s = find(id);
            if (!s || s->count == 0) continue;
            store(s->count, s->count - 1, std::memory_order_relaxed);
            if (s->count == 0) --t_->live;
        }
    }
    /// Forgets every count (between begin() and end()).
    void clear() noexcept {
        for (RefSlot& s : t_->slot) {
            store(s.count, 0, std::memory_order_relaxed);
            store(s.id, 0, std::memory_order_relaxed);
        }
        t_->used = t_->live = 0;
    }
    std::uint64_t live() const noexcept { return t_->live; }

private:
    static std::size_t home(std::uint64_t id) noexcept {
        return static_cast<std::size_t>((id * 0x9e3779b97f4a7c15ull) >> 52) % RefTable::slots;
    }
    static std::uint64_t load(const std::uint64_t& word, std::memory_order order) noexcept {
        return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(word)).load(order);
    }
    static void store(std::uint64_t& word, std::uint64_t value, std::memory_order order) noexcept {
        std::atomic_ref<std::uint64_t>(word).store(value, order);
    }

    RefSlot* find(std::uint64_t id) const noexcept {
        for (std::size_t i = home(id), probes = 0; probes < RefTable::slots; i = (i + 1) % RefTable::slots, ++probes) {
            if (t_->slot[i].id == 0) return nullptr;
            if (t_->slot[i].id == id) return &t_->slot[i];
        }
        return nullptr;
    }
    std::uint64_t count_of(std::uint64_t id) const noexcept {
        const RefSlot* s = find(id);
        return s ? s->count : 0;
    }
    RefSlot* find_or_claim(std::uint64_t id) noexcept {
        for (std::size_t i = home(id), probes = 0; probes < RefTable::slots; i = (i + 1) % RefTable::slots, ++probes) {
            RefSlot& s = t_->slot[i];
            if (s.id == id) return &s;
            if (s.id == 0) {
                store(s.count, 0, std::memory_order_relaxed);
                store(s.id, id, std::memory_order_relaxed);
                ++t_->used;
                return &s;
            }
        }
        return nullptr;
    }
    /// Rebuilds the table with only the live counts (readers answer "maybe" meanwhile).
    void compact() {
        std::vector<RefSlot> keep;
        keep.reserve(static_cast<std::size_t>(t_->live));
        for (const RefSlot& s : t_->slot)
            if (s.id != 0 && s.count != 0) keep.push_back(s);
        const bool outside = (t_->version & 1u) == 0;
        if (outside) begin();
        clear();
        for (const RefSlot& s : keep) {
            RefSlot* fresh = find_or_claim(s.id);
            store(fresh->count, s.count, std::memory_order_relaxed);
            ++t_->live;
        }
        if (outside) end();
    }

    RefTable* t_;
};

}  // namespace mproc::detail
