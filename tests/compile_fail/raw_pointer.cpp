// Must not compile: a raw pointer points into memory the other process does not have.
#include <mproc/serialize.hpp>

#ifdef MPROC_COMPILE_FAIL_CONTROL
using Subject = int;  // the control build: the same program with a serialisable type compiles
#else
using Subject = int*;
#endif

int main() {
    Subject value{};
    return static_cast<int>(mproc::to_bytes(value).size());
}
