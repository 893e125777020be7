"""Keys torch.compile's on-disk caches to this package's operator definitions.

Inductor and AOTAutograd cache compiled graphs under a key made of the traced graph, the inputs,
the settings and PyTorch's own source, but a custom operator enters that key by its name alone:
its schema, fake implementation, backward and kernels do not. After an upgrade of ``ipmt_fast``
that changes an operator (a saved tensor dropped from a block's outputs, say), a graph compiled
before it is served again and unpacks the new outputs by the old layout: torch.compile of the
fused model then fails at its first call with Inductor's size assertion on an op's output (or,
were the shapes to agree, computes with the wrong tensors).

Importing ``ipmt_fast`` therefore installs a scheduler pass that does nothing to the graph and
exists for its ``uuid``, which Inductor puts in every cache key: a digest of the files that define
the operators (``ipmt_fast/ops``, the Triton kernels, the C++/CUDA sources), plus the identifiers
of the corrections this package applies to Inductor (``ipmt_fast.inductor_fix``). Graphs compiled
with one version of the operators never share an entry with another's. A pass the user installed
before importing ``ipmt_fast`` keeps running, inside ours, its identifier part of the key.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Iterable, List, Optional

# Files whose text defines the operators, per directory; the model's own code is traced by Dynamo
# and is part of the graph key already.
OPERATOR_SOURCE_PATTERNS = ("*.py", "*.cpp", "*.cu", "*.cuh", "*.h")

_identifiers: List[str] = []


def operator_sources() -> List[Path]:
    """The files that define the custom operators: their Python registration, fakes and autograd
    (``ipmt_fast/ops``), the Triton kernels and the C++/CUDA extension's sources, sorted."""
    from .ops import extension

    # Found, not imported: importing the kernels imports Triton.
    kernels = importlib.util.find_spec("ipmt_fast.kernels").submodule_search_locations
    directories = (Path(__file__).resolve().parent / "ops", *map(Path, kernels), extension.source_dir())
    return sorted({path for directory in directories for pattern in OPERATOR_SOURCE_PATTERNS
                   for path in directory.glob(pattern) if path.is_file()})


def digest_of(paths: Iterable[Path]) -> str:
    """SHA-256 over each file's name and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def operators_digest() -> str:
    """:func:`digest_of` the :func:`operator_sources`, computed once per process."""
    return digest_of(operator_sources())


def add_identifier(identifier: str) -> None:
    """Make ``identifier`` (a correction applied to Inductor, say) part of every cache key."""
    if identifier not in _identifiers:
        _identifiers.append(identifier)


def cache_key_salt() -> str:
    """What this package adds to Inductor's cache keys (the installed pass's ``uuid``)."""
    return "; ".join([f"ipmt_fast operators {operators_digest()}", *_identifiers])


@functools.lru_cache(maxsize=None)
def _salt_pass_class():
    from torch._inductor.custom_graph_pass import CustomSchedulerPass

    class CacheKeySalt(CustomSchedulerPass):
        """Runs the pass it wraps (if any) and nothing else; its ``uuid`` is the cache key salt."""

        def __init__(self, wrapped: Optional[CustomSchedulerPass] = None):
            self.wrapped = wrapped

        def __call__(self, nodes):
            return nodes if self.wrapped is None else self.wrapped(nodes)

        def uuid(self):
            wrapped = None if self.wrapped is None else self.wrapped.uuid()
            return cache_key_salt() if wrapped is None else f"{cache_key_salt()}; wrapped: {wrapped}"

    return CacheKeySalt


def install() -> bool:
    """Put the salt pass in Inductor's ``_pre_fusion_custom_pass`` (wrapping a pass already there);
    returns whether it is installed. Idempotent. A pre-fusion pass of a kind Inductor does not
    cache (not a ``CustomSchedulerPass``) is left alone: Inductor bypasses its caches for it. A
    torch without Inductor's custom passes has no such cache to key: nothing to install."""
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor.custom_graph_pass import CustomSchedulerPass
    except ImportError:
        return False

    salt_class = _salt_pass_class()
    current = inductor_config._pre_fusion_custom_pass
    if isinstance(current, salt_class):
        return True
    if current is not None and not isinstance(current, CustomSchedulerPass):
        return False
    inductor_config._pre_fusion_custom_pass = salt_class(current)
    return True
