"""Building the compiled ops: the first real compile says so once on stderr (and how long it took),
a load from the cache says nothing; ``ipmt-fast build`` / ``python -m ipmt_fast.ops.extension``
report the library and exit non-zero with the reason when it cannot be built."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from ipmt_fast.ops import extension

STARTED = "ipmt-fast: building the compiled ops"
FINISHED = re.compile(r"^ipmt-fast: built the compiled ops in (?P<seconds>\d+\.\d) s: (?P<library>\S+)$", re.M)
# Several calls of a compiled op through `auto` (each asks whether the library is there), then the
# build report, in a fresh interpreter (the build state is per process).
FIRST_USE_SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import torch
    from ipmt_fast.ops import extension, ms_deform_sample

    inputs = (torch.randn(1, 12, 1, 4), [(3, 4)], torch.rand(1, 5, 1, 1, 2, 2), torch.rand(1, 5, 1, 1, 2))
    for _ in range(3):
        ms_deform_sample(*inputs, backend="auto")
    assert extension.unavailable_reason("cpu") is None
    print(json.dumps(dataclasses.asdict(extension.build())))
""")


def _run(argv, extensions_dir, **env):
    environment = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), **env)
    return subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=600)


def _objects_without_the_library(library: Path, extensions_dir: Path) -> None:
    """Copy ``library``'s build folder, object files and ninja state included but not the library
    itself, to where a build with ``TORCH_EXTENSIONS_DIR=extensions_dir`` looks for it (directly
    under it: the default root alone adds a Python/CUDA version folder): ``load`` then sees no library
    and builds for real, and ninja, finding every object up to date, only links (seconds, where a
    compile from nothing takes 1-2 minutes of CI time on 2 cores)."""
    folder = library.parent
    shutil.copytree(folder, extensions_dir / folder.name, ignore=shutil.ignore_patterns(library.name))


def test_a_real_build_says_so_once_and_a_cached_load_says_nothing(compiled_extension, tmp_path):
    """Builds for real (ninja relinks the session's objects) in an extensions folder without the library."""
    _objects_without_the_library(Path(extension.load_extension()), tmp_path)
    first = _run([sys.executable, "-c", FIRST_USE_SCRIPT], tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(STARTED) == 1, first.stderr
    finished = FINISHED.findall(first.stderr)
    assert len(finished) == 1, first.stderr
    seconds, library = float(finished[0][0]), Path(finished[0][1])
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert seconds > 0 and report["compile_seconds"] == pytest.approx(seconds, abs=0.05)
    assert library == Path(report["library"]) and library.is_file() and tmp_path in library.parents

    for argv in ([sys.executable, "-m", "ipmt_fast", "build"], [sys.executable, "-m", "ipmt_fast.ops.extension"]):
        cached = _run(argv, tmp_path)
        assert cached.returncode == 0, cached.stderr
        assert STARTED not in cached.stderr and "Warning" not in cached.stderr, (argv, cached.stderr)
        assert cached.stdout.splitlines() == [
            "compiled ops: found in the cache, nothing to build", f"library: {library}",
            "CUDA kernels: yes" if torch.cuda.is_available() else "CUDA kernels: no (PyTorch sees no CUDA device)"]


def test_build_that_cannot_happen_exits_1_with_the_reason(tmp_path):
    result = _run([sys.executable, "-m", "ipmt_fast", "build"], tmp_path, CXX="/nonexistent/c++")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("ipmt-fast build: error: cannot build the C++ extension: C++ compiler "
                             "'/nonexistent/c++' not found (install g++/clang++ or set CXX)\n")
    assert not any(tmp_path.iterdir())  # refused before anything was built


def test_build_command_reports_the_library_and_its_cuda_kernels(compiled_extension):
    code, stdout, stderr = run_cli("build")
    assert code == 0, stderr
    lines = stdout.splitlines()
    # Built in this process by an earlier test, or found in the cache.
    assert re.fullmatch(r"compiled ops: (found in the cache, nothing to build|built in \d+\.\d s)", lines[0])
    assert lines[1] == f"library: {extension.load_extension()}" and Path(lines[1][len("library: "):]).is_file()
    code, stdout, stderr = run_cli("build", "--require-cuda")
    if torch.cuda.is_available():
        assert code == 0 and stdout.splitlines()[2] == "CUDA kernels: yes", stderr
    else:
        assert code == 1 and stdout.splitlines()[2] == "CUDA kernels: no (PyTorch sees no CUDA device)"
        assert stderr == ("ipmt-fast build: error: --require-cuda: the library has no CUDA kernels: "
                          "PyTorch sees no CUDA device\n")
