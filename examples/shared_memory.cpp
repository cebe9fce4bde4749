// Twin of docs/python-twins/shared_memory.py, Python's shared_memory example across two processes:
//
//     shm_a = shared_memory.SharedMemory(create=True, size=10)
//     shm_a.buf[:4] = bytearray([22, 33, 44, 55])
//     # a child: shm_b = shared_memory.SharedMemory(shm_a.name); print(bytes(shm_b.buf[:5]))
//     #          shm_b.buf[4] = 66
//     print(bytes(shm_a.buf[:5]))    # prints "b'\x16!,7B'"
//     shm_a.close(); shm_a.unlink()
//
// mproc's block has no name: the child gets the handle itself (here by capture; a Queue, a Pipe
// or a Pool task carries one as well), and the block is freed with its last handle, so there is
// no unlink(). The bytes are printed the way Python prints a bytes object.
#include <mproc/process.hpp>
#include <mproc/shared_memory.hpp>

#include <algorithm>
#include <cstddef>
#include <fmt/core.h>
#include <iterator>
#include <span>
#include <string>

std::string python_bytes(std::span<const std::byte> bytes) {
    std::string text = "b'";
    for (std::byte b : bytes) {
        const auto c = static_cast<unsigned char>(b);
        if (c == '\\' || c == '\'') text += fmt::format("\\{}", static_cast<char>(c));
        else if (c >= 0x20 && c < 0x7f) text += static_cast<char>(c);
        else text += fmt::format("\\x{:02x}", c);
    }
    return text + "'";
}

void child(mproc::SharedMemory shm_b) {
    fmt::print("{}\n", python_bytes(shm_b.buf().first(5)));
    shm_b.buf()[4] = std::byte{66};
}

int main() {
    mproc::SharedMemory shm_a(10);
    const std::byte first[] = {std::byte{22}, std::byte{33}, std::byte{44}, std::byte{55}};
    std::copy(std::begin(first), std::end(first), shm_a.buf().begin());
    mproc::Process p(child, shm_a);
    p.start();
    p.join();
    fmt::print("{}\n", python_bytes(shm_a.buf().first(5)));
}
