// mproc — the Pool's wire format: the one place that knows how a task frame and a result frame
// are laid out. The local engine, its workers and the MPI engine and ranks all read and write
// frames through these names; no other file knows an offset.
//
// A frame is a u64 length, then its body (os/framing.hpp). Bodies:
//
//   task frame    | id u64 | call u64 | code u64 | count u32 | [callable u64] | item records... | skips u32... | skip count u32 |
//   result frame  | id u64 | spent_ns i64 | per item: outcome u8, then a record (the value or the exception) |
//                 | id u64 | spent_ns i64 | packed u8 | one record: every item's value, back to back |
//
// `call` names the Pool call the task belongs to (the id of the call's first task): a worker skips
// the tasks of a call the pool has cancelled (fork_engine.hpp). `code` is the address of the task's TaskCode (invoke.hpp): what decodes, calls and encodes each
// item. `callable` is present when the TaskCode says the callable is a function pointer; the MPI
// engine rewrites both addresses as portable names and back (mpi/detail/address.hpp). The trailer
// lists the items not to run (they already failed when an earlier worker died on them). `spent_ns`
// is the worker's run time of the task. Task id 0 is a worker's hello: in the spent_ns slot the
// worker's pid (it ran nothing), then one outcome, the initializer's. Task id 2^64-1 is a worker's
// *not adopted* notice, with no outcome: in that slot the id of a shared-memory segment it was
// sent and could not map (fork_engine.hpp sends it again with the next task that names it).
//
// A *packed* task (invoke.hpp: one argument and a result that are both encoded as their bytes, as
// numbers are) carries its items as one record, the arguments back to back, and its result frame
// answers with one packed outcome holding every value — unless an item threw or is skipped: then
// the worker writes one outcome per item, as for any task.
//
// A *record* is a length (u32; 0xFFFFFFFF, then a u64, for 4 GiB and more) and that many bytes.
// Every item and every outcome is a record, so one that cannot be decoded fails alone and the
// reader goes on at the next; and an outcome is committed only once its bytes are whole — a
// result whose serialisation throws half-way is rolled back and replaced by the error.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../../serialize.hpp"
#include "../os/framing.hpp"
#include "../serialize/remote_exception.hpp"
#include "../serialize/type_name.hpp"

namespace mproc::detail {

// ---- fixed fields ----------------------------------------------------------------------------

/// A field of type T at byte `Offset` of a frame body.
template <class T, std::size_t Offset> struct Field {
    static constexpr std::size_t at = Offset;
    static constexpr std::size_t end = Offset + sizeof(T);
    static T get(std::span<const std::byte> body) noexcept {
        T value;
        std::memcpy(&value, body.data() + at, sizeof value);
        return value;
    }
    static void set(std::span<std::byte> body, T value) noexcept {
        std::memcpy(body.data() + at, &value, sizeof value);
    }
};

/// The fields of a task frame's body.
namespace task_frame {
using id = Field<std::uint64_t, 0>;
using call = Field<std::uint64_t, id::end>;
using code = Field<std::uint64_t, call::end>;
using count = Field<std::uint32_t, code::end>;
using callable = Field<std::uint64_t, count::end>;  // only when the code's callable is a function pointer
inline constexpr std::size_t payload_at = count::end;  // the callable (if any), then the items
using skip_count_size = std::uint32_t;  // the trailer's last field
inline constexpr std::size_t smallest = payload_at + sizeof(skip_count_size);
}  // namespace task_frame

/// The fields of a result frame's body.
namespace result_frame {
using id = Field<std::uint64_t, 0>;
using spent_ns = Field<std::int64_t, id::end>;
using worker_pid = spent_ns;  // in a hello (task id 0), which has run nothing
using segment_id = Field<std::uint64_t, id::end>;  // in a not-adopted notice
inline constexpr std::size_t outcomes_at = spent_ns::end;
}  // namespace result_frame

/// The body of a whole frame (one that starts with its frame header).
inline std::span<std::byte> body_of(Buffer& frame) noexcept {
    return std::span<std::byte>(frame.data(), frame.size()).subspan(frame_header_size);
}

/// Task id 0 is the worker's hello: the worker's pid, then an Outcome::value once the initializer
/// has run, or Outcome::exception and the initializer's exception.
inline constexpr std::uint64_t hello_task_id = 0;
/// A worker could not map a segment it was sent (see the top of this file).
inline constexpr std::uint64_t not_adopted_task_id = UINT64_MAX;

/// An item's outcome; `packed` stands for every item of a packed task, each a value.
enum class Outcome : std::uint8_t { value = 0, exception = 1, skipped = 2, packed = 3 };

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
    if (length > in.remaining())
        Reader::fail("record of " + std::to_string(length) + " bytes, " + std::to_string(in.remaining()) +
                     " left in the frame");
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

/// Writes an item's outcome whose record is already encoded (`bytes`): read_outcome_record's twin.
inline void write_outcome_record(Writer& out, Outcome outcome, std::span<const std::byte> bytes) {
    out.write(outcome);
    const std::size_t at = begin_record(out);
    out.write_raw(bytes.data(), bytes.size());
    end_record(out, at);
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
template <class R> void write_value_outcome(Writer& out, const R& value) {
    const std::size_t mark = out.position();
    try {
        out.write(Outcome::value);
        write_record(out, value);
    } catch (...) {
        out.rewind(mark);
        write_exception_outcome(
            out, RemoteException::capture_as_serialization_error("cannot encode the result of type " + type_name<R>()));
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
        if (in.remaining() != 0) Reader::fail(std::to_string(in.remaining()) + " unexpected bytes after the value");
    } catch (...) {
        throw SerializationError("cannot decode the result of type " + type_name<T>() + ": " +
                                 describe_current_exception());
    }
}

// ---- task frames -----------------------------------------------------------------------------

struct ChunkContext;
/// Runs every item of a chunk in a worker (invoke.hpp).
using Invoker = void (*)(ChunkContext&);

/// What a task frame's `code` names: the invoker, and whether the callable is a function pointer
/// (whose value follows the item count). `magic` lets a reader check that an address translated
/// from another process really names a TaskCode.
struct TaskCode {
    static constexpr std::uint64_t expected_magic = 0x6d70726f632d7463;  // "mproc-tc"
    std::uint64_t magic;
    Invoker invoke;
    bool pointer_callable;
};

/// The TaskCode a task frame names (an address in this process: the parent's own, or translated).
inline const TaskCode& task_code_of(std::span<const std::byte> body) noexcept {
    // NOLINTNEXTLINE(performance-no-int-to-ptr)
    return *reinterpret_cast<const TaskCode*>(static_cast<std::uintptr_t>(task_frame::code::get(body)));
}

/// Starts a task frame: its fixed fields; the callable and the item records follow.
inline void begin_task_frame(Buffer& frame, std::uint64_t id, std::uint64_t call, const TaskCode& code,
                             std::uint32_t count) {
    begin_frame(frame);
    Writer out(frame);
    out(id, call, static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(&code)), count);
}
/// Closes a task frame with its list of items to skip.
inline void end_task_frame(Buffer& frame, std::span<const std::uint32_t> skips) {
    for (std::uint32_t s : skips) frame.append(&s, sizeof s);
    const auto n = static_cast<task_frame::skip_count_size>(skips.size());
    frame.append(&n, sizeof n);
    finish_frame(frame);
}
/// Sets the item count of a whole task frame (after its items are encoded).
inline void set_task_count(Buffer& frame, std::uint32_t count) { task_frame::count::set(body_of(frame), count); }

/// The fields of a task frame as the worker reads them.
struct TaskView {
    std::uint64_t task_id = 0;
    std::uint64_t call = 0;
    Invoker invoker = nullptr;
    std::uint32_t count = 0;
    std::span<const std::byte> payload;  // the callable (if any) and the items
    std::vector<std::uint32_t> skips;
};

/// The skip list's length, from the trailer of a task frame body.
inline std::uint32_t task_skip_count(std::span<const std::byte> body) noexcept {
    task_frame::skip_count_size n = 0;
    std::memcpy(&n, body.data() + body.size() - sizeof n, sizeof n);
    return n;
}

inline TaskView parse_task(std::span<const std::byte> body) {
    if (body.size() < task_frame::smallest) Reader::fail("task frame too short");
    TaskView t;
    t.task_id = task_frame::id::get(body);
    t.call = task_frame::call::get(body);
    t.count = task_frame::count::get(body);
    t.invoker = task_code_of(body).invoke;
    const std::uint32_t nskip = task_skip_count(body);
    if (nskip > (body.size() - task_frame::smallest) / sizeof(std::uint32_t))
        Reader::fail("task frame skip list too long");
    const std::size_t trailer = sizeof(task_frame::skip_count_size) + std::size_t{nskip} * sizeof(std::uint32_t);
    t.skips.resize(nskip);
    if (nskip)
        std::memcpy(t.skips.data(), body.data() + body.size() - trailer, std::size_t{nskip} * sizeof(std::uint32_t));
    t.payload = body.subspan(task_frame::payload_at, body.size() - task_frame::payload_at - trailer);
    return t;
}

/// Rewrites `frame` (a whole task frame) with `skips` as its new skip list.
inline void set_task_skips(Buffer& frame, std::span<const std::uint32_t> skips) {
    const std::uint32_t old = task_skip_count(body_of(frame));
    frame.resize(frame.size() - sizeof(task_frame::skip_count_size) - std::size_t{old} * sizeof(std::uint32_t));
    end_task_frame(frame, skips);
}

// ---- result frames ---------------------------------------------------------------------------

/// Starts the result frame of task `id`; the outcomes follow, then finish_result_frame.
inline Writer begin_result_frame(Buffer& frame, std::uint64_t id) {
    begin_frame(frame);
    Writer out(frame);
    out(id, std::int64_t{0});
    return out;
}
/// Closes a result frame, with the time its task took.
inline void finish_result_frame(Buffer& frame, std::int64_t spent_ns) {
    result_frame::spent_ns::set(body_of(frame), spent_ns);
    finish_frame(frame);
}
/// A worker's not-adopted notice for `segment` (a whole frame, in `out`).
inline void write_not_adopted(Buffer& out, std::uint64_t segment) {
    begin_result_frame(out, not_adopted_task_id);
    result_frame::segment_id::set(body_of(out), segment);
    finish_frame(out);
}
/// Replaces whatever outcomes `frame` holds by `count` exception outcomes, each `why`: the result
/// of a task none of whose items could run (its chunk does not decode).
inline void fail_every_item(Buffer& frame, std::uint32_t count, const RemoteException& why) {
    frame.resize(frame_header_size + result_frame::outcomes_at);
    Writer out(frame);
    for (std::uint32_t i = 0; i < count; ++i) write_exception_outcome(out, why);
}
/// A whole result frame for the task frame `task_body`, every item failing with `why` (a task the
/// receiving side could not even parse; a damaged header names no items).
inline void failed_task_frame(Buffer& frame, std::span<const std::byte> task_body, const RemoteException& why) {
    const bool whole = task_body.size() >= task_frame::smallest;
    begin_result_frame(frame, whole ? task_frame::id::get(task_body) : 0);
    fail_every_item(frame, whole ? task_frame::count::get(task_body) : 0, why);
    finish_result_frame(frame, 0);
}
/// The id of a result frame body, and a reader at its outcomes.
inline std::uint64_t result_id(std::span<const std::byte> body) {
    if (body.size() < result_frame::outcomes_at) Reader::fail("result frame too short");
    return result_frame::id::get(body);
}
inline std::span<const std::byte> result_outcomes(std::span<const std::byte> body) {
    if (body.size() < result_frame::outcomes_at) Reader::fail("result frame too short");
    return body.subspan(result_frame::outcomes_at);
}

/// The values of a packed result frame body — `count` of equal size, back to back — or nullopt
/// when its outcomes are one per item. A packed outcome that does not add up is a SerializationError.
inline std::optional<std::span<const std::byte>> packed_values(std::span<const std::byte> body, std::uint32_t count) {
    const std::span<const std::byte> outcomes = result_outcomes(body);
    if (outcomes.empty() || outcomes[0] != static_cast<std::byte>(Outcome::packed)) return std::nullopt;
    Reader in(outcomes.subspan(1));
    const std::span<const std::byte> values = read_record(in);
    if (in.remaining() != 0) Reader::fail("unexpected bytes after a packed outcome");
    if (count == 0 || values.size() % count != 0)
        Reader::fail("a packed outcome of " + std::to_string(values.size()) + " bytes for " + std::to_string(count) +
                     " items");
    return values;
}

/// Reads the `count` outcomes of a result frame body whose outcomes are one per item into `out`.
inline void read_outcomes(std::span<const std::byte> body, std::uint32_t count, std::vector<OutcomeRecord>& out) {
    Reader in(result_outcomes(body));
    for (std::uint32_t i = 0; i < count; ++i) out.push_back(read_outcome_record(in));
    if (in.remaining() != 0) Reader::fail("unexpected bytes after the last outcome of a result frame");
}

/// Splits a packed outcome's `values` into one value outcome per item.
inline void split_packed(std::span<const std::byte> values, std::uint32_t count, std::vector<OutcomeRecord>& out) {
    const std::size_t each = values.size() / count;
    for (std::uint32_t i = 0; i < count; ++i) out.push_back({Outcome::value, values.subspan(i * each, each)});
}

}  // namespace mproc::detail
