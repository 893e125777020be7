"""Trace cases in processes of their own.

``trace_cases(names, directory)`` (what the test calls) builds the fake CUDA shim and runs
``python -m fake_cuda.run_trace --shim LIB --out REPORT CASE...`` in :data:`TRACE_PROCESSES`
child processes, each tracing a share of the cases, and merges what they write. A child loads the
shim first (before torch is imported, see ``shim.py``), then writes JSON to ``--out``:
``environment`` (what torch believes about CUDA in that process) and ``reports`` (one per case,
:func:`fake_cuda.capture_trace.run_case`, with its ``seconds``).

Only the standard library is imported at module level: the child must load the shim before torch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fake_cuda.shim import build_shim, child_environment, preload_shim

# The cases are independent; CI's machine has two cores.
TRACE_PROCESSES = 2
# Seconds a child may take: it may have to build the compiled backend's C++ library (~40 s on two
# cores) before its first trace; the traces themselves take a few seconds.
TRACE_TIMEOUT_S = 600


def trace_cases(names: List[str], directory: Path) -> Dict[str, Any]:
    """Trace the named cases (see ``Case.parse``) in child processes; returns ``environment`` (of
    each child, a list) and ``reports`` (by case name). Report files are written to ``directory``."""
    shim = build_shim()
    shares = [names[i::TRACE_PROCESSES] for i in range(TRACE_PROCESSES)]
    children = []
    for i, share in enumerate(filter(None, shares)):
        out = Path(directory) / f"reports-{i}.json"
        command = [sys.executable, "-m", "fake_cuda.run_trace", "--shim", shim, "--out", str(out), *share]
        children.append((out, subprocess.Popen(command, env=child_environment(), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)))
    merged: Dict[str, Any] = {"environment": [], "reports": {}}
    try:
        for out, child in children:
            output, _ = child.communicate(timeout=TRACE_TIMEOUT_S)
            if child.returncode != 0 or not out.is_file():
                raise RuntimeError(f"a trace process failed (exit {child.returncode}): {output[-3000:]}")
            written = json.loads(out.read_text())
            merged["environment"].append(written["environment"])
            merged["reports"].update((report["case"], report) for report in written["reports"])
    finally:
        for _, child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return merged


def main(argv: Optional[List[str]] = None) -> None:
    """The child: trace the cases given on the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shim", required=True, help="path of the built fake CUDA shim library")
    parser.add_argument("--out", required=True, help="where to write the JSON reports")
    parser.add_argument("cases", nargs="+", help="case names, e.g. train-auto-bf16, train-torch-none+host_read")
    args = parser.parse_args(argv)
    preload_shim(args.shim)
    import torch  # after the shim

    from fake_cuda.capture_trace import Case, run_case

    environment = {"cuda_is_available": torch.cuda.is_available(),
                   "accelerator": str(torch.accelerator.current_accelerator())}
    reports = []
    for name in args.cases:
        start = time.perf_counter()
        report = run_case(Case.parse(name))
        report["seconds"] = time.perf_counter() - start
        reports.append(report)
    with open(args.out, "w") as file:
        json.dump({"environment": environment, "reports": reports}, file, indent=1)


if __name__ == "__main__":
    main()
