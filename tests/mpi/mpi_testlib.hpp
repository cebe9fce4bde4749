#pragma once
#include <cstdint>

/// 3x + 1.
int mproc_mpi_testlib_scale(int x);
/// Where mproc_mpi_testlib_scale is loaded in the calling process.
std::uintptr_t mproc_mpi_testlib_where();
