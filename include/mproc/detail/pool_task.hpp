// mproc — how one Pool task is encoded, run in a worker, and answered.
//
// Workers are forks of the parent, so a function pointer means the same function there. A task
// names its code by the address of a TaskCode: a constant instantiated in the parent for the
// task's (callable, argument types) that holds the *invoker* — which decodes the arguments, calls,
// and encodes the outcome of each item — and says whether a function pointer follows, so an engine
// whose workers load code at other addresses (mproc/mpi.hpp) can find and translate both
// addresses. Task frame body:
//     u64 task id | u64 task code | u32 item count | callable | items... | u32 skips... | u32 skip count
// The trailer lists items not to run (they already failed when an earlier worker died on them).
// Result frame body:
//     u64 task id | u64 nanoseconds spent | per item: u8 outcome, then the value or the exception.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../serialize.hpp"
#include "framing.hpp"
#include "remote_exception.hpp"
#include "shared_object.hpp"

namespace mproc::detail {

/// What a worker publishes about the item it is running, in memory the pool can read — so when a
/// worker dies, the pool knows which item killed it, and when an item overstays task_timeout,
/// which one to blame.
struct WorkerSlot {
    std::atomic<std::uint64_t> task_id{0};
    std::atomic<std::uint32_t> item{0};
    std::atomic<std::uint32_t> running{0};
    std::atomic<std::int64_t> started_ns{0};
};

inline std::int64_t monotonic_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

enum class Outcome : std::uint8_t { value = 0, exception = 1, skipped = 2 };

/// What an invoker needs in the worker.
struct ChunkContext {
    Reader& in;
    Writer& out;
    WorkerSlot& slot;
    std::span<const std::uint32_t> skips;
    std::uint64_t task_id;
    std::uint32_t count;
    bool timed;  // publish start times (only when task_timeout is set)
};
using Invoker = void (*)(ChunkContext&);

/// What a task frame names: the invoker, and whether the callable is a function pointer (whose
/// value follows the item count). `magic` lets a reader check that an address translated from
/// another process really names a TaskCode.
struct TaskCode {
    static constexpr std::uint64_t expected_magic = 0x6d70726f632d7463;  // "mproc-tc"
    std::uint64_t magic;
    Invoker invoke;
    bool pointer_callable;
};

/// Tasks are function pointers or stateless callables: nothing captured can cross to a worker.
template <class F>
inline constexpr bool is_task_callable_v =
    std::is_pointer_v<F> ? std::is_function_v<std::remove_pointer_t<F>>
                         : (std::is_class_v<F> && std::is_empty_v<F> && std::is_default_constructible_v<F>);

template <class F> void write_callable(Writer& out, const F& f) {
    if constexpr (std::is_pointer_v<F>) {
        const auto address = reinterpret_cast<std::uintptr_t>(f);
        out.write_raw(&address, sizeof address);
    }
}
template <class F> F read_callable(Reader& in) {
    if constexpr (std::is_pointer_v<F>) {
        std::uintptr_t address = 0;
        in.read_raw(&address, sizeof address);
        // The same executable runs on both sides of the fork: a function's address is valid there.
        return reinterpret_cast<F>(address);  // NOLINT(performance-no-int-to-ptr)
    } else {
        return F{};
    }
}

/// The decayed result of calling F with Args (void stays void).
template <class F, class Args> struct task_result;
template <class F, class... Args> struct task_result<F, std::tuple<Args...>> {
    using type = std::decay_t<std::invoke_result_t<F&, Args&&...>>;
};
template <class F, class Args> using task_result_t = typename task_result<F, Args>::type;

/// Decodes one item's arguments. Shared-object handles among them (Queue, SharedDict, Lock, ...)
/// are default-constructed empty before they are read, not as new shared objects thrown away at
/// once (for a Queue or a SharedDict that is a 1 GiB memfd per item).
template <class Args> Args decode_args(Reader& in) {
    HandleDecodeScope decoding;
    Args args{};
    in.read(args);
    return args;
}

/// Runs every item of a chunk in the worker. Instantiated in the parent; called by address.
template <class F, class Args>
void run_chunk(ChunkContext& c) {
    using R = task_result_t<F, Args>;
    c.slot.task_id.store(c.task_id, std::memory_order_relaxed);
    c.slot.item.store(0, std::memory_order_relaxed);
    c.slot.running.store(1, std::memory_order_release);
    F f = read_callable<F>(c.in);
    std::size_t next_skip = 0;
    for (std::uint32_t i = 0; i < c.count; ++i) {
        c.slot.item.store(i, std::memory_order_relaxed);
        if (c.timed) c.slot.started_ns.store(monotonic_ns(), std::memory_order_release);
        Args args = decode_args<Args>(c.in);  // a decoding failure belongs to the whole chunk; it propagates
        if (next_skip < c.skips.size() && c.skips[next_skip] == i) {
            ++next_skip;
            c.out.write(Outcome::skipped);
            continue;
        }
        try {
            if constexpr (std::is_void_v<R>) {
                std::apply(f, std::move(args));
                c.out.write(Outcome::value);
            } else {
                R result = std::apply(f, std::move(args));
                c.out.write(Outcome::value);
                c.out.write(result);
            }
        } catch (...) {
            c.out.write(Outcome::exception);
            c.out.write(RemoteException::capture());
        }
    }
}

/// The TaskCode of tasks calling an F with Args; its address is what a task frame names.
template <class F, class Args>
inline constexpr TaskCode task_code{TaskCode::expected_magic, &run_chunk<F, Args>, std::is_pointer_v<F>};

/// The frame for a chunk of items whose encodings are already in `items`, for `count` items.
template <class F, class Args>
void begin_task_frame(Buffer& frame, std::uint64_t task_id, std::uint32_t count, const F& f) {
    begin_frame(frame);
    Writer out(frame);
    const auto code = reinterpret_cast<std::uintptr_t>(&task_code<F, Args>);
    out(task_id, static_cast<std::uint64_t>(code), count);
    write_callable(out, f);
}
/// Closes a task frame with its list of items to skip.
inline void end_task_frame(Buffer& frame, std::span<const std::uint32_t> skips) {
    for (std::uint32_t s : skips) frame.append(&s, sizeof s);
    const auto n = static_cast<std::uint32_t>(skips.size());
    frame.append(&n, sizeof n);
    finish_frame(frame);
}

/// Where a task frame's body holds the TaskCode's address, and the callable when it is a pointer.
inline constexpr std::size_t task_code_at = 8;
inline constexpr std::size_t task_callable_at = 8 + 8 + 4;

/// The fields of a task frame as the worker reads them.
struct TaskView {
    std::uint64_t task_id = 0;
    Invoker invoker = nullptr;
    std::uint32_t count = 0;
    std::span<const std::byte> payload;   // callable and items
    std::vector<std::uint32_t> skips;
};

inline TaskView parse_task(std::span<const std::byte> body) {
    TaskView t;
    constexpr std::size_t head = 8 + 8 + 4;
    if (body.size() < head + 4) Reader::fail("task frame too short");
    std::uint64_t code = 0;
    std::memcpy(&t.task_id, body.data(), 8);
    std::memcpy(&code, body.data() + 8, 8);
    std::memcpy(&t.count, body.data() + 16, 4);
    // The address of a static TaskCode of this same executable, sent by the parent before the fork.
    // NOLINTNEXTLINE(performance-no-int-to-ptr)
    t.invoker = reinterpret_cast<const TaskCode*>(static_cast<std::uintptr_t>(code))->invoke;
    std::uint32_t nskip = 0;
    std::memcpy(&nskip, body.data() + body.size() - 4, 4);
    if (nskip > (body.size() - head - 4) / 4) Reader::fail("task frame skip list too long");
    const std::size_t trailer = 4 + std::size_t{nskip} * 4;
    t.skips.resize(nskip);
    if (nskip) std::memcpy(t.skips.data(), body.data() + body.size() - trailer, std::size_t{nskip} * 4);
    t.payload = body.subspan(head, body.size() - head - trailer);
    return t;
}

/// Rewrites `frame` (a whole task frame) with `skips` as its new skip list.
inline void set_task_skips(Buffer& frame, std::span<const std::uint32_t> skips) {
    const std::span<const std::byte> body = frame.bytes().subspan(frame_header_size);
    std::uint32_t old = 0;
    std::memcpy(&old, body.data() + body.size() - 4, 4);
    frame.resize(frame.size() - 4 - std::size_t{old} * 4);
    end_task_frame(frame, skips);
}

}  // namespace mproc::detail
