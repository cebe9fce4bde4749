// mproc — naming code across ranks: an address as (loaded object, offset).
//
// Every rank runs the same program, but each loads it — and its shared libraries — at addresses
// of its own (ASLR). So before a task leaves rank 0, each address in it (the TaskCode that names
// the invoker, and the function pointer when the task is one) becomes a *portable address*:
//     u16 module id + 1 | u48 offset from the object's load bias
// found with dladdr1 (the object's link map gives its name and load bias). Module ids index a
// table of object names ("" for the main program) that rank 0 sends to each worker before the
// first task that needs them. A worker finds the object of that name among its own (the main
// program is the first of dl_iterate_phdr's), adds the offset to its load bias, and checks that the
// address lies in a segment of that object with the right permission (executable for code,
// readable for a TaskCode, whose magic number it checks too). An object the worker has not loaded,
// or an offset that is not code there (another build of the program), is an mproc::Error, which
// fails the task: it is never called.
#pragma once

#include <dlfcn.h>
#include <link.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>

#include "../../detail/os/framing.hpp"
#include "../../detail/pool/wire.hpp"
#include "../../errors.hpp"
#include "../../serialize.hpp"

namespace mproc::mpi::detail {

using mproc::detail::TaskCode;

inline constexpr unsigned offset_bits = 48;
inline constexpr std::uint64_t offset_mask = (std::uint64_t{1} << offset_bits) - 1;

/// Rank 0's side: addresses in this process to portable addresses.
class CodeNames {
public:
    /// The portable address of `address`. Throws mproc::Error when no loaded object holds it.
    std::uint64_t portable(std::uintptr_t address) {
        if (const auto it = cache_.find(address); it != cache_.end()) return it->second;
        Dl_info info{};
        link_map* map = nullptr;
        if (::dladdr1(reinterpret_cast<void*>(address), &info, reinterpret_cast<void**>(&map), RTLD_DL_LINKMAP) == 0 ||
            map == nullptr)
            throw Error(
                fmt::format("mproc::mpi: the task's code at {:#x} is in no loaded object, so other ranks "
                            "cannot find it (tasks must be functions of the program or of its libraries)",
                            address));
        const std::string name = map == first_map() ? std::string() : std::string(map->l_name ? map->l_name : "");
        const std::uintptr_t offset = address - static_cast<std::uintptr_t>(map->l_addr);
        if (offset > offset_mask)
            throw Error(fmt::format("mproc::mpi: code at {:#x} lies too far into {}", address, name));
        auto [entry, added] = ids_.try_emplace(name, static_cast<std::uint32_t>(names_.size()));
        if (added) {
            if (names_.size() + 1 >= (std::size_t{1} << (64 - offset_bits)))
                throw Error("mproc::mpi: tasks come from too many loaded objects");
            names_.push_back(name);
        }
        const std::uint64_t portable = (std::uint64_t{entry->second} + 1) << offset_bits | offset;
        cache_.emplace(address, portable);
        return portable;
    }

    /// Rewrites the addresses of a task frame (with its frame header) as portable addresses.
    void make_portable(Buffer& frame) {
        namespace tf = mproc::detail::task_frame;
        const std::span<std::byte> body = mproc::detail::body_of(frame);
        const std::uint64_t code = tf::code::get(body);
        if (mproc::detail::task_code_of(body).pointer_callable)
            tf::callable::set(body, portable(static_cast<std::uintptr_t>(tf::callable::get(body))));
        tf::code::set(body, portable(static_cast<std::uintptr_t>(code)));
    }

    /// Every object name given an id so far, in id order.
    const std::vector<std::string>& modules() const noexcept { return names_; }

private:
    static link_map* first_map() {
        static link_map* const main_map = [] {
            link_map* map = nullptr;
            void* self = ::dlopen(nullptr, RTLD_LAZY | RTLD_NOLOAD);
            if (self) {
                ::dlinfo(self, RTLD_DI_LINKMAP, &map);
                ::dlclose(self);
            }
            return map;
        }();
        return main_map;
    }

    std::vector<std::string> names_;
    std::unordered_map<std::string, std::uint32_t> ids_;
    std::unordered_map<std::uintptr_t, std::uint64_t> cache_;
};

/// A worker's side: portable addresses to addresses in this process.
class CodeResolver {
public:
    enum class Use { code, task_code };

    explicit CodeResolver(int rank) : rank_(rank) {}

    /// Learns object names from rank 0 (ids `first`, `first + 1`, ...).
    void add_modules(std::uint32_t first, std::vector<std::string> names) {
        if (first != names_.size()) throw SerializationError("mproc::mpi: object names arrived out of order");
        for (auto& n : names) {
            names_.push_back(std::move(n));
            objects_.emplace_back();
        }
    }

    /// The local address of a portable one. Throws mproc::Error when it cannot be found here.
    std::uintptr_t resolve(std::uint64_t portable, Use use) {
        if (const auto it = cache_.find(portable); it != cache_.end()) return it->second;
        const std::uint64_t id = (portable >> offset_bits);
        if (id == 0 || id > names_.size())
            throw Error(fmt::format("mproc::mpi: rank {} got a task naming unknown object #{}", rank_, id));
        const std::string& name = names_[id - 1];
        const Object& object = find(id - 1);
        const std::uintptr_t address = object.bias + (portable & offset_mask);
        const std::size_t need = use == Use::code ? 1 : sizeof(TaskCode);
        const unsigned flag = use == Use::code ? PF_X : PF_R;
        bool inside = false;
        for (const Segment& s : object.segments)
            if ((s.flags & flag) && address >= s.start && address + need <= s.end) inside = true;
        if (!inside ||
            (use == Use::task_code && reinterpret_cast<const TaskCode*>(address)->magic != TaskCode::expected_magic))
            throw Error(
                fmt::format("mproc::mpi: rank {} cannot find the task's {} at offset {:#x} of {}: every rank "
                            "must run the same build of the program and its libraries",
                            rank_, use == Use::code ? "function" : "code", portable & offset_mask, describe(name)));
        cache_.emplace(portable, address);
        return address;
    }

    /// Rewrites a task frame body's portable addresses as local ones.
    void make_local(std::span<std::byte> body) {
        namespace tf = mproc::detail::task_frame;
        if (body.size() < tf::smallest) throw SerializationError("mproc::mpi: task frame too short");
        const std::uintptr_t local_code = resolve(tf::code::get(body), Use::task_code);
        if (reinterpret_cast<const TaskCode*>(local_code)->pointer_callable) {
            if (body.size() < tf::callable::end + sizeof(tf::skip_count_size))
                throw SerializationError("mproc::mpi: task frame too short");
            tf::callable::set(body, resolve(tf::callable::get(body), Use::code));
        }
        tf::code::set(body, local_code);
    }

private:
    struct Segment {
        std::uintptr_t start, end;
        unsigned flags;
    };
    struct Object {
        bool found = false;
        std::uintptr_t bias = 0;
        std::vector<Segment> segments;
    };

    static std::string describe(const std::string& name) { return name.empty() ? "the program" : name; }

    const Object& find(std::uint64_t index) {
        Object& object = objects_[index];
        if (object.found) return object;
        struct Search {
            const std::string* name;
            Object* object;
            bool first = true;
        } search{&names_[index], &object};
        ::dl_iterate_phdr(
            [](dl_phdr_info* info, std::size_t, void* data) -> int {
                auto& s = *static_cast<Search*>(data);
                const bool is_main = s.first;
                s.first = false;
                const bool match = s.name->empty() ? is_main : (info->dlpi_name && *s.name == info->dlpi_name);
                if (!match) return 0;
                s.object->found = true;
                s.object->bias = static_cast<std::uintptr_t>(info->dlpi_addr);
                for (int i = 0; i < info->dlpi_phnum; ++i) {
                    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
                    if (ph.p_type != PT_LOAD) continue;
                    const std::uintptr_t start = s.object->bias + ph.p_vaddr;
                    s.object->segments.push_back({start, start + ph.p_memsz, ph.p_flags});
                }
                return 1;
            },
            &search);
        if (!object.found)
            throw Error(
                fmt::format("mproc::mpi: rank {} cannot run the task: its code is in {}, which this rank has "
                            "not loaded (every rank must load it: link it into the program, or dlopen it on "
                            "every rank before the pool starts)",
                            rank_, describe(names_[index])));
        return object;
    }

    int rank_;
    std::vector<std::string> names_;
    std::vector<Object> objects_;
    std::unordered_map<std::uint64_t, std::uintptr_t> cache_;
};

}  // namespace mproc::mpi::detail
