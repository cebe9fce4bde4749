// mproc — how one Pool task is encoded, run in a worker, and answered.
//
// Workers are forks of the parent, so a function pointer means the same function there. A task
// names its code by the address of a TaskCode: a constant instantiated in the parent for the
// task's (callable, argument types) that holds the *invoker* — which decodes the arguments, calls,
// and encodes the outcome of each item — and says whether a function pointer follows, so an engine
// whose workers load code at other addresses (mproc/mpi.hpp) can find and translate both
// addresses. Task frame body:
//     u64 task id | u64 task code | u32 item count | callable | item records... | u32 skips... | u32 skip count
// The trailer lists items not to run (they already failed when an earlier worker died on them).
// Result frame body:
//     u64 task id | i64 nanoseconds spent | per item: u8 outcome, then a record: the value or the exception.
// A *record* is a length (u32; 0xFFFFFFFF, then a u64, for 4 GiB and more) and that many bytes.
// Every item and every outcome is a record, so one that cannot be decoded fails alone and the
// reader goes on at the next; and an outcome is committed only once its bytes are whole — a
// result whose serialisation throws half-way is rolled back and replaced by the error.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../../serialize.hpp"
#include "../os/framing.hpp"
#include "../serialize/remote_exception.hpp"
#include "../shm/shared_object.hpp"

namespace mproc::detail {

/// Where a worker is with the task at the head of its queue.
enum class WorkerPhase : std::uint32_t {
    idle = 0,        // between tasks: the next one (if any) is not taken yet
    running = 1,     // running items: task_timeout counts from started_ns
    delivering = 2,  // every item has run; the result frame is on its way (not charged to the task)
};

/// What a worker publishes about the task it is running, in memory the pool can read — so when a
/// worker dies, the pool knows which item killed it; when an item overstays task_timeout, which
/// one to blame; and when a worker leaves queued tasks untaken, that it has stalled.
struct WorkerSlot {
    std::atomic<std::uint64_t> task_id{0};
    std::atomic<std::uint32_t> item{0};
    std::atomic<std::uint32_t> phase{0};       // a WorkerPhase
    std::atomic<std::int64_t> started_ns{0};
    std::atomic<std::uint64_t> begun{0};       // tasks this worker has taken from its ring

    WorkerPhase current_phase() const noexcept {
        return static_cast<WorkerPhase>(phase.load(std::memory_order_acquire));
    }
    void enter(WorkerPhase p) noexcept { phase.store(static_cast<std::uint32_t>(p), std::memory_order_release); }
};

inline std::int64_t monotonic_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

enum class Outcome : std::uint8_t { value = 0, exception = 1, skipped = 2 };

// ---- records ---------------------------------------------------------------------------------

inline constexpr std::uint32_t long_record = 0xFFFFFFFF;

/// Starts a record: writes a placeholder length and returns where it is, for end_record.
inline std::size_t begin_record(Writer& out) {
    const std::size_t at = out.position();
    const std::uint32_t placeholder = 0;
    out.write_raw(&placeholder, sizeof placeholder);
    return at;
}
/// Closes the record begun at `at`: fills in its length (moving its bytes 8 further on in the rare
/// case of a record of 4 GiB or more, whose length takes 12 bytes).
inline void end_record(Writer& out, std::size_t at) {
    Buffer& buffer = out.buffer();
    const std::size_t length = buffer.size() - at - sizeof(std::uint32_t);
    if (length < long_record) [[likely]] {
        const auto n = static_cast<std::uint32_t>(length);
        std::memcpy(buffer.data() + at, &n, sizeof n);
        return;
    }
    buffer.extend(sizeof(std::uint64_t));
    std::byte* body = buffer.data() + at + sizeof(std::uint32_t);
    std::memmove(body + sizeof(std::uint64_t), body, length);
    const std::uint64_t n = length;
    std::memcpy(buffer.data() + at, &long_record, sizeof long_record);
    std::memcpy(body, &n, sizeof n);
}
/// The bytes of the next record; the reader moves past them. A record longer than what is left is
/// a SerializationError (the frame itself is damaged).
inline std::span<const std::byte> read_record(Reader& in) {
    std::uint32_t short_length = 0;
    in.read_raw(&short_length, sizeof short_length);
    std::uint64_t length = short_length;
    if (short_length == long_record) in.read_raw(&length, sizeof length);
    if (length > in.remaining()) Reader::fail("record of " + std::to_string(length) + " bytes, " +
                                              std::to_string(in.remaining()) + " left in the frame");
    return in.read_span(static_cast<std::size_t>(length));
}

/// Appends `values` to `out` as one record.
template <class... Ts> void write_record(Writer& out, const Ts&... values) {
    const std::size_t at = begin_record(out);
    out(values...);
    end_record(out, at);
}

/// One item's outcome as read from a result frame.
struct OutcomeRecord {
    Outcome outcome = Outcome::skipped;
    std::span<const std::byte> bytes;  // the value, or the RemoteException
};
inline OutcomeRecord read_outcome_record(Reader& in) {
    OutcomeRecord r;
    in.read(r.outcome);
    if (r.outcome != Outcome::value && r.outcome != Outcome::exception && r.outcome != Outcome::skipped)
        Reader::fail("invalid item outcome " + std::to_string(static_cast<unsigned>(r.outcome)));
    r.bytes = read_record(in);
    return r;
}

/// Writes an item's exception outcome.
inline void write_exception_outcome(Writer& out, const RemoteException& why) {
    out.write(Outcome::exception);
    write_record(out, why);
}
inline void write_skipped_outcome(Writer& out) {
    out.write(Outcome::skipped);
    write_record(out);
}

/// Writes an item's value outcome — or, when encoding the value throws, rolls back what it wrote
/// and writes the exception outcome of a SerializationError that names the type and the cause.
template <class R>
void write_value_outcome(Writer& out, const R& value) {
    const std::size_t mark = out.position();
    try {
        out.write(Outcome::value);
        write_record(out, value);
    } catch (...) {
        out.rewind(mark);
        write_exception_outcome(out, RemoteException::capture_as_serialization_error(
                                         "cannot encode the result of type " + type_name<R>()));
    }
}
inline void write_void_outcome(Writer& out) {
    out.write(Outcome::value);
    write_record(out);
}

/// The exception an exception outcome carries (or a SerializationError when it does not decode).
inline std::exception_ptr rebuild_exception(std::span<const std::byte> bytes) {
    try {
        return decode<RemoteException>(bytes).rebuild();
    } catch (...) {
        return std::make_exception_ptr(
            SerializationError("cannot decode a task's exception: " + describe_current_exception()));
    }
}

/// The exception a worker's hello carries (its initializer threw), or nullopt when it ran.
inline std::optional<RemoteException> read_hello_outcome(Reader& in) {
    const OutcomeRecord r = read_outcome_record(in);
    if (r.outcome != Outcome::exception) return std::nullopt;
    try {
        return decode<RemoteException>(r.bytes);
    } catch (...) {
        return RemoteException::capture_as_serialization_error("the initializer's exception does not decode");
    }
}

/// Decodes a value record exactly; a failure is a SerializationError naming the type and the cause.
template <class T> void decode_value_into(std::span<const std::byte> bytes, T& value) {
    try {
        Reader in(bytes);
        in.read(value);
        if (in.remaining() != 0)
            Reader::fail(std::to_string(in.remaining()) + " unexpected bytes after the value");
    } catch (...) {
        throw SerializationError("cannot decode the result of type " + type_name<T>() + ": " +
                                 describe_current_exception());
    }
}

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

/// Runs every item of a chunk in the worker. Instantiated in the parent; called by address.
/// Each item ends in exactly one outcome record: its value, or its exception — the task's own,
/// or a SerializationError when its arguments do not decode or its result does not encode.
template <class F, class Args>
void run_chunk(ChunkContext& c) {
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
        // The start time first, then the item: the pool reads them as a pair (item, time, item).
        if (c.timed) c.slot.started_ns.store(monotonic_ns(), std::memory_order_release);
        c.slot.item.store(i, std::memory_order_release);
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

/// The TaskCode of tasks calling an F with Args; its address is what a task frame names.
template <class F, class Args>
inline constexpr TaskCode task_code{TaskCode::expected_magic, &run_chunk<F, Args>, std::is_pointer_v<F>};

/// Starts the frame of a chunk of `count` items; the item records follow (see write_record).
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

// Where the fixed fields of a task frame's body are (the callable follows them when it is a pointer).
inline constexpr std::size_t task_id_at = 0;
inline constexpr std::size_t task_code_at = 8;
inline constexpr std::size_t task_count_at = 16;
inline constexpr std::size_t task_callable_at = 20;
// A result frame's body: the task id, then the nanoseconds the task took, then the outcomes.
inline constexpr std::size_t result_id_at = 0;
inline constexpr std::size_t result_spent_at = 8;
inline constexpr std::size_t result_outcomes_at = 16;

/// Sets the item count of a whole task frame (after its items are encoded).
inline void set_task_count(Buffer& frame, std::uint32_t count) {
    std::memcpy(frame.data() + frame_header_size + task_count_at, &count, sizeof count);
}

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
    constexpr std::size_t head = task_callable_at;
    if (body.size() < head + 4) Reader::fail("task frame too short");
    std::uint64_t code = 0;
    std::memcpy(&t.task_id, body.data() + task_id_at, sizeof t.task_id);
    std::memcpy(&code, body.data() + task_code_at, sizeof code);
    std::memcpy(&t.count, body.data() + task_count_at, sizeof t.count);
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
