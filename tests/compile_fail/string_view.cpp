// Must not compile: a view points into memory the other process does not have.
#include <mproc/serialize.hpp>
#include <string>
#include <string_view>

#ifdef MPROC_COMPILE_FAIL_CONTROL
using Subject = std::string;  // the control build: the owning string compiles
#else
using Subject = std::string_view;
#endif

int main() {
    Subject value("text");
    return static_cast<int>(mproc::to_bytes(value).size());
}
