// mproc — SharedDict: a hash table in shared memory, what Python's Manager().dict() is for.
//
//     mproc::SharedDict<std::string, int> d;       // create before the processes that use it
//     d["count"] = 0;
//     d["count"] += 3;                             // atomic read-modify-write: no lost updates
//     int n = d["count"];                          // mproc::KeyError if absent (so is d["new"] += 1)
//     d.update("k", [](std::optional<int> old) { return old.value_or(0) + 1; });   // atomic
//     fmt::format("dic={}", d);                    // dic={"count": 15}
//
// Keys and values are any serialisable types, stored as their encoded bytes (keys compare by
// their encoding). The table lives in a memfd reserved at max_bytes (1 GiB by default) and
// grows into it as it fills; an insert that would pass the limit throws mproc::Full and leaves
// the dict as it was. Every operation runs under one robust lock, so each is atomic and
// items()/keys()/values() are consistent snapshots; `update` runs the caller's function under
// that lock (keep it short, and do not touch the same dict from it).
//
// A process killed in the middle of an update leaves the dict as it was before or after it:
// entries are written in full before one store publishes them, and the next lock holder
// rebuilds the allocator's free lists from what the table reaches (docs/shared-memory.md).
//
// A key or value may hold handles (a Queue, a Lock, another SharedDict, ...): the entry keeps the
// ids of the segments they point into, and the dict counts them (detail/ref_table.hpp), so each
// process keeps those objects mapped while it can reach the dict, even after it dropped its own
// handles to them (see detail/shm_registry.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fmt/core.h>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <sys/random.h>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/shm/arena.hpp"
#include "detail/shm/ref_table.hpp"
#include "detail/serialize/repr.hpp"
#include "detail/shm/robust_mutex.hpp"
#include "detail/shm/memory.hpp"
#include "detail/shm/shared_object.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

/// How a SharedDict is made: `mproc::SharedDict<K, V> d({.max_bytes = 64 << 20});`
struct SharedDictOptions {
    /// The most memory the dict may use, table and entries included. Reserved as address space
    /// up front; memory is used only as entries fill it.
    std::size_t max_bytes = std::size_t{1} << 30;
};

namespace detail {

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

    static SharedRef create(const SharedDictOptions& options, std::uint64_t type) {
        const std::size_t header = round_up(sizeof(DictHeader), 64);
        if (options.max_bytes < header + 4096)
            throw Error("mproc::SharedDict: max_bytes " + std::to_string(options.max_bytes) + " is too small");
        if (options.max_bytes > (std::size_t{1} << 46))
            throw Error("mproc::SharedDict: max_bytes " + std::to_string(options.max_bytes) + " is too large");
        // The RefTable lies past max_bytes, in pages of its own: sparse, it costs nothing until the
        // dict holds handles, and it takes nothing from max_bytes.
        const std::size_t refs = round_up(options.max_bytes, page_size());
        SharedRef ref = SharedRef::dedicated(refs + sizeof(RefTable), "mproc-dict");
        auto* h = new (ref.address()) DictHeader;
        h->header = {dict_magic, 0, type};
        h->mutex.init();
        if (::getrandom(&h->seed, sizeof h->seed, GRND_NONBLOCK) != static_cast<ssize_t>(sizeof h->seed))
            h->seed = reinterpret_cast<std::uintptr_t>(h) ^ static_cast<std::uint64_t>(::getpid());
        h->refs = refs;
        Arena::init(h->arena, header, options.max_bytes);
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

    /// How the registry reads a dict's RefTable (see detail/shm_registry.hpp).
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
    bool holds_handles(std::uint64_t slot) const noexcept { return arena_.ptr<DictEntry>(slots()[slot].entry)->refs != 0; }

    std::span<const std::byte> value_at(std::uint64_t slot) const noexcept {
        const std::uint64_t e = slots()[slot].entry;
        const auto* entry = arena_.ptr<DictEntry>(e);
        return {arena_.ptr<const std::byte>(e + sizeof(DictEntry) + entry->key_len),
                static_cast<std::size_t>(entry->value_len)};
    }

    /// Sets key to value (inserting or replacing); `ids` are the segments their handles point
    /// into. Throws Full, changing nothing, when the arena (or the RefTable) cannot hold it.
    void assign(std::span<const std::byte> key, std::uint64_t h, std::span<const std::byte> value,
                std::span<const std::uint64_t> ids = {}) {
        RefCounts counts(refs_);
        counts.reserve(ids, "mproc::SharedDict");
        if (const std::uint64_t slot = find(key, h); slot != npos) {
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
        while (s[i].entry != slot_empty && s[i].entry != slot_erased) i = (i + 1) & mask;
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
               (key.empty() || std::memcmp(arena_.ptr<const std::byte>(e + sizeof(DictEntry)), key.data(), key.size()) == 0);
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

}  // namespace detail

namespace detail {

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

}  // namespace detail

/// A dict shared between processes. A handle: copies (and fork children) share one dict.
template <class K, class V>
class SharedDict {
    static_assert(is_serializable_v<K>, "mproc::SharedDict<K, V>: K must be serialisable");
    static_assert(is_serializable_v<V>, "mproc::SharedDict<K, V>: V must be serialisable");
    static_assert(std::is_default_constructible_v<V>, "mproc::SharedDict<K, V>: V must be default-constructible");

public:
    using key_type = K;
    using mapped_type = V;
    using Options = SharedDictOptions;

    SharedDict() : SharedDict(Options{}) {}
    explicit SharedDict(const Options& options) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::ByteDict::create(options, detail::type_hash<SharedDict<K, V>>());
    }

    /// What d[key] returns: reads, assignments and atomic compound assignments on one entry.
    class Item {
    public:
        /// d[k] = v
        Item& operator=(const V& value) {
            dict_->set(key_, value);
            return *this;
        }
        // d[a] = d[b] copies the value; d[a] = d[a] writes an entry's value back onto itself.
        Item& operator=(const Item& other) { return *this = other.value(); }  // NOLINT(bugprone-unhandled-self-assignment)
        /// The value; mproc::KeyError if the key is absent.
        V value() const { return dict_->at(key_); }
        operator V() const { return value(); }

        // Atomic read-modify-write; mproc::KeyError (and no change) if the key is absent.
        // Each returns the new value.
        template <class U> V operator+=(const U& n) requires requires(V& v, const U& u) { v += u; }
        {
            return dict_->modify(key_, [&](V& v) { v += n; });
        }
        template <class U> V operator-=(const U& n) requires requires(V& v, const U& u) { v -= u; }
        {
            return dict_->modify(key_, [&](V& v) { v -= n; });
        }
        template <class U> V operator*=(const U& n) requires requires(V& v, const U& u) { v *= u; }
        {
            return dict_->modify(key_, [&](V& v) { v *= n; });
        }
        template <class U> V operator/=(const U& n) requires requires(V& v, const U& u) { v /= u; }
        {
            return dict_->modify(key_, [&](V& v) { v /= n; });
        }
        V operator++() requires requires(V& v) { ++v; }
        {
            return dict_->modify(key_, [](V& v) { ++v; });
        }
        V operator--() requires requires(V& v) { --v; }
        {
            return dict_->modify(key_, [](V& v) { --v; });
        }

        template <class U> bool operator==(const U& other) const requires requires(const V& v, const U& u) { v == u; }
        {
            return value() == other;
        }

    private:
        friend class SharedDict;
        Item(SharedDict* dict, K key) : dict_(dict), key_(std::move(key)) {}
        SharedDict* dict_;
        K key_;
    };

    Item operator[](const K& key) { return Item(this, key); }

    /// The value for `key`; mproc::KeyError if absent.
    V at(const K& key) const {
        if (auto v = get(key)) return std::move(*v);
        throw_key_error(key);
    }
    std::optional<V> get(const K& key) const { return copy_out(key, false); }
    V get(const K& key, const V& default_value) const {
        if (auto v = get(key)) return std::move(*v);
        return default_value;
    }

    /// d[key] = value. mproc::Full (dict unchanged) past max_bytes.
    void set(const K& key, const V& value) {
        {
            detail::DictScratch scratch;
            std::vector<std::uint64_t> ids;  // the segments the key's and value's handles point into
            const Buffer& k = scratch.encode(0, key, ids);
            const Buffer& v = scratch.encode(1, value, ids);
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            d.assign(k.bytes(), d.hash(k.bytes()), v.bytes(), ids);
        }
        detail::segments().sweep();  // a replaced value may have held the last reference to something
    }

    bool contains(const K& key) const {
        bool found = false;
        {
            detail::DictScratch scratch;
            const Buffer& k = scratch.encode(0, key);
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            found = d.find(k.bytes(), d.hash(k.bytes())) != detail::ByteDict::npos;
        }
        detail::segments().sweep();  // every call notices what other processes let go (see copy_out)
        return found;
    }

    /// Removes `key`; false if it was not there.
    bool erase(const K& key) {
        {
            detail::DictScratch scratch;
            const Buffer& k = scratch.encode(0, key);
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            const std::uint64_t slot = d.find(k.bytes(), d.hash(k.bytes()));
            if (slot == detail::ByteDict::npos) return false;
            d.erase_at(slot);
        }
        detail::segments().sweep();
        return true;
    }

    /// Removes `key` and returns its value, if it was there.
    std::optional<V> pop(const K& key) { return copy_out(key, true); }

    /// Atomically replaces the value of `key` with fn(old) — old is nullopt when absent — and
    /// returns it. fn runs under the dict's lock; if it throws, nothing changes.
    template <class F>
        requires std::is_invocable_r_v<V, F&, std::optional<V>>
    V update(const K& key, F&& fn) {
        std::optional<V> result;
        {
            detail::DictScratch scratch;
            std::vector<std::uint64_t> ids;
            const Buffer& k = scratch.encode(0, key, ids);
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            const std::uint64_t h = d.hash(k.bytes());
            const std::uint64_t slot = d.find(k.bytes(), h);
            std::optional<V> old;
            if (slot != detail::ByteDict::npos) old = decode<V>(d.value_at(slot));
            V fresh = fn(std::move(old));
            const Buffer& v = scratch.encode(1, fresh, ids);
            d.assign(k.bytes(), h, v.bytes(), ids);
            result.emplace(std::move(fresh));
        }
        detail::segments().sweep();
        return std::move(*result);
    }

    std::size_t size() const {
        std::size_t n = 0;
        {
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            n = static_cast<std::size_t>(d.size());
        }
        detail::segments().sweep();
        return n;
    }
    bool empty() const { return size() == 0; }
    void clear() {
        {
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            d.clear();
        }
        detail::segments().sweep();
    }

    /// A consistent snapshot, in insertion order (as Python's dict).
    std::vector<std::pair<K, V>> items() const {
        std::vector<std::pair<K, V>> out;
        snapshot([&](std::span<const std::byte> k, std::span<const std::byte> v) {
            out.emplace_back(decode<K>(k), decode<V>(v));
        });
        return out;
    }
    std::vector<K> keys() const {
        std::vector<K> out;
        snapshot([&](std::span<const std::byte> k, std::span<const std::byte>) { out.push_back(decode<K>(k)); });
        return out;
    }
    std::vector<V> values() const {
        std::vector<V> out;
        snapshot([&](std::span<const std::byte>, std::span<const std::byte> v) { out.push_back(decode<V>(v)); });
        return out;
    }

    /// The configured limit, in bytes.
    std::size_t max_bytes() const { return static_cast<std::size_t>(detail::ByteDict(ref_).limit()); }
    /// Memory the dict holds right now, in bytes.
    std::size_t memory_in_use() const { return ref_ ? ref_.segment()->memory().resident_bytes() : 0; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::dict_magic, detail::type_hash<SharedDict<K, V>>(), sizeof(detail::DictHeader),
                        "SharedDict");
            detail::ByteDict::check(ref_);
        }
    }

private:
    /// The value of `key` (removed from the dict when `remove`), copied out under the lock and
    /// decoded after it, so a slow decode never holds up other processes.
    std::optional<V> copy_out(const K& key, bool remove) const {
        detail::DictScratch scratch;
        const Buffer& k = scratch.encode(0, key);
        Buffer& value = scratch.get(2);
        {
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            const std::uint64_t slot = d.find(k.bytes(), d.hash(k.bytes()));
            if (slot == detail::ByteDict::npos) return std::nullopt;
            const auto bytes = d.value_at(slot);
            if (remove || d.holds_handles(slot)) {
                // Decoded under the lock: the value's handles are then this process's own before
                // the entry can go (and with it what kept their objects mapped here).
                std::optional<V> found = decode<V>(bytes);
                if (remove) d.erase_at(slot);
                guard.unlock();
                detail::segments().sweep();
                return found;
            }
            value.append(bytes.data(), bytes.size());
        }
        // Other processes may have dropped what this process kept for the dict's sake.
        detail::segments().sweep();
        return decode<V>(value.bytes());
    }

    [[noreturn]] static void throw_key_error(const K& key) {
        if constexpr (detail::repr_supported<K>())
            throw KeyError("mproc::SharedDict: no key " + detail::repr(key));
        else
            throw KeyError("mproc::SharedDict: no such key");
    }

    /// Applies `change` to the value of an existing key, atomically; KeyError if absent.
    template <class Change> V modify(const K& key, Change&& change) {
        detail::DictScratch scratch;
        std::vector<std::uint64_t> ids;
        const Buffer& k = scratch.encode(0, key, ids);
        detail::ByteDict d(ref_);
        auto guard = d.lock();
        const std::uint64_t h = d.hash(k.bytes());
        const std::uint64_t slot = d.find(k.bytes(), h);
        if (slot == detail::ByteDict::npos) {
            guard.unlock();
            throw_key_error(key);
        }
        V value = decode<V>(d.value_at(slot));
        change(value);
        const Buffer& v = scratch.encode(1, value, ids);
        d.assign(k.bytes(), h, v.bytes(), ids);
        return value;
    }

    /// Copies every entry's bytes out under the lock, then hands them to fn in insertion order.
    template <class Fn> void snapshot(Fn&& fn) const {
        struct Ref {
            std::uint64_t order;
            std::size_t key_at, key_len, value_at, value_len;
        };
        Buffer bytes;
        std::vector<Ref> refs;
        auto deliver = [&] {
            std::sort(refs.begin(), refs.end(), [](const Ref& a, const Ref& b) { return a.order < b.order; });
            for (const Ref& r : refs)
                fn(std::span<const std::byte>(bytes.data() + r.key_at, r.key_len),
                   std::span<const std::byte>(bytes.data() + r.value_at, r.value_len));
        };
        {
            detail::ByteDict d(ref_);
            auto guard = d.lock();
            refs.reserve(static_cast<std::size_t>(d.size()));
            d.for_each([&](std::span<const std::byte> k, std::span<const std::byte> v, std::uint64_t order) {
                Ref r{order, bytes.size(), k.size(), 0, v.size()};
                bytes.append(k.data(), k.size());
                r.value_at = bytes.size();
                bytes.append(v.data(), v.size());
                refs.push_back(r);
            });
            // Entries that hold handles are decoded under the lock (see copy_out).
            if (d.holds_any_handles()) {
                deliver();
                guard.unlock();
                detail::segments().sweep();
                return;
            }
        }
        detail::segments().sweep();
        deliver();
    }

    detail::SharedRef ref_;
};

}  // namespace mproc

/// `fmt::format("{}", d)` prints a snapshot like a map: {"count": 15, "other": 2}.
template <class K, class V>
struct fmt::formatter<mproc::SharedDict<K, V>> {
    constexpr auto parse(format_parse_context& ctx) -> decltype(ctx.begin()) { return ctx.begin(); }
    template <class FormatContext>
    auto format(const mproc::SharedDict<K, V>& dict, FormatContext& ctx) const -> decltype(ctx.out()) {
        std::string out = "{";
        bool first = true;
        for (const auto& [k, v] : dict.items()) {
            if (!first) out += ", ";
            first = false;
            mproc::detail::repr_into(out, k);
            out += ": ";
            mproc::detail::repr_into(out, v);
        }
        out += '}';
        return std::copy(out.begin(), out.end(), ctx.out());
    }
};
