#include <catch2/catch.hpp>
#include <mproc/pipe.hpp>

TEST_CASE("a duplex pipe carries a message each way") {
    auto [a, b] = mproc::Pipe<std::string>();
    a.send("ping");
    CHECK(b.recv() == "ping");
    b.send("pong");
    CHECK(a.recv() == "pong");
}
