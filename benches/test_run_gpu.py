"""benches/run_gpu.sh without a GPU: every bench command of its dry run parses, and every test it
names exists (quick; not part of the CI suite in tests/, which checks the script's time budget in
tests/test_run_gpu_budget.py)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from . import layers, ops

REPO = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"^=== \[(?P<name>[\w-]+)\] \([abc]\) (?:limit \d+s of \d+s, starts at \d+s|"
                        r"SKIPPED \(limit \d+s\): .*?): (?P<command>.*)$")
# What runs first, in this order: the build, the CUDA tests never run on a GPU, then the B=4, L=5
# benches (eager and graphed, then torch.compile).
PRIORITY = ["build-ext", "tests-cuda-new", "layers-b4", "layers-b4-compile", "layers-b4-compile-ro"]


def dry_run(**env) -> dict:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    result = subprocess.run(["bash", str(REPO / "benches" / "run_gpu.sh"), "--dry-run"], capture_output=True,
                            text=True, env=environment, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return {m["name"]: m["command"] for m in map(STAGE_LINE.match, result.stdout.splitlines()) if m}


def test_dry_run_lists_the_stages_by_priority_and_touches_nothing():
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    stages = list(dry_run())
    assert [s for s in stages if s in PRIORITY] == PRIORITY
    assert stages.index("install") < stages.index("build-ext") and stages[-1] == "tests-all"
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before


def test_every_bench_command_of_the_run_parses():
    parsers = {"benches.layers": layers.parse_args, "benches.ops": ops.parse_args}
    checked = 0
    for name, command in dry_run().items():
        argv = shlex.split(command)
        if "-m" not in argv:
            continue
        module, args = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        if module in parsers:
            parsers[module](args)
            checked += 1
        elif module == "pytest":
            for arg in args:
                if arg.startswith(("tests", "--deselect=", "--ignore=")):
                    assert (REPO / arg.split("=")[-1].partition("::")[0]).exists(), (name, arg)
    assert checked >= 9
