// mproc — naming code across ranks: an address as (loaded object, offset).
//
// Every rank runs the same program, but each loads it — and its shared libraries — at addresses
// of its own (ASLR), and on a cluster perhaps from folders of its own (a node-local copy, another
// prefix, a container). So before a task leaves rank 0, each address in it (the TaskCode that
// names the invoker, and the function pointer when the task is one) becomes a *portable address*:
//     u16 module id + 1 | u48 offset from the object's load bias
// found with dladdr1 (the object's link map gives its path and load bias). Module ids index a
// table of objects — each its path on rank 0 ("" for the main program) and its GNU build-id —
// that rank 0 sends to each worker before the first task that needs them. A worker finds the
// object by identity: the loaded object of the same file name with the same build-id, wherever it
// was loaded from (by its path only when rank 0's copy has no build-id), or the main program,
// whose build-id must match too. It adds the offset to the object's load bias and checks that the
// address lies in a segment of that object with the right permission (executable for code,
// readable for a TaskCode, whose magic number it checks too). An object the worker has not
// loaded, one of another build (its build-id differs: said in so many words), or an offset that is
// not code there, is an mproc::Error, which fails the task: it is never called.
#pragma once

#include <dlfcn.h>
#include <link.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
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

/// A loaded object as rank 0 names it to the workers.
struct ModuleName {
    std::string path;      // its path on rank 0; "" for the main program
    std::string build_id;  // its GNU build-id (raw bytes), empty when it has none
    template <class Archive> void serialize(Archive& ar) { ar(path, build_id); }
};

/// A loaded object of this process, as dl_iterate_phdr shows it.
struct LoadedObject {
    std::string path;  // "" for the main program
    std::uintptr_t bias = 0;
    std::string build_id;
    struct Segment {
        std::uintptr_t start, end;
        unsigned flags;
    };
    std::vector<Segment> segments;
};

/// The GNU build-id in an object's loaded note segments (empty if it has none).
inline std::string build_id_of(const dl_phdr_info& info) {
    for (int i = 0; i < info.dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info.dlpi_phdr[i];
        if (ph.p_type != PT_NOTE) continue;
        const auto* const begin = reinterpret_cast<const std::byte*>(info.dlpi_addr + ph.p_vaddr);
        const std::size_t size = ph.p_memsz;
        // Notes are padded to the segment's alignment (4, or 8 in some objects).
        const std::size_t align = ph.p_align == 8 ? 8 : 4;
        const auto padded = [align](std::size_t n) { return (n + align - 1) & ~(align - 1); };
        std::size_t at = 0;  // offsets, never pointers past the segment
        while (size - at >= sizeof(ElfW(Nhdr))) {
            ElfW(Nhdr) note{};
            std::memcpy(&note, begin + at, sizeof note);
            const std::size_t name = at + sizeof note;
            if (padded(note.n_namesz) > size - name) break;
            const std::size_t desc = name + padded(note.n_namesz);
            if (note.n_descsz > size - desc) break;
            if (note.n_type == NT_GNU_BUILD_ID && note.n_namesz == 4 && std::memcmp(begin + name, "GNU", 4) == 0)
                return std::string(reinterpret_cast<const char*>(begin + desc), note.n_descsz);
            if (padded(note.n_descsz) > size - desc) break;
            at = desc + padded(note.n_descsz);
        }
    }
    return {};
}

/// Every object this process has loaded, the main program first (path "").
inline std::vector<LoadedObject> loaded_objects() {
    std::vector<LoadedObject> objects;
    ::dl_iterate_phdr(
        [](dl_phdr_info* info, std::size_t, void* data) -> int {
            auto& all = *static_cast<std::vector<LoadedObject>*>(data);
            LoadedObject object;
            if (!all.empty()) object.path = info->dlpi_name ? info->dlpi_name : "";
            object.bias = static_cast<std::uintptr_t>(info->dlpi_addr);
            object.build_id = build_id_of(*info);
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const ElfW(Phdr)& ph = info->dlpi_phdr[i];
                if (ph.p_type != PT_LOAD) continue;
                const std::uintptr_t start = object.bias + ph.p_vaddr;
                object.segments.push_back({start, start + ph.p_memsz, ph.p_flags});
            }
            all.push_back(std::move(object));
            return 0;
        },
        &objects);
    return objects;
}

/// A path's last component.
inline std::string_view file_name_of(std::string_view path) noexcept {
    const std::size_t slash = path.rfind('/');
    return slash == std::string_view::npos ? path : path.substr(slash + 1);
}

/// A build-id as hex, for messages.
inline std::string hex_of(std::string_view bytes) {
    std::string out;
    for (const char c : bytes) out += fmt::format("{:02x}", static_cast<unsigned char>(c));
    return out.empty() ? "none" : out;
}

/// Rank 0's side: addresses in this process to portable addresses.
class CodeNames {
public:
    /// The portable address of `address`. Throws mproc::Error when no loaded object holds it.
    /// Addresses in the main program are remembered for good; those in libraries only until the
    /// dynamic loader next loads or unloads an object (a library may be unloaded and another, or
    /// another build of it, loaded at the same address). An object is known by its path and
    /// build-id together.
    std::uint64_t portable(std::uintptr_t address) {
        if (const auto it = cache_.find(address); it != cache_.end()) return it->second;
        const LoaderGeneration loads = loader_generation();
        if (loads != library_generation_) {  // a library was loaded or unloaded since: forget them all
            library_cache_.clear();
            library_generation_ = loads;
        }
        if (const auto it = library_cache_.find(address); it != library_cache_.end()) return it->second;
        Dl_info info{};
        link_map* map = nullptr;
        if (::dladdr1(reinterpret_cast<void*>(address), &info, reinterpret_cast<void**>(&map), RTLD_DL_LINKMAP) == 0 ||
            map == nullptr)
            throw Error(
                fmt::format("mproc::mpi: the task's code at {:#x} is in no loaded object, so other ranks "
                            "cannot find it (tasks must be functions of the program or of its libraries)",
                            address));
        const bool in_program = map == first_map();
        std::string name = in_program ? std::string() : std::string(map->l_name ? map->l_name : "");
        const std::uintptr_t offset = address - static_cast<std::uintptr_t>(map->l_addr);
        if (offset > offset_mask)
            throw Error(fmt::format("mproc::mpi: code at {:#x} lies too far into {}", address, name));
        std::string build_id = build_id_at(static_cast<std::uintptr_t>(map->l_addr), name);
        std::string key = name + '\0' + build_id;
        auto [entry, added] = ids_.try_emplace(std::move(key), static_cast<std::uint32_t>(names_.size()));
        if (added) {
            if (names_.size() + 1 >= (std::size_t{1} << (64 - offset_bits))) {
                ids_.erase(entry);
                throw Error("mproc::mpi: tasks come from too many loaded objects");
            }
            names_.push_back({std::move(name), std::move(build_id)});
        }
        const std::uint64_t portable = (std::uint64_t{entry->second} + 1) << offset_bits | offset;
        (in_program ? cache_ : library_cache_).emplace(address, portable);
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

    /// Every object given an id so far, in id order.
    const std::vector<ModuleName>& modules() const noexcept { return names_; }

private:
    /// The dynamic loader's counts of objects loaded and unloaded so far (glibc's dlpi_adds and
    /// dlpi_subs): either changes whenever it loads or unloads one.
    using LoaderGeneration = std::pair<unsigned long long, unsigned long long>;
    static LoaderGeneration loader_generation() {
        LoaderGeneration generation{0, 0};
        ::dl_iterate_phdr(
            [](dl_phdr_info* info, std::size_t size, void* data) -> int {
                if (size >= offsetof(dl_phdr_info, dlpi_subs) + sizeof(info->dlpi_subs))
                    *static_cast<LoaderGeneration*>(data) = {info->dlpi_adds, info->dlpi_subs};
                return 1;  // the first object tells
            },
            &generation);
        return generation;
    }

    /// The build-id of the loaded object at load bias `bias` whose path is `path` ("": the program).
    /// Only that object's notes are read.
    static std::string build_id_at(std::uintptr_t bias, const std::string& path) {
        struct Search {
            std::uintptr_t bias;
            const std::string* path;
            bool first = true;
            std::string build_id;
        } search{bias, &path, true, {}};
        ::dl_iterate_phdr(
            [](dl_phdr_info* info, std::size_t, void* data) -> int {
                auto& s = *static_cast<Search*>(data);
                const bool is_program = std::exchange(s.first, false);
                if (static_cast<std::uintptr_t>(info->dlpi_addr) != s.bias) return 0;
                if (s.path->empty() ? !is_program : !(info->dlpi_name && *s.path == info->dlpi_name)) return 0;
                s.build_id = build_id_of(*info);
                return 1;
            },
            &search);
        return std::move(search.build_id);
    }

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

    std::vector<ModuleName> names_;
    std::unordered_map<std::string, std::uint32_t> ids_;  // path, a NUL, build-id -> module id
    std::unordered_map<std::uintptr_t, std::uint64_t> cache_;          // the program's addresses
    std::unordered_map<std::uintptr_t, std::uint64_t> library_cache_;  // libraries', for one generation
    LoaderGeneration library_generation_{0, 0};
};

/// A worker's side: portable addresses to addresses in this process.
class CodeResolver {
public:
    enum class Use { code, task_code };

    explicit CodeResolver(int rank) : rank_(rank) {}

    /// Learns objects from rank 0 (ids `first`, `first + 1`, ...).
    void add_modules(std::uint32_t first, std::vector<ModuleName> names) {
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
        const std::string& name = names_[id - 1].path;
        const Object& object = find(id - 1);
        const std::uintptr_t address = object.bias + (portable & offset_mask);
        const std::size_t need = use == Use::code ? 1 : sizeof(TaskCode);
        const unsigned flag = use == Use::code ? PF_X : PF_R;
        bool inside = false;
        for (const LoadedObject::Segment& s : object.segments)
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
    struct Object {
        bool found = false;
        std::uintptr_t bias = 0;
        std::vector<LoadedObject::Segment> segments;
    };

    static std::string describe(const std::string& name) { return name.empty() ? "the program" : name; }

    const Object& find(std::uint64_t index) {
        Object& object = objects_[index];
        if (object.found) return object;
        const ModuleName& want = names_[index];
        std::vector<LoadedObject> loaded = loaded_objects();
        const LoadedObject* match = nullptr;
        const LoadedObject* other_build = nullptr;
        if (want.path.empty()) {
            if (!loaded.empty())
                (want.build_id.empty() || loaded[0].build_id == want.build_id ? match : other_build) = &loaded[0];
        } else {
            for (const LoadedObject& o : loaded) {
                if (&o == &loaded[0] || file_name_of(o.path) != file_name_of(want.path)) continue;
                if (want.build_id.empty() ? o.path == want.path : o.build_id == want.build_id) {
                    // The same build from rank 0's own path, if this rank has it there too.
                    if (!match || o.path == want.path) match = &o;
                    if (o.path == want.path) break;
                } else if (!want.build_id.empty() && !other_build) {
                    other_build = &o;
                }
            }
        }
        if (!match && other_build)
            throw Error(
                want.path.empty()
                    ? fmt::format("mproc::mpi: rank {} runs another build of the program than rank 0 (build-id {} "
                                  "here, {} on rank 0): every rank must run the same build",
                                  rank_, hex_of(other_build->build_id), hex_of(want.build_id))
                    : fmt::format("mproc::mpi: rank {} cannot run the task: its code is in {} (build-id {} on "
                                  "rank 0), but this rank loaded {}, another build (build-id {}): every rank must "
                                  "load the same build of the library",
                                  rank_, want.path, hex_of(want.build_id), other_build->path,
                                  hex_of(other_build->build_id)));
        if (!match)
            throw Error(
                fmt::format("mproc::mpi: rank {} cannot run the task: its code is in {}, which this rank has "
                            "not loaded (every rank must load it: link it into the program, or dlopen it on "
                            "every rank before the pool starts)",
                            rank_, describe(want.path)));
        object.found = true;
        object.bias = match->bias;
        object.segments = match->segments;
        return object;
    }

    int rank_;
    std::vector<ModuleName> names_;
    std::vector<Object> objects_;
    std::unordered_map<std::uint64_t, std::uintptr_t> cache_;
};

}  // namespace mproc::mpi::detail
