"""ipmt-fast: a faithful, fast IPMT (Intermediate Prototype Mining Transformer, NeurIPS 2022).

``ipmt_fast.IPMT`` is the model; ``ipmt_fast.ops`` holds the fused hot-path ops and their
backends; ``ipmt_fast.load_published_checkpoint`` loads the published weights.

Importing the package corrects a TorchInductor CPU scheduling bug that zeroes gradients through
``F.interpolate`` under ``torch.compile`` (see ``ipmt_fast.inductor_fix``), and keys
torch.compile's on-disk caches to this version's operators (``ipmt_fast.compile_cache``).
"""
import os
import platform
import re
import sys

# The oldest releases ipmt-fast runs on, checked here before anything touches torch's newer APIs
# (setup.py declares the same bounds; tests/test_versions.py keeps them equal). torch 2.13 is the
# first whose C++ headers compile csrc/ (older ones make `Tensor::sum({0, 1})` ambiguous) and
# whose `torch.library.wrap_triton` takes interpreter-mode kernels; torch 2.13 needs Python 3.10.
# scripts/check_torch_versions.py and NOTES.md hold the evidence.
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 13)
# Set to 1 to import anyway on an older release (to find out what breaks there, as
# scripts/check_torch_versions.py --below-floor does).
SKIP_VERSION_CHECK_VARIABLE = "IPMT_FAST_SKIP_VERSION_CHECK"


def _release(version: str):
    """(major, minor) of a version string such as '2.13.0+cpu' or '2.14.0a0+git1234'; None if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_versions() -> None:
    """Refuse, in one line naming the release needed, a Python or torch older than the supported ones."""
    if sys.version_info[:2] < MIN_PYTHON:
        raise ImportError(f"ipmt-fast needs Python >= {'.'.join(map(str, MIN_PYTHON))}, "
                          f"this is Python {platform.python_version()}")
    import torch

    found = _release(torch.__version__)
    needed = ".".join(map(str, MIN_TORCH))
    if found is not None and found < MIN_TORCH:
        raise ImportError(f"ipmt-fast needs torch >= {needed}, found torch {torch.__version__}: "
                          f"pip install 'torch>={needed}'")


if os.environ.get(SKIP_VERSION_CHECK_VARIABLE) != "1":
    _check_versions()

from . import compile_cache, inductor_fix, ops  # noqa: E402 (after the version check)
from .model import (IPMT, IPMTransformer, duplex_segmentation_loss, load_published_checkpoint,  # noqa: E402
                    weighted_dice_loss)
from .tuning import TuningResult, tune_backends  # noqa: E402

__version__ = "0.1.0"
inductor_fix.apply()
compile_cache.install()
__all__ = ["IPMT", "IPMTransformer", "TuningResult", "duplex_segmentation_loss", "load_published_checkpoint", "ops",
           "tune_backends", "weighted_dice_loss"]
