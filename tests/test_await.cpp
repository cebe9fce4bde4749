// co_await on an AsyncResult from a plain coroutine (no framework): values, vectors, void, exceptions,
// a result already ready, resumption on the pool's thread or through resume_on's executor, several and
// many awaiters, a pool terminated or destroyed under an awaiting coroutine, a cancelled result, and a
// resumption that throws.
#include "test_pool_common.hpp"

#include <coroutine>
#include <exception>
#include <numeric>

using namespace std::chrono_literals;
using pool_test::Watchdog;

namespace {

int square(int x) { return x * x; }
void nothing(int) {}
int fail_on_odd(int x) {
    if (x % 2) throw std::domain_error("odd " + std::to_string(x));
    return x;
}
void void_fail(int x) { throw std::out_of_range("void " + std::to_string(x)); }

std::vector<int> iota_vec(int n) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), 0);
    return v;
}

/// The smallest coroutine type: it starts at once, runs to its end and frees itself; nobody awaits it.
struct Eager {
    struct promise_type {
        Eager get_return_object() noexcept { return {}; }
        std::suspend_never initial_suspend() noexcept { return {}; }
        std::suspend_never final_suspend() noexcept { return {}; }
        void return_void() noexcept {}
        void unhandled_exception() noexcept { std::terminate(); }
    };
};

/// What a test coroutine saw, and a way for the test to wait (failing instead of hanging) until it is
/// done. Declared before the Pool, so it outlives the pool's thread.
struct Outcome {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    std::thread::id resumed_on;  // the thread the coroutine ran on after its (first) co_await
    std::string error;           // "<type>: <what>" of what the co_await threw
    std::string note;            // anything else the coroutine says

    void resumed() {
        std::lock_guard lock(mutex);
        resumed_on = std::this_thread::get_id();
    }
    void caught() {
        std::lock_guard lock(mutex);
        error = mproc::detail::describe_current_exception();
    }
    void set_note(std::string text) {
        std::lock_guard lock(mutex);
        note = std::move(text);
    }
    bool has_note() {
        std::lock_guard lock(mutex);
        return !note.empty();
    }
    void finish() {
        std::lock_guard lock(mutex);
        done = true;
        cv.notify_all();
    }
    bool is_done() {
        std::lock_guard lock(mutex);
        return done;
    }
    bool wait() {
        std::unique_lock lock(mutex);
        return cv.wait_for(lock, 120s, [&] { return done; });
    }
};

/// Handles an executor was given, and the thread it was called on.
struct Inbox {
    std::mutex mutex;
    std::condition_variable cv;
    std::vector<std::coroutine_handle<>> handles;
    std::vector<std::thread::id> threads;

    auto executor() {
        return [this](std::coroutine_handle<> h) {
            std::lock_guard lock(mutex);
            handles.push_back(h);
            threads.push_back(std::this_thread::get_id());
            cv.notify_all();
        };
    }
    /// Waits (failing instead of hanging) for the next handle and takes it.
    std::coroutine_handle<> take(std::thread::id* thread = nullptr) {
        std::unique_lock lock(mutex);
        if (!cv.wait_for(lock, 120s, [&] { return !handles.empty(); })) return {};
        auto h = handles.front();
        handles.erase(handles.begin());
        if (thread) *thread = threads.front();
        threads.erase(threads.begin());
        return h;
    }
    std::size_t size() {
        std::lock_guard lock(mutex);
        return handles.size();
    }
};

}  // namespace

// ---- values, vectors, void, exceptions --------------------------------------------------------

namespace {

struct Values {
    int value = 0;
    std::vector<int> squares;
    std::vector<int> none = {-1};
    bool void_done = false;
    bool callback_ran_first = false;
};

Eager await_values(mproc::Pool& pool, int gate_fd, std::atomic<bool>& callback_ran, Values& got, Outcome& out) {
    try {
        got.value = co_await pool.apply_async(pool_test::gated, std::tuple{gate_fd, 7},
                                              [&](int) { callback_ran = true; });
        out.resumed();
        got.callback_ran_first = callback_ran.load();
        got.squares = co_await pool.map_async(square, iota_vec(20), 3);
        const std::vector<int> empty;
        got.none = co_await pool.map_async(square, empty);  // completed by the pool's thread, with no task
        co_await pool.apply_async(nothing, std::tuple{1});
        co_await pool.map_async(nothing, iota_vec(5));
        got.void_done = true;
    } catch (...) {
        out.caught();
    }
    out.finish();
}

}  // namespace

TEST_CASE(
    "co_await gives an apply_async value, a map_async vector and a void result, resuming after the callback on "
    "the pool's thread") {
    pool_test::Gate gate;
    Watchdog dog(200s, "co_await values");
    Outcome out;
    Values got;
    std::atomic<bool> callback_ran{false};
    {
        mproc::Pool pool(2);
        await_values(pool, gate.read_fd(), callback_ran, got, out);
        CHECK_FALSE(out.is_done());  // suspended: the gated task has not returned
        gate.open();
        REQUIRE(out.wait());
        INFO("error: " << out.error);
        CHECK(out.error.empty());
        CHECK(got.value == 7);
        CHECK(got.callback_ran_first);
        CHECK(got.squares ==
              std::vector<int>{0, 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121, 144, 169, 196, 225, 256, 289, 324, 361});
        CHECK(got.none.empty());
        CHECK(got.void_done);
        CHECK(out.resumed_on != std::this_thread::get_id());
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

namespace {

Eager await_error(mproc::AsyncResult<int> ar, Outcome& out) {
    try {
        (void)co_await std::move(ar);
    } catch (...) {
        out.resumed();
        out.caught();
    }
    out.finish();
}
Eager await_vector_error(mproc::AsyncResult<std::vector<int>> ar, Outcome& out) {
    try {
        (void)co_await ar;
    } catch (...) {
        out.caught();
    }
    out.finish();
}
Eager await_void_error(mproc::AsyncResult<void> ar, Outcome& out) {
    try {
        co_await ar;
    } catch (...) {
        out.caught();
    }
    out.finish();
}

}  // namespace

TEST_CASE("co_await rethrows the task's exception in the coroutine, as get() does") {
    Watchdog dog(200s, "co_await exceptions");
    Outcome one, many, none;
    {
        mproc::Pool pool(2);
        await_error(pool.apply_async(fail_on_odd, std::tuple{3}), one);
        await_vector_error(pool.map_async(fail_on_odd, iota_vec(40), 1), many);
        await_void_error(pool.apply_async(void_fail, std::tuple{5}), none);
        REQUIRE(one.wait());
        REQUIRE(many.wait());
        REQUIRE(none.wait());
        CHECK(one.error == "std::domain_error: odd 3");
        CHECK(many.error == "std::domain_error: odd 1");  // the lowest-index failure, as get()
        CHECK(none.error == "std::out_of_range: void 5");
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- a result already ready; lvalues and rvalues ------------------------------------------------

namespace {

Eager await_ready_twice(mproc::AsyncResult<std::vector<int>>& ar, std::vector<int>& first, std::vector<int>& second,
                        Outcome& out) {
    first = co_await ar;  // an lvalue: copied
    out.resumed();
    second = co_await ar;
    out.finish();
}
Eager await_moved(mproc::AsyncResult<std::vector<int>>& ar, std::vector<int>& got, Outcome& out) {
    got = co_await std::move(ar);  // an rvalue: moved out
    out.resumed();
    out.finish();
}

}  // namespace

TEST_CASE("co_await of a ready result does not suspend; an lvalue is copied from, an rvalue moved out of") {
    Watchdog dog(200s, "co_await ready");
    {
        mproc::Pool pool(2);
        auto ar = pool.map_async(square, iota_vec(10));
        REQUIRE(ar.wait(60s));
        Outcome out;
        std::vector<int> first, second;
        await_ready_twice(ar, first, second, out);
        // Ran to its end inside the call, on this thread: it never suspended.
        CHECK(out.is_done());
        CHECK(out.resumed_on == std::this_thread::get_id());
        const std::vector<int> squares = {0, 1, 4, 9, 16, 25, 36, 49, 64, 81};
        CHECK(first == squares);
        CHECK(second == squares);
        CHECK(ar.get() == squares);  // still there

        Outcome moved_out;
        std::vector<int> got;
        await_moved(ar, got, moved_out);
        CHECK(moved_out.is_done());
        CHECK(got == squares);
        CHECK(ar.get().empty());  // moved out, as std::move(ar).get() does
        CHECK(ar.valid());
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

namespace {

Eager await_empty(mproc::AsyncResult<int> ar, Outcome& out) {
    try {
        (void)co_await ar;
    } catch (...) {
        out.caught();
    }
    out.finish();
}
Eager await_empty_on(mproc::AsyncResult<void>& ar, Inbox& inbox, Outcome& out) {
    try {
        co_await ar.resume_on(inbox.executor());
    } catch (...) {
        out.caught();
    }
    out.finish();
}

}  // namespace

TEST_CASE("co_await of a default-constructed or moved-from AsyncResult throws mproc::Error") {
    Watchdog dog(200s, "co_await empty");
    Outcome none;
    await_empty(mproc::AsyncResult<int>{}, none);
    CHECK(none.is_done());
    CHECK_THAT(none.error, Catch::StartsWith("mproc::Error: this AsyncResult holds no result"));
    {
        mproc::Pool pool(1);
        auto ar = pool.apply_async(nothing, std::tuple{1});
        auto taken = std::move(ar);
        Outcome moved_from;
        Inbox inbox;
        await_empty_on(ar, inbox, moved_from);  // NOLINT(bugprone-use-after-move): what is tested
        CHECK(moved_from.is_done());
        CHECK_THAT(moved_from.error, Catch::StartsWith("mproc::Error: this AsyncResult holds no result"));
        CHECK(inbox.size() == 0);
        taken.get();
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- where the coroutine resumes ---------------------------------------------------------------

namespace {

Eager await_on(mproc::AsyncResult<int>& ar, Inbox& inbox, int& got, Outcome& out) {
    try {
        got = co_await ar.resume_on(inbox.executor());
        out.resumed();
    } catch (...) {
        out.caught();
    }
    out.finish();
}

}  // namespace

TEST_CASE(
    "resume_on: the executor gets the handle on the pool's thread, and the coroutine resumes where it is "
    "resumed") {
    pool_test::Gate gate;
    Watchdog dog(200s, "resume_on");
    Outcome out, ready_out;
    Inbox inbox;
    {
        mproc::Pool pool(2);
        auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 11});
        int got = 0;
        await_on(ar, inbox, got, out);
        CHECK_FALSE(out.is_done());
        gate.open();
        std::thread::id executor_thread;
        const auto handle = inbox.take(&executor_thread);
        REQUIRE(handle);
        CHECK(executor_thread != std::this_thread::get_id());
        CHECK_FALSE(out.is_done());  // handed over, not resumed
        CHECK(ar.ready());
        handle.resume();  // this thread is the "event loop"
        CHECK(out.is_done());
        CHECK(out.error.empty());
        CHECK(got == 11);
        CHECK(out.resumed_on == std::this_thread::get_id());

        // Ready already: no suspension, the executor is not called.
        int again = 0;
        await_on(ar, inbox, again, ready_out);
        CHECK(ready_out.is_done());
        CHECK(again == 11);
        CHECK(inbox.size() == 0);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

namespace {

struct Nested {
    int a = 0, b = 0;
};

Eager await_then_block(mproc::AsyncResult<int> a, mproc::AsyncResult<int>& b, Nested& got, Outcome& out) {
    try {
        got.a = co_await std::move(a);
        out.resumed();
        try {
            (void)b.get();  // on the pool's thread: would wait for the thread it blocks
        } catch (const mproc::Error& e) {
            out.set_note(e.what());
        }
        got.b = co_await b;  // fine: nothing blocks
    } catch (...) {
        out.caught();
    }
    out.finish();
}

}  // namespace

TEST_CASE(
    "a coroutine resumed on the pool's thread gets mproc::Error from a blocking get() of a pending result, and "
    "may co_await it") {
    pool_test::Gate gate_a, gate_b;
    Watchdog dog(200s, "get inside a resumed coroutine");
    Outcome out;
    Nested got;
    {
        mproc::Pool pool(2);
        auto b = pool.apply_async(pool_test::gated, std::tuple{gate_b.read_fd(), 2});
        await_then_block(pool.apply_async(pool_test::gated, std::tuple{gate_a.read_fd(), 1}), b, got, out);
        gate_a.open();
        // The coroutine is now waiting for b, having found get() refused.
        const auto deadline = std::chrono::steady_clock::now() + 120s;
        while (!out.has_note() && !out.is_done() && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(1ms);
        CHECK_FALSE(out.is_done());
        gate_b.open();
        REQUIRE(out.wait());
        INFO("error: " << out.error);
        CHECK(out.error.empty());
        CHECK(got.a == 1);
        CHECK(got.b == 2);
        CHECK_THAT(out.note, Catch::Contains("would deadlock"));
        CHECK(out.resumed_on != std::this_thread::get_id());
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- several and many awaiters -----------------------------------------------------------------

namespace {

Eager await_shared(mproc::AsyncResult<int> ar, int& got, Outcome& out) {
    got = co_await ar;
    out.finish();
}

/// 200 of these at once: each awaits a result of its own, held in its frame (which the resumption frees).
Eager await_own(mproc::Pool& pool, int i, std::atomic<long>& sum, std::atomic<int>& left, std::mutex& mutex,
                std::condition_variable& cv) {
    long v = 0;
    try {
        v = co_await pool.apply_async(square, std::tuple{i});
    } catch (...) {
        v = -1'000'000;
    }
    sum += v;
    if (--left == 0) {
        std::lock_guard lock(mutex);
        cv.notify_all();
    }
}

}  // namespace

TEST_CASE("several coroutines awaiting one result are all resumed") {
    pool_test::Gate gate;
    Watchdog dog(200s, "several awaiters");
    Outcome outs[4];
    int got[4] = {};
    {
        mproc::Pool pool(2);
        auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 5});
        for (int i = 0; i < 4; ++i) await_shared(ar, got[i], outs[i]);  // copies of ar share its result
        for (auto& o : outs) CHECK_FALSE(o.is_done());
        gate.open();
        for (int i = 0; i < 4; ++i) {
            REQUIRE(outs[i].wait());
            CHECK(got[i] == 5);
        }
        CHECK(ar.get() == 5);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE("200 coroutines each awaiting its own result all complete") {
    Watchdog dog(300s, "200 awaiters");
    constexpr int n = 200;
    std::atomic<long> sum{0};
    std::atomic<int> left{n};
    std::mutex mutex;
    std::condition_variable cv;
    {
        mproc::Pool pool(2);
        for (int i = 0; i < n; ++i) await_own(pool, i, sum, left, mutex, cv);
        {
            std::unique_lock lock(mutex);
            REQUIRE(cv.wait_for(lock, 240s, [&] { return left.load() == 0; }));
        }
        long expected = 0;
        for (long i = 0; i < n; ++i) expected += i * i;
        CHECK(sum.load() == expected);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- a pool that ends under an awaiting coroutine -----------------------------------------------

TEST_CASE("terminate() or destroying the pool under an awaiting coroutine resumes it with mproc::Error") {
    pool_test::Gate gate;  // never opened: the tasks never finish
    Watchdog dog(200s, "terminate under co_await");
    Outcome by_terminate, by_terminate_on, by_destructor;
    Inbox inbox;
    int got = 0;
    {
        mproc::Pool pool(2);
        await_error(pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1}), by_terminate);
        auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 2});
        await_on(ar, inbox, got, by_terminate_on);
        CHECK_FALSE(by_terminate.is_done());
        pool.terminate();
        // The pending results failed inside terminate(), which resumed the coroutine on this thread.
        CHECK(by_terminate.is_done());
        CHECK_THAT(by_terminate.error, Catch::StartsWith("mproc::Error: ") && Catch::Contains("terminated"));
        CHECK(by_terminate.resumed_on == std::this_thread::get_id());
        // Through an executor: handed over, and its co_await throws once resumed.
        const auto handle = inbox.take();
        REQUIRE(handle);
        CHECK_FALSE(by_terminate_on.is_done());
        handle.resume();
        CHECK(by_terminate_on.is_done());
        CHECK_THAT(by_terminate_on.error, Catch::StartsWith("mproc::Error: ") && Catch::Contains("terminated"));
    }
    {
        mproc::Pool pool(2);
        await_error(pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 3}), by_destructor);
        CHECK_FALSE(by_destructor.is_done());
    }
    CHECK(by_destructor.is_done());
    CHECK_THAT(by_destructor.error, Catch::StartsWith("mproc::Error: "));
    POOL_REQUIRE_NOTHING_LEFT();
}

TEST_CASE(
    "cancel() of a result a coroutine awaits resumes it on the pool's thread: its co_await throws "
    "CancelledError") {
    pool_test::Gate gate;  // never opened: the task runs until cancelled
    Watchdog dog(200s, "cancel under co_await");
    Outcome out;
    {
        mproc::Pool pool(2);
        auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 1});
        await_error(ar, out);
        CHECK_FALSE(out.is_done());
        CHECK(ar.cancel());
        REQUIRE(out.wait());
        CHECK_THAT(out.error, Catch::StartsWith("mproc::CancelledError: "));
        CHECK(out.resumed_on != std::this_thread::get_id());
        CHECK(pool.apply(square, 6) == 36);
    }
    POOL_REQUIRE_NOTHING_LEFT();
}

// ---- a resumption that throws ------------------------------------------------------------------

namespace {

/// A coroutine whose escaping exception leaves through resume(), to whoever resumed it.
struct Escaping {
    struct promise_type {
        std::coroutine_handle<promise_type>* self;
        explicit promise_type(std::coroutine_handle<promise_type>* out, mproc::AsyncResult<int>&) : self(out) {}
        Escaping get_return_object() noexcept {
            *self = std::coroutine_handle<promise_type>::from_promise(*this);
            return {};
        }
        std::suspend_never initial_suspend() noexcept { return {}; }
        std::suspend_always final_suspend() noexcept { return {}; }  // the test destroys it
        void return_void() noexcept {}
        void unhandled_exception() { throw; }
    };
};

Escaping throw_after_resume(std::coroutine_handle<Escaping::promise_type>*, mproc::AsyncResult<int>& ar) {
    (void)co_await ar;
    throw std::runtime_error("escaped the coroutine");
}

Eager await_with_throwing_executor(mproc::AsyncResult<int>& ar, std::coroutine_handle<>& kept, Outcome& out) {
    (void)co_await ar.resume_on([&kept](std::coroutine_handle<> h) {
        kept = h;
        throw std::length_error("executor refused");
    });
    out.finish();  // never: the coroutine stays suspended (the test destroys it)
}

}  // namespace

TEST_CASE("a resumption or an executor that throws is reported on stderr; the pool and the other awaiters go on") {
    pool_test::Gate gate;
    Watchdog dog(200s, "throwing resumption");
    mproc_test::StderrCapture err;
    std::coroutine_handle<Escaping::promise_type> escaping;
    std::coroutine_handle<> refused;
    Outcome stuck, after;
    int got = 0;
    {
        mproc::Pool pool(2);
        auto ar = pool.apply_async(pool_test::gated, std::tuple{gate.read_fd(), 4});
        throw_after_resume(&escaping, ar);
        await_with_throwing_executor(ar, refused, stuck);
        await_shared(ar, got, after);  // registered last: runs after the two that throw
        REQUIRE(escaping);
        gate.open();
        REQUIRE(after.wait());
        CHECK(got == 4);
        CHECK(pool.apply(square, 9) == 81);  // the pool's thread lives on
        CHECK_FALSE(stuck.is_done());
        pool.close();
        pool.join();  // the pool's thread has finished with both
    }
    CHECK(escaping.done());  // ended by its exception, at its final suspend point
    escaping.destroy();
    REQUIRE(refused);
    CHECK_FALSE(refused.done());
    refused.destroy();  // suspended in its co_await for ever: its frame is freed here
    err.restore();
    const std::string text = err.text();
    INFO("stderr: " << text);
    CHECK_THAT(text, Catch::Contains("co_await resumption threw std::runtime_error: escaped the coroutine"));
    CHECK_THAT(text, Catch::Contains("co_await resumption threw std::length_error: executor refused"));
    POOL_REQUIRE_NOTHING_LEFT();
}
