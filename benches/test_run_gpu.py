"""benches/run_gpu.sh without a GPU: its dry run lists the stages in priority order, and every bench
command in it parses (quick; not part of the CI suite in tests/)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from . import layers, ops

REPO = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"^=== \[(?P<name>[\w-]+)\] limit (?P<limit>\d+)s: (?P<command>.*)$")
# What the CUDA-graphs issue asks to run first, in this order, before the older stages.
PRIORITY = ["tests-graphs", "graphs-transformer", "graphs-step", "max-autotune", "transformer-compile",
            "tests-cuda-first"]


def dry_run() -> dict:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "benches" / "run_gpu.sh"), "--dry-run"], capture_output=True,
                            text=True, env=env, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return {m["name"]: m["command"] for m in map(STAGE_LINE.match, result.stdout.splitlines()) if m}


def test_dry_run_lists_the_graph_stages_first_and_touches_nothing():
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    stages = list(dry_run())
    assert [s for s in stages if s in PRIORITY] == PRIORITY
    assert stages.index("build-ext") < stages.index("tests-graphs")
    assert stages[-1] == "tests-all"
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
            assert all((REPO / a).exists() for a in args if a.startswith("tests")), (name, args)
    assert checked >= 7
