// A library only rank 0 loads (with dlopen): a task from it cannot be resolved on the other ranks.
// Built three more times: as a library the workers load from another folder (the same build), and
// as two builds of one library (the second with one more function, so another build-id).
extern "C" int mproc_mpi_plugin_twice(int x) { return 2 * x; }

#ifdef MPROC_MPI_PLUGIN_OTHER_BUILD
extern "C" int mproc_mpi_plugin_other_build() { return 1; }
#endif
