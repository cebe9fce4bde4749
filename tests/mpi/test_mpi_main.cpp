// The main of test_mpi_pool: MPI first, then Catch2 on rank 0. Built like tests/test_main.cpp,
// without the project's warning flags (Catch2's own implementation is not held to them).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mproc/mpi.hpp>

int main(int argc, char** argv) {
    mproc::mpi::Init mpi(argc, argv);  // ranks 1.. serve tasks here and never return
    return Catch::Session().run(argc, argv);
}
