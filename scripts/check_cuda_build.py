"""Build ``csrc/`` with its CUDA kernels against a CUDA build of PyTorch, load it, and check that
every operator the library defines has a CUDA kernel. Needs no GPU.

The package itself compiles the CUDA sources only where PyTorch sees a GPU
(``ipmt_fast.ops.extension.cuda_toolkit_reason``), so on a machine without one this script drives
the same build: the source lists and flags are imported from ``ipmt_fast.ops.extension``, the
architectures come from ``TORCH_CUDA_ARCH_LIST``. The build, the load and the per-operator check
run in a child process that imports torch alone, so every ``ipmt_fast::`` operator there is the
library's, whatever the package registers or loads at import; the operators the package defines
from Python (the Triton ones) are checked in this process. It prints what it ran and what it found
and exits non-zero on any failure. Run it with the Python of an environment holding a CUDA build of
torch and this repository (``scripts/check_cuda_build.sh`` sets one up and calls it).

    python scripts/check_cuda_build.py [--archs "8.0;9.0"] [--build-dir DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sm_80 (A100) and sm_90 (H100, where the benches ran).
DEFAULT_ARCHS = "8.0;9.0"
# Dispatch keys whose kernel serves CUDA tensors.
SERVES_CUDA = ("CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
# The names this script needs from ipmt_fast.ops.extension (the package's own build recipe).
EXTENSION_NAMES = ("EXTENSION_NAME", "NAMESPACE", "CPU_SOURCES", "CUDA_SOURCES", "HEADERS", "CXX_FLAGS", "CUDA_FLAGS",
                   "LD_FLAGS", "source_dir")


def fail(message: str) -> "None":
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def command_output(command) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"<{error}>"
    return (result.stdout + result.stderr).strip()


def find_cuda_home() -> Path:
    """$CUDA_HOME, else the toolkit that the ``nvcc`` on PATH belongs to (following wrappers and links)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        fail("no nvcc on PATH and CUDA_HOME unset: install a CUDA toolkit or set CUDA_HOME")
    # The nvcc on PATH may be a shell wrapper around the toolkit's binary: ask nvcc itself where its
    # toolkit is (a dry-run compile prints it as TOP), falling back to ../.. of its real path.
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder, "empty.cu")
        empty.write_text("")
        for line in command_output([nvcc, "--dryrun", "-c", str(empty), "-o", str(empty.with_suffix(".o"))]).splitlines():
            if line.startswith("#$ TOP="):
                return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(os.path.realpath(nvcc)).parents[1]


def wheel_include_dirs() -> list:
    """Include folders of the nvidia-* wheels beside this torch (cuBLAS, cuSPARSE, ... headers that a
    minimal toolkit lacks)."""
    folders = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        folders += sorted(str(p) for p in Path(site, "nvidia").glob("*/include") if p.is_dir())
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS),
                        help=f"TORCH_CUDA_ARCH_LIST (default $TORCH_CUDA_ARCH_LIST or {DEFAULT_ARCHS!r})")
    parser.add_argument("--build-dir", type=Path, help="build folder (default: a new temporary one, so it compiles)")
    parser.add_argument("--build-and-list", metavar="RECIPE_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_and_list:  # the child process of the check below
        build_and_list(json.loads(args.build_and_list))
        return

    # cpp_extension reads CUDA_HOME and the architecture list when imported / when building.
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = args.archs

    import torch
    nvcc = cuda_home / "bin" / "nvcc"
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    # Changes to what is built or checked; the logs this script writes do not count.
    changed = [line for line in command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", ".",
                                                ":(exclude)scripts/logs"]).splitlines() if line]
    print(f"repository: {REPO} at {command_output(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])}"
          f" ({len(changed)} uncommitted changes outside scripts/logs)")
    print(f"python: {platform.python_version()} ({sys.executable})")
    print(f"torch: {torch.__version__}, built for CUDA {torch.version.cuda}; torch.cuda.is_available(): "
          f"{torch.cuda.is_available()}")
    try:
        import triton
    except ImportError:
        triton = None
    print(f"triton: {triton.__version__ if triton else 'not installed'}")
    print(f"CUDA_HOME: {cuda_home}")
    print(f"nvcc: {' '.join(command_output([str(nvcc), '--version']).splitlines()[-2:])}")
    print(f"c++: {command_output([os.environ.get('CXX', 'c++'), '--version']).splitlines()[0]}")
    print(f"TORCH_CUDA_ARCH_LIST: {args.archs}")
    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} is a CPU build: run this with a CUDA build of torch")
    if not nvcc.is_file():
        fail(f"nvcc not found at {nvcc}")

    from ipmt_fast.ops import extension

    missing = [name for name in EXTENSION_NAMES if not hasattr(extension, name)]
    if missing:
        fail(f"ipmt_fast.ops.extension no longer defines {', '.join(missing)}: update this script")
    namespace = extension.NAMESPACE
    directory = extension.source_dir()
    sources = [directory / name for name in extension.CPU_SOURCES + extension.CUDA_SOURCES]
    absent = [str(p) for p in sources + [directory / h for h in extension.HEADERS] if not p.is_file()]
    if absent:
        fail(f"sources listed in ipmt_fast.ops.extension not found: {', '.join(absent)}")

    # Searched after the toolkit's own headers (-idirafter): the wheels fill in only what it lacks.
    wheel_includes = wheel_include_dirs()
    after_cxx = [flag for folder in wheel_includes for flag in ("-idirafter", folder)]
    after_nvcc = [f"-Xcompiler=-idirafter,{folder}" for folder in wheel_includes]
    print(f"sources: {', '.join(p.name for p in sources)}")
    print(f"nvidia wheel include folders (searched last): {', '.join(wheel_includes) or 'none'}")

    # The Triton ops are defined from Python (torch.library.triton_op) when ipmt_fast is imported:
    # one device-generic kernel (CompositeExplicitAutograd) that launches on the tensors' device, so
    # a CUDA kernel or a composite one both serve CUDA tensors. Ops with a CPU kernel come from a
    # library the package may have loaded itself; the build below is checked in its own process.
    python_ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith(namespace + "::")
                        and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"))
    print(f"--- {len(python_ops)} operators defined from Python (kernel for CUDA tensors: its own or composite)")
    lacking = []
    for name in python_ops:
        served = [key for key in SERVES_CUDA if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
        print(f"{name:55s} {', '.join(served) or 'NONE'}")
        if not served:
            lacking.append(name)

    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="ipmt_fast_cuda_build_"))
    recipe = {"name": f"{extension.EXTENSION_NAME}_cuda_check", "sources": [str(p) for p in sources],
              "extra_cflags": list(extension.CXX_FLAGS) + after_cxx,
              "extra_cuda_cflags": list(extension.CUDA_FLAGS) + after_nvcc,
              "extra_ldflags": list(extension.LD_FLAGS), "extra_include_paths": [str(directory)],
              "build_directory": str(build_dir), "namespace": namespace, "archs": args.archs,
              "cuobjdump": str(cuobjdump_path(cuda_home, triton) or "")}
    # A fresh process that imports torch only: every operator in the namespace there is the library's.
    library_check = subprocess.run([sys.executable, __file__, "--build-and-list", json.dumps(recipe)])
    if library_check.returncode:
        fail("the library check above failed" + (f"; and {len(lacking)} Python-defined operators have no kernel for "
                                                  f"CUDA tensors: {', '.join(lacking)}" if lacking else ""))
    if lacking:
        fail(f"{len(lacking)} Python-defined operators have no kernel for CUDA tensors: {', '.join(lacking)}")
    print(f"PASS: the library's operators each have a CPU and a CUDA kernel (above), and the {len(python_ops)} "
          f"Python-defined ones a kernel serving CUDA")


def cuobjdump_path(cuda_home: Path, triton):
    """The toolkit's cuobjdump, else the copy Triton ships (a minimal toolkit may lack it), or None."""
    found = shutil.which("cuobjdump", path=str(cuda_home / "bin"))
    if found:
        return Path(found)
    if triton is not None:
        shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if shipped.is_file():
            return shipped
    return None


def build_and_list(recipe: dict) -> None:
    """In a process that has not imported ipmt_fast: build and load the library with CUDA kernels,
    list its device code, and check that each operator it defines has a CPU and a CUDA kernel."""
    import torch
    from torch.utils import cpp_extension

    namespace = recipe["namespace"]
    Path(recipe["build_directory"]).mkdir(parents=True, exist_ok=True)
    print(f"build folder: {recipe['build_directory']}\n--- build ---", flush=True)
    try:
        library = cpp_extension.load(
            name=recipe["name"], sources=recipe["sources"], extra_cflags=recipe["extra_cflags"],
            extra_cuda_cflags=recipe["extra_cuda_cflags"], extra_ldflags=recipe["extra_ldflags"],
            extra_include_paths=recipe["extra_include_paths"], build_directory=recipe["build_directory"],
            with_cuda=True, is_python_module=False, verbose=True)
    except Exception as error:  # compiler errors arrive as RuntimeError / CalledProcessError
        fail(f"the CUDA build failed: {error}")
    print(f"--- built and loaded: {library}", flush=True)

    archs = recipe["archs"].replace(",", ";").split(";")
    expected = {f"sm_{arch.strip().replace('.', '')}" for arch in archs if arch.strip()}
    if recipe["cuobjdump"]:
        listing = command_output([recipe["cuobjdump"], "--list-elf", str(library)])
        print(f"device code in the library (cuobjdump --list-elf):\n{listing}")
        found = {arch for arch in expected if f".{arch}." in listing}
        if found != expected:
            fail(f"the library holds device code for {sorted(found)}, expected {sorted(expected)}")
    else:
        print("cuobjdump not found (neither in the toolkit nor in triton): device architectures not listed")

    defined = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith(namespace + "::"))
    if not defined:
        fail(f"loading {library} defined no {namespace}:: operators")
    print(f"--- {len(defined)} operators defined by the library (dispatch keys with a kernel: CPU, CUDA)")
    lacking = []
    for name in defined:
        cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        print(f"{name:55s} CPU {'yes' if cpu else 'NO '}  CUDA {'yes' if cuda else 'NO'}")
        if not (cpu and cuda):
            lacking.append(name)
    if lacking:
        fail(f"{len(lacking)} of {len(defined)} library operators lack a CPU or CUDA kernel: {', '.join(lacking)}")
    print(f"library: {len(defined)} operators, each with a CPU and a CUDA kernel; device code for "
          f"{', '.join(sorted(expected)) if recipe['cuobjdump'] else 'not listed'}", flush=True)


if __name__ == "__main__":
    main()
