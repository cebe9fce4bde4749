// Writes the seed corpora of mproc's fuzz targets (the files under tests/fuzz/corpus/):
//   make_corpus <dir>   ->  <dir>/decode/*  and  <dir>/shm_ops/*
// decode seeds: one valid encoding of a sample value of every type fuzz_decode knows (first byte:
// the type's index), and framed streams (first byte 0xF0, then the chunking seed): whole frames,
// an empty frame, a truncated one. shm_ops seeds: short operation programs for fuzz_shm_ops.
#include <mproc/serialize.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_types.hpp"

namespace fs = std::filesystem;
using namespace mproc_fuzz;

namespace {

void write_file(const fs::path& path, const std::vector<std::byte>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("cannot write " + path.string());
}

std::vector<std::byte> with_prefix(std::initializer_list<std::uint8_t> prefix, const std::vector<std::byte>& rest) {
    std::vector<std::byte> out;
    for (auto b : prefix) out.push_back(std::byte{b});
    out.insert(out.end(), rest.begin(), rest.end());
    return out;
}

Types samples() {
    Types t;
    std::get<0>(t) = -1234567890123;
    std::get<1>(t) = true;
    std::get<2>(t) = Colour::blue;
    std::get<3>(t) = "hello, mproc";
    std::get<4>(t) = {1, -2, 3, 1 << 30};
    std::get<5>(t) = {true, false, true};
    std::get<6>(t) = {"", "a", "bc", std::string(40, 'x')};
    std::get<7>(t) = {{}, {1, 2, 3}, {255}};
    std::get<8>(t) = {{"count", {15}}, {"empty", {}}, {"xs", {-1, 0, 1}}};
    std::get<9>(t) = {3, 1, 2};
    std::get<10>(t) = {{1, "one"}, {2, "two"}};
    std::get<11>(t) = {"alpha", "beta"};
    std::get<12>(t) = {"key", 7};
    std::get<13>(t) = {-3, "tuple", {1, 2, 3}};
    std::get<14>(t) = std::vector<std::string>{"v", "w"};
    std::get<15>(t) = std::vector<std::optional<std::string>>{std::nullopt, "x"};
    std::get<16>(t) = std::chrono::milliseconds(1500);
    std::get<17>(t) = std::vector<std::monostate>(3);
    std::get<18>(t) = std::vector<Empty>(2);
    std::get<19>(t) = {{1, {}}, {5, {}}};
    std::get<21>(t) = Plain{42, 7, {'a', 'b', 'c', 'd', 'e', 'f'}};
    std::get<22>(t) = {Plain{1, 2, {}}, Plain{-1, 65535, {'z'}}};
    std::get<23>(t) = Point{"p", {1.5, -2.25}, 9};
    std::get<24>(t) = {Point{"a", {}, std::nullopt}, Point{"b", {0.0}, 1}};
    std::get<25>(t) = {{"i", std::int64_t{3}}, {"d", 2.5}, {"s", std::string("str")}};
    return t;
}

std::vector<std::byte> frame(const std::vector<std::byte>& payload) {
    std::vector<std::byte> out(8);
    const std::uint64_t n = payload.size();
    std::memcpy(out.data(), &n, 8);
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_corpus <corpus dir>\n");
        return 2;
    }
    const fs::path root = argv[1];
    fs::create_directories(root / "decode");
    fs::create_directories(root / "shm_ops");

    const Types t = samples();
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        (write_file(root / "decode" / ("type-" + std::to_string(I)),
                    with_prefix({static_cast<std::uint8_t>(I)}, mproc::to_bytes(std::get<I>(t)))),
         ...);
    }(std::make_index_sequence<type_count>{});

    // Framed streams: strings, an empty frame, a frame that does not decode, a truncated tail.
    std::vector<std::byte> stream;
    for (const char* s : {"first", "", "third message"}) {
        const auto f = frame(mproc::to_bytes(std::string(s)));
        stream.insert(stream.end(), f.begin(), f.end());
    }
    const auto empty = frame({});
    stream.insert(stream.end(), empty.begin(), empty.end());
    const auto bad = frame({std::byte{0xff}, std::byte{0xff}});
    stream.insert(stream.end(), bad.begin(), bad.end());
    write_file(root / "decode" / "frames-whole", with_prefix({0xF0, 3}, stream));
    auto truncated = stream;
    const auto big = frame(mproc::to_bytes(std::string(5000, 'q')));
    truncated.insert(truncated.end(), big.begin(), big.end() - 100);
    write_file(root / "decode" / "frames-truncated", with_prefix({0xF1, 200}, truncated));

    // shm_ops programs (opcodes: see fuzz_shm_ops.cpp).
    const std::vector<std::vector<std::uint8_t>> programs = {
        // put "abc"-ish items through both handles, get them back, check sizes.
        {0, 3, 'a', 1, 5, 'b', 2, 1, 3, 4, 3, 4, 17},
        // fill the bounded queue past maxsize, then drain.
        [] {
            std::vector<std::uint8_t> p;
            for (int i = 0; i < 34; ++i) p.insert(p.end(), {0, 2, static_cast<std::uint8_t>('a' + i % 26)});
            p.insert(p.end(), {4, 17, 4});
            return p;
        }(),
        // dict: set, get, update, erase, pop, compare.
        {6, 1, 4, 'x', 8, 1, 11, 1, 3, 'y', 1, 9, 1, 6, 2, 2, 'z', 10, 2, 15, 14, 0, 16},
        // counters: set, +=, += on absent key, compare.
        {13, 3, 10, 0, 12, 3, 5, 12, 4, 1, 16},
        // big values fill the dict to Full.
        [] {
            std::vector<std::uint8_t> p;
            for (int i = 0; i < 20; ++i) p.insert(p.end(), {6, static_cast<std::uint8_t>(i), 0x80, 0xff, 0x3f, 'v'});
            p.insert(p.end(), {15});
            return p;
        }(),
        // close one handle, put through it (Error) and through the other.
        {5, 0, 1, 'a', 1, 1, 'b', 2, 0, 17},
    };
    for (std::size_t i = 0; i < programs.size(); ++i) {
        std::vector<std::byte> bytes;
        for (auto b : programs[i]) bytes.push_back(std::byte{b});
        write_file(root / "shm_ops" / ("program-" + std::to_string(i)), bytes);
    }
    std::printf("seeds written under %s\n", root.c_str());
    return 0;
}
