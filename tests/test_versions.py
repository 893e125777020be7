"""The supported range: a too-old torch is refused at import in one line naming the release needed,
and setup.py declares the same lower bounds as the import-time check."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ipmt_fast

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"
# Imports ipmt_fast under a pretended torch release and reports the error and what got imported.
PRETEND_SCRIPT = """
import json, sys
import torch
torch.__version__ = sys.argv[1]
try:
    import ipmt_fast
    error = None
except ImportError as caught:
    error = str(caught)
print(json.dumps({"error": error, "ops_imported": "ipmt_fast.ops" in sys.modules}))
"""
NEEDED = ".".join(map(str, ipmt_fast.MIN_TORCH))


def _declared(pattern: str) -> tuple:
    match = re.search(pattern, SETUP_PY.read_text())
    assert match, f"setup.py has no {pattern!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_too_old_torch_is_refused_at_import_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != ipmt_fast.SKIP_VERSION_CHECK_VARIABLE}
    result = subprocess.run([sys.executable, "-c", PRETEND_SCRIPT, "2.12.1+cu128"], capture_output=True, text=True,
                            timeout=120, check=True, env=env)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] == (f"ipmt-fast needs torch >= {NEEDED}, found torch 2.12.1+cu128: "
                               f"pip install 'torch>={NEEDED}'")
    # Refused before the ops register anything with torch.library.
    assert not report["ops_imported"]


@pytest.mark.parametrize("version", ["2.12.1", "2.6.0+cu124", "1.13.1", "2.9.0a0+git1234"])
def test_older_releases_are_refused(version, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ImportError, match=re.escape(f"needs torch >= {NEEDED}, found torch {version}")):
        ipmt_fast._check_versions()


@pytest.mark.parametrize("version", [NEEDED + ".0", NEEDED + ".0+cpu", "2.14.0a0+gitabc123", "2.15.0.dev20261201+cu130",
                                     "3.0.0", "unknown"])
def test_supported_and_unreadable_releases_pass(version, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    ipmt_fast._check_versions()


def test_setup_py_declares_the_import_time_bounds():
    assert _declared(r'"torch>=([\d.]+)') == ipmt_fast.MIN_TORCH
    assert _declared(r'PYTHON = ">=([\d.]+)"') == ipmt_fast.MIN_PYTHON


def test_this_interpreter_and_torch_are_in_range():
    assert sys.version_info[:2] >= ipmt_fast.MIN_PYTHON
    assert ipmt_fast._release(torch.__version__) >= ipmt_fast.MIN_TORCH
