"""Test-session setup shared by every test file."""
import os

import torch

# Triton kernels run on CPU tensors only in interpreter mode, which must be chosen before the
# first `import triton`; on a machine with a GPU the tests use compiled Triton instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
