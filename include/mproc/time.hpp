// mproc — the one duration type of mproc's public API.
#pragma once

#include <chrono>

namespace mproc {

/// Every timeout in mproc: 100ms, 2s and Seconds{0.5} all convert to it.
using Seconds = std::chrono::duration<double>;

}  // namespace mproc
