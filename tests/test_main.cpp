// The main of every test program but test_mpi_pool (which starts MPI first).
#include "catch_runner.hpp"

int main(int argc, char** argv) { return mproc_test::run_catch(argc, argv); }
