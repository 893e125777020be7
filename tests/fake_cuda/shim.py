"""Build and load ``fake_cuda_shim.cpp``: a CUDA device guard and CUDA hooks for a CPU-only torch.

Building and loading happen in different processes, and neither in the test session's own:

* :func:`build_shim` compiles the library in a child process (``torch.utils.cpp_extension.load``
  loads what it builds, and a loaded shim would make that process believe in CUDA). The build is
  cached like the ``compiled`` backend's (``ipmt_fast.ops.extension``): under the default torch
  extensions directory, named by a hash of the source, the flags and the torch version, so a
  later run with the same source only loads it (about 20 s to compile with ninja, once).
* :func:`preload_shim` loads it into the current process before ``torch`` is imported (the CUDA
  hooks take effect only then, see the source's header); the trace runner calls it first.

Only the standard library is imported at module level, so :func:`preload_shim` runs before torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

SOURCE = Path(__file__).resolve().with_name("fake_cuda_shim.cpp")
# The directory to put on PYTHONPATH for `import fake_cuda` (tests/).
PACKAGE_PARENT = SOURCE.parent.parent
LIBRARY_PREFIX = "ipmt_fake_cuda_shim"
CXX_FLAGS = ("-O1",)
# The torch libraries the shim links against (it uses c10 and ATen symbols only), loaded into the
# process with global symbol visibility before the shim so that its references resolve.
TORCH_LIBRARIES = ("libc10.so", "libtorch_cpu.so")
# Seconds a build may take: a cold compile takes ~20 s on a 2-core machine; allow a loaded one.
BUILD_TIMEOUT_S = 600


class ShimError(RuntimeError):
    """The shim could not be built or loaded; the message says why."""


def library_name() -> str:
    """The build's name: the source, flags and torch version hashed (a change rebuilds)."""
    import torch  # the build process only

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(repr((CXX_FLAGS, torch.__version__)).encode())
    return f"{LIBRARY_PREFIX}_{digest.hexdigest()[:16]}"


def _build_in_this_process() -> str:
    """Compile (or find the cached build of) the shim; returns the library's path. Loads it here
    as a side effect of ``cpp_extension.load``: call only in a throwaway process."""
    from torch.utils import cpp_extension

    return cpp_extension.load(name=library_name(), sources=[str(SOURCE)], extra_cflags=list(CXX_FLAGS),
                              is_python_module=False, verbose=False)


def child_environment() -> Dict[str, str]:
    """This process's environment with the directory holding the ``fake_cuda`` package first on
    ``PYTHONPATH``, for the child processes that import it."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), environment.get("PYTHONPATH")]))
    return environment


def build_shim() -> str:
    """Build the shim (or find it built) in a child process; returns the library's path."""
    command = [sys.executable, "-c", "from fake_cuda import shim; print(shim._build_in_this_process())"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                env=child_environment())
    except subprocess.TimeoutExpired as error:
        raise ShimError(f"building {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from error
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise ShimError(f"building {SOURCE.name} failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return lines[-1]


def preload_shim(path: str) -> None:
    """Load the shim at ``path`` into this process. Must run before ``import torch``."""
    if "torch" in sys.modules:
        raise ShimError("the fake CUDA shim must be loaded before torch is imported: torch caches its "
                        "CUDA hooks when it is imported")
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ShimError("torch is not installed")
    torch_lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    for name in TORCH_LIBRARIES:
        ctypes.CDLL(str(torch_lib / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(os.fspath(path), mode=ctypes.RTLD_GLOBAL)
