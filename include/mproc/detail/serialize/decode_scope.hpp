// mproc — the scope in which handles are decoded: default-constructed ones stay empty.
#pragma once

namespace mproc::detail {

/// While alive in a thread, default-constructed handles in that thread are empty instead of
/// creating a new shared object. For decoders (decode<T>, a Pool worker reading task arguments):
/// they default-construct before they read, and creating a Queue (a 1 GiB memfd) only to
/// replace it is wasted work — and, under a container's lock, work every other process waits for.
class HandleDecodeScope {
public:
    HandleDecodeScope() noexcept { ++depth(); }
    ~HandleDecodeScope() { --depth(); }
    HandleDecodeScope(const HandleDecodeScope&) = delete;
    HandleDecodeScope& operator=(const HandleDecodeScope&) = delete;
    static bool active() noexcept { return depth() > 0; }

private:
    static int& depth() noexcept {
        thread_local int d = 0;
        return d;
    }
};

}  // namespace mproc::detail
