#include <catch2/catch.hpp>
#include <mproc/serialize.hpp>

TEST_CASE("a string survives a round trip") {
    const std::string text = "hello";
    CHECK(mproc::from_bytes<std::string>(mproc::to_bytes(text)) == text);
}
