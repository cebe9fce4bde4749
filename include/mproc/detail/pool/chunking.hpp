// mproc — how map, starmap and imap cut their input into tasks: the argument tuple of one item,
// the default chunk size (Python's), and the encoding of up to n items into one task frame, which
// stops early at a byte budget and keeps the items before an input that throws.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <iterator>
#include <memory>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../../serialize.hpp"
#include "engine.hpp"
#include "invoke.hpp"
#include "wire.hpp"

namespace mproc::detail {

/// A range element as the argument tuple of one call: map passes the element, starmap unpacks it.
template <class E, bool Star> struct item_args {
    using type = std::tuple<E>;
};
template <class E> struct item_args<E, true> {
    using type = decltype([]<std::size_t... I>(std::index_sequence<I...>) {
        return std::tuple<std::decay_t<std::tuple_element_t<I, E>>...>{};
    }(std::make_index_sequence<std::tuple_size_v<E>>{}));
};
template <class Range, bool Star>
using item_args_t = typename item_args<std::decay_t<std::ranges::range_value_t<Range>>, Star>::type;

/// How many bytes of items a default-sized chunk holds at most. A chunk this size, and its result
/// when the values are of similar size, fits a worker's task and result rings
/// (SharedSeats::ring_capacity / 4), so map streams through shared memory with no system call while
/// the workers are busy; bigger chunks would travel on the worker's socket.
inline constexpr std::size_t default_chunk_bytes = std::size_t{32} * 1024;

/// Encodes up to `n` items from `it` into one task, and stops early once the items take
/// `max_bytes` (at least one item is taken). Returns the items taken. An exception from the input
/// (advancing it, reading an element, encoding one) propagates — or, given `input_error`, is
/// stored there and ends the chunk after the items already encoded (the partial item is dropped).
template <class F, class Args, class It, class End>
std::uint32_t encode_chunk(Task& task, std::uint64_t task_id, const F& f, It& it, const End& end, std::size_t n,
                           std::size_t max_bytes = SIZE_MAX, std::exception_ptr* input_error = nullptr) {
    n = std::min<std::size_t>(n, UINT32_MAX);  // a task counts its items in 32 bits (`taken` would wrap)
    task.id = task_id;
    if (task.sink->call == 0) task.sink->call = task.id;  // the call's first task names it
    begin_chunk_frame<F, Args>(task.frame, task.id, task.sink->call, 0, f);
    const std::size_t start = task.frame.size();
    // Room for the items at their smallest encoding, so the frame is rarely copied as it grows.
    constexpr std::size_t item_min = sizeof(std::uint32_t) + min_encoded_size<Args>();
    task.frame.reserve(start + std::min(n, std::min(max_bytes, std::size_t{64} << 20) / item_min + 1) * item_min + 64);
    Writer out(task.frame);
    std::uint32_t taken = 0;
    // A packed task's items are one record, the arguments back to back (wire.hpp).
    [[maybe_unused]] const std::size_t packed_record = is_packed_task_v<F, Args> ? begin_record(out) : 0;
    std::size_t whole = out.position();  // where the last complete item ends
    EncodeCapture capture;  // the shared objects the items name, for a worker forked before them
    if constexpr (is_packed_task_v<F, Args> && std::contiguous_iterator<It> && std::sized_sentinel_for<End, It> &&
                  std::is_same_v<std::iter_value_t<It>, std::tuple_element_t<0, Args>>) {
        // Numbers straight from a contiguous input (a vector, an array): one copy for the chunk.
        using T = std::tuple_element_t<0, Args>;
        const auto left = static_cast<std::size_t>(end - it);
        const std::size_t k = std::min(
            {n, left, std::max<std::size_t>(1, max_bytes / sizeof(T)), std::size_t{UINT32_MAX}});
        out.write_raw(std::to_address(it), k * sizeof(T));
        it += static_cast<std::iter_difference_t<It>>(k);
        taken = static_cast<std::uint32_t>(k);
        whole = out.position();
    }
    try {
        while (taken < n && it != end) {
            if constexpr (is_packed_task_v<F, Args>) {
                using T = std::tuple_element_t<0, Args>;
                const T argument = [&]() -> T {
                    if constexpr (std::is_same_v<std::decay_t<decltype(*it)>, T>) return *it;
                    else return std::get<0>(*it);  // starmap: a one-element tuple
                }();
                out.write_raw(&argument, sizeof argument);
            } else {
                write_record(out, *it);
            }
            whole = out.position();
            ++taken;
            ++it;
            if (task.frame.size() - start >= max_bytes) break;
        }
    } catch (...) {
        if (!input_error) throw;
        *input_error = std::current_exception();
        out.rewind(whole);
    }
    if constexpr (is_packed_task_v<F, Args>) end_record(out, packed_record);
    else task.segments = capture.segments();
    set_task_count(task.frame, taken);
    end_task_frame(task.frame, {});
    task.count = taken;
    return taken;
}

/// The size of map's next default chunk, with `left` items not yet in a chunk: a quarter of one
/// worker's share of them (rounded up), so the first chunk is Python's default size and the chunks
/// shrink as the input runs out, down to one item (guided scheduling). The last chunks are small:
/// when items take uneven time, no worker is left with a long chunk while the others are idle.
/// (Default chunks are also cut at default_chunk_bytes.)
inline std::size_t default_chunksize(std::size_t left, unsigned processes) {
    if (left == 0) return 1;
    const std::size_t per = std::size_t{processes} * 4;
    return left / per + (left % per ? 1 : 0);
}

}  // namespace mproc::detail
