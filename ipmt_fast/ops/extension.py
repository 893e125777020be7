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

A real compile (not a load from the cache) says so on stderr when it starts and how long it took
when it ends: it takes tens of seconds, at the first call that needs the library. To build ahead:
``ipmt-fast build`` or ``python -m ipmt_fast.ops.extension`` (:func:`main`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch

EXTENSION_NAME = "ipmt_fast_ops"
# The operator namespace the library registers (``torch.ops.ipmt_fast``).
NAMESPACE = "ipmt_fast"
CPU_SOURCES = ("ops.cpp", "ms_deform_sample_cpu.cpp", "fused_ops.cpp", "cpu_loops.cpp", "patch_conv.cpp",
               "dropout_draws.cpp", "blocks.cpp", "autograd.cpp")
CUDA_SOURCES = ("ms_deform_sample_cuda.cu", "ms_deform_sample_cuda_ops.cpp")
HEADERS = ("ms_deform_sample.h", "ms_deform_sample_binding.h", "ms_deform_sample_cuda.h", "fused_ops.h",
           "patch_conv.h", "cpu_loops.h", "dropout_draws.h", "tensor_utils.h")
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
# Seconds the library took to compile in this process; None when it came from the cache.
_compile_seconds: Optional[float] = None
_on_load: List[Callable[[], None]] = []

# `python -m ipmt_fast.ops.extension` imports the package, which imports this module, before it
# runs this file as __main__; runpy then warns that the module is already imported. The __main__
# block below delegates to the imported module, so that warning says nothing useful.
warnings.filterwarnings("ignore", message=f"'{__name__}' found in sys.modules after import of package",
                        category=RuntimeWarning)


class ExtensionUnavailableError(RuntimeError):
    """The compiled extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """The directory holding the C++/CUDA sources: the ``csrc/`` of the checkout this package was
    imported from, else package ``ipmt_fast.csrc`` (an installed wheel). The checkout comes first:
    an editable install maps ``ipmt_fast.csrc`` to its own checkout, which another checkout on
    ``PYTHONPATH`` would otherwise build in place of its own sources."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if (checkout / CPU_SOURCES[0]).is_file():
        return checkout
    try:
        import ipmt_fast.csrc as package

        for location in package.__path__:
            if (Path(location) / CPU_SOURCES[0]).is_file():
                return Path(location)
    except ImportError:
        pass
    return checkout


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


def _sources(with_cuda: bool) -> List[Path]:
    directory = source_dir()
    return [directory / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]


def _cached_library(with_cuda: bool) -> Optional[Path]:
    """The library a build with these sources and flags already left in the build directory, or
    None if ``load`` would compile (the directory is the one ``load`` itself uses for the name)."""
    from torch.utils import cpp_extension

    sources = _sources(with_cuda)
    if not all(path.is_file() for path in sources):
        return None
    name = _build_name(sources, with_cuda)
    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}{cpp_extension.LIB_EXT}"
    return library if library.is_file() else None


def _announce(message: str) -> None:
    """One line on stderr, drawn above any active progress bar (tqdm's bars also live on stderr)."""
    from tqdm import tqdm

    tqdm.write(f"ipmt-fast: {message}", file=sys.stderr)


def _compile(with_cuda: bool):
    from torch.utils import cpp_extension

    directory = source_dir()
    sources = _sources(with_cuda)
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
    global _compile_seconds
    cuda_reason = cuda_toolkit_reason()
    compiles = _cached_library(with_cuda=cuda_reason is None) is None
    if compiles:
        kind = "C++/CUDA" if cuda_reason is None else "C++"
        _announce(f"building the compiled ops ({kind} extension, once per source change; "
                  f"`ipmt-fast build` does it ahead)...")
    began = time.perf_counter()
    library = None
    if cuda_reason is None:
        try:
            library = _compile(with_cuda=True)
        except ExtensionUnavailableError as error:
            cuda_reason = str(error)
    if library is None:
        library = _compile(with_cuda=False)
    if compiles:
        _compile_seconds = time.perf_counter() - began
        _announce(f"built the compiled ops in {_compile_seconds:.1f} s: {library}")
    return library, cuda_reason


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


@contextlib.contextmanager
def cpu_paths(enabled: bool) -> Iterator[None]:
    """Turn the compiled ops' CPU-only paths on or off inside the ``with`` block.

    On the CPU in float32 and float64 the compiled ops run their pointwise and normalisation work
    as loops of their own, the query update's convolutions on small maps as patch rows and their
    dropout draws as one loop (the same masks as ``bernoulli_``; ``csrc/cpu_loops.h``,
    ``csrc/patch_conv.h``, ``csrc/dropout_draws.h``). With ``enabled=False`` they run the ATen
    compositions, library convolutions and ``bernoulli_`` calls that their CUDA kernels run
    instead, so that arithmetic can be tested and debugged without a GPU. The switch is
    process-wide (every thread), not thread-local; the previous setting is restored on exit.
    Builds the library if needed.
    """
    setter = ctypes.CDLL(load_extension()).ipmt_fast_set_cpu_paths
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    previous = setter(int(bool(enabled)))
    try:
        yield
    finally:
        setter(previous)


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


# --------------------------------------------------------------------------- building ahead
@dataclass(frozen=True)
class BuildReport:
    """What :func:`build` found.

    Attributes:
        library: path of the loaded library.
        compile_seconds: how long this process took to compile it; None if it came from the cache.
        cuda_kernels: whether it has the CUDA kernels.
        no_cuda_reason: why it has none (None when it has them).
    """

    library: str
    compile_seconds: Optional[float]
    cuda_kernels: bool
    no_cuda_reason: Optional[str]


def build() -> BuildReport:
    """Build the library now (or load it from the cache), as the first call of a compiled op
    would. Raises :class:`ExtensionUnavailableError`, with the reason, where it cannot be built."""
    library = load_extension()
    cuda_kernels = built_with_cuda()
    reason = None if cuda_kernels else (_cuda_unavailable or "the library registered no CUDA kernel")
    return BuildReport(library, _compile_seconds, cuda_kernels, reason)


def report_build(require_cuda: bool, prog: str) -> int:
    """Build (or find cached) and print where the library is and whether it has CUDA kernels;
    the exit code: 0, or 1 (after a one-line reason on stderr) if it cannot be built, or has no
    CUDA kernels while ``require_cuda``. Shared by ``ipmt-fast build`` and :func:`main`."""
    try:
        result = build()
    except ExtensionUnavailableError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    if result.compile_seconds is None:
        print("compiled ops: found in the cache, nothing to build")
    else:
        print(f"compiled ops: built in {result.compile_seconds:.1f} s")
    print(f"library: {result.library}")
    print("CUDA kernels: yes" if result.cuda_kernels else f"CUDA kernels: no ({result.no_cuda_reason})")
    if require_cuda and not result.cuda_kernels:
        print(f"{prog}: error: --require-cuda: the library has no CUDA kernels: {result.no_cuda_reason}",
              file=sys.stderr)
        return 1
    return 0


def add_build_arguments(parser) -> None:
    """The options of ``ipmt-fast build`` and ``python -m ipmt_fast.ops.extension``."""
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail (exit code 1) unless the library has CUDA kernels")


BUILD_DESCRIPTION = ("Build the compiled ops (the C++/CUDA extension of the `compiled` backend, which `auto` "
                     "uses) now instead of at the first model call, or find them in the cache; print where the "
                     "library is and whether it has CUDA kernels. Exit code 1, with the reason, if it cannot be built.")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ipmt_fast.ops.extension [--require-cuda]``."""
    import argparse

    prog = "python -m ipmt_fast.ops.extension"
    parser = argparse.ArgumentParser(prog=prog, description=BUILD_DESCRIPTION)
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    return report_build(args.require_cuda, prog)


if __name__ == "__main__":
    # Run as a script this file is a second module object; the op modules registered their
    # load hooks with the package's one, so build through that.
    from ipmt_fast.ops.extension import main as package_main

    sys.exit(package_main())
