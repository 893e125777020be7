"""A backend name for the tests: the compiled ops with their CPU-only paths off.

On the CPU in float32 and float64 the compiled ops run loops and patch-row convolutions of their
own (csrc/cpu_loops.h, csrc/patch_conv.h); on CUDA they run ATen compositions and library
convolutions instead. Parametrizing a test's ``backend`` over ``WITHOUT_CPU_PATHS`` with
``indirect=True`` (the ``backend`` fixture of tests/conftest.py) runs it on the compiled backend
with those paths off, so the arithmetic a GPU executes is tested on the CPU too.
"""

WITHOUT_CPU_PATHS = "compiled-without-cpu-paths"


def with_compositions(backends):
    """``backends`` and, where "compiled" is one of them, ``WITHOUT_CPU_PATHS`` after them."""
    return tuple(backends) + ((WITHOUT_CPU_PATHS,) if "compiled" in backends else ())
