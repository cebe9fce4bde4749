// A shared library the MPI tests link: its function is a Pool task that lives outside the test
// program, so it is named across ranks by its offset in this library.
#include "mpi_testlib.hpp"

#include <cstdint>

int mproc_mpi_testlib_scale(int x) { return 3 * x + 1; }

std::uintptr_t mproc_mpi_testlib_where() { return reinterpret_cast<std::uintptr_t>(&mproc_mpi_testlib_scale); }
