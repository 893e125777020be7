"""Loading published IPMT checkpoints (and our own) into :class:`ipmt_fast.IPMT`."""
from __future__ import annotations

import os
import re
from typing import Mapping, Union

import torch

from .network import IPMT

DATA_PARALLEL_PREFIX = "module."
# The published transformer creates 6L layer norms and 3L FFNs but uses only 4L and 2L of them.
UNUSED_PATTERNS = ((re.compile(r"^transformer\.layer_norms\.(\d+)\."), 4), (re.compile(r"^transformer\.ffns\.(\d+)\."), 2))
MAX_NAMES_SHOWN = 12


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt or not a checkpoint.
    The message reads ``cannot read checkpoint <path>: <reason>`` (one line)."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


# torch.load's weights-only unpickler puts the actual reason between these, in a long message.
UNPICKLER_MARKER = "WeightsUnpickler error:"
UNPICKLER_END = " Check the documentation"
MAX_REASON_CHARS = 200


def _load_failure(error: Exception) -> str:
    """One line saying why ``torch.load`` failed (its own messages run over several lines)."""
    text = " ".join(str(error).split())
    detail = text.split(UNPICKLER_MARKER, 1)[1].split(UNPICKLER_END)[0] if UNPICKLER_MARKER in text else text
    detail = detail.split(". ")[0].strip().rstrip(".")[:MAX_REASON_CHARS]
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if "zip archive" in text or "PytorchStreamReader" in text:
        return f"the file is truncated or corrupt ({detail})"
    return f"not a PyTorch checkpoint, or corrupt ({type(error).__name__}{': ' + detail if detail else ''})"


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping:
    """``torch.load`` of a checkpoint file (tensors and plain data only, onto the CPU), as a
    mapping; any failure is a :class:`CheckpointError` naming the file and the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises many types for a damaged file (RuntimeError, EOFError, UnpicklingError,
    # KeyError, ...): every one means the same thing here.
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(path, _load_failure(error)) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(path, f"it holds a {type(state).__name__}, not a mapping of names to tensors")
    return state


def _names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


def _never_used(name: str, num_layers: int) -> bool:
    for pattern, used_per_layer in UNUSED_PATTERNS:
        match = pattern.match(name)
        if match and int(match.group(1)) >= used_per_layer * num_layers:
            return True
    return False


def load_published_checkpoint(model: IPMT, checkpoint: Union[str, os.PathLike, Mapping]) -> IPMT:
    """Load a published (or ipmt-fast) IPMT state dict into ``model``.

    Accepts a path or a mapping; the state dict may be nested under ``state_dict`` (or ``model``)
    and carry DataParallel's ``module.`` prefix. The published transformer's never-used layer
    norms and FFNs are dropped. Anything else that does not match ``model`` exactly (missing or
    unexpected names, wrong shapes) raises ``ValueError`` listing the names; a file that cannot be
    read raises :class:`CheckpointError`.
    """
    state = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    state = {k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k: v for k, v in state.items()}
    num_layers = model.transformer.num_layers
    state = {k: v for k, v in state.items() if not _never_used(k, num_layers)}
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong_shape = {k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)}
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected: {_names(unexpected)}")
        if wrong_shape:
            problems.append("wrong shape: " + _names(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                                                    for k in wrong_shape))
        raise ValueError("checkpoint does not match this IPMT (layers/shot/reduce_dim/num_layers?); "
                         + "; ".join(problems))
    model.load_state_dict(state)
    return model
