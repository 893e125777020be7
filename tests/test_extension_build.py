"""The JIT build of csrc/: cached loading, clear reasons when it cannot build, CUDA sources compile."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import ipmt_fast
from ipmt_fast.ops import extension

# Runs in a fresh interpreter (the build result is cached per process) and prints what it saw.
FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch
    from ipmt_fast.ops import extension, ms_deform_sample

    inputs = (torch.randn(1, 12, 1, 4), [(3, 4)], torch.rand(1, 5, 1, 1, 2, 2), torch.rand(1, 5, 1, 1, 2))
    report = {"reason": extension.unavailable_reason("cpu")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [ms_deform_sample(*inputs) for _ in range(2)]
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    report["auto_matches_torch"] = all(torch.equal(o, ms_deform_sample(*inputs, backend="torch")) for o in outputs)
    try:
        ms_deform_sample(*inputs, backend="compiled")
        report["named_error"] = None
    except RuntimeError as error:
        report["named_error"] = str(error)
    print(json.dumps(report))
""")


def _run_fallback_script(tmp_path, **env):
    environment = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PATH": "/usr/bin:/bin", **env}
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=environment, capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_missing_compiler_is_named_and_auto_falls_back_once(tmp_path):
    report = _run_fallback_script(tmp_path, CXX="/nonexistent/c++")
    assert "C++ compiler '/nonexistent/c++' not found" in report["reason"]
    assert len(report["warnings"]) == 1 and "/nonexistent/c++" in report["warnings"][0]
    assert report["auto_matches_torch"]
    assert "/nonexistent/c++" in report["named_error"]


def test_missing_ninja_is_named(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    report = _run_fallback_script(tmp_path, PATH=str(empty))
    assert "ninja not found" in report["reason"]


def test_sources_are_found_and_the_build_is_cached():
    assert all((extension.source_dir() / name).is_file()
               for name in extension.CPU_SOURCES + extension.CUDA_SOURCES + extension.HEADERS)
    # Those of the checkout the package came from (not an editable install's, if that is another).
    assert extension.source_dir() == Path(ipmt_fast.__file__).resolve().parents[1] / "csrc"
    if extension.build_tools_reason() is not None:
        pytest.skip(extension.build_tools_reason())
    assert extension.unavailable_reason("cpu") is None
    assert extension.load_extension() is extension.load_extension()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch, tmp_path):
    # The flags PyTorch adds when it builds a .cu file (C++ standard, half conversions off).
    command = ["nvcc", "-c", f"-arch={arch}", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
               str(extension.source_dir() / "ms_deform_sample_cuda.cu"), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _cuda_torch_include_dirs():
    """Include directories of a CUDA build of PyTorch: this torch's, or the ones named by
    $IPMT_CUDA_TORCH_INCLUDE (the ``torch/include`` folder of a CUDA wheel), else None."""
    root = os.environ.get("IPMT_CUDA_TORCH_INCLUDE")
    if root:
        return [root, os.path.join(root, "torch", "csrc", "api", "include")]
    if torch.version.cuda is not None:
        return cpp_extension.include_paths(device_type="cuda")
    return None


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cuda_registration_compiles():
    """The CUDA kernels' registration (device guard, current stream) against PyTorch's CUDA
    headers: built only on GPU machines, so checked here when CUDA headers are at hand."""
    includes = _cuda_torch_include_dirs()
    if includes is None:
        pytest.skip("this PyTorch has no CUDA headers; set IPMT_CUDA_TORCH_INCLUDE to a CUDA wheel's torch/include")
    # A CPU build of torch does not look for a toolkit; /usr/local/cuda is the toolkit's default home.
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or DEFAULT_CUDA_HOME
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        pytest.skip(f"no CUDA toolkit headers in {cuda_home} (set CUDA_HOME)")
    flags = [f"-I{path}" for path in includes + [os.path.join(cuda_home, "include"),
                                                  sysconfig.get_paths()["include"], str(extension.source_dir())]]
    command = ["c++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=syntax_check", *flags,
               str(extension.source_dir() / "ms_deform_sample_cuda_ops.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
