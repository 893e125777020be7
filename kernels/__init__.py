"""Triton kernels and their launchers (shipped as ``ipmt_fast.kernels``).

They know nothing of IPMT: tensors and strides in, tensors out. Importing a module here imports
``triton``; set ``TRITON_INTERPRET=1`` before that to run them on CPU tensors.
"""
