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


@pytest.fixture
def without_cpu_paths(compiled_extension):
    """The compiled ops with their CPU-only loops and patch-row convolution off: the ATen
    compositions and library convolutions their CUDA kernels run (ipmt_fast.ops.extension.cpu_paths)."""
    from ipmt_fast.ops.extension import cpu_paths

    with cpu_paths(False):
        yield


@pytest.fixture
def backend(request):
    """The backend name of an indirect parametrization: ``cpu_paths.WITHOUT_CPU_PATHS`` is
    "compiled" with its CPU-only paths off for the test, any other name is itself."""
    from cpu_paths import WITHOUT_CPU_PATHS

    if request.param == WITHOUT_CPU_PATHS:
        request.getfixturevalue("without_cpu_paths")
        return "compiled"
    return request.param


@pytest.fixture(params=[True, False], ids=["cpu-paths", "without-cpu-paths"])
def either_cpu_paths(request, compiled_extension):
    """The test twice: the compiled ops with their CPU-only paths on (the default), then off."""
    from ipmt_fast.ops.extension import cpu_paths

    with cpu_paths(request.param):
        yield request.param
