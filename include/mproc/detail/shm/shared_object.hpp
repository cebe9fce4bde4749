// mproc — the core of every shared-object handle: where the object lives, and how a handle
// crosses a process boundary.
//
// A SharedRef is (segment, offset). Copying it copies the segment's per-process reference, so
// the mapping stays while any handle in this process points into it. Encoded, it is the pair
// (segment id, offset); decoded, it is resolved through segments() (see registry.hpp).
//
// Every shared object starts with an ObjectHeader: a magic number for its kind and a hash of
// its C++ type, so a handle decoded as the wrong type (a Queue<int> read as a Queue<string>,
// a Lock as a Value) is a SerializationError instead of a misread of shared memory.
//
// Small objects (locks, events, values, small arrays) are carved from shared 1 MiB chunks by an
// atomic bump in the chunk's header, rather than one memfd each: a program may create thousands
// without running out of descriptors. Chunk memory is never reused while the chunk lives (no
// process could know that every other process dropped its handles), so a chunk is freed — by
// the kernel — once no process holds a handle into it. Big objects get a segment of their own.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <unistd.h>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../../serialize.hpp"
#include "../os/fork_locks.hpp"
#include "../serialize/decode_scope.hpp"
#include "registry.hpp"

namespace mproc::detail {

/// The first bytes of every shared object.
struct ObjectHeader {
    std::uint32_t magic;
    std::uint32_t reserved;
    std::uint64_t type_hash;
};

/// FNV-1a of the type's mangled name: the same in every process forked from one program.
template <class T> std::uint64_t type_hash() noexcept {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (const char* p = typeid(T).name(); *p != '\0'; ++p) {
        h ^= static_cast<unsigned char>(*p);
        h *= 0x100000001b3ull;
    }
    return h;
}

/// While alive in a thread, every handle encoded in that thread is recorded: a container (a
/// SharedDict) storing an encoded value learns which segments the value holds handles into.
class EncodeCapture {
public:
    EncodeCapture() noexcept : outer_(current()) { current() = this; }
    ~EncodeCapture() { current() = outer_; }
    EncodeCapture(const EncodeCapture&) = delete;
    EncodeCapture& operator=(const EncodeCapture&) = delete;

    /// Called by every handle as it encodes.
    static void record(const SegmentPtr& segment) {
        if (EncodeCapture* capture = current()) capture->add(segment);
    }
    /// The distinct segments recorded, in the order first seen; they stay mapped while this lives.
    const std::vector<SegmentPtr>& segments() const noexcept { return segments_; }
    /// Their ids.
    std::vector<std::uint64_t> ids() const {
        std::vector<std::uint64_t> out;
        out.reserve(segments_.size());
        for (const SegmentPtr& segment : segments_) out.push_back(segment->id());
        return out;
    }
    /// Forgets what was recorded (the next value of the same operation).
    void clear() noexcept { segments_.clear(); }

private:
    void add(const SegmentPtr& segment) {
        for (const SegmentPtr& known : segments_)
            if (known.get() == segment.get()) return;
        segments_.push_back(segment);
    }
    static EncodeCapture*& current() noexcept {
        thread_local EncodeCapture* capture = nullptr;
        return capture;
    }
    EncodeCapture* outer_;
    std::vector<SegmentPtr> segments_;
};

/// The size up to which objects share chunks.
inline constexpr std::size_t small_object_limit = std::size_t{16} * 1024;
inline constexpr std::size_t chunk_size = 1 << 20;

struct ChunkHeader {
    std::uint32_t magic;
    std::uint32_t reserved;
    std::atomic<std::uint64_t> used;  // bytes handed out, header included
};
inline constexpr std::uint32_t chunk_magic = 0x6d43484bu;  // "mCHK"

/// Points at one object inside one segment.
class SharedRef {
public:
    SharedRef() = default;
    SharedRef(SegmentPtr segment, std::uint64_t offset) noexcept
        : segment_(std::move(segment)), offset_(offset), address_(segment_->base() + offset) {}
    SharedRef(const SharedRef&) = default;
    SharedRef& operator=(const SharedRef&) = default;
    // A moved-from handle is empty, so using it fails cleanly instead of touching an unmapped address.
    SharedRef(SharedRef&& other) noexcept
        : segment_(std::move(other.segment_)), offset_(std::exchange(other.offset_, 0)),
          address_(std::exchange(other.address_, nullptr)) {}
    SharedRef& operator=(SharedRef&& other) noexcept {
        if (this != &other) {
            segment_ = std::move(other.segment_);
            offset_ = std::exchange(other.offset_, 0);
            address_ = std::exchange(other.address_, nullptr);
        }
        return *this;
    }

    /// Fresh zero-filled memory for an object of `size` bytes aligned to `align` (<= 64).
    static SharedRef allocate(std::size_t size, std::size_t align, const char* name) {
        if (size > small_object_limit) return SharedRef(segments().create(size, name), 0);
        return small_objects().allocate(size, align);
    }
    /// A segment of its own, for objects that reserve a large address range.
    static SharedRef dedicated(std::size_t size, const char* name) {
        return SharedRef(segments().create(size, name), 0);
    }

    explicit operator bool() const noexcept { return address_ != nullptr; }
    std::byte* address() const noexcept { return address_; }
    template <class T> T* as() const {
        if (!address_)
            throw Error(
                "mproc: use of an empty shared-object handle (moved from, left empty by a failed decode, or left out by its type's serialize)");
        return reinterpret_cast<T*>(address_);
    }
    const SegmentPtr& segment() const noexcept { return segment_; }
    std::uint64_t offset() const noexcept { return offset_; }
    /// The same segment, another object in it (a Value's Lock).
    SharedRef at(std::uint64_t offset) const { return SharedRef(segment_, offset); }
    bool same_object(const SharedRef& other) const noexcept { return address_ == other.address_; }

    void encode(Writer& out) const {
        if (!segment_) throw SerializationError("mproc: cannot encode an empty shared-object handle");
        EncodeCapture::record(segment_);
        out(segment_->id(), offset_);
    }

    /// Reads (id, offset), resolves it, and checks that an object of the expected kind and type
    /// is there. `what` names the kind in messages ("Queue").
    void decode(Reader& in, std::uint32_t magic, std::uint64_t type, std::size_t min_size, const char* what) {
        std::uint64_t id = 0, offset = 0;
        in(id, offset);
        SegmentPtr segment = segments().find(id);
        if (!segment) {
            const std::string prefix = std::string("mproc: cannot use the ") + what + " passed to process " +
                                       std::to_string(::getpid()) + ": its shared memory (segment " + hex(id) + ")";
            if (const auto why = segments().unadopted_reason(id))
                throw Error(prefix + " was sent to this process but could not be mapped here (" + *why +
                            "); a Pool sends it again with the next task that names it");
            throw Error(prefix +
                        " was created after this process was forked, and was not sent to it; "
                        "create it before the process that uses it");
        }
        if (offset > segment->size() || segment->size() - offset < min_size || offset % 8 != 0)
            throw SerializationError(std::string("mproc: corrupt ") + what + " handle: offset " +
                                     std::to_string(offset) + " outside its segment");
        const auto* header = reinterpret_cast<const ObjectHeader*>(segment->base() + offset);
        if (header->magic != magic || header->type_hash != type)
            throw SerializationError(std::string("mproc: the handle does not refer to a ") + what + " of this type");
        *this = SharedRef(std::move(segment), offset);
    }

private:
    static std::string hex(std::uint64_t v) {
        static const char digits[] = "0123456789abcdef";
        std::string s = "0x";
        for (int shift = 60; shift >= 0; shift -= 4) s += digits[(v >> shift) & 0xf];
        return s;
    }

    class SmallObjects {
    public:
        SmallObjects() noexcept { ForkLocks::add(ForkLockRank::small_objects, mutex_); }
        SmallObjects(const SmallObjects&) = delete;
        SmallObjects& operator=(const SmallObjects&) = delete;

        SharedRef allocate(std::size_t size, std::size_t align) {
            if (align < 8) align = 8;
            SegmentPtr full;  // a used-up chunk is let go after the mutex (its deleter takes the registry's)
            std::lock_guard guard(mutex_);
            for (int attempt = 0; attempt < 2; ++attempt) {
                if (chunk_) {
                    auto* header = reinterpret_cast<ChunkHeader*>(chunk_->base());
                    // A fork child shares this chunk and may allocate from it at the same time:
                    // the bump is an atomic in shared memory, not a local counter.
                    std::uint64_t used = header->used.load(std::memory_order_relaxed);
                    for (;;) {
                        const std::uint64_t start = round_up(used, align);
                        const std::uint64_t end = start + size;
                        if (end > chunk_->size()) break;
                        if (header->used.compare_exchange_weak(used, end, std::memory_order_relaxed))
                            return SharedRef(chunk_, start);
                    }
                }
                SegmentPtr fresh = segments().create(chunk_size, "mproc-objects");
                full = std::exchange(chunk_, std::move(fresh));
                auto* header = new (chunk_->base()) ChunkHeader{chunk_magic, 0, {}};
                header->used.store(round_up(sizeof(ChunkHeader), 64), std::memory_order_relaxed);
            }
            throw Error("mproc: cannot allocate a shared object of " + std::to_string(size) + " bytes");
        }

    private:
        std::mutex mutex_;
        SegmentPtr chunk_;
    };
    static SmallObjects& small_objects() {
        static SmallObjects* objects = new SmallObjects;  // never destroyed, like the registry
        return *objects;
    }

public:
    /// Creates this process's registry and small-object allocator if they do not exist yet, and
    /// with them the fork handlers that keep their mutexes out of children (fork_locks.hpp).
    /// Called once at program start: a fork can then never catch a thread in the middle of
    /// creating them (inside the guard of a function-local static, a lock of its own).
    static bool init_process_state() {
        (void)segments();
        (void)small_objects();
        return true;
    }

private:
    SegmentPtr segment_;
    std::uint64_t offset_ = 0;
    std::byte* address_ = nullptr;
};

/// This process's shared-object state, created during static initialisation (see above).
[[maybe_unused]] inline const bool process_state_ready = SharedRef::init_process_state();

}  // namespace mproc::detail
