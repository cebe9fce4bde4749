// Must not compile: a std::function holds code and state that cannot cross a process boundary.
#include <functional>
#include <mproc/serialize.hpp>

#ifdef MPROC_COMPILE_FAIL_CONTROL
using Subject = std::vector<int>;  // the control build: the same program with a serialisable type compiles
#else
using Subject = std::function<void()>;
#endif

int main() {
    Subject value{};
    return static_cast<int>(mproc::to_bytes(value).size());
}
