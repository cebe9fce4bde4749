// mproc — what a Pool task is in code: a callable and argument types, and the invoker that runs
// each item of a chunk in a worker — decoding its arguments, calling, and encoding its outcome.
//
// Workers are forks of the parent, so a function pointer means the same function there. A task
// frame names its code by the address of a TaskCode (wire.hpp): a constant instantiated in the
// parent for the task's (callable, argument types) that holds the invoker, and says whether a
// function pointer follows, so an engine whose workers load code at other addresses
// (mproc/mpi.hpp) can find and translate both addresses.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../serialize.hpp"
#include "../os/clock.hpp"
#include "../serialize/remote_exception.hpp"
#include "../shm/shared_object.hpp"
#include "link.hpp"
#include "wire.hpp"

namespace mproc::detail {

/// What an invoker needs in the worker.
struct ChunkContext {
    Reader& in;
    Writer& out;
    SeatStatus& status;
    std::span<const std::uint32_t> skips;
    std::uint64_t task_id;
    std::uint32_t count;
    bool timed;  // publish start times (only when task_timeout is set)
};
/// Tasks are function pointers or stateless callables: nothing captured can cross to a worker.
template <class F>
inline constexpr bool is_task_callable_v = std::is_pointer_v<F> ? std::is_function_v<std::remove_pointer_t<F>>
                                                                : (std::is_class_v<F> && std::is_empty_v<F> &&
                                                                   std::is_default_constructible_v<F>);

/// The compile-time checks of a task: a callable a worker can run, with these arguments.
template <class F> constexpr void require_task_callable() {
    static_assert(is_task_callable_v<F>,
                  "mproc::Pool: a task must be a function pointer or a stateless callable (a lambda "
                  "without captures). A worker is another process and cannot see captured variables: "
                  "pass values as arguments instead.");
}

template <class F, class Args> constexpr void require_invocable_with() {
    constexpr bool ok = []<class... A>(std::tuple<A...>*) {
        return std::is_invocable_v<F&, A&&...>;
    }(static_cast<Args*>(nullptr));
    static_assert(ok, "mproc::Pool: the task cannot be called with these arguments");
}

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

/// Decodes one item's arguments from their record. Shared-object handles among them (Queue,
/// SharedDict, Lock, ...) are default-constructed empty before they are read, not as new shared
/// objects thrown away at once (for a Queue or a SharedDict that is a 1 GiB memfd per item).
template <class Args> Args decode_args(std::span<const std::byte> bytes) {
    HandleDecodeScope decoding;
    Args args{};
    Reader in(bytes);
    in.read(args);
    if (in.remaining() != 0) Reader::fail(std::to_string(in.remaining()) + " unexpected bytes after the arguments");
    return args;
}

/// Publishes that item `i` of the chunk starts: its start time first, then the item — the pool
/// reads them as a pair (item, time, item).
inline void mark_item_started(ChunkContext& c, std::uint32_t i) noexcept {
    if (c.timed) c.status.started_ns.store(monotonic_ns(), std::memory_order_release);
    c.status.item.store(i, std::memory_order_release);
}

/// Runs every item of a chunk in the worker. Instantiated in the parent; called by address.
/// Each item ends in exactly one outcome record: its value, or its exception — the task's own,
/// or a SerializationError when its arguments do not decode or its result does not encode.
template <class F, class Args> void run_chunk(ChunkContext& c) {
    using R = task_result_t<F, Args>;
    F f = read_callable<F>(c.in);
    std::size_t next_skip = 0;
    for (std::uint32_t i = 0; i < c.count; ++i) {
        const std::span<const std::byte> item = read_record(c.in);  // a damaged frame fails the whole chunk
        if (next_skip < c.skips.size() && c.skips[next_skip] == i) {
            ++next_skip;
            write_skipped_outcome(c.out);
            continue;
        }
        mark_item_started(c, i);
        std::optional<Args> args;
        try {
            args.emplace(decode_args<Args>(item));
        } catch (...) {
            write_exception_outcome(c.out, RemoteException::capture_as_serialization_error(
                                               "cannot decode the arguments " + type_name<Args>()));
            continue;
        }
        const std::size_t mark = c.out.position();
        try {
            if constexpr (std::is_void_v<R>) {
                std::apply(f, std::move(*args));
                write_void_outcome(c.out);
            } else {
                const R result = std::apply(f, std::move(*args));
                write_value_outcome(c.out, result);
            }
        } catch (...) {
            c.out.rewind(mark);
            write_exception_outcome(c.out, RemoteException::capture());
        }
    }
}

/// Whether tasks calling F with Args are *packed* (wire.hpp): one argument and a non-void result,
/// both encoded as their bytes (numbers, enums), so a chunk's arguments travel as one array and
/// its results come back as one — no record, outcome or decoder per item.
template <class F, class Args> constexpr bool packed_task() {
    if constexpr (std::tuple_size_v<Args> != 1) {
        return false;
    } else {
        using R = task_result_t<F, Args>;
        if constexpr (std::is_void_v<R>) return false;
        else return is_bulk_copyable_v<std::tuple_element_t<0, Args>> && is_bulk_copyable_v<R>;
    }
}
template <class F, class Args> inline constexpr bool is_packed_task_v = packed_task<F, Args>();

/// Runs items `from`… of a packed chunk one outcome each (a chunk with items to skip, or the rest
/// of one where an item threw).
template <class F, class T>
void run_packed_items(ChunkContext& c, F& f, std::span<const std::byte> items, std::uint32_t from) {
    std::size_t next_skip = 0;
    while (next_skip < c.skips.size() && c.skips[next_skip] < from) ++next_skip;
    for (std::uint32_t i = from; i < c.count; ++i) {
        if (next_skip < c.skips.size() && c.skips[next_skip] == i) {
            ++next_skip;
            write_skipped_outcome(c.out);
            continue;
        }
        mark_item_started(c, i);
        T x;
        std::memcpy(&x, items.data() + std::size_t{i} * sizeof(T), sizeof(T));
        const std::size_t mark = c.out.position();
        try {
            write_value_outcome(c.out, std::invoke(f, std::move(x)));
        } catch (...) {
            c.out.rewind(mark);
            write_exception_outcome(c.out, RemoteException::capture());
        }
    }
}

/// Runs every item of a packed chunk in the worker: the arguments are read straight from their
/// array and the results written straight into one packed outcome. An item that throws turns the
/// chunk back into one outcome per item (the values before it kept, none run twice).
template <class F, class Args> void run_packed_chunk(ChunkContext& c) {
    using T = std::tuple_element_t<0, Args>;
    using R = task_result_t<F, Args>;
    F f = read_callable<F>(c.in);
    const std::span<const std::byte> items = read_record(c.in);  // a damaged frame fails the whole chunk
    if (items.size() != std::size_t{c.count} * sizeof(T))
        Reader::fail("a packed chunk of " + std::to_string(items.size()) + " bytes for " + std::to_string(c.count) +
                     " items");
    if (!c.skips.empty()) {
        run_packed_items<F, T>(c, f, items, 0);
        return;
    }
    const std::size_t mark = c.out.position();
    c.out.write(Outcome::packed);
    const std::size_t record = begin_record(c.out);
    const std::size_t values_at = c.out.position();
    c.out.buffer().extend(std::size_t{c.count} * sizeof(R));
    for (std::uint32_t i = 0; i < c.count; ++i) {
        mark_item_started(c, i);
        T x;
        std::memcpy(&x, items.data() + std::size_t{i} * sizeof(T), sizeof(T));
        try {
            const R value = std::invoke(f, std::move(x));
            std::memcpy(c.out.buffer().data() + values_at + std::size_t{i} * sizeof(R), &value, sizeof(R));
        } catch (...) {
            const RemoteException why = RemoteException::capture();
            std::vector<R> done(i);
            if (i != 0) std::memcpy(done.data(), c.out.buffer().data() + values_at, std::size_t{i} * sizeof(R));
            c.out.rewind(mark);
            for (const R& value : done) write_value_outcome(c.out, value);
            write_exception_outcome(c.out, why);
            run_packed_items<F, T>(c, f, items, i + 1);
            return;
        }
    }
    end_record(c.out, record);
}

/// The invoker of tasks calling an F with Args.
template <class F, class Args> constexpr Invoker invoker_of() {
    if constexpr (is_packed_task_v<F, Args>) return &run_packed_chunk<F, Args>;
    else return &run_chunk<F, Args>;
}

/// The TaskCode of tasks calling an F with Args; its address is what a task frame names.
template <class F, class Args>
inline constexpr TaskCode task_code{TaskCode::expected_magic, invoker_of<F, Args>(), std::is_pointer_v<F>};

/// Starts the task frame of a chunk of `count` items calling `f`, for the Pool call `call`; the item records follow (see
/// write_record), then end_task_frame.
template <class F, class Args>
void begin_chunk_frame(Buffer& frame, std::uint64_t task_id, std::uint64_t call, std::uint32_t count, const F& f) {
    begin_task_frame(frame, task_id, call, task_code<F, Args>, count);
    Writer out(frame);
    write_callable(out, f);
}

}  // namespace mproc::detail
