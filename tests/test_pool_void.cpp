// Pool tasks that return void: map/starmap return void once every task has run (the README says so), and
// apply_async/map_async give an AsyncResult<void>.
#include "test_pool_common.hpp"

#include <numeric>

using namespace std::chrono_literals;

namespace {

void log_task(int i) { pool_test::log_line(i); }
void log_sum(int a, int b) { pool_test::log_line(a + b); }
void fail_on_odd(int i) {
    if (i % 2) throw std::domain_error("odd " + std::to_string(i));
}

std::vector<int> iota_vec(int n, int from = 0) {
    std::vector<int> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), from);
    return v;
}

}  // namespace

TEST_CASE("map and starmap of a function returning void return once every task has run") {
    pool_test::TaskLog log;  // before the pool: workers see its path
    mproc::Pool pool(2);
    const auto xs = iota_vec(300);
    static_assert(std::is_void_v<decltype(pool.map(log_task, xs))>);
    for (std::size_t chunksize : {std::size_t{0}, std::size_t{1}, std::size_t{7}}) {
        pool.map(log_task, xs, chunksize);
    }
    std::multiset<long> thrice;
    for (int x : xs) thrice.insert({x, x, x});
    CHECK(log.numbers() == thrice);

    auto am = pool.map_async(log_task, std::vector<int>{1000, 1001}, 1);
    static_assert(std::is_same_v<decltype(am), mproc::AsyncResult<void>>);
    am.get();
    CHECK(am.successful());
    CHECK(log.numbers().count(1000) == 1);
    CHECK(log.numbers().count(1001) == 1);

    std::vector<std::tuple<int, int>> pairs = {{2000, 1}, {2000, 2}, {2000, 3}};
    static_assert(std::is_void_v<decltype(pool.starmap(log_sum, pairs))>);
    pool.starmap(log_sum, pairs);
    CHECK(log.numbers().count(2003) == 1);
    pool.starmap_async(log_sum, pairs, 1).get();
    CHECK(log.numbers().count(2003) == 2);
    CHECK(log.numbers().size() == 900 + 2 + 6);
}

TEST_CASE("apply_async of a void task: callback with no argument, AsyncResult<void>") {
    pool_test::TaskLog log;
    mproc::Pool pool(2);
    bool void_callback = false;
    auto av = pool.apply_async(log_task, std::tuple{3000}, [&] { void_callback = true; });
    static_assert(std::is_same_v<decltype(av), mproc::AsyncResult<void>>);
    av.get();
    CHECK(void_callback);
    CHECK(log.numbers().count(3000) == 1);
    pool.apply(log_task, 3001);
    CHECK(log.numbers().count(3001) == 1);

    std::exception_ptr error;
    auto bad = pool.apply_async(fail_on_odd, std::tuple{3}, {}, [&](std::exception_ptr e) { error = e; });
    CHECK_THROWS_AS(bad.get(), std::domain_error);
    CHECK(error);
    CHECK_THROWS_WITH(pool.map(fail_on_odd, iota_vec(10)), "odd 1");
}

TEST_CASE("map of a void task over an empty input") {
    mproc::Pool pool(2);
    pool.map(log_task, std::vector<int>{});
    pool.map_async(log_task, std::vector<int>{}).get();
    CHECK(pool.apply([](int x) { return x + 1; }, 1) == 2);
}
