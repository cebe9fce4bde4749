// mproc — the SharedDict on encoded bytes: a hash table over an arena in shared memory, its lock
// and its repair.
//
// SharedDict<K, V> (shared_dict.hpp) encodes keys and values and hands the bytes to ByteDict,
// which keeps them in one memfd: the header, then an arena (detail/shm/arena.hpp) holding the slot
// table and the entries, then the RefTable of the handles the entries hold. Every change is built
// where nobody can see it and published by one 8-byte store, and a holder killed halfway leaves
// only bookkeeping that ByteDict::repair puts right (docs/shared-memory.md). DictCall is the start
// every call on one key shares: encode, lock, find.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "../os/random.hpp"
#include "arena.hpp"
#include "memory.hpp"
#include "ref_table.hpp"
#include "robust_mutex.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

inline constexpr std::uint32_t dict_magic = 0x6d444354u;  // "mDCT"
inline constexpr std::uint64_t slot_empty = 0;
inline constexpr std::uint64_t slot_erased = 1;

struct DictHeader {
    ObjectHeader header;
    RobustMutex mutex;
    std::uint64_t seed;        // of the key hash
    std::uint64_t table;       // payload offset of the slot table; one store publishes a new one
    std::uint64_t size;        // live entries (recounted after a crash)
    std::uint64_t erased;      // erased slots not yet reused (recounted after a crash)
    std::uint64_t next_order;  // insertion counter: snapshots list entries in insertion order
    std::uint64_t refs;        // segment offset of the RefTable, past the arena's limit
    ArenaHeader arena;
};

/// The table: `capacity` (a power of two) then that many slots.
struct DictSlot {
    std::uint64_t hash;
    std::uint64_t entry;  // payload offset of the entry, or slot_empty / slot_erased
};

/// An entry: this header, then the key's bytes, then the value's, then `refs` segment ids (the
/// segments the key's and the value's handles point into, counted in the dict's RefTable).
struct DictEntry {
    std::uint64_t hash;
    std::uint64_t order;
    std::uint64_t key_len;
    std::uint64_t value_len;
    std::uint64_t refs;
};

/// A 64-bit hash of a byte string (multiply-xorshift over 8-byte words).
inline std::uint64_t hash_bytes(std::span<const std::byte> bytes, std::uint64_t seed) noexcept {
    constexpr std::uint64_t k = 0xbf58476d1ce4e5b9ull;
    std::uint64_t h = seed ^ (bytes.size() * 0x9e3779b97f4a7c15ull);
    const std::byte* p = bytes.data();
    std::size_t n = bytes.size();
    for (; n >= 8; p += 8, n -= 8) {
        std::uint64_t w;
        std::memcpy(&w, p, 8);
        h = (h ^ w) * k;
        h ^= h >> 29;
    }
    if (n > 0) {
        std::uint64_t w = 0;
        std::memcpy(&w, p, n);
        h = (h ^ w ^ (std::uint64_t{n} << 59)) * k;
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

/// The dict's logic on encoded keys and values; SharedDict<K, V> adds the types.
class ByteDict {
public:
    static constexpr std::uint64_t npos = ~std::uint64_t{0};
    static constexpr std::uint64_t min_capacity = 8;

    static SharedRef create(std::size_t max_bytes, std::uint64_t type) {
        const std::size_t header = round_up(sizeof(DictHeader), 64);
        if (max_bytes < header + 4096)
            throw Error("mproc::SharedDict: max_bytes " + std::to_string(max_bytes) + " is too small");
        if (max_bytes > (std::size_t{1} << 46))
            throw Error("mproc::SharedDict: max_bytes " + std::to_string(max_bytes) + " is too large");
        // The RefTable lies past max_bytes, in pages of its own: sparse, it costs nothing until the
        // dict holds handles, and it takes nothing from max_bytes.
        const std::size_t refs = round_up(max_bytes, page_size());
        SharedRef ref = SharedRef::dedicated(refs + sizeof(RefTable), "mproc-dict");
        auto* h = new (ref.address()) DictHeader;
        h->header = {dict_magic, 0, type};
        h->mutex.init();
        h->seed = random_u64();
        h->refs = refs;
        Arena::init(h->arena, header, max_bytes);
        segments().mark_container(*ref.segment(), &container_view);
        return ref;
    }

    static void check(const SharedRef& ref) {
        const auto* h = reinterpret_cast<const DictHeader*>(ref.address());
        const std::size_t size = ref.segment()->size();
        if (ref.offset() != 0 || h->arena.limit > size || h->arena.begin < sizeof(DictHeader) ||
            h->refs < h->arena.limit || h->refs % 8 != 0 || h->refs > size || size - h->refs < sizeof(RefTable))
            throw SerializationError("mproc: corrupt SharedDict handle: its layout does not match its memory");
        segments().mark_container(*ref.segment(), &container_view);
    }

    /// How the registry reads a dict's RefTable (see detail/shm/registry.hpp).
    static constexpr ContainerView container_view{
        [](const std::byte* base, std::uint64_t id) noexcept {
            const auto* h = reinterpret_cast<const DictHeader*>(base);
            return RefCounts::may_reference(reinterpret_cast<const RefTable*>(base + h->refs), id);
        },
        [](const std::byte* base) noexcept {
            const auto* h = reinterpret_cast<const DictHeader*>(base);
            return RefCounts::version(reinterpret_cast<const RefTable*>(base + h->refs));
        }};

    explicit ByteDict(const SharedRef& ref)
        : base_(ref.address()), h_(ref.as<DictHeader>()), arena_(base_, h_->arena),
          refs_(reinterpret_cast<RefTable*>(base_ + h_->refs)) {}

    struct Repair {
        ByteDict* d;
        void operator()() const { d->repair(); }
    };
    using Guard = RobustGuard<Repair>;
    Guard lock() { return Guard(h_->mutex, Repair{this}); }

    std::uint64_t hash(std::span<const std::byte> key) const noexcept { return hash_bytes(key, h_->seed); }

    // Everything below requires the lock.

    /// The slot holding `key`, or npos.
    std::uint64_t find(std::span<const std::byte> key, std::uint64_t h) const noexcept {
        if (h_->table == 0) return npos;
        const std::uint64_t cap = capacity();
        const std::uint64_t mask = cap - 1;
        DictSlot* s = slots();
        for (std::uint64_t i = h & mask, probes = 0; probes < cap; i = (i + 1) & mask, ++probes) {
            const std::uint64_t e = s[i].entry;
            if (e == slot_empty) return npos;
            if (e != slot_erased && s[i].hash == h && key_matches(e, key)) return i;
        }
        return npos;
    }

    /// True when the entry in `slot` holds handles (counted in the RefTable).
    bool holds_handles(std::uint64_t slot) const noexcept {
        return arena_.ptr<DictEntry>(slots()[slot].entry)->refs != 0;
    }

    std::span<const std::byte> value_at(std::uint64_t slot) const noexcept {
        const std::uint64_t e = slots()[slot].entry;
        const auto* entry = arena_.ptr<DictEntry>(e);
        return {arena_.ptr<const std::byte>(e + sizeof(DictEntry) + entry->key_len),
                static_cast<std::size_t>(entry->value_len)};
    }

    /// Sets key to value: replaces the entry in `slot`, or inserts one when `slot` is npos
    /// (`slot` is find(key, h), under this same hold of the lock). `ids` are the segments their
    /// handles point into. Throws Full, changing nothing, when the arena (or the RefTable) cannot
    /// hold it.
    void assign(std::uint64_t slot, std::span<const std::byte> key, std::uint64_t h, std::span<const std::byte> value,
                std::span<const std::uint64_t> ids = {}) {
        RefCounts counts(refs_);
        counts.reserve(ids, "mproc::SharedDict");
        if (slot != npos) {
            DictSlot& s = slots()[slot];
            const std::uint64_t old = s.entry;
            const std::uint64_t fresh = make_entry(key, h, arena_.ptr<DictEntry>(old)->order, value, ids);
            const auto old_ids = entry_ids(old);
            const bool counted = !ids.empty() || !old_ids.empty();
            if (counted) {
                counts.begin();
                counts.add(ids);
            }
            s.entry = fresh;  // publishes the new value
            if (counted) {
                counts.remove(old_ids);
                counts.end();
            }
            arena_.free(old);
            return;
        }
        reserve_one();
        const std::uint64_t fresh = make_entry(key, h, h_->next_order, value, ids);
        ++h_->next_order;
        const std::uint64_t mask = capacity() - 1;
        DictSlot* s = slots();
        std::uint64_t i = h & mask;
        // reserve_one() left a free slot; a table whose counts lie (memory scribbled on) has none,
        // and the walk ends after one lap rather than spin.
        for (std::uint64_t probes = 0; s[i].entry != slot_empty && s[i].entry != slot_erased; i = (i + 1) & mask)
            if (++probes == capacity()) {
                arena_.free(fresh);
                throw Error("mproc::SharedDict: its table is corrupt (no free slot where its counts promise one)");
            }
        if (s[i].entry == slot_erased) --h_->erased;
        if (!ids.empty()) {
            counts.begin();
            counts.add(ids);
        }
        s[i].hash = h;
        s[i].entry = fresh;  // publishes the entry
        ++h_->size;
        if (!ids.empty()) counts.end();
    }

    /// Removes the entry in `slot`.
    void erase_at(std::uint64_t slot) {
        DictSlot* s = slots();
        const std::uint64_t mask = capacity() - 1;
        const std::uint64_t old = s[slot].entry;
        const auto old_ids = entry_ids(old);
        // A slot before an empty one ends no probe chain: it can be empty again.
        if (s[(slot + 1) & mask].entry == slot_empty) {
            s[slot].entry = slot_empty;
        } else {
            s[slot].entry = slot_erased;
            ++h_->erased;
        }
        --h_->size;
        if (!old_ids.empty()) {
            RefCounts counts(refs_);
            counts.begin();
            counts.remove(old_ids);
            counts.end();
        }
        arena_.free(old);
    }

    void clear() {
        if (h_->table == 0 || h_->size + h_->erased == 0) return;
        const std::uint64_t old_table = h_->table;
        const std::uint64_t cap = capacity();
        RefCounts counts(refs_);
        const bool counted = refs_->used != 0;
        if (const std::uint64_t fresh = new_table(min_capacity)) {
            if (counted) counts.begin();
            h_->table = fresh;  // publishes the empty dict
            h_->size = 0;
            h_->erased = 0;
            if (counted) {
                counts.clear();
                counts.end();
            }
            free_entries(old_table, cap);
            arena_.free(old_table);
            return;
        }
        // No room even for an empty table: clear in place, one published step at a time.
        DictSlot* s = slots();
        for (std::uint64_t i = 0; i < cap; ++i)
            if (s[i].entry != slot_empty && s[i].entry != slot_erased) {
                const std::uint64_t old = s[i].entry;
                const auto old_ids = entry_ids(old);
                s[i].entry = slot_erased;
                --h_->size;
                ++h_->erased;
                if (!old_ids.empty()) {
                    counts.begin();
                    counts.remove(old_ids);
                    counts.end();
                }
                arena_.free(old);
            }
        for (std::uint64_t i = 0; i < cap; ++i) s[i].entry = slot_empty;
        h_->erased = 0;
    }

    std::uint64_t size() const noexcept { return h_->size; }
    /// True when some entry may hold handles.
    bool holds_any_handles() const noexcept { return refs_->live != 0 || (refs_->version & 1u) != 0; }

    /// Calls fn(key bytes, value bytes, insertion order) for every entry.
    template <class Fn> void for_each(Fn&& fn) const {
        if (h_->table == 0) return;
        const std::uint64_t cap = capacity();
        const DictSlot* s = slots();
        for (std::uint64_t i = 0; i < cap; ++i) {
            const std::uint64_t e = s[i].entry;
            if (e == slot_empty || e == slot_erased) continue;
            const auto* entry = arena_.ptr<DictEntry>(e);
            const auto* bytes = arena_.ptr<const std::byte>(e + sizeof(DictEntry));
            fn(std::span<const std::byte>(bytes, entry->key_len),
               std::span<const std::byte>(bytes + entry->key_len, entry->value_len), entry->order);
        }
    }

    std::uint64_t limit() const noexcept { return arena_.limit(); }

private:
    std::uint64_t capacity() const noexcept { return *arena_.ptr<std::uint64_t>(h_->table); }
    DictSlot* slots() const noexcept { return arena_.ptr<DictSlot>(h_->table + 8); }

    bool key_matches(std::uint64_t e, std::span<const std::byte> key) const noexcept {
        const auto* entry = arena_.ptr<DictEntry>(e);
        return entry->key_len == key.size() &&
               (key.empty() ||
                std::memcmp(arena_.ptr<const std::byte>(e + sizeof(DictEntry)), key.data(), key.size()) == 0);
    }

    [[noreturn]] void full(std::uint64_t wanted) const {
        throw Full("mproc::SharedDict: no room for " + std::to_string(wanted) + " more bytes within its max_bytes (" +
                   std::to_string(arena_.limit()) + "); the dict is unchanged");
    }

    /// A complete entry, not yet reachable from the table.
    std::uint64_t make_entry(std::span<const std::byte> key, std::uint64_t h, std::uint64_t order,
                             std::span<const std::byte> value, std::span<const std::uint64_t> ids) {
        const std::uint64_t bytes = sizeof(DictEntry) + key.size() + value.size() + ids.size_bytes();
        const std::uint64_t e = arena_.allocate(bytes);
        if (e == 0) full(bytes);
        auto* entry = arena_.ptr<DictEntry>(e);
        *entry = {h, order, key.size(), value.size(), ids.size()};
        auto* out = arena_.ptr<std::byte>(e + sizeof(DictEntry));
        if (!key.empty()) std::memcpy(out, key.data(), key.size());
        if (!value.empty()) std::memcpy(out + key.size(), value.data(), value.size());
        if (!ids.empty()) std::memcpy(out + key.size() + value.size(), ids.data(), ids.size_bytes());
        return e;
    }

    /// The segment ids entry `e` holds handles into (copied: they may be unaligned).
    std::vector<std::uint64_t> entry_ids(std::uint64_t e) const {
        const auto* entry = arena_.ptr<DictEntry>(e);
        std::vector<std::uint64_t> ids;
        if (entry->refs == 0) return ids;
        const std::uint64_t room = arena_.capacity(e);
        const std::uint64_t used = sizeof(DictEntry) + entry->key_len + entry->value_len;
        if (used > room || entry->refs > (room - used) / 8) throw Error("mproc: SharedDict entry is corrupted");
        ids.resize(static_cast<std::size_t>(entry->refs));
        std::memcpy(ids.data(), arena_.ptr<const std::byte>(e + used), ids.size() * 8);
        return ids;
    }

    /// An empty table of `cap` slots, not yet published; 0 if there is no room.
    std::uint64_t new_table(std::uint64_t cap) {
        const std::uint64_t t = arena_.allocate(8 + cap * sizeof(DictSlot));
        if (t == 0) return 0;
        *arena_.ptr<std::uint64_t>(t) = cap;
        std::memset(arena_.ptr<DictSlot>(t + 8), 0, cap * sizeof(DictSlot));
        return t;
    }

    /// Makes sure one more entry fits under the load limit (3/4), rebuilding the table bigger
    /// (or just without its erased slots) when needed. Throws Full with the dict unchanged.
    void reserve_one() {
        const std::uint64_t cap = h_->table ? capacity() : 0;
        if ((h_->size + h_->erased + 1) * 4 <= cap * 3) return;
        std::uint64_t want = min_capacity;
        while (want * 3 < (h_->size + 1) * 4 * 2) want *= 2;  // half full after the rebuild
        const std::uint64_t fresh = new_table(want);
        if (fresh == 0) full(8 + want * sizeof(DictSlot));
        if (cap != 0) {
            const DictSlot* from = slots();
            auto* to = arena_.ptr<DictSlot>(fresh + 8);
            const std::uint64_t mask = want - 1;
            for (std::uint64_t i = 0; i < cap; ++i) {
                if (from[i].entry == slot_empty || from[i].entry == slot_erased) continue;
                std::uint64_t j = from[i].hash & mask;
                while (to[j].entry != slot_empty) j = (j + 1) & mask;
                to[j] = from[i];
            }
        }
        const std::uint64_t old = h_->table;
        h_->table = fresh;  // publishes the rebuilt table
        h_->erased = 0;
        if (old != 0) arena_.free(old);
    }

    void free_entries(std::uint64_t table, std::uint64_t cap) {
        const auto* s = arena_.ptr<DictSlot>(table + 8);
        for (std::uint64_t i = 0; i < cap; ++i)
            if (s[i].entry != slot_empty && s[i].entry != slot_erased) arena_.free(s[i].entry);
    }

    /// After a holder died: recount, and give every block the table does not reach back to the
    /// free lists (half-built entries and tables, blocks freed from the table but not yet listed);
    /// then count again, from the entries, the handles they hold (the RefTable may be halfway
    /// through a change).
    void repair() {
        repair_entries();
        // A dict that never held a handle has nothing to recount (and its table stays untouched).
        if ((refs_->version & 1u) == 0 && refs_->used == 0) return;
        RefCounts counts(refs_);
        counts.begin();
        counts.clear();
        if (h_->table != 0) {
            const std::uint64_t cap = capacity();
            const DictSlot* s = slots();
            for (std::uint64_t i = 0; i < cap; ++i)
                if (s[i].entry != slot_empty && s[i].entry != slot_erased) {
                    const auto ids = entry_ids(s[i].entry);
                    counts.reserve(ids, "mproc::SharedDict");  // the entries fitted before
                    counts.add(ids);
                }
        }
        counts.end();
    }

    void repair_entries() {
        std::vector<std::uint64_t> live;
        std::uint64_t size = 0, erased = 0;
        if (h_->table != 0) {
            if (!arena_.plausible(h_->table)) throw Error("mproc: SharedDict table offset is corrupted");
            live.push_back(h_->table);
            const std::uint64_t cap = capacity();
            const DictSlot* s = slots();
            for (std::uint64_t i = 0; i < cap; ++i) {
                const std::uint64_t e = s[i].entry;
                if (e == slot_empty) continue;
                if (e == slot_erased) {
                    ++erased;
                    continue;
                }
                if (!arena_.plausible(e)) throw Error("mproc: SharedDict entry offset is corrupted");
                live.push_back(e);
                ++size;
            }
        }
        h_->size = size;
        h_->erased = erased;
        arena_.rebuild(std::move(live));
    }

    std::byte* base_;
    DictHeader* h_;
    Arena arena_;
    RefTable* refs_;
};

/// Thread-local buffers for the encodings one dict call needs, so `d[k] = v` and `d[k]` allocate
/// nothing once warm. A call made while another on the same thread holds them (a serialize() or an
/// update() function that uses a dict) gets fresh buffers instead; big ones are not kept.
class DictScratch {
public:
    DictScratch() noexcept : mine_(!in_use()) {
        if (mine_) in_use() = true;
    }
    ~DictScratch() {
        if (!mine_) return;
        for (Buffer& b : pool())
            if (b.size() > keep_bytes) b = Buffer();
        in_use() = false;
    }
    DictScratch(const DictScratch&) = delete;
    DictScratch& operator=(const DictScratch&) = delete;

    /// Buffer `i` (0..2), emptied.
    Buffer& get(std::size_t i) noexcept {
        Buffer& b = (mine_ ? pool().data() : own_.data())[i];
        b.clear();
        return b;
    }
    /// Buffer `i` holding the encoding of `value`.
    template <class T> const Buffer& encode(std::size_t i, const T& value) {
        Buffer& b = get(i);
        encode_into(b, value);
        return b;
    }
    /// The same, adding to `ids` the segments that `value`'s handles point into.
    template <class T> const Buffer& encode(std::size_t i, const T& value, std::vector<std::uint64_t>& ids) {
        EncodeCapture handles;
        const Buffer& b = encode(i, value);
        for (std::uint64_t id : handles.ids())
            if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
        return b;
    }

private:
    static constexpr std::size_t keep_bytes = std::size_t{1} << 16;
    static bool& in_use() noexcept {
        thread_local bool flag = false;
        return flag;
    }
    static std::array<Buffer, 3>& pool() noexcept {
        thread_local std::array<Buffer, 3> buffers;
        return buffers;
    }
    bool mine_;
    std::array<Buffer, 3> own_;
};

/// The start every SharedDict call on one key shares, written once: the key encoded (scratch
/// buffer 0), the dict locked (repaired first if a holder died) and the key looked up. A call
/// that stores collects in `ids` the segments the key's handles point into, and then the
/// value's; a call that only reads or erases encodes the key without collecting them. The lock
/// is held until the call ends (or unlock()).
class DictCall {
public:
    enum class Stores : bool { no, yes };

    template <class K>
    DictCall(const SharedRef& ref, const K& key, Stores stores)
        : key_(stores == Stores::yes ? scratch_.encode(0, key, ids_) : scratch_.encode(0, key)), dict_(ref),
          guard_(dict_.lock()), hash_(dict_.hash(key_.bytes())), slot_(dict_.find(key_.bytes(), hash_)) {}
    /// For d[key] = value: the value is encoded too (scratch buffer 1) before the lock is taken.
    template <class K, class V>
    DictCall(const SharedRef& ref, const K& key, const V& value)
        : key_(scratch_.encode(0, key, ids_)), value_(&scratch_.encode(1, value, ids_)), dict_(ref),
          guard_(dict_.lock()), hash_(dict_.hash(key_.bytes())), slot_(dict_.find(key_.bytes(), hash_)) {}
    DictCall(const DictCall&) = delete;
    DictCall& operator=(const DictCall&) = delete;

    bool found() const noexcept { return slot_ != ByteDict::npos; }
    /// The key's value, as bytes in the dict (when found()).
    std::span<const std::byte> value() const noexcept { return dict_.value_at(slot_); }
    /// True when the key's entry holds handles (when found()).
    bool holds_handles() const noexcept { return dict_.holds_handles(slot_); }

    /// Sets the key to the value encoded on construction.
    void assign() { dict_.assign(slot_, key_.bytes(), hash_, value_->bytes(), ids_); }
    /// Sets the key to `value` (encoded now, under the lock).
    template <class V> void assign(const V& value) {
        value_ = &scratch_.encode(1, value, ids_);
        assign();
    }
    /// Removes the key's entry (when found()).
    void erase() { dict_.erase_at(slot_); }

    /// Scratch buffer 2, emptied, for a copy of the value to decode after the lock is released.
    Buffer& spare() noexcept { return scratch_.get(2); }
    void unlock() noexcept { guard_.unlock(); }

private:
    DictScratch scratch_;
    std::vector<std::uint64_t> ids_;
    const Buffer& key_;
    const Buffer* value_ = nullptr;
    ByteDict dict_;
    ByteDict::Guard guard_;
    std::uint64_t hash_;
    std::uint64_t slot_;
};

}  // namespace mproc::detail
