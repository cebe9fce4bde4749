// mproc — Pool: a set of worker processes that run tasks, as Python's multiprocessing.Pool does —
// without its failures: a worker that dies fails only the item it was running, and the pool
// replaces it and goes on.
//
//     mproc::Pool pool;                                   // cpu_count() workers
//     int r = pool.apply(square, 7);                      // 49
//     auto ar = pool.apply_async(square, std::tuple{3}, [&](int v) { ... });
//     std::vector<int> sq = pool.map(square, xs);         // ordered
//     for (int v : pool.imap(square, xs)) { ... }         // lazily, in order
//     pool.close(); pool.join();
//
// Tasks are function pointers or stateless callables: a worker is another process, so values go in
// as arguments (serialised), never as captures.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <new>
#include <optional>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "async_result.hpp"
#include "detail/os/cpu.hpp"
#include "detail/pool/chunking.hpp"
#include "detail/pool/engine.hpp"
#include "detail/pool/feed.hpp"
#include "detail/pool/fork_engine.hpp"
#include "detail/pool/invoke.hpp"
#include "detail/pool/wire.hpp"
#include "errors.hpp"
#include "pool_options.hpp"
#include "pool_stats.hpp"
#include "serialize.hpp"

namespace mproc {

/// The lazy result of Pool::imap / imap_unordered: an input range. Only a bounded window of
/// items is in flight; the input is read as the loop advances, so an endless input works when the
/// loop breaks. Dereferencing an item whose task failed rethrows its exception; the iteration
/// can go on past it.
template <class F, class Args, class View, bool Ordered> class ImapRange {
public:
    using value_type = detail::task_result_t<F, Args>;
    static_assert(!std::is_void_v<value_type>, "mproc::Pool::imap: the task returns void; use map() instead");

private:
    template <template <class> class Nothrow>
    static constexpr bool nothrow_movable = Nothrow<F>::value && Nothrow<View>::value &&
                                            Nothrow<std::optional<std::ranges::iterator_t<View>>>::value &&
                                            Nothrow<typename detail::ImapState<value_type, Ordered>::Item>::value;

public:
    ImapRange(detail::PoolEngine& engine, F f, View view, std::size_t chunksize, CallOptions options = {})
        // A task holds at most UINT32_MAX items (encode_chunk): a larger chunksize is that one.
        : f_(f), view_(std::move(view)), chunksize_(chunksize == 0 ? 1 : std::min<std::size_t>(chunksize, UINT32_MAX)),
          state_(std::make_shared<detail::ImapState<value_type, Ordered>>(&engine)) {
        state_->engine = engine.link();
        state_->max_retries = options.max_retries;
        const std::size_t chunks_in_flight = std::max<std::size_t>(8, std::size_t{engine.processes()} * 4);
        // Items in flight at most; a chunksize so large that the product wraps means all of them.
        window_ = chunksize_ > SIZE_MAX / chunks_in_flight ? SIZE_MAX : chunks_in_flight * chunksize_;
    }
    // As noexcept as moving its parts is: a view that owns a std::deque allocates as it moves,
    // and declared noexcept regardless, running out of memory there would end the program.
    ImapRange(ImapRange&&) noexcept(nothrow_movable<std::is_nothrow_move_constructible>) = default;
    ImapRange& operator=(ImapRange&&) noexcept(nothrow_movable<std::is_nothrow_move_assignable>) = default;
    ImapRange(const ImapRange&) = delete;
    ImapRange& operator=(const ImapRange&) = delete;
    /// Leaving the loop early cancels what is still in flight: no worker goes on with items whose
    /// results nobody will read.
    /// (In another process — a forked child holding a copy — or when memory runs out, nothing is
    /// cancelled: the pool's teardown settles the tasks.)
    ~ImapRange() {
        if (!state_) return;
        try {
            state_->abandon();
        } catch (...) {}
    }

    class iterator {
    public:
        using value_type = ImapRange::value_type;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        /// The current item's value; rethrows its task's exception.
        const value_type& operator*() const {
            if (range_->current_.error) std::rethrow_exception(range_->current_.error);
            return *range_->current_.value;
        }
        iterator& operator++() {
            range_->advance();
            return *this;
        }
        void operator++(int) { ++*this; }
        friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

    private:
        friend class ImapRange;
        explicit iterator(ImapRange* r) : range_(r) {}
        bool at_end() const noexcept { return !range_ || range_->done_; }
        ImapRange* range_ = nullptr;
    };

    /// Starts the iteration and waits for the first item. An imap is a single-pass range:
    /// calling begin() a second time throws mproc::Error.
    iterator begin() {
        if (started_) throw Error("Pool::imap: begin() called twice: an imap range is single-pass");
        started_ = true;
        try {
            input_ = std::ranges::begin(view_);
        } catch (...) {
            input_failed();
        }
        advance();
        return iterator(this);
    }
    std::default_sentinel_t end() const noexcept { return {}; }

private:
    void top_up() {
        while (!input_done_ && submitted_ - consumed_ < window_) {
            if (state_->aborted()) {  // the call failed (on the pool's thread, at any time): no more of it starts
                input_done_ = true;
                break;
            }
            // The pool is reached through the call's link, never by a pointer of the range's own:
            // a range may outlive its pool (then the rest of the call fails, as a closed pool's).
            const std::optional<std::uint64_t> id = state_->engine->next_task_id();
            if (!id) {
                input_error_ = std::make_exception_ptr(Error("mproc::Pool::imap: the pool was destroyed"));
                input_done_ = true;
                break;
            }
            detail::Task task;
            task.sink = state_;
            task.first = submitted_;
            std::exception_ptr input_error;
            const std::uint32_t n = detail::encode_chunk<F, Args>(task, *id, f_, *input_, std::ranges::end(view_),
                                                                  chunksize_, SIZE_MAX, &input_error);
            if (n < chunksize_) input_done_ = true;
            if (input_error) {
                input_error_ = std::move(input_error);
                input_done_ = true;
            }
            if (n == 0) break;
            try {
                state_->engine->submit(std::move(task));
            } catch (...) {
                // Not taken (the pool closed, no memory): its items, already read from the input,
                // fail in their place, as an input that threw there does.
                input_error_ = std::current_exception();
                input_done_ = true;
                break;
            }
            submitted_ += n;
        }
    }
    /// The input itself threw: every item before it is still yielded, then its exception, then
    /// the end.
    void input_failed() {
        input_error_ = std::current_exception();
        input_done_ = true;
    }
    void advance() {
        // In a forked child, before top_up takes the link's lock (a copy a parent thread held).
        state_->require_owner("iterating a Pool's imap");
        if (input_error_shown_) {
            done_ = true;
            current_ = {};
            return;
        }
        top_up();
        if (consumed_ == submitted_ && input_done_) {
            if (input_error_) {
                // The input's exception, in the position of the item it failed to give.
                current_ = {std::nullopt, std::exchange(input_error_, nullptr)};
                input_error_shown_ = true;
                return;
            }
            done_ = true;
            return;
        }
        current_ = state_->take(consumed_);
        ++consumed_;
    }

    F f_;
    View view_;
    std::optional<std::ranges::iterator_t<View>> input_;
    std::size_t chunksize_;
    std::size_t window_ = 0;
    std::shared_ptr<detail::ImapState<value_type, Ordered>> state_;
    typename detail::ImapState<value_type, Ordered>::Item current_;
    std::size_t submitted_ = 0;
    std::size_t consumed_ = 0;
    std::exception_ptr input_error_;  // what the input threw, shown after the items before it
    bool started_ = false;
    bool input_done_ = false;
    bool input_error_shown_ = false;
    bool done_ = false;
};

/// A pool of worker processes. Move-only; the destructor terminates the workers (like leaving
/// Python's `with Pool() as p:`), so call close() and join() to let queued work finish.
class Pool {
public:
    template <class R> using Callback = typename detail::SingleResult<R>::Callback;
    using ErrorCallback = std::function<void(std::exception_ptr)>;

    /// cpu_count() workers.
    Pool() : Pool(PoolOptions{}) {}
    explicit Pool(unsigned processes) : Pool(PoolOptions{.processes = processes}) {}
    explicit Pool(PoolOptions options) : engine_(std::make_unique<detail::ForkEngine>(std::move(options))) {}
    Pool(Pool&&) noexcept = default;
    Pool& operator=(Pool&& other) noexcept {
        if (this != &other) {
            release_engine();
            engine_ = std::move(other.engine_);
        }
        return *this;
    }
    /// Terminates the workers. Inside one of this pool's own callbacks, the teardown finishes on
    /// the pool's thread once the callback has returned.
    ~Pool() { release_engine(); }

    unsigned processes() const { return engine().processes(); }

    // ---- one call ---------------------------------------------------------------------------

    /// Runs f(args...) in a worker and waits for the result.
    template <class F, class... A> auto apply(F f, A&&... args) {
        return apply_async(f, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)).get();
    }

    /// Runs f(args...) in a worker. `callback` (or `error_callback`) runs in this process, on the
    /// pool's thread, before get() returns.
    template <class F, class... A, class R = detail::task_result_t<F, std::tuple<std::decay_t<A>...>>>
    AsyncResult<R> apply_async(F f, std::tuple<A...> args = {},
                               std::type_identity_t<typename detail::SingleResult<R>::Callback> callback = {},
                               ErrorCallback error_callback = {}, CallOptions options = {}) {
        using Args = std::tuple<std::decay_t<A>...>;
        detail::require_task_callable<F>();
        detail::require_invocable_with<F, Args>();
        auto state = std::make_shared<detail::SingleResult<R>>(1, std::move(callback), std::move(error_callback),
                                                               &engine());
        state->engine = engine().link();
        state->max_retries = options.max_retries;
        detail::Task task;
        task.sink = state;
        task.id = engine().next_task_id();
        task.count = 1;
        state->call = task.id;
        detail::begin_chunk_frame<F, Args>(task.frame, task.id, task.id, 1, f);
        Writer out(task.frame);
        {
            detail::EncodeCapture capture;  // the shared objects it names, for a worker forked before them
            detail::write_record(out, Args(std::move(args)));
            task.segments = capture.segments();
        }
        detail::end_task_frame(task.frame, {});
        engine().submit(std::move(task));
        return AsyncResult<R>(std::shared_ptr<detail::ValueState<detail::collected_t<R, false>>>(state));
    }

    // ---- many calls -------------------------------------------------------------------------

    /// f(x) for every x, results in input order. Waits for every task; if any failed, throws the
    /// exception of the first (lowest-index) failure. chunksize 0: Python's default.
    /// The input is encoded as the workers go, a window ahead of the results (detail/pool/feed.hpp).
    template <class F, std::ranges::input_range Range,
              class R = detail::task_result_t<F, detail::item_args_t<Range, false>>>
    auto map(F f, Range&& xs, std::size_t chunksize = 0, CallOptions options = {}) {
        return submit_many<F, detail::item_args_t<Range, false>, R>(f, std::forward<Range>(xs), chunksize,
                                                                    typename detail::ManyResult<R>::Callback{}, {},
                                                                    options, /*paced=*/true)
            .get();
    }
    template <class F, std::ranges::input_range Range,
              class R = detail::task_result_t<F, detail::item_args_t<Range, false>>>
    AsyncResult<detail::collected_t<R, true>> map_async(
        F f, Range&& xs, std::size_t chunksize = 0,
        std::type_identity_t<typename detail::ManyResult<R>::Callback> callback = {}, ErrorCallback error_callback = {},
        CallOptions options = {}) {
        return submit_many<F, detail::item_args_t<Range, false>, R>(
            f, std::forward<Range>(xs), chunksize, std::move(callback), std::move(error_callback), options);
    }

    /// f(a, b, ...) for every tuple (a, b, ...), results in input order (see map).
    template <class F, std::ranges::input_range Range,
              class R = detail::task_result_t<F, detail::item_args_t<Range, true>>>
    auto starmap(F f, Range&& xs, std::size_t chunksize = 0, CallOptions options = {}) {
        return submit_many<F, detail::item_args_t<Range, true>, R>(f, std::forward<Range>(xs), chunksize,
                                                                   typename detail::ManyResult<R>::Callback{}, {},
                                                                   options, /*paced=*/true)
            .get();
    }
    template <class F, std::ranges::input_range Range,
              class R = detail::task_result_t<F, detail::item_args_t<Range, true>>>
    AsyncResult<detail::collected_t<R, true>> starmap_async(
        F f, Range&& xs, std::size_t chunksize = 0,
        std::type_identity_t<typename detail::ManyResult<R>::Callback> callback = {}, ErrorCallback error_callback = {},
        CallOptions options = {}) {
        return submit_many<F, detail::item_args_t<Range, true>, R>(
            f, std::forward<Range>(xs), chunksize, std::move(callback), std::move(error_callback), options);
    }

    /// f(x) for every x, lazily and in order, as results arrive.
    template <class F, std::ranges::input_range Range>
    auto imap(F f, Range&& xs, std::size_t chunksize = 1, CallOptions options = {}) {
        return make_imap<F, true>(f, std::forward<Range>(xs), chunksize, options);
    }
    /// f(x) for every x, lazily, in the order they complete.
    template <class F, std::ranges::input_range Range>
    auto imap_unordered(F f, Range&& xs, std::size_t chunksize = 1, CallOptions options = {}) {
        return make_imap<F, false>(f, std::forward<Range>(xs), chunksize, options);
    }

    // ---- lifetime ---------------------------------------------------------------------------

    /// No more tasks; submitting now throws mproc::Error.
    void close() { engine().close(); }
    /// After close(): waits for every queued task and callback, then for the workers to exit.
    void join() { (void)engine().join(); }
    /// join() that gives up after `timeout`: false when the tasks or the workers have not finished
    /// by then. The pool stays joinable: call join() again (or terminate()).
    [[nodiscard]] bool join(Seconds timeout) { return engine().join(timeout); }
    /// Stops the workers now; pending results fail with mproc::Error.
    void terminate() { engine().terminate(); }

    /// The live workers' pids (they change as workers are replaced). A worker is listed once it
    /// has started: always before its first result is delivered, not always by the time the
    /// constructor returns.
    std::vector<pid_t> worker_pids() { return engine().worker_pids(); }

    /// What the workers are doing and have done: per seat, its worker's pid, tasks done, busy and
    /// idle time, the task it runs now and for how long, its resident memory, and how many workers
    /// it has had replaced and why; and the pool's totals. Formats with fmt as a table.
    PoolStats stats() { return engine().stats(); }

protected:
    /// A pool whose tasks another engine runs (mproc::mpi::Pool: MPI ranks).
    explicit Pool(std::unique_ptr<detail::PoolEngine> engine) : engine_(std::move(engine)) {}

private:
    detail::PoolEngine& engine() const {
        if (!engine_) throw Error("this Pool was moved from");
        return *engine_;
    }
    void release_engine() noexcept {
        // A forked child's copy: its thread, processes and waiters are the parent's, and destroying
        // its condition variables may wait for those waiters. The copy is left as it is.
        if (engine_ && !engine_->owned_here()) keep_inherited(engine_.release());
        if (engine_ && engine_->retire_from_callback()) (void)engine_.release();  // it deletes itself
        engine_.reset();
    }
    /// Keeps a child's copy of its parent's engine reachable, so that a child that ends with
    /// exit() reports no leak of it (under LeakSanitizer).
    /// (A list pushed without a lock: threads of the child may drop copies at once.)
    static void keep_inherited(detail::PoolEngine* engine) noexcept {
        struct Kept {
            detail::PoolEngine* engine;
            Kept* next;
        };
        static std::atomic<Kept*> kept{nullptr};
        auto* node = new (std::nothrow) Kept{engine, kept.load(std::memory_order_relaxed)};
        if (!node) return;  // no memory: it stays as it is, unreachable
        while (!kept.compare_exchange_weak(node->next, node, std::memory_order_release, std::memory_order_relaxed)) {}
    }

    template <class F, class Args, class R, class Range, class Cb>
    AsyncResult<detail::collected_t<R, true>> submit_many(F f, Range&& xs, std::size_t chunksize, Cb callback,
                                                          ErrorCallback error_callback, CallOptions options,
                                                          bool paced = false) {
        detail::require_task_callable<F>();
        detail::require_invocable_with<F, Args>();
        if constexpr (!std::ranges::forward_range<Range> && !std::ranges::sized_range<Range>) {
            // A single-pass input: gathered whole first, to learn its length.
            std::vector<std::ranges::range_value_t<Range>> items;
            for (auto&& x : xs) items.push_back(std::forward<decltype(x)>(x));
            return submit_many<F, Args, R>(f, items, chunksize, std::move(callback), std::move(error_callback), options,
                                           paced);
        } else {
            const auto count = static_cast<std::size_t>(std::ranges::distance(xs));
            // Default chunks are guided (each sized by the items left, see default_chunksize) and
            // cut short at default_chunk_bytes of items; a chunksize the caller gives is kept
            // exactly (max_tasks_per_child counts chunks).
            const bool guided = chunksize == 0;
            const std::size_t max_bytes = guided ? detail::default_chunk_bytes : SIZE_MAX;
            auto state = std::make_shared<detail::ManyResult<R>>(count, std::move(callback), std::move(error_callback),
                                                                 &engine());
            state->engine = engine().link();
            state->max_retries = options.max_retries;
            if (count == 0) engine().post([state] { state->complete_empty(); });
            // The tasks go out as they are encoded; if the input throws, the feed withdraws the
            // part already handed over (detail/pool/feed.hpp).
            detail::TaskFeed feed(engine(), state, count, paced);
            auto it = std::ranges::begin(xs);
            const auto end = std::ranges::end(xs);
            for (std::size_t first = 0; first < count;) {
                detail::Task& task = feed.next();
                task.first = first;
                const std::size_t n = guided ? detail::default_chunksize(count - first, engine().processes())
                                             : chunksize;
                first += detail::encode_chunk<F, Args>(task, engine().next_task_id(), f, it, end, n, max_bytes);
                feed.encoded(first);
            }
            feed.finish();
            return AsyncResult<detail::collected_t<R, true>>(
                std::shared_ptr<detail::ValueState<detail::collected_t<R, true>>>(state));
        }
    }

    template <class F, bool Ordered, class Range>
    auto make_imap(F f, Range&& xs, std::size_t chunksize, CallOptions options) {
        using Args = detail::item_args_t<Range, false>;
        detail::require_task_callable<F>();
        detail::require_invocable_with<F, Args>();
        using View = std::views::all_t<Range>;
        return ImapRange<F, Args, View, Ordered>(engine(), f, std::views::all(std::forward<Range>(xs)), chunksize,
                                                 options);
    }

    std::unique_ptr<detail::PoolEngine> engine_;
};

}  // namespace mproc
