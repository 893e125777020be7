"""Test-session setup shared by every test file."""
import os

import pytest
import torch

# Triton kernels run on CPU tensors only in interpreter mode, which must be chosen before the
# first `import triton`; on a machine with a GPU the tests use compiled Triton instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled_extension():
    """The compiled operator library, loaded (``torch.ops.ipmt_fast.*`` registered). Skips where it
    cannot be built for want of a tool, fails where it could and did not (a broken build)."""
    from ipmt_fast.ops import extension

    reason = extension.unavailable_reason("cpu")
    if reason is not None:
        if extension.build_tools_reason() is None:
            pytest.fail(reason)
        pytest.skip(reason)
