// mproc — SharedList: a list in shared memory, what Python's Manager().list() is for.
//
//     mproc::SharedList<int> l;                    // create before the processes that use it
//     l.append(1);
//     l.extend({2, 3});
//     l.insert(0, 0);                              // [0, 1, 2, 3]
//     l[0] += 5;                                   // atomic read-modify-write: no lost updates
//     int last = l.pop();                          // 3; l.pop(0), l.pop(-1); IndexError when empty
//     l.remove(5);                                 // the first 5; KeyError if there is none
//     fmt::format("{}", l);                        // [1, 2]
//
// Elements are any serialisable type, stored as their encoded bytes (index, count, contains and
// remove compare those bytes). The list lives in a memfd reserved at max_bytes (1 GiB by
// default) and grows into it as it fills; a change that would pass the limit throws mproc::Full
// and leaves the list as it was. Every operation runs under one robust lock, so each is atomic and
// to_vector() is a consistent snapshot. Indexes count from the end when negative, as in Python;
// one out of range throws mproc::IndexError.
//
// A process killed in the middle of a change leaves the list as it was before or after it, and
// the next lock holder rebuilds the allocator's free lists from what the list reaches; elements
// that hold handles (a Queue, a Lock, a SharedDict, ...) keep their objects alive as a
// SharedDict's values do (docs/shared-memory.md). The array, its lock and its repair are
// detail/shm/byte_list.hpp.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <fmt/core.h>
#include <initializer_list>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/serialize/repr.hpp"
#include "detail/shm/byte_dict.hpp"
#include "detail/shm/byte_list.hpp"
#include "detail/shm/shared_object.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

/// How a SharedList is made: `mproc::SharedList<T> l({.max_bytes = 64 << 20});`
struct SharedListOptions {
    /// The most memory the list may use, elements and their array included. Reserved as address
    /// space up front; memory is used only as elements fill it.
    std::size_t max_bytes = std::size_t{1} << 30;
};

/// A list shared between processes. A handle: copies (and fork children) share one list.
template <class T> class SharedList {
    static_assert(is_serializable_v<T>, "mproc::SharedList<T>: T must be serialisable");
    static_assert(std::is_default_constructible_v<T>, "mproc::SharedList<T>: T must be default-constructible");

public:
    using value_type = T;
    using Options = SharedListOptions;

    SharedList() : SharedList(Options{}) {}
    explicit SharedList(const Options& options) {
        if (detail::HandleDecodeScope::active()) return;
        ref_ = detail::ByteList::create(options.max_bytes, detail::type_hash<SharedList<T>>());
    }
    /// A new list holding `values`.
    SharedList(std::initializer_list<T> values, const Options& options = {}) : SharedList(options) { extend(values); }

    /// What l[i] returns: reads, assignments and atomic compound assignments on one element.
    class Item {
    public:
        /// l[i] = v
        Item& operator=(const T& value) {
            list_->set(index_, value);
            return *this;
        }
        // l[i] = l[j] copies the value; l[i] = l[i] writes an element back onto itself.
        // NOLINTNEXTLINE(bugprone-unhandled-self-assignment)
        Item& operator=(const Item& other) { return *this = other.value(); }
        /// The value; mproc::IndexError if the index is out of range.
        T value() const { return list_->at(index_); }
        operator T() const { return value(); }

        // Atomic read-modify-write; mproc::IndexError (and no change) if out of range.
        // Each returns the new value.
        template <class U> T operator+=(const U& n) requires requires(T& v, const U& u) { v += u; } {
            return list_->modify(index_, [&](T& v) { v += n; });
        }
        template <class U> T operator-=(const U& n) requires requires(T& v, const U& u) { v -= u; } {
            return list_->modify(index_, [&](T& v) { v -= n; });
        }
        template <class U> T operator*=(const U& n) requires requires(T& v, const U& u) { v *= u; } {
            return list_->modify(index_, [&](T& v) { v *= n; });
        }
        template <class U> T operator/=(const U& n) requires requires(T& v, const U& u) { v /= u; } {
            return list_->modify(index_, [&](T& v) { v /= n; });
        }
        T operator++() requires requires(T& v) { ++v; } {
            return list_->modify(index_, [](T& v) { ++v; });
        }
        T operator--() requires requires(T& v) { --v; } {
            return list_->modify(index_, [](T& v) { --v; });
        }

        template <class U> bool operator==(const U& other) const requires requires(const T& v, const U& u) { v == u; } {
            return value() == other;
        }

    private:
        friend class SharedList;
        Item(SharedList* list, std::ptrdiff_t index) : list_(list), index_(index) {}
        SharedList* list_;
        std::ptrdiff_t index_;
    };

    /// l[i]; negative `i` counts from the end.
    Item operator[](std::ptrdiff_t i) { return Item(this, i); }

    /// The element at `i` (negative counts from the end); mproc::IndexError if out of range.
    T at(std::ptrdiff_t i) const {
        Call call(ref_);
        const std::uint64_t at = call.resolve(i);
        if (call.list.holds_handles(at)) {
            // Decoded under the lock: the element's handles are then this process's own before
            // the element can go (and with it what kept their objects mapped here).
            T found = decode<T>(call.list.value_at(at));
            call.unlock();
            return found;
        }
        Buffer& value = call.scratch.get(2);
        const auto bytes = call.list.value_at(at);
        value.append(bytes.data(), bytes.size());
        call.unlock();
        return decode<T>(value.bytes());
    }

    /// l[i] = value; mproc::IndexError if out of range, mproc::Full (list unchanged) past max_bytes.
    void set(std::ptrdiff_t i, const T& value) {
        Encoded one(value);
        Call call(ref_);
        const std::uint64_t at = call.resolve(i, "assignment index");
        call.list.assign(at, one.value());
    }

    /// Adds `value` at the end. mproc::Full (list unchanged) past max_bytes.
    void append(const T& value) {
        Encoded one(value);
        const detail::ByteList::Value v = one.value();
        Call call(ref_);
        call.list.extend(std::span<const detail::ByteList::Value>(&v, 1));
    }

    /// Adds every element of `values` at the end, all at once: another process sees none or all
    /// of them. mproc::Full (list unchanged) past max_bytes.
    template <std::ranges::input_range R> requires std::convertible_to<std::ranges::range_reference_t<R>, const T&>
    void extend(const R& values) {
        std::vector<Encoded> encoded;
        if constexpr (std::ranges::sized_range<R>) encoded.reserve(std::ranges::size(values));
        for (const T& v : values) encoded.emplace_back(v);
        std::vector<detail::ByteList::Value> all;
        all.reserve(encoded.size());
        for (const Encoded& e : encoded) all.push_back(e.value());
        Call call(ref_);
        call.list.extend(all);
    }
    void extend(std::initializer_list<T> values) { extend(std::span<const T>(values.begin(), values.size())); }

    /// Inserts `value` before position `i`; as in Python, `i` past either end inserts at that end.
    /// mproc::Full (list unchanged) past max_bytes.
    void insert(std::ptrdiff_t i, const T& value) {
        Encoded one(value);
        Call call(ref_);
        const auto n = static_cast<std::ptrdiff_t>(call.size_seen);
        if (i < 0) i = std::max<std::ptrdiff_t>(i + n, 0);
        call.list.insert(static_cast<std::uint64_t>(std::min(i, n)), one.value());
    }

    /// Removes and returns the last element; mproc::IndexError if the list is empty.
    T pop() { return pop(-1); }
    /// Removes and returns the element at `i` (negative counts from the end); mproc::IndexError
    /// if out of range.
    T pop(std::ptrdiff_t i) {
        std::optional<T> out;
        {
            Call call(ref_);
            if (call.size_seen == 0) {
                call.unlock();
                throw IndexError("mproc::SharedList: pop from an empty list");
            }
            const std::uint64_t at = call.resolve(i, "pop index");
            // Decoded under the lock (see at()), then removed.
            out.emplace(decode<T>(call.list.value_at(at)));
            call.list.erase(at);
        }
        return std::move(*out);
    }

    /// The position of the first element equal to `value`; mproc::KeyError if there is none.
    std::size_t index(const T& value) const {
        const std::uint64_t at = find(value);
        if (at == detail::ByteList::npos) throw_absent("index", value);
        return static_cast<std::size_t>(at);
    }
    bool contains(const T& value) const { return find(value) != detail::ByteList::npos; }
    /// How many elements equal `value`.
    std::size_t count(const T& value) const {
        Buffer bytes;
        encode_into(bytes, value);
        std::size_t n = 0;
        Call call(ref_);
        for (std::uint64_t at = call.list.find(bytes.bytes()); at != detail::ByteList::npos;
             at = call.list.find(bytes.bytes(), at + 1))
            ++n;
        return n;
    }

    /// Removes the first element equal to `value`; mproc::KeyError (list unchanged) if there is none.
    void remove(const T& value) {
        Buffer bytes;
        encode_into(bytes, value);
        {
            Call call(ref_);
            const std::uint64_t at = call.list.find(bytes.bytes());
            if (at != detail::ByteList::npos) {
                call.list.erase(at);
                return;
            }
        }
        throw_absent("remove", value);
    }

    std::size_t size() const {
        Call call(ref_);
        return static_cast<std::size_t>(call.size_seen);
    }
    bool empty() const { return size() == 0; }
    void clear() {
        Call call(ref_);
        call.list.clear();
    }

    /// A consistent snapshot, in order.
    std::vector<T> to_vector() const {
        std::vector<T> out;
        Buffer bytes;
        std::vector<std::pair<std::size_t, std::size_t>> at;
        auto deliver = [&] {
            out.reserve(at.size());
            for (const auto& [from, len] : at) out.push_back(decode<T>(bytes.bytes().subspan(from, len)));
        };
        Call call(ref_);
        at.reserve(static_cast<std::size_t>(call.size_seen));
        call.list.for_each([&](std::span<const std::byte> v) {
            at.emplace_back(bytes.size(), v.size());
            bytes.append(v.data(), v.size());
        });
        // Elements that hold handles are decoded under the lock (see at()).
        if (call.list.holds_any_handles()) {
            deliver();
            return out;
        }
        call.unlock();
        deliver();
        return out;
    }

    /// The configured limit, in bytes.
    std::size_t max_bytes() const { return static_cast<std::size_t>(detail::ByteList(ref_).limit()); }
    /// Memory the list holds right now, in bytes.
    std::size_t memory_in_use() const { return ref_ ? ref_.segment()->memory().resident_bytes() : 0; }

    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            ref_.encode(ar);
        } else {
            ref_.decode(ar, detail::list_magic, detail::type_hash<SharedList<T>>(), sizeof(detail::ListHeader),
                        "SharedList");
            detail::ByteList::check(ref_);
        }
    }

private:
    /// One element encoded, with the segments its handles point into.
    class Encoded {
    public:
        explicit Encoded(const T& value) {
            detail::EncodeCapture handles;
            encode_into(bytes_, value);
            ids_ = handles.ids();
            std::sort(ids_.begin(), ids_.end());
            ids_.erase(std::unique(ids_.begin(), ids_.end()), ids_.end());
        }
        detail::ByteList::Value value() const { return {bytes_.bytes(), ids_}; }

    private:
        Buffer bytes_;
        std::vector<std::uint64_t> ids_;
    };

    /// The start every call shares: the list locked (repaired first if a holder died) and its
    /// size read. When the call ends (or at unlock()), the lock goes and the registry lets go of
    /// what no container still refers to (a replaced or removed element may have held the last
    /// reference to something, and other processes may have let go of what this one kept).
    struct Call {
        explicit Call(const detail::SharedRef& ref) : list(ref), guard(list.lock()), size_seen(list.size()) {}
        Call(const Call&) = delete;
        Call& operator=(const Call&) = delete;
        ~Call() {
            if (!locked) return;
            guard.unlock();
            detail::segments().sweep();
        }
        void unlock() {
            locked = false;
            guard.unlock();
            detail::segments().sweep();
        }
        /// Where element `i` is; else unlocks and throws IndexError ("<what> <i> out of range").
        std::uint64_t resolve(std::ptrdiff_t i, const char* what = "index") {
            const std::uint64_t at = list.resolve(i);
            if (at != detail::ByteList::npos) return at;
            unlock();
            throw IndexError("mproc::SharedList: " + std::string(what) + " " + std::to_string(i) +
                             " out of range (size " + std::to_string(size_seen) + ")");
        }
        detail::DictScratch scratch;
        detail::ByteList list;
        detail::ByteList::Guard guard;
        std::uint64_t size_seen;
        bool locked = true;
    };

    std::uint64_t find(const T& value) const {
        Buffer bytes;
        encode_into(bytes, value);
        Call call(ref_);
        return call.list.find(bytes.bytes());
    }

    [[noreturn]] static void throw_absent(const char* call, const T& value) {
        if constexpr (detail::repr_supported<T>())
            throw KeyError(std::string("mproc::SharedList: ") + call + "(x): x = " + detail::repr(value) +
                           " is not in the list");
        else throw KeyError(std::string("mproc::SharedList: ") + call + "(x): x is not in the list");
    }

    /// Applies `change` to the element at `i`, atomically; IndexError if out of range.
    template <class Change> T modify(std::ptrdiff_t i, Change&& change) {
        Call call(ref_);
        const std::uint64_t at = call.resolve(i);
        T value = decode<T>(call.list.value_at(at));
        change(value);
        Encoded fresh(value);
        call.list.assign(at, fresh.value());
        return value;
    }

    detail::SharedRef ref_;
};

}  // namespace mproc

/// `fmt::format("{}", l)` prints a snapshot like Python's list: [1, 2, "three"].
template <class T> struct fmt::formatter<mproc::SharedList<T>> {
    constexpr auto parse(format_parse_context& ctx) -> decltype(ctx.begin()) { return ctx.begin(); }
    template <class FormatContext>
    auto format(const mproc::SharedList<T>& list, FormatContext& ctx) const -> decltype(ctx.out()) {
        std::string out = "[";
        bool first = true;
        for (const auto& v : list.to_vector()) {
            if (!first) out += ", ";
            first = false;
            mproc::detail::repr_into(out, v);
        }
        out += ']';
        return std::copy(out.begin(), out.end(), ctx.out());
    }
};
