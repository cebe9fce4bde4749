// co_await on Pool results from plain C++20 coroutines, with no framework: a coroutine type of a few
// lines and a one-thread event loop, both written here.
//
// A coroutine that co_awaits a pending AsyncResult is suspended, and resumed once the result is
// ready: by default on the pool's thread (where callbacks run), or, with resume_on(executor),
// wherever the executor sends it — here, the event loop on the main thread. It prints:
//
//     apply_async: 9, map_async: [1, 4, 9, 16]
//     the task threw: -1 is not positive
//     resume_on: 49, on the main thread
#include <mproc/pool.hpp>

#include <condition_variable>
#include <coroutine>
#include <deque>
#include <exception>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <latch>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

int square(int x) { return x * x; }
int positive(int x) {
    if (x <= 0) throw std::domain_error(fmt::format("{} is not positive", x));
    return x;
}

// The smallest coroutine type: it starts at once, runs to its end and frees itself; nobody awaits it.
struct Detached {
    struct promise_type {
        Detached get_return_object() noexcept { return {}; }
        std::suspend_never initial_suspend() noexcept { return {}; }
        std::suspend_never final_suspend() noexcept { return {}; }
        void return_void() noexcept {}
        void unhandled_exception() noexcept { std::terminate(); }
    };
};

// A one-thread event loop: post() hands it a coroutine to resume (from any thread); run() resumes
// them, in order, on the thread that calls it, until stop().
class EventLoop {
public:
    void post(std::coroutine_handle<> h) {
        {
            std::lock_guard lock(mutex_);
            ready_.push_back(h);
        }
        wake_.notify_one();
    }
    void stop() {
        {
            std::lock_guard lock(mutex_);
            stopped_ = true;
        }
        wake_.notify_one();
    }
    void run() {
        for (;;) {
            std::coroutine_handle<> next;
            {
                std::unique_lock lock(mutex_);
                wake_.wait(lock, [&] { return stopped_ || !ready_.empty(); });
                if (ready_.empty()) return;
                next = ready_.front();
                ready_.pop_front();
            }
            next.resume();
        }
    }

private:
    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<std::coroutine_handle<>> ready_;
    bool stopped_ = false;
};

// Resumed on the pool's thread after each co_await: like a callback, it must not block there (a get()
// of a pending result would throw mproc::Error), but it may co_await again.
Detached on_the_pool(mproc::Pool& pool, std::latch& done) {
    const int nine = co_await pool.apply_async(square, std::tuple{3});
    const std::vector<int> xs = {1, 2, 3, 4};
    const std::vector<int> squares = co_await pool.map_async(square, xs);
    fmt::print("apply_async: {}, map_async: {}\n", nine, squares);
    try {
        co_await pool.apply_async(positive, std::tuple{-1});  // the task's exception is rethrown here
    } catch (const std::domain_error& e) {
        fmt::print("the task threw: {}\n", e.what());
    }
    done.count_down();
}

// Resumed by the event loop, on the thread that runs it.
Detached on_the_loop(mproc::Pool& pool, EventLoop& loop, std::thread::id loop_thread) {
    const auto to_the_loop = [&loop](std::coroutine_handle<> h) { loop.post(h); };
    const int v = co_await pool.apply_async(square, std::tuple{7}).resume_on(to_the_loop);
    fmt::print("resume_on: {}, on the {} thread\n", v, std::this_thread::get_id() == loop_thread ? "main" : "pool's");
    loop.stop();
}

int main() {
    mproc::Pool pool(2);

    std::latch done(1);
    on_the_pool(pool, done);  // returns at its first co_await
    done.wait();

    EventLoop loop;
    on_the_loop(pool, loop, std::this_thread::get_id());
    loop.run();  // resumes on_the_loop here, which then stops the loop
}
