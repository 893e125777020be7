"""A correction to TorchInductor's CPU scheduler, applied when ``ipmt_fast`` is imported.

The bug (found with this model, present in torch 2.13): when Inductor's C++ backend fuses two
nodes whose loops have compatible but different shapes, it recomputes one node's loop body and
re-derives the buffers it reads. That re-derivation forgets the node's *mutation renames* unless
the node also has a fake (ordering-only) dependency. A node that reads a buffer after a scatter
into it (``index_put(..., accumulate=True)`` into a fresh zero buffer, which is how the backward
of the decomposed ``F.interpolate(mode="bilinear")`` accumulates) then looks as if it read the
zero buffer before the scatter, and gets scheduled there: the gradient that should flow through
the interpolation is exactly zero. In IPMT, ``torch.compile`` of the reference model on a CPU
returned zero gradients for every parameter of the main (dice) loss path.

The correction re-applies the renames after every recomputation, whether or not the node has
fake dependencies, which is what the scheduler already does in its ``refresh_dependencies``. It
replaces only a method whose source still has the faulty condition, so a torch that carries its
own fix is left untouched.

Inductor caches compiled graphs on disk under a key that knows nothing of a patched method, so a
kernel scheduled by the faulty code before this fix was applied would be served again. The fix
therefore adds its identifier to the salt of every cache key (``ipmt_fast.compile_cache``):
graphs compiled with the fix never share an entry with ones compiled without it.

``tests/test_compile.py`` compares Inductor against eager on the full model (the test that found
the bug) and checks this module's detection.
"""
from __future__ import annotations

import inspect

# The faulty line of ``SchedulerNode.recompute_size_and_body``: renames applied under fake
# dependencies only.
_FAULTY_CONDITION = "if fake_deps:"
# Part of Inductor's cache key wherever the fix is applied (see the module docstring).
FIX_IDENTIFIER = "ipmt_fast.inductor_fix: mutation renames re-applied after recompute_size_and_body (1)"


def _recompute_size_and_body(self, extra_indexing_constraints=None, recompute_sizes_body_func=None) -> None:
    from torch._inductor.dependencies import StarDep, WeakDep
    from torch.utils._ordered_set import OrderedSet

    fake_deps = OrderedSet(dep for dep in self.read_writes.reads if isinstance(dep, (WeakDep, StarDep)))
    self._compute_attrs(extra_indexing_constraints=extra_indexing_constraints,
                        recompute_sizes_body_func=recompute_sizes_body_func)
    if fake_deps or self.mutation_renames:
        self.set_read_writes(self.read_writes.with_read(fake_deps).rename(self.mutation_renames))


def needs_fix() -> bool:
    """Whether this torch's Inductor has the faulty ``recompute_size_and_body`` (unpatched)."""
    try:
        from torch._inductor.scheduler import SchedulerNode
        source = inspect.getsource(SchedulerNode.recompute_size_and_body)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return _FAULTY_CONDITION in source and "mutation_renames" in source and hasattr(SchedulerNode, "_compute_attrs")


def apply() -> bool:
    """Install the corrected method if this torch needs it; returns whether it did (idempotent)."""
    if not needs_fix():
        return False
    from torch._inductor.scheduler import SchedulerNode

    from . import compile_cache
    SchedulerNode.recompute_size_and_body = _recompute_size_and_body
    compile_cache.add_identifier(FIX_IDENTIFIER)
    return True
