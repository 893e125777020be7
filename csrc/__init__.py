"""C++ (CPU) and CUDA sources of the compiled backend, built on first use by ``ipmt_fast.ops.extension``."""
