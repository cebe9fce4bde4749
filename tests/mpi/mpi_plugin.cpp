// A library only rank 0 loads (with dlopen): a task from it cannot be resolved on the other ranks.
extern "C" int mproc_mpi_plugin_twice(int x) { return 2 * x; }
