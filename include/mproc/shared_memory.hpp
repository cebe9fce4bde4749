// mproc — SharedMemory: a block of bytes in anonymous shared memory, Python's
// multiprocessing.shared_memory.SharedMemory without a name.
//
//     mproc::SharedMemory block(64 << 20);        // 64 MiB, zero-filled; pages exist once touched
//     std::span<std::byte> bytes = block.buf();   // block.data(), block.size()
//     std::span<double> xs = block.as<double>();  // the bytes as an array of a trivially copyable type
//     queue.put(block);                            // the handle crosses, never the bytes (an empty one too)
//     mproc::SharedMemory same = queue.get();      // the receiver sees the same memory
//     block.close();                               // this handle lets go (Python's close())
//
// A handle, like RawArray: copies (and the copies a fork makes) refer to one block, which lives
// while any handle in any process does, or a Queue, SharedDict or SharedList holds one. A block
// travels in a Queue, a Pipe, a Process target or as a Pool task argument by its 17-byte handle:
// moving 1 GiB costs what moving an int does. Python's name (attaching to a block by name) and
// unlink() have no twin: the block has no name anywhere, and the kernel frees it with its last
// mapping, however its processes end (see docs/shared-memory.md). As every shared object, a block
// reaches the processes forked after it was made, and a Pool's workers whenever it was made (the
// pool sends them the memory of what their tasks name); a Process started before it cannot use it.
//
// Writers and readers synchronise themselves (a Lock, an Event, or the Queue that carries the
// handle: a put happens before the get that returns it). A handle is a value, as a
// std::shared_ptr is: copies of one may be used by any threads at once, but one handle object
// that a thread changes (close(), assignment, decoding into it) is not read by another meanwhile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "detail/shm/shared_object.hpp"
#include "detail/shm/sync_state.hpp"
#include "errors.hpp"
#include "serialize.hpp"

namespace mproc {

class SharedMemory {
    using Header = detail::SharedMemoryHeader;

public:
    /// An empty handle: no block (size() 0, buf() empty). A Pool worker decodes into one.
    SharedMemory() noexcept = default;

    /// A new block of `size` bytes, zero-filled. A block of more than 16 KiB has a segment of its
    /// own and starts on a page boundary; smaller ones share a chunk and start on a 64-byte line.
    /// (A segment's header takes its first page; a chunk's block, the 64 bytes before it.)
    /// Throws mproc::Error for 0 bytes (as Python does) or more than 1 TiB.
    explicit SharedMemory(std::size_t size) {
        if (size == 0) throw Error("mproc::SharedMemory: the size must be positive");
        if (size > max_size) throw Error("mproc::SharedMemory: " + std::to_string(size) + " bytes is more than 1 TiB");
        const bool own_segment = size > detail::small_object_limit;
        const std::size_t offset = own_segment ? detail::page_size() : line;
        // A block with a segment of its own is at the segment's start: its bytes, one page in.
        ref_ = own_segment ? detail::SharedRef::dedicated(offset + size, "mproc-memory")
                           : detail::SharedRef::allocate(offset + size, line, "mproc-memory");
        Header* h = ref_.as<Header>();
        h->header = {detail::shared_memory_magic, 0, detail::type_hash<SharedMemory>()};
        h->size = size;
        h->data_offset = offset;
        bind();
    }

    SharedMemory(const SharedMemory&) = default;
    SharedMemory& operator=(const SharedMemory&) = default;
    SharedMemory(SharedMemory&& other) noexcept
        : ref_(std::move(other.ref_)), data_(std::exchange(other.data_, nullptr)),
          size_(std::exchange(other.size_, 0)) {}
    SharedMemory& operator=(SharedMemory&& other) noexcept {
        ref_ = std::move(other.ref_);
        data_ = std::exchange(other.data_, nullptr);
        size_ = std::exchange(other.size_, 0);
        return *this;
    }

    /// The block's bytes (empty for an empty handle).
    std::span<std::byte> buf() const noexcept { return {data_, size_}; }
    std::byte* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return data_ == nullptr; }
    explicit operator bool() const noexcept { return data_ != nullptr; }

    /// The block as size() / sizeof(T) values of T (the bytes past the last whole one left out).
    template <class T> std::span<T> as() const noexcept {
        static_assert(std::is_trivially_copyable_v<T>, "mproc::SharedMemory::as<T>: T must be trivially copyable");
        static_assert(alignof(T) <= line, "mproc::SharedMemory::as<T>: T is aligned past 64 bytes");
        return {reinterpret_cast<T*>(data_), size_ / sizeof(T)};
    }

    /// Lets go of this handle (Python's close()): it is empty after. The block stays for every
    /// other handle; the last one gone frees it.
    void close() noexcept {
        ref_ = {};
        data_ = nullptr;
        size_ = 0;
    }

    /// Two handles to the same block.
    friend bool operator==(const SharedMemory& a, const SharedMemory& b) noexcept { return a.data_ == b.data_; }

    /// A handle encodes as a byte saying whether it has a block, then the block's segment id and
    /// offset (an empty handle crosses as empty).
    template <class Archive> void serialize(Archive& ar) {
        if constexpr (std::is_same_v<Archive, Writer>) {
            const std::uint8_t present = data_ ? 1 : 0;
            ar(present);
            if (present) ref_.encode(ar);
        } else {
            close();
            std::uint8_t present = 0;
            ar(present);
            if (present > 1) throw SerializationError("mproc: corrupt SharedMemory handle");
            if (!present) return;
            ref_.decode(ar, detail::shared_memory_magic, detail::type_hash<SharedMemory>(), sizeof(Header),
                        "SharedMemory");
            // Read once: another process could change the header between a check and its use.
            const Header* h = ref_.as<Header>();
            const std::uint64_t size = h->size;
            const std::uint64_t offset = h->data_offset;
            const std::size_t room = ref_.segment()->size() - ref_.offset();
            if ((offset != line && offset != detail::page_size()) || room < offset || size > room - offset ||
                size == 0) {
                close();
                throw SerializationError("mproc: corrupt SharedMemory handle: its size does not fit its memory");
            }
            data_ = ref_.address() + offset;
            size_ = static_cast<std::size_t>(size);
        }
    }

private:
    static constexpr std::size_t line = 64;
    static constexpr std::size_t max_size = std::size_t{1} << 40;

    void bind() {
        const Header* h = ref_.as<Header>();
        data_ = ref_.address() + h->data_offset;
        size_ = static_cast<std::size_t>(h->size);
    }

    detail::SharedRef ref_;
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace mproc
