// mproc — one block of shared memory: a memfd and its MAP_SHARED mapping.
//
// The memory is anonymous: memfd_create names nothing in any filesystem (nothing ever appears in
// /dev/shm), and the kernel frees it when the last mapping and the last descriptor are gone —
// a process killed by SIGKILL leaks nothing.
//
// The memfd is sized to the most the object may ever use and mapped once with MAP_NORESERVE.
// tmpfs files are sparse, so only pages that are touched take memory: the block "grows as it
// fills" while its address never moves, and release_pages() hands pages back (MADV_REMOVE
// punches them out of the memfd). The size is sealed, so no one can shrink the file under a
// mapping and turn reads into SIGBUS.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>

#include "../../errors.hpp"
#include "../os/unique_fd.hpp"

namespace mproc::detail {

inline std::size_t page_size() noexcept {
    static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    return size;
}
constexpr std::size_t round_up(std::size_t n, std::size_t to) noexcept { return (n + to - 1) / to * to; }
constexpr std::size_t round_down(std::size_t n, std::size_t to) noexcept { return n / to * to; }

/// Gives the whole pages inside [addr, addr + length) back to the kernel; they read as zeros
/// afterwards. Only for shared memfd mappings (MADV_REMOVE frees the file's pages, not just
/// this process's view of them). Best effort: on failure the memory simply stays in use.
inline void release_pages(void* addr, std::size_t length) noexcept {
    const auto begin = reinterpret_cast<std::uintptr_t>(addr);
    const std::uintptr_t first = round_up(begin, page_size());
    const std::uintptr_t last = round_down(begin + length, page_size());
    // NOLINTNEXTLINE(performance-no-int-to-ptr): page arithmetic on an address we were given
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_REMOVE);
}

/// Owns one memfd-backed MAP_SHARED mapping. Move-only.
class SharedMemory {
public:
    SharedMemory() = default;
    SharedMemory(SharedMemory&& other) noexcept
        : fd_(std::move(other.fd_)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
    SharedMemory& operator=(SharedMemory&& other) noexcept {
        if (this != &other) {
            unmap();
            fd_ = std::move(other.fd_);
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    SharedMemory(const SharedMemory&) = delete;
    SharedMemory& operator=(const SharedMemory&) = delete;
    ~SharedMemory() { unmap(); }

    /// A fresh zero-filled block of at least `size` bytes (rounded up to whole pages). `name`
    /// only labels it in /proc/<pid>/maps ("memfd:<name>").
    static SharedMemory create(std::size_t size, const char* name) {
        size = round_up(size == 0 ? 1 : size, page_size());
        // A memfd counts as a file: sized past RLIMIT_FSIZE, ftruncate would raise SIGXFSZ, which
        // ends the process, before it could fail with EFBIG.
        if (rlimit fsize{};
            ::getrlimit(RLIMIT_FSIZE, &fsize) == 0 && fsize.rlim_cur != RLIM_INFINITY && size > fsize.rlim_cur)
            throw Error("mproc: " + std::to_string(size) + " bytes of shared memory (" + name +
                        ") exceed this process's file size limit of " + std::to_string(fsize.rlim_cur) +
                        " bytes (RLIMIT_FSIZE, ulimit -f), which a memfd counts against");
        UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
        if (!fd) throw_errno("memfd_create");
        if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
            throw_errno("ftruncate(memfd, " + std::to_string(size) + ")");
        // Best effort: older kernels without sealing still work, just less defended.
        ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
        return map(std::move(fd), size);
    }

    /// Maps a memfd received from another process (its whole current size).
    static SharedMemory open(UniqueFd fd) {
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0) throw_errno("fstat(shared memory fd)");
        if (st.st_size <= 0) throw Error("mproc: shared memory fd " + std::to_string(fd.get()) + " is empty");
        return map(std::move(fd), static_cast<std::size_t>(st.st_size));
    }

    std::byte* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    int fd() const noexcept { return fd_.get(); }
    explicit operator bool() const noexcept { return data_ != nullptr; }

    /// Bytes of memory the block holds right now (its touched, unreleased pages).
    std::size_t resident_bytes() const noexcept {
        struct stat st {};
        if (!fd_ || ::fstat(fd_.get(), &st) != 0) return 0;
        return static_cast<std::size_t>(st.st_blocks) * 512;
    }

private:
    static SharedMemory map(UniqueFd fd, std::size_t size) {
        void* at = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd.get(), 0);
        if (at == MAP_FAILED) throw_errno("mmap(" + std::to_string(size) + " bytes of shared memory)");
        SharedMemory block;
        block.fd_ = std::move(fd);
        block.data_ = static_cast<std::byte*>(at);
        block.size_ = size;
        return block;
    }
    void unmap() noexcept {
        if (data_) ::munmap(data_, size_);
        data_ = nullptr;
        size_ = 0;
        fd_.reset();
    }

    UniqueFd fd_;
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace mproc::detail
