"""Just-in-time build of the C++ / CUDA sources in ``csrc/`` (the ``compiled`` backend).

The sources are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja) into the
default torch extensions directory (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``),
under a name keyed by a hash of the sources and build flags: a later process with the same sources
loads the cached library without compiling. The library registers its operators with the PyTorch
dispatcher (``TORCH_LIBRARY(ipmt_fast, ...)``): they are called as ``torch.ops.ipmt_fast.<name>``,
and each op module registers their fake (shape-only) implementations, autograd and autocast rules
through :func:`on_load` once the library is in. The CUDA kernels are compiled in only when PyTorch
sees a GPU and a CUDA toolkit (``nvcc``) is found; otherwise the library serves CPU tensors only.

A build that cannot happen (no C++ compiler, no ninja, a compile error) is not an exception at
import time: :func:`unavailable_reason` returns a sentence naming what is missing, which the backend
registry reports (``auto`` falls back with one warning; asking for ``compiled`` by name raises).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, List, Optional

import torch

EXTENSION_NAME = "ipmt_fast_ops"
# The operator namespace the library registers (``torch.ops.ipmt_fast``).
NAMESPACE = "ipmt_fast"
CPU_SOURCES = ("ops.cpp", "ms_deform_sample_cpu.cpp", "fused_ops.cpp", "blocks.cpp", "autograd.cpp")
CUDA_SOURCES = ("ms_deform_sample_cuda.cu", "ms_deform_sample_cuda_ops.cpp")
HEADERS = ("ms_deform_sample.h", "ms_deform_sample_binding.h", "ms_deform_sample_cuda.h", "fused_ops.h",
           "tensor_utils.h")
# -ffp-contract=off: a product and a sum stay two roundings unless the code asks for a fused
# multiply-add (the deformable sampling reproduces grid_sample's rounding, ms_deform_sample.h).
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LD_FLAGS = ("-fopenmp",)
CUDA_FLAGS = ("-O3",)
# How much of a failed build's compiler output a reason quotes.
BUILD_LOG_TAIL_CHARS = 2000

_lock = threading.Lock()
_library_path: Optional[str] = None
_build_error: Optional[str] = None
_cuda_unavailable: Optional[str] = None
_on_load: List[Callable[[], None]] = []


class ExtensionUnavailableError(RuntimeError):
    """The compiled extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """The directory holding the C++/CUDA sources: package ``ipmt_fast.csrc`` (the checkout's ``csrc/``)."""
    try:
        import ipmt_fast.csrc as package

        for location in package.__path__:
            if (Path(location) / CPU_SOURCES[0]).is_file():
                return Path(location)
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / "csrc"


def cuda_toolkit_reason() -> Optional[str]:
    """Why the CUDA kernels cannot be compiled in, or None if they can."""
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        return "no CUDA toolkit found (install one or set CUDA_HOME so that $CUDA_HOME/bin/nvcc exists)"
    if not (Path(cuda_home) / "bin" / "nvcc").is_file():
        return f"nvcc not found in CUDA_HOME={cuda_home} (expected {cuda_home}/bin/nvcc)"
    return None


def build_tools_reason() -> Optional[str]:
    """Which build tool (C++ compiler, ninja) is missing, or None if both are present."""
    from torch.utils import cpp_extension

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"C++ compiler {compiler!r} not found (install g++/clang++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja not found on PATH (pip install ninja)")
    return "; ".join(missing) or None


def _build_name(sources, with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for path in sorted(sources) + [source_dir() / h for h in HEADERS]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    # The source folder too: checkouts with equal sources would otherwise share a build folder whose
    # build file names the other checkout's sources, and rebuild in turn.
    digest.update(repr((CXX_FLAGS, LD_FLAGS, CUDA_FLAGS, with_cuda, torch.__version__, str(source_dir()))).encode())
    return f"{EXTENSION_NAME}_{digest.hexdigest()[:16]}"


def _compile(with_cuda: bool):
    from torch.utils import cpp_extension

    directory = source_dir()
    sources = [directory / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise ExtensionUnavailableError(f"C++/CUDA sources not found: {', '.join(missing)}")
    try:
        return cpp_extension.load(
            name=_build_name(sources, with_cuda), sources=[str(p) for p in sources],
            extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=list(CUDA_FLAGS), extra_ldflags=list(LD_FLAGS),
            extra_include_paths=[str(directory)], with_cuda=with_cuda, is_python_module=False, verbose=False)
    except Exception as error:  # compiler errors arrive as RuntimeError / CalledProcessError
        log = str(error)[-BUILD_LOG_TAIL_CHARS:]
        kind = "C++/CUDA" if with_cuda else "C++"
        raise ExtensionUnavailableError(f"building the {kind} extension from {directory} failed: {log}") from error


def _build():
    """(library path, why it has no CUDA kernels or None). A failed CUDA build falls back to a
    CPU-only build, so the CPU kernels stay usable and the CUDA reason says what went wrong."""
    tools = build_tools_reason()
    if tools is not None:
        raise ExtensionUnavailableError(f"cannot build the C++ extension: {tools}")
    cuda_reason = cuda_toolkit_reason()
    if cuda_reason is None:
        try:
            return _compile(with_cuda=True), None
        except ExtensionUnavailableError as error:
            cuda_reason = str(error)
    return _compile(with_cuda=False), cuda_reason


def on_load(register: Callable[[], None]) -> None:
    """Run ``register`` (an op module's Python-side registrations of its C++ ops) once the library
    is loaded: now if it already is, else right after it loads."""
    with _lock:
        _on_load.append(register)
        loaded = _library_path is not None
    if loaded:
        register()


def load_extension() -> str:
    """Build (on first use) and load the operator library; returns its path. Once per process."""
    global _library_path, _build_error, _cuda_unavailable
    with _lock:
        newly_loaded = False
        if _library_path is None and _build_error is None:
            try:
                _library_path, _cuda_unavailable = _build()
                newly_loaded = True
            except ExtensionUnavailableError as error:
                _build_error = str(error)
        if _library_path is None:
            raise ExtensionUnavailableError(_build_error)
        registrations = list(_on_load) if newly_loaded else []
    for register in registrations:
        register()
    return _library_path


def built_with_cuda() -> bool:
    """Whether the loaded library has CUDA kernels (it registered ``ms_deform_sample`` for CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::ms_deform_sample", "CUDA")


def unavailable_reason(device_type: str) -> Optional[str]:
    """Why the compiled kernels cannot run on ``device_type`` tensors, or None if they can.

    Tries the build (once per process); this is the registry's availability callback.
    """
    try:
        load_extension()
    except ExtensionUnavailableError as error:
        return str(error)
    if device_type == "cuda" and not built_with_cuda():
        return f"the C++ extension was built without CUDA kernels: {_cuda_unavailable}"
    return None
