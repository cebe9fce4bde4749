// Must not compile: a Barrier action that captures. The action runs in whichever process arrives
// last, which cannot see another process's captured variables, so mproc asks for a function pointer
// or a stateless callable.
#include <mproc/sync.hpp>

namespace {
int rounds = 0;
}

int main() {
    int local_rounds = 0;
#ifdef MPROC_COMPILE_FAIL_CONTROL
    // The control build: the same action without a capture compiles.
    mproc::Barrier barrier(1, [] { ++rounds; });
#else
    mproc::Barrier barrier(1, [&local_rounds] { ++local_rounds; });
#endif
    barrier.wait();
    return rounds + local_rounds == 1 ? 0 : 1;
}
