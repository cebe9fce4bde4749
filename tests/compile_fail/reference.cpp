// Must not compile: a reference is an alias of memory in this process, not a value.
#include <mproc/serialize.hpp>

int main() {
#ifdef MPROC_COMPILE_FAIL_CONTROL
    mproc::require_serializable<int>();  // the control build: a value type passes
#else
    mproc::require_serializable<int&>();
#endif
    return 0;
}
