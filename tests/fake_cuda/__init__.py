"""Fake CUDA on a CPU-only machine: a C++ shim standing in for the CUDA device guard and hooks
(``shim.py``), and a trace of what a CUDA graph would capture with fake CUDA tensors
(``capture_trace.py``, run through ``run_trace.py``). Used by ``tests/test_cuda_capture_trace.py``.

Nothing is imported here: ``run_trace`` must load the shim before anything imports torch.
"""
