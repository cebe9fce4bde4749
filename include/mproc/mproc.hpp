// mproc — Python's multiprocessing for C++20. This header brings in every part.
// (<mproc/mpi.hpp>, the Pool over MPI, is separate: it needs MPI, which the rest never does.)
#pragma once

#include "async_result.hpp"
#include "errors.hpp"
#include "guard.hpp"
#include "pipe.hpp"
#include "pool.hpp"
#include "process.hpp"
#include "progress.hpp"
#include "queue.hpp"
#include "serialize.hpp"
#include "shared_dict.hpp"
#include "shared_list.hpp"
#include "shared_memory.hpp"
#include "sync.hpp"
#include "time.hpp"
#include "version.hpp"
#include "wait.hpp"
