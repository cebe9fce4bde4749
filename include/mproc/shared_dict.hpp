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
// ids of the segments they point into, and the dict counts them (detail/shm/ref_table.hpp), so
// each process keeps those objects mapped while it can reach the dict, even after it dropped its
// own handles to them (see detail/shm/registry.hpp). The table itself, its lock and its repair
// are detail/shm/byte_dict.hpp.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <fmt/core.h>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/serialize/repr.hpp"
#include "detail/shm/byte_dict.hpp"
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

/// A dict shared between processes. A handle: copies (and fork children) share one dict.
template <class K, class V> class SharedDict {
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
        ref_ = detail::ByteDict::create(options.max_bytes, detail::type_hash<SharedDict<K, V>>());
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
        // NOLINTNEXTLINE(bugprone-unhandled-self-assignment)
        Item& operator=(const Item& other) { return *this = other.value(); }
        /// The value; mproc::KeyError if the key is absent.
        V value() const { return dict_->at(key_); }
        operator V() const { return value(); }

        // Atomic read-modify-write; mproc::KeyError (and no change) if the key is absent.
        // Each returns the new value.
        template <class U> V operator+=(const U& n) requires requires(V& v, const U& u) { v += u; } {
            return dict_->modify(key_, [&](V& v) { v += n; });
        }
        template <class U> V operator-=(const U& n) requires requires(V& v, const U& u) { v -= u; } {
            return dict_->modify(key_, [&](V& v) { v -= n; });
        }
        template <class U> V operator*=(const U& n) requires requires(V& v, const U& u) { v *= u; } {
            return dict_->modify(key_, [&](V& v) { v *= n; });
        }
        template <class U> V operator/=(const U& n) requires requires(V& v, const U& u) { v /= u; } {
            return dict_->modify(key_, [&](V& v) { v /= n; });
        }
        V operator++() requires requires(V& v) { ++v; } {
            return dict_->modify(key_, [](V& v) { ++v; });
        }
        V operator--() requires requires(V& v) { --v; } {
            return dict_->modify(key_, [](V& v) { --v; });
        }

        template <class U> bool operator==(const U& other) const requires requires(const V& v, const U& u) { v == u; } {
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
            detail::DictCall call(ref_, key, value);
            call.assign();
        }
        detail::segments().sweep();  // a replaced value may have held the last reference to something
    }

    bool contains(const K& key) const {
        bool found = false;
        {
            detail::DictCall call(ref_, key, detail::DictCall::Stores::no);
            found = call.found();
        }
        detail::segments().sweep();  // every call notices what other processes let go (see copy_out)
        return found;
    }

    /// Removes `key`; false if it was not there.
    bool erase(const K& key) {
        {
            detail::DictCall call(ref_, key, detail::DictCall::Stores::no);
            if (!call.found()) return false;
            call.erase();
        }
        detail::segments().sweep();
        return true;
    }

    /// Removes `key` and returns its value, if it was there.
    std::optional<V> pop(const K& key) { return copy_out(key, true); }

    /// Atomically replaces the value of `key` with fn(old) — old is nullopt when absent — and
    /// returns it. fn runs under the dict's lock; if it throws, nothing changes.
    template <class F> requires std::is_invocable_r_v<V, F&, std::optional<V>> V update(const K& key, F&& fn) {
        std::optional<V> result;
        {
            detail::DictCall call(ref_, key, detail::DictCall::Stores::yes);
            std::optional<V> old;
            if (call.found()) old = decode<V>(call.value());
            V fresh = fn(std::move(old));
            call.assign(fresh);
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
        detail::DictCall call(ref_, key, detail::DictCall::Stores::no);
        if (!call.found()) return std::nullopt;
        if (remove || call.holds_handles()) {
            // Decoded under the lock: the value's handles are then this process's own before
            // the entry can go (and with it what kept their objects mapped here).
            std::optional<V> found = decode<V>(call.value());
            if (remove) call.erase();
            call.unlock();
            detail::segments().sweep();
            return found;
        }
        Buffer& value = call.spare();
        const auto bytes = call.value();
        value.append(bytes.data(), bytes.size());
        call.unlock();
        // Other processes may have dropped what this process kept for the dict's sake.
        detail::segments().sweep();
        return decode<V>(value.bytes());
    }

    [[noreturn]] static void throw_key_error(const K& key) {
        if constexpr (detail::repr_supported<K>()) throw KeyError("mproc::SharedDict: no key " + detail::repr(key));
        else throw KeyError("mproc::SharedDict: no such key");
    }

    /// Applies `change` to the value of an existing key, atomically; KeyError if absent.
    template <class Change> V modify(const K& key, Change&& change) {
        detail::DictCall call(ref_, key, detail::DictCall::Stores::yes);
        if (!call.found()) {
            call.unlock();
            throw_key_error(key);
        }
        V value = decode<V>(call.value());
        change(value);
        call.assign(value);
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
template <class K, class V> struct fmt::formatter<mproc::SharedDict<K, V>> {
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
