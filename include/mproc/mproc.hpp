// mproc — Python's multiprocessing for C++20. This header brings in every part.
#pragma once

#include "errors.hpp"
#include "serialize.hpp"
#include "process.hpp"
#include "guard.hpp"
#include "pipe.hpp"
#include "async_result.hpp"
#include "pool.hpp"
#include "progress.hpp"
