"""benches/run_gpu.sh fits a 15-minute GPU lease: its dry run shows stage group (a) within 180 s,
(b) within 240 s and the whole run within 540 s even if every stage used its whole limit, and a
run with a stand-in Python (no GPU, no torch work) shows every stage writing into the results
folder, a stage cut at its limit, stages skipped when the budget is spent, and the copies to $OUT."""
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benches" / "run_gpu.sh"
LEASE_BUDGET_S = 540  # 9 minutes of a 15-minute lease; the machine's start takes the rest
GROUP_BUDGET_S = {"a": 180, "b": 240}
HEADER = re.compile(r"^# run_gpu\.sh on \S+, \S+, budget (?P<budget>\d+)s \(reserve (?P<reserve>\d+)s\)")
RESULTS_LINE = re.compile(r"^# results: (?P<path>\S+)$")
RAN = re.compile(r"^=== \[(?P<name>[\w-]+)\] \((?P<group>[abc])\) limit (?P<limit>\d+)s of (?P<nominal>\d+)s, "
                 r"starts at (?P<start>\d+)s: (?P<command>.*)$")
SKIPPED = re.compile(r"^=== \[(?P<name>[\w-]+)\] \((?P<group>[abc])\) SKIPPED \(limit (?P<nominal>\d+)s\): "
                     r"(?P<reason>.*?): (?P<command>.*)$")
WORST_END = re.compile(r"^# dry run: nothing ran; worst case ends at (?P<end>\d+)s \+ (?P<reserve>\d+)s reserve")


def _stages(stdout: str):
    stages = []
    for line in stdout.splitlines():
        match = RAN.match(line) or SKIPPED.match(line)
        if match:
            stage = match.groupdict()
            stage["argv"] = shlex.split(stage["command"])
            stages.append(stage)
    return stages


def _dry_run():
    env = dict(os.environ, PYTHON=sys.executable)
    for name in list(env):  # the defaults, not whatever this shell set
        if name in ("BUDGET_S", "RESERVE_S") or name.startswith("T_"):
            del env[name]
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_stages_fit_the_lease_in_the_worst_case():
    stdout = _dry_run()
    lines = stdout.splitlines()
    header = HEADER.match(lines[0])
    budget, reserve = int(header["budget"]), int(header["reserve"])
    assert budget <= LEASE_BUDGET_S
    results = next(RESULTS_LINE.match(line)["path"] for line in lines if RESULTS_LINE.match(line))
    stages = _stages(stdout)
    names = [s["name"] for s in stages]
    assert len(names) == len(set(names)) >= 10
    groups = [s["group"] for s in stages]
    assert groups == sorted(groups) and set(groups) == {"a", "b", "c"}  # (a), then (b), then (c)

    for group, allowed in GROUP_BUDGET_S.items():
        members = [s for s in stages if s["group"] == group]
        assert sum(int(s["nominal"]) for s in members) <= allowed, group  # skipped slots count too
        for stage in members:  # even in the worst case none is clipped or skipped for want of budget
            if "limit" in stage:
                assert stage["limit"] == stage["nominal"], stage["name"]
            else:
                assert not stage["reason"].startswith("budget spent"), stage["name"]
    ran = [s for s in stages if s.get("start") is not None]
    for earlier, later in zip(ran, ran[1:]):  # the latest start: every earlier stage used its whole limit
        assert int(later["start"]) == int(earlier["start"]) + int(earlier["limit"])
    assert all(int(s["start"]) + int(s["limit"]) <= budget - reserve for s in ran)
    end = next(WORST_END.match(line) for line in lines if WORST_END.match(line))
    assert int(end["end"]) == int(ran[-1]["start"]) + int(ran[-1]["limit"]) and int(end["end"]) + reserve <= budget

    # Where each stage's results go: the log of every stage is results/logs/<name>.log (see the run
    # below); the benches' files and the tests' reports go to the results folder too.
    for stage in stages:
        argv = stage["argv"]
        if "benches.layers" in argv or "benches.ops" in argv:
            assert argv[argv.index("--out") + 1] == results, stage["name"]
        if "pytest" in argv:
            assert f"--junitxml={results}/{stage['name']}.xml" in argv, stage["name"]


def test_new_cuda_tests_named_by_the_run_exist():
    """The (a) stage names tests by file::function: a renamed test must be renamed there too."""
    stage = next(s for s in _stages(_dry_run()) if s["name"] == "tests-cuda-new")
    named = [a for a in stage["argv"] if a.startswith("tests/")]
    assert "tests/test_graphs.py" in named and len(named) >= 5
    for node in named:
        path, _, function = node.partition("::")
        assert (REPO / path).is_file(), node
        if function:
            assert re.search(rf"^def {function}\(", (REPO / path).read_text(), re.M), node


# A stand-in for Python: answers the device question, records every call, writes the file a
# bench (--out, --tag) or pytest (--junitxml) would write, and sleeps in the stage named by $FAKE_SLOW.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_CALLS"
case "$*" in
    *device_label*) echo cuda-fake; exit 0;;
    *"import xdist"*) exit 1;;
esac
out="" tag="" xml=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out=${args[i+1]};;
        --tag) tag=${args[i+1]};;
        --junitxml=*) xml=${args[i]#--junitxml=};;
    esac
done
[ -n "$out" ] && echo '{}' > "$out/$tag.json"
[ -n "$xml" ] && echo '<testsuites/>' > "$xml"
case "$*" in *"$FAKE_SLOW"*) sleep 60;; esac
exit 0
"""
# Budget for the stand-in run: the stages before the slow one start with >= MIN_STAGE_S left,
# the slow one is cut at its limit, and then less than MIN_STAGE_S is left for the rest.
FAKE_BUDGET = dict(BUDGET_S="7", RESERVE_S="1", KILL_GRACE_S="1", MIN_STAGE_S="3", T_COMPILE_RO="6")
SLOW_STAGE = "layers-b4-compile-ro"


def test_a_run_writes_every_stage_into_the_results_folder(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    results, out, calls = tmp_path / "results", tmp_path / "out", tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("T_")}
    env.update(FAKE_BUDGET, PYTHON=str(fake), RESULTS_DIR=str(results), OUT=str(out), FAKE_CALLS=str(calls),
               FAKE_SLOW=f"--tag {SLOW_STAGE}")
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert run.returncode == 0, run.stdout + run.stderr

    planned = [s["name"] for s in _stages(_dry_run())]
    rows = [line.split("\t") for line in (results / "logs" / "stages.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == planned
    verdicts = {r[0]: r[2] for r in rows}
    slow = planned.index(SLOW_STAGE)
    assert all(verdicts[name] == "ok" for name in planned[:slow]), verdicts
    assert verdicts[SLOW_STAGE] == "TIMEOUT" and int(dict((r[0], r[3]) for r in rows)[SLOW_STAGE]) <= 6
    assert all(verdicts[name] == "SKIPPED(budget)" for name in planned[slow + 1:])

    ran = planned[:slow + 1]
    assert all((results / "logs" / f"{name}.log").is_file() for name in ran)
    assert {p.name for p in results.glob("*.json")} == {"layers-b4.json", "layers-b4-compile.json",
                                                        f"{SLOW_STAGE}.json"}  # the cut one kept what it wrote
    assert (results / "tests-cuda-new.xml").is_file()
    recorded = calls.read_text()
    assert recorded.index("-m ipmt_fast.ops.extension --require-cuda") < recorded.index("tests-cuda-new.xml") \
        < recorded.index("--tag layers-b4\n") < recorded.index(f"--tag {SLOW_STAGE}")
    assert "layers-sweep" not in recorded  # skipped stages never start

    assert {p.name for p in out.iterdir()} == {"results-cuda-fake.tar.gz", "stages.tsv", "run_gpu.log",
                                              "summary.txt"}
    with tarfile.open(out / "results-cuda-fake.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {f"results/logs/{name}.log" for name in ran} <= packed
    assert f"=== [{SLOW_STAGE}] TIMEOUT after" in run.stdout
