// The main of test_mpi_pool: MPI first, then Catch2's session (tests/catch_runner.cpp) on rank 0.
#include <mproc/mpi.hpp>

#include "catch_runner.hpp"

int main(int argc, char** argv) {
    mproc::mpi::Init mpi(argc, argv);  // ranks 1.. serve tasks here and never return
    return mproc_test::run_catch(argc, argv);
}
