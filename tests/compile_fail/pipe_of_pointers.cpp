// Must not compile: a Pipe of a type that cannot be serialised.
#include <mproc/pipe.hpp>

#ifdef MPROC_COMPILE_FAIL_CONTROL
using Subject = double;  // the control build: a Pipe of a serialisable type compiles
#else
using Subject = double*;
#endif

int main() {
    auto [a, b] = mproc::Pipe<Subject>();
    return a.poll() ? 1 : 0;
}
