"""Check that ipmt-fast runs on given PyTorch releases: one virtual environment per release (made
if missing), and in each: the import, one training step (forward with both losses, backward) and
one eval forward of the full model on every backend against the reference backend, then the
test suite's ``torch.library.opcheck`` tests (or the whole suite with ``--suite full``).

    python scripts/check_torch_versions.py 2.6.0 2.14.1                # venvs in ../venvs/torch-VERSION
    python scripts/check_torch_versions.py --venv-root /tmp/v --python python3.9 2.6.0
    python scripts/check_torch_versions.py --smoke                     # the model check, in this environment

A release is installed with ``pip install torch==VERSION`` (which brings the Triton release that
torch wheel pins) and the repository with ``pip install -e REPO[test] torch==VERSION``, so a
release outside ``setup.py``'s range fails at that step. ``--below-floor`` checks such a release
anyway, to see what breaks there: the repository goes in without its torch requirement and the
import-time version check is skipped (``IPMT_FAST_SKIP_VERSION_CHECK=1``). Without a GPU the
Triton backend runs under ``TRITON_INTERPRET=1``. A summary per release is printed and appended to
``--log``, pip's and pytest's output to the ``.details.log`` beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV_ROOT = REPO.parent / "venvs"
DEFAULT_LOG = REPO / "scripts" / "logs" / "torch-versions.log"
BACKENDS = ("reference", "torch", "compiled", "triton")
# The test suite's float32 tolerance for fused backends against the reference (full model).
FLOAT32_RTOL = 1e-4
# A small model at a size every backend handles in seconds on a CPU: (H - 1) % 8 == 0.
DIM, SIZE, LAYERS, SHOT, BATCH = 16, 33, 2, 1, 2
# What the smoke step prints before its JSON result, so the caller can find it in the output.
RESULT_TAG = "SMOKE-RESULT "
# Prints the repository's requirements (with the test extra) but torch and Triton, which the torch
# wheel brings in its own versions: what --below-floor installs beside a release out of range.
REQUIREMENTS_BUT_TORCH = """
import importlib.metadata
from pip._vendor.packaging.requirements import Requirement
for text in importlib.metadata.requires("ipmt-fast"):
    requirement = Requirement(text)
    if requirement.name in ("torch", "triton") or requirement.marker and not requirement.marker.evaluate({"extra": "test"}):
        continue
    requirement.marker = None
    print(requirement)
"""
# Seconds one release's steps may take (a CUDA wheel's install is several GB).
INSTALL_TIMEOUT_S = 3600
SMOKE_TIMEOUT_S = 1800
SUITE_TIMEOUT_S = 3600


# ---------------------------------------------------------------- inside one environment

def _one_line(error: BaseException) -> str:
    """The error's type and message in one line (a long message: its first and last lines)."""
    lines = [line for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} / {lines[-1]}"


def _episode(torch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    s_x = torch.randn(BATCH, SHOT, 3, SIZE, SIZE, generator=g)
    s_y = (torch.rand(BATCH, SHOT, SIZE, SIZE, generator=g) > 0.6).long()
    s_y[:, 0, -3:] = 255
    y = (torch.rand(BATCH, SIZE, SIZE, generator=g) > 0.5).long()
    y[:, :, -5:] = 255
    return x, s_x, s_y, y


def _run_backend(torch, ipmt_fast, backend):
    """Losses, eval logits and every parameter's gradient of one training step on ``backend``."""
    torch.manual_seed(0)
    model = ipmt_fast.IPMT(reduce_dim=DIM, num_layers=LAYERS, shot=SHOT, backend=backend)
    with torch.no_grad():  # sampling points off the pixel grid, where bilinear sampling has kinks
        for layer in model.transformer.qry_self_layers:
            layer.sampling_offsets.weight.normal_(0, 0.05)
            layer.attention_weights.weight.normal_(0, 0.05)
    x, s_x, s_y, y = _episode(torch)
    model.train()
    torch.manual_seed(7)  # the same dropout masks for every backend
    _, main_loss, aux_loss = model(x, s_x, s_y, y)
    (main_loss + aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        logits = model(x, s_x, s_y, y)
    return {"main loss": main_loss.detach(), "aux loss": aux_loss.detach(), "eval logits": logits}, grads


def smoke() -> dict:
    """Import, and one training step + eval forward per backend compared with the reference."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    report = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.is_available(), "backends": {}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError as error:
        report["triton"] = f"not importable ({_one_line(error)})"
    import numpy
    report["numpy"] = numpy.__version__
    start = time.perf_counter()
    try:
        import ipmt_fast
    except Exception as error:
        report["import"] = f"FAIL {_one_line(error)}"
        return report
    report["import"] = f"ok ({time.perf_counter() - start:.1f} s)"
    expected = None
    for backend in BACKENDS:
        start = time.perf_counter()
        try:
            outputs, grads = _run_backend(torch, ipmt_fast, backend)
        except Exception as error:
            report["backends"][backend] = f"FAIL {_one_line(error)}"
            continue
        seconds = time.perf_counter() - start
        if backend == "reference":
            expected = (outputs, grads)
            report["backends"][backend] = f"ok ({len(grads)} gradients, {seconds:.1f} s)"
            continue
        if expected is None:
            report["backends"][backend] = "not compared: the reference failed"
            continue
        if grads.keys() != expected[1].keys():
            report["backends"][backend] = f"FAIL gradients for {len(grads)} parameters, reference {len(expected[1])}"
            continue
        errors = {name: float((out - expected[0][name]).norm() / expected[0][name].norm())
                  for name, out in outputs.items()}
        errors["worst gradient"] = max(float((g - expected[1][n]).norm() / expected[1][n].norm().clamp_min(1e-30))
                                       for n, g in grads.items())
        worst = max(errors.values())
        verdict = "ok" if worst <= FLOAT32_RTOL else f"FAIL (tolerance {FLOAT32_RTOL:g})"
        report["backends"][backend] = (f"{verdict} relative error vs reference: "
                                       + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f", {seconds:.1f} s")
    return report


# ---------------------------------------------------------------- driving one environment per release

def _run(command, log, timeout, env=None):
    """Run ``command``, its output to ``log`` (open file); returns (exit code, output)."""
    log.write(f"$ {' '.join(map(str, command))}\n")
    log.flush()
    try:
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                                cwd=REPO, env=env)
    except subprocess.TimeoutExpired as error:
        return 124, f"timed out after {timeout} s: {error}"
    output = result.stdout + result.stderr
    # pip's lines naming the package indexes it looks in say nothing about the check.
    kept = [line for line in output.splitlines() if not line.startswith(("Looking in indexes", "Looking in links"))]
    log.write("\n".join(kept)[-20000:] + "\n")
    log.flush()
    return result.returncode, output


def _pip_tail(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("ERROR") or "requires" in line.lower()]
    return " / ".join(lines[-3:]) or (output.strip().splitlines() or ["no output"])[-1]


def check_release(version: str, args, log) -> dict:
    venv = args.venv_root / f"torch-{version}{args.venv_suffix}"
    python = venv / "bin" / "python"
    result = {"venv": str(venv)}
    if not python.is_file():
        code, output = _run([args.python, "-m", "venv", venv], log, 120)
        if code:
            return {**result, "setup": f"FAIL python -m venv: {output.strip()[-300:]}"}
        code, output = _run([python, "-m", "pip", "install", f"torch=={version}"], log, INSTALL_TIMEOUT_S)
        if code:
            return {**result, "setup": f"FAIL pip install torch=={version}: {_pip_tail(output)}"}
    env = dict(os.environ)
    if args.below_floor:
        env["IPMT_FAST_SKIP_VERSION_CHECK"] = "1"
        code, output = _run([python, "-m", "pip", "install", "--no-deps", "-e", REPO], log, INSTALL_TIMEOUT_S)
        if code == 0:
            code, output = _run([python, "-c", REQUIREMENTS_BUT_TORCH], log, 120)
        if code == 0:
            code, output = _run([python, "-m", "pip", "install", *output.split()], log, INSTALL_TIMEOUT_S)
        if code:
            return {**result, "setup": f"FAIL installing the repository without its torch bound: {_pip_tail(output)}"}
        result["setup"] = "ok (below the floor: torch requirement and import-time check skipped)"
    else:
        code, output = _run([python, "-m", "pip", "install", "-e", f"{REPO}[test]", f"torch=={version}"], log,
                            INSTALL_TIMEOUT_S)
        if code:
            return {**result, "setup": f"FAIL pip install -e .[test] torch=={version}: {_pip_tail(output)}"}
        result["setup"] = "ok"
    code, output = _run([python, Path(__file__).resolve(), "--smoke"], log, SMOKE_TIMEOUT_S, env=env)
    tagged = [line for line in output.splitlines() if line.startswith(RESULT_TAG)]
    if not tagged:
        return {**result, "smoke": f"FAIL exit code {code}: {output.strip()[-500:]}"}
    result.update(json.loads(tagged[-1][len(RESULT_TAG):]))
    if args.suite != "none":
        selection = ["-k", "opcheck"] if args.suite == "opcheck" else []
        code, output = _run([python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *selection], log,
                            SUITE_TIMEOUT_S, env=env)
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
        result[f"pytest ({args.suite})"] = f"exit {code}: {summary[-1].strip('= ') if summary else output[-300:]}"
        failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        if failures:
            result["pytest failures"] = failures
    return result


def passed(result: dict) -> bool:
    values = [result.get("setup", ""), result.get("import", "FAIL"), *result.get("backends", {"-": "FAIL"}).values()]
    values += [v for k, v in result.items() if k.startswith("pytest (")]
    return not any(str(v).startswith("FAIL") or str(v).startswith("exit ") and not str(v).startswith("exit 0")
                   for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="torch releases, e.g. 2.6.0 2.14.1")
    parser.add_argument("--smoke", action="store_true", help="run the model check in this environment and exit")
    parser.add_argument("--venv-root", type=Path, default=DEFAULT_VENV_ROOT,
                        help=f"where the environments are (default {DEFAULT_VENV_ROOT})")
    parser.add_argument("--venv-suffix", default="", help="appended to each environment's name, e.g. --venv-suffix=-py3.10")
    parser.add_argument("--python", default=sys.executable, help="the Python that makes new environments")
    parser.add_argument("--suite", choices=("opcheck", "full", "none"), default="opcheck",
                        help="which tests to run in each environment (default: the opcheck tests)")
    parser.add_argument("--below-floor", action="store_true",
                        help="check releases older than setup.py allows: skip the torch bound and the import check")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help=f"appended to (default {DEFAULT_LOG})")
    args = parser.parse_args()
    if args.smoke:
        print(RESULT_TAG + json.dumps(smoke()), flush=True)
        return
    if not args.versions:
        parser.error("name at least one torch release, or --smoke")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    details = args.log.with_suffix(".details.log")
    # The commit checked, "-dirty" when tracked files differ from it.
    head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=7", "--match", "^"],
                          capture_output=True, text=True).stdout.strip()
    failed = []
    with open(details, "a") as log:
        for version in args.versions:
            date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(f"\n===== torch {version}, {date}, repository at {head}\n")
            result = check_release(version, args, log)
            status = "PASS" if passed(result) else "FAIL"
            if status == "FAIL":
                failed.append(version)
            lines = [f"## torch {version}: {status} ({date}, repository at {head}, {platform.machine()}, "
                     f"{'GPU' if result.get('gpu') else 'no GPU'})"]
            for key, value in result.items():
                if key == "backends":
                    lines += [f"- backend {name}: {verdict}" for name, verdict in value.items()]
                elif key == "pytest failures":
                    lines += [f"  - {line}" for line in value]
                elif key != "gpu":
                    lines.append(f"- {key}: {value}")
            text = "\n".join(lines) + "\n"
            print(text, flush=True)
            with open(args.log, "a") as summary:
                summary.write(text + "\n")
    print(f"{len(args.versions) - len(failed)} passed, {len(failed)} failed" + (f": {' '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
