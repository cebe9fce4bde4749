// Must not compile: a struct that is neither trivially copyable nor has a serialize member.
#include <mproc/serialize.hpp>
#include <string>

#ifdef MPROC_COMPILE_FAIL_CONTROL
struct LabelWithoutSerialize {  // the control build: the same struct with a serialize member compiles
    std::string label;
    int count = 0;
    template <class Archive> void serialize(Archive& ar) { ar(label, count); }
};
#else
struct LabelWithoutSerialize {
    std::string label;
    int count = 0;
};
#endif

int main() {
    LabelWithoutSerialize value{};
    const auto bytes = mproc::to_bytes(value);
    return static_cast<int>(mproc::from_bytes<LabelWithoutSerialize>(bytes).count);
}
