// mproc — a block allocator inside one shared mapping, addressed by offsets.
//
// Processes map the same memory at different addresses, so nothing in the arena is a pointer:
// every reference is an offset from the mapping's base.
//
// Blocks come in size classes (16..64 bytes by 16, then four classes per doubling), each with an
// 8-byte header {state, class}. A freed block goes on its class's free list and is reused for
// the next allocation of that class; a new block is carved from `top`, the end of the carved
// space, which only grows. So the blocks from `begin` to `top` can always be walked one after
// another, whatever happens.
//
// Crash safety comes from that walk. Every change is ordered so that one store publishes it (a
// list head, `top`), and a process that dies between two stores can only leave a block that is
// on no list and not in use — a leak, never an overlap. The owner of the arena knows which
// blocks are in use (they are reachable from its root), and rebuild() turns every other block
// into a free one: after EOWNERDEAD, the next lock holder calls it and nothing is lost.
//
// Freed blocks of 64 KiB and more also give their pages back to the kernel (the block stays
// reserved; its pages fault back in, zeroed, when it is reused).
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../../errors.hpp"
#include "memory.hpp"

namespace mproc::detail {

inline constexpr std::size_t arena_classes = 4 + 4 * 36;  // the largest class is 2^42 bytes

/// Block size (header included) of class i.
constexpr std::uint64_t arena_class_size(std::size_t i) noexcept {
    if (i < 4) return 16 * (i + 1);
    const std::uint64_t base = std::uint64_t{64} << ((i - 4) / 4);
    return base + ((i - 4) % 4 + 1) * (base / 4);
}

/// The smallest class whose blocks hold `n` bytes (header included); arena_classes if none.
constexpr std::size_t arena_class_of(std::uint64_t n) noexcept {
    if (n <= 64) return n == 0 ? 0 : static_cast<std::size_t>((n + 15) / 16 - 1);
    const auto k = static_cast<std::size_t>(std::bit_width((n - 1) / 64) - 1);
    if (k >= 36) return arena_classes;
    const std::uint64_t base = std::uint64_t{64} << k;
    const std::uint64_t step = base / 4;
    return 4 + 4 * k + static_cast<std::size_t>((n - base + step - 1) / step - 1);
}

/// The arena's state, kept inside the mapping it manages.
struct ArenaHeader {
    std::uint64_t begin;  // offset of the first block
    std::uint64_t limit;  // end of the space blocks may use
    std::uint64_t top;    // end of the carved blocks
    std::uint64_t free_head[arena_classes];  // block offsets; 0 = empty list
};

struct ArenaBlock {
    std::uint32_t state;
    std::uint32_t cls;
    std::uint64_t next;  // free blocks only: the next on the list (the first 8 payload bytes)
};

/// A view of an arena: the mapping's base and the header inside it.
class Arena {
public:
    static constexpr std::uint32_t used_state = 0x55534544u;  // "USED"
    static constexpr std::uint32_t free_state = 0x46524545u;  // "FREE"
    static constexpr std::size_t header_bytes = 8;

    Arena(std::byte* base, ArenaHeader& header) noexcept : base_(base), h_(&header) {}

    static void init(ArenaHeader& header, std::uint64_t begin, std::uint64_t limit) noexcept {
        header.begin = round_up(begin, 16);
        header.limit = limit;
        header.top = header.begin;
        for (auto& head : header.free_head) head = 0;
    }

    /// A block with room for `bytes` payload bytes; returns the payload's offset (8-aligned),
    /// or 0 when the arena cannot hold it. The payload's contents are unspecified.
    std::uint64_t allocate(std::uint64_t bytes) {
        if (bytes > (std::uint64_t{1} << 42)) return 0;
        const std::size_t cls = arena_class_of(bytes + header_bytes);
        if (cls >= arena_classes) return 0;
        if (std::uint64_t block = h_->free_head[cls]) return pop(cls, block);
        const std::uint64_t size = arena_class_size(cls);
        if (h_->limit - h_->top >= size) {
            const std::uint64_t block = h_->top;
            auto* b = at(block);
            b->state = used_state;
            b->cls = static_cast<std::uint32_t>(cls);
            h_->top = block + size;  // publishes the block
            return block + header_bytes;
        }
        // No room to carve: a larger free block will do (it is used whole).
        for (std::size_t bigger = cls + 1; bigger < arena_classes; ++bigger)
            if (std::uint64_t block = h_->free_head[bigger]) return pop(bigger, block);
        return 0;
    }

    /// Returns the block whose payload is at `payload` to its free list.
    void free(std::uint64_t payload) {
        const std::uint64_t block = payload - header_bytes;
        auto* b = checked(block);
        if (b->state != used_state) corrupt("free of a block that is not in use");
        push(block, b->cls);
    }

    /// How many payload bytes the block at `payload` holds.
    std::uint64_t capacity(std::uint64_t payload) const {
        return arena_class_size(at(payload - header_bytes)->cls) - header_bytes;
    }

    /// After a crash: `live` holds the payload offset of every block in use; every other block
    /// becomes free and the lists are rebuilt from scratch.
    void rebuild(std::vector<std::uint64_t> live) {
        std::sort(live.begin(), live.end());
        live.erase(std::unique(live.begin(), live.end()), live.end());
        for (auto& head : h_->free_head) head = 0;
        std::size_t next_live = 0, matched = 0;
        for (std::uint64_t block = h_->begin; block < h_->top;) {
            auto* b = at(block);
            if (b->cls >= arena_classes) corrupt("bad block class");
            const std::uint64_t size = arena_class_size(b->cls);
            if (size > h_->top - block) corrupt("block runs past the top");
            while (next_live < live.size() && live[next_live] < block + header_bytes) ++next_live;
            if (next_live < live.size() && live[next_live] == block + header_bytes) {
                b->state = used_state;
                ++next_live;
                ++matched;
            } else {
                push(block, b->cls);
            }
            block += size;
        }
        // Every block in use must be where the walk finds blocks.
        if (matched != live.size()) corrupt("a block in use is not on a block boundary");
    }

    /// True if `payload` could be a block's payload inside this arena.
    bool plausible(std::uint64_t payload) const noexcept {
        return payload >= h_->begin + header_bytes && payload < h_->top && (payload - header_bytes) % 16 == 0;
    }

    std::uint64_t top() const noexcept { return h_->top; }
    std::uint64_t limit() const noexcept { return h_->limit; }
    template <class T> T* ptr(std::uint64_t offset) const noexcept { return reinterpret_cast<T*>(base_ + offset); }

private:
    ArenaBlock* at(std::uint64_t block) const noexcept { return reinterpret_cast<ArenaBlock*>(base_ + block); }
    ArenaBlock* checked(std::uint64_t block) const {
        if (block < h_->begin || block >= h_->top || (block - h_->begin) % 16 != 0) corrupt("offset outside the arena");
        return at(block);
    }
    std::uint64_t pop(std::size_t cls, std::uint64_t block) {
        auto* b = checked(block);
        if (b->state != free_state || b->cls != cls) corrupt("free list entry is not a free block of its class");
        h_->free_head[cls] = b->next;  // from here the block is ours (a crash leaks it until rebuild)
        b->state = used_state;
        return block + header_bytes;
    }
    void push(std::uint64_t block, std::uint32_t cls) noexcept {
        auto* b = at(block);
        b->state = free_state;
        b->next = h_->free_head[cls];
        h_->free_head[cls] = block;  // publishes it
        const std::uint64_t size = arena_class_size(cls);
        if (size >= (std::uint64_t{64} << 10))
            release_pages(base_ + block + sizeof(ArenaBlock), size - sizeof(ArenaBlock));
    }
    [[noreturn]] static void corrupt(const char* what) {
        throw Error(std::string("mproc: shared memory arena is corrupted: ") + what);
    }

    std::byte* base_;
    ArenaHeader* h_;
};

}  // namespace mproc::detail
