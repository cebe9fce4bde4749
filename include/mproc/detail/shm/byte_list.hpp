// mproc — the SharedList on encoded bytes: an array of entries over an arena in shared memory, its
// lock and its repair.
//
// SharedList<T> (shared_list.hpp) encodes elements and hands the bytes to ByteList, which keeps
// them in one memfd laid out as a SharedDict's is (detail/shm/byte_dict.hpp): the header, then an
// arena (detail/shm/arena.hpp) holding the item array and the entries, then the RefTable of the
// handles the entries hold. The item array is {size, capacity, entry offsets...}; the header's
// `items` word points at it. Every change is built where nobody can see it and published by one
// 8-byte store — of the array's `size` (append, extend, pop from the end), of one entry offset
// (l[i] = v), or of `items` (a copy of the array with an element inserted or removed, a grown
// array, the empty list) — so a holder killed halfway leaves only bookkeeping that
// ByteList::repair puts right (docs/shared-memory.md).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "arena.hpp"
#include "memory.hpp"
#include "ref_table.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

inline constexpr std::uint32_t list_magic = 0x6d4c5354u;  // "mLST"

struct ListHeader {
    ObjectHeader header;
    RobustMutex mutex;
    std::uint64_t items;  // payload offset of the item array, 0 for the empty list; one store publishes a new one
    std::uint64_t refs;   // segment offset of the RefTable, past the arena's limit
    ArenaHeader arena;
};

/// The item array's head; `capacity` entry offsets follow it, of which the first `size` are the list.
struct ListItems {
    std::uint64_t size;
    std::uint64_t capacity;
};

/// An entry: this header, then the element's bytes, then `refs` segment ids (the segments the
/// element's handles point into, counted in the list's RefTable).
struct ListEntry {
    std::uint64_t len;
    std::uint64_t refs;
};

/// The list's logic on encoded elements; SharedList<T> adds the type.
class ByteList {
public:
    static constexpr std::uint64_t npos = ~std::uint64_t{0};
    static constexpr std::uint64_t min_capacity = 8;

    /// One element to store: its bytes, and the segments its handles point into.
    struct Value {
        std::span<const std::byte> bytes;
        std::span<const std::uint64_t> ids;
    };

    static SharedRef create(std::size_t max_bytes, std::uint64_t type) {
        const std::size_t header = round_up(sizeof(ListHeader), 64);
        if (max_bytes < header + 4096)
            throw Error("mproc::SharedList: max_bytes " + std::to_string(max_bytes) + " is too small");
        if (max_bytes > (std::size_t{1} << 46))
            throw Error("mproc::SharedList: max_bytes " + std::to_string(max_bytes) + " is too large");
        // The RefTable lies past max_bytes, in pages of its own (sparse: it costs nothing until the
        // list holds handles), as a SharedDict's does.
        const std::size_t refs = round_up(max_bytes, page_size());
        SharedRef ref = SharedRef::dedicated(refs + sizeof(RefTable), "mproc-list");
        auto* h = new (ref.address()) ListHeader;
        h->header = {list_magic, 0, type};
        h->mutex.init();
        h->items = 0;
        h->refs = refs;
        Arena::init(h->arena, header, max_bytes);
        segments().mark_container(*ref.segment(), &container_view);
        return ref;
    }

    static void check(const SharedRef& ref) {
        const auto* h = reinterpret_cast<const ListHeader*>(ref.address());
        const std::size_t size = ref.segment()->size();
        if (ref.offset() != 0 || h->arena.limit > size || h->arena.begin < sizeof(ListHeader) ||
            h->refs < h->arena.limit || h->refs % 8 != 0 || h->refs > size || size - h->refs < sizeof(RefTable))
            throw SerializationError("mproc: corrupt SharedList handle: its layout does not match its memory");
        segments().mark_container(*ref.segment(), &container_view);
    }

    /// How the registry reads a list's RefTable (see detail/shm/registry.hpp).
    static constexpr ContainerView container_view{
        [](const std::byte* base, std::uint64_t id) noexcept {
            const auto* h = reinterpret_cast<const ListHeader*>(base);
            return RefCounts::may_reference(reinterpret_cast<const RefTable*>(base + h->refs), id);
        },
        [](const std::byte* base) noexcept {
            const auto* h = reinterpret_cast<const ListHeader*>(base);
            return RefCounts::version(reinterpret_cast<const RefTable*>(base + h->refs));
        }};

    explicit ByteList(const SharedRef& ref)
        : base_(ref.address()), h_(ref.as<ListHeader>()), arena_(base_, h_->arena),
          refs_(reinterpret_cast<RefTable*>(base_ + h_->refs)) {}

    struct Repair {
        ByteList* l;
        void operator()() const { l->repair(); }
    };
    using Guard = RobustGuard<Repair>;
    Guard lock() { return Guard(h_->mutex, Repair{this}); }

    // Everything below requires the lock.

    std::uint64_t size() const noexcept { return h_->items == 0 ? 0 : head()->size; }

    /// Python's index rules: `i` counts from the end when negative; npos when out of range.
    std::uint64_t resolve(std::int64_t i) const noexcept {
        const auto n = static_cast<std::int64_t>(size());
        if (i < 0) i += n;
        return i < 0 || i >= n ? npos : static_cast<std::uint64_t>(i);
    }

    std::span<const std::byte> value_at(std::uint64_t i) const noexcept {
        const std::uint64_t e = entries()[i];
        return {arena_.ptr<const std::byte>(e + sizeof(ListEntry)),
                static_cast<std::size_t>(arena_.ptr<ListEntry>(e)->len)};
    }
    /// True when the element at `i` holds handles (counted in the RefTable).
    bool holds_handles(std::uint64_t i) const noexcept { return arena_.ptr<ListEntry>(entries()[i])->refs != 0; }
    /// True when some element may hold handles.
    bool holds_any_handles() const noexcept { return refs_->live != 0 || (refs_->version & 1u) != 0; }

    /// The first position in [from, size()) whose element's bytes are `bytes`, or npos.
    std::uint64_t find(std::span<const std::byte> bytes, std::uint64_t from = 0) const noexcept {
        const std::uint64_t n = size();
        for (std::uint64_t i = from; i < n; ++i) {
            const auto v = value_at(i);
            if (v.size() == bytes.size() && (v.empty() || std::memcmp(v.data(), bytes.data(), v.size()) == 0)) return i;
        }
        return npos;
    }

    /// Appends `values`, all or none: throws Full, changing nothing, when the arena (or the
    /// RefTable) cannot hold them.
    void extend(std::span<const Value> values) {
        if (values.empty()) return;
        RefCounts counts(refs_);
        const std::vector<std::uint64_t> ids = all_ids(values);
        counts.reserve(ids, "mproc::SharedList");
        std::vector<std::uint64_t> fresh;
        fresh.reserve(values.size());
        try {
            for (const Value& v : values) fresh.push_back(make_entry(v));
            reserve(size() + values.size());
        } catch (...) {
            for (std::uint64_t e : fresh) arena_.free(e);
            throw;
        }
        ListItems* items = head();
        std::copy(fresh.begin(), fresh.end(), entries() + items->size);
        const bool counted = !ids.empty();
        if (counted) {
            counts.begin();
            for (const Value& v : values) counts.add(v.ids);
        }
        items->size += values.size();  // publishes the new elements
        if (counted) counts.end();
    }

    /// Inserts `value` before position `at` (0..size()).
    void insert(std::uint64_t at, const Value& value) {
        if (at >= size()) return extend(std::span<const Value>(&value, 1));
        RefCounts counts(refs_);
        counts.reserve(value.ids, "mproc::SharedList");
        const std::uint64_t e = make_entry(value);
        const std::uint64_t n = size();
        const std::uint64_t cap = head()->capacity;
        const std::uint64_t fresh = new_items(n + 1 > cap ? grown(n + 1) : cap);
        if (fresh == 0) {
            arena_.free(e);
            full(items_bytes(n + 1));
        }
        auto* to = arena_.ptr<std::uint64_t>(fresh + sizeof(ListItems));
        const std::uint64_t* from = entries();
        std::copy(from, from + at, to);
        to[at] = e;
        std::copy(from + at, from + n, to + at + 1);
        arena_.ptr<ListItems>(fresh)->size = n + 1;
        publish(fresh, counts, value.ids, {});
    }

    /// Replaces the element at `i` (< size()).
    void assign(std::uint64_t i, const Value& value) {
        RefCounts counts(refs_);
        counts.reserve(value.ids, "mproc::SharedList");
        const std::uint64_t e = make_entry(value);
        std::uint64_t& slot = entries()[i];
        const std::uint64_t old = slot;
        const auto old_ids = entry_ids(old);
        const bool counted = !value.ids.empty() || !old_ids.empty();
        if (counted) {
            counts.begin();
            counts.add(value.ids);
        }
        slot = e;  // publishes the new element
        if (counted) {
            counts.remove(old_ids);
            counts.end();
        }
        arena_.free(old);
    }

    /// Removes the element at `i` (< size()). Throws Full, changing nothing, if a copy of the item
    /// array with the element left out does not fit (only when `i` is not the last).
    void erase(std::uint64_t i) {
        const std::uint64_t n = size();
        const std::uint64_t old = entries()[i];
        const auto old_ids = entry_ids(old);
        RefCounts counts(refs_);
        if (i + 1 == n) {
            if (!old_ids.empty()) counts.begin();
            head()->size = n - 1;  // publishes the shorter list
            if (!old_ids.empty()) {
                counts.remove(old_ids);
                counts.end();
            }
            arena_.free(old);
            return;
        }
        const std::uint64_t fresh = new_items(head()->capacity);
        if (fresh == 0) full(items_bytes(head()->capacity));
        auto* to = arena_.ptr<std::uint64_t>(fresh + sizeof(ListItems));
        const std::uint64_t* from = entries();
        std::copy(from, from + i, to);
        std::copy(from + i + 1, from + n, to + i);
        arena_.ptr<ListItems>(fresh)->size = n - 1;
        publish(fresh, counts, {}, old_ids);
        arena_.free(old);
    }

    void clear() {
        const std::uint64_t old = h_->items;
        if (old == 0) return;
        const std::vector<std::uint64_t> gone(entries(), entries() + size());
        RefCounts counts(refs_);
        const bool counted = refs_->used != 0;
        if (counted) counts.begin();
        h_->items = 0;  // publishes the empty list
        if (counted) {
            counts.clear();
            counts.end();
        }
        for (std::uint64_t e : gone) arena_.free(e);
        arena_.free(old);
    }

    /// Calls fn(element bytes) for every element, in order.
    template <class Fn> void for_each(Fn&& fn) const {
        const std::uint64_t n = size();
        for (std::uint64_t i = 0; i < n; ++i) fn(value_at(i));
    }

    std::uint64_t limit() const noexcept { return arena_.limit(); }

private:
    ListItems* head() const noexcept { return arena_.ptr<ListItems>(h_->items); }
    std::uint64_t* entries() const noexcept { return arena_.ptr<std::uint64_t>(h_->items + sizeof(ListItems)); }
    static std::uint64_t items_bytes(std::uint64_t cap) noexcept { return sizeof(ListItems) + cap * 8; }
    std::uint64_t grown(std::uint64_t needed) const noexcept {
        const std::uint64_t cap = h_->items == 0 ? 0 : head()->capacity;
        return std::max({min_capacity, cap + cap / 2, needed});
    }

    [[noreturn]] void full(std::uint64_t wanted) const {
        throw Full("mproc::SharedList: no room for " + std::to_string(wanted) + " more bytes within its max_bytes (" +
                   std::to_string(arena_.limit()) + "); the list is unchanged");
    }

    static std::vector<std::uint64_t> all_ids(std::span<const Value> values) {
        std::vector<std::uint64_t> ids;
        for (const Value& v : values)
            for (std::uint64_t id : v.ids)
                if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
        return ids;
    }

    /// A complete entry, not yet reachable from the item array.
    std::uint64_t make_entry(const Value& v) {
        const std::uint64_t bytes = sizeof(ListEntry) + v.bytes.size() + v.ids.size_bytes();
        const std::uint64_t e = arena_.allocate(bytes);
        if (e == 0) full(bytes);
        *arena_.ptr<ListEntry>(e) = {v.bytes.size(), v.ids.size()};
        auto* out = arena_.ptr<std::byte>(e + sizeof(ListEntry));
        if (!v.bytes.empty()) std::memcpy(out, v.bytes.data(), v.bytes.size());
        if (!v.ids.empty()) std::memcpy(out + v.bytes.size(), v.ids.data(), v.ids.size_bytes());
        return e;
    }

    /// The segment ids entry `e` holds handles into (copied: they may be unaligned).
    std::vector<std::uint64_t> entry_ids(std::uint64_t e) const {
        const auto* entry = arena_.ptr<ListEntry>(e);
        std::vector<std::uint64_t> ids;
        if (entry->refs == 0) return ids;
        const std::uint64_t room = arena_.capacity(e);
        const std::uint64_t used = sizeof(ListEntry) + entry->len;
        if (used > room || entry->refs > (room - used) / 8) throw Error("mproc: SharedList entry is corrupted");
        ids.resize(static_cast<std::size_t>(entry->refs));
        std::memcpy(ids.data(), arena_.ptr<const std::byte>(e + used), ids.size() * 8);
        return ids;
    }

    /// An empty item array of `cap` entries, not yet published; 0 if there is no room.
    std::uint64_t new_items(std::uint64_t cap) {
        const std::uint64_t t = arena_.allocate(items_bytes(cap));
        if (t == 0) return 0;
        *arena_.ptr<ListItems>(t) = {0, cap};
        return t;
    }

    /// Makes room in the item array for `n` elements, publishing a bigger copy when needed.
    /// Throws Full with the list unchanged.
    void reserve(std::uint64_t n) {
        if (h_->items != 0 && head()->capacity >= n) return;
        const std::uint64_t cap = grown(n);
        const std::uint64_t fresh = new_items(cap);
        if (fresh == 0) full(items_bytes(cap));
        const std::uint64_t old = h_->items;
        if (old != 0) {
            std::copy(entries(), entries() + size(), arena_.ptr<std::uint64_t>(fresh + sizeof(ListItems)));
            arena_.ptr<ListItems>(fresh)->size = size();
        }
        h_->items = fresh;  // publishes the same list in a bigger array
        if (old != 0) arena_.free(old);
    }

    /// Switches to the complete item array `fresh`, counting `added` and uncounting `removed`
    /// around the one store that publishes it; the old array is freed after.
    void publish(std::uint64_t fresh, RefCounts& counts, std::span<const std::uint64_t> added,
                 std::span<const std::uint64_t> removed) {
        const std::uint64_t old = h_->items;
        const bool counted = !added.empty() || !removed.empty();
        if (counted) {
            counts.begin();
            counts.add(added);
        }
        h_->items = fresh;  // publishes the change
        if (counted) {
            counts.remove(removed);
            counts.end();
        }
        arena_.free(old);
    }

    /// After a holder died: give every block the item array does not reach back to the free lists
    /// (half-built entries and arrays, blocks unpublished but not yet freed), then count again,
    /// from the entries, the handles they hold (the RefTable may be halfway through a change).
    void repair() {
        std::vector<std::uint64_t> live;
        if (h_->items != 0) {
            if (!arena_.plausible(h_->items)) throw Error("mproc: SharedList item array offset is corrupted");
            const ListItems* items = head();
            if (items->size > items->capacity || items_bytes(items->capacity) > arena_.capacity(h_->items))
                throw Error("mproc: SharedList item array is corrupted");
            live.push_back(h_->items);
            for (std::uint64_t i = 0; i < items->size; ++i) {
                if (!arena_.plausible(entries()[i])) throw Error("mproc: SharedList entry offset is corrupted");
                live.push_back(entries()[i]);
            }
        }
        arena_.rebuild(live);
        // A list that never held a handle has nothing to recount (and its table stays untouched).
        if ((refs_->version & 1u) == 0 && refs_->used == 0) return;
        RefCounts counts(refs_);
        counts.begin();
        counts.clear();
        for (std::uint64_t i = 0, n = size(); i < n; ++i) {
            const auto ids = entry_ids(entries()[i]);
            counts.reserve(ids, "mproc::SharedList");  // the entries fitted before
            counts.add(ids);
        }
        counts.end();
    }

    std::byte* base_;
    ListHeader* h_;
    Arena arena_;
    RefTable* refs_;
};

}  // namespace mproc::detail
