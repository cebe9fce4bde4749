// Must not compile: a Pool task that captures. The worker is another process: it cannot see the
// captured variable, so mproc asks for the value as an argument instead.
#include <mproc/pool.hpp>

int main() {
    mproc::Pool pool(1);
    int offset = 3;
#ifdef MPROC_COMPILE_FAIL_CONTROL
    // The control build: the same call with the value passed as an argument compiles.
    return pool.apply([](int x, int off) { return x + off; }, 4, offset) == 7 ? 0 : 1;
#else
    return pool.apply([offset](int x) { return x + offset; }, 4) == 7 ? 0 : 1;
#endif
}
