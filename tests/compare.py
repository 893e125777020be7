"""The one comparison helper of the test suite: element-wise, NaN/inf-aware, and loud.

``assert_close(actual, expected, rtol=..., atol=...)`` passes when, at every element,

    |actual - expected| <= atol + rtol * max|expected|

(``max|expected|`` over the finite elements: a relative bound on the tensor's scale, so entries
near zero are judged against the tensor's magnitude, not their own), NaN sits exactly where the
expected tensor has NaN, and infinities match in position and sign. A failure names the worst
element: its index, both values, the error and the bound.

Low precision is judged adaptively (``assert_low_precision_close``): the fused result's error
against a float64 oracle may be at most ``LOW_PRECISION_FACTOR`` times the reference form's own
error in the same dtype, plus a small floor, instead of a constant per test.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

# A fused op in a low-precision dtype may be this many times as far from the float64 oracle as the
# reference form computed in the same dtype.
LOW_PRECISION_FACTOR = 2.0
# ... plus this many units of the dtype's resolution (relative to the tensor's scale), so that a
# reference form that happens to round exactly (error 0) does not demand bit equality.
LOW_PRECISION_FLOOR_ULPS = 4.0


def _as_double(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).contiguous()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` over the elements finite in both (the absolute
    error when ``expected`` is all zeros). Mismatched NaN/inf positions give ``inf``."""
    a, e = _as_double(actual), _as_double(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    finite = torch.isfinite(e)
    if not torch.equal(torch.isnan(a), torch.isnan(e)) or not torch.equal(a[torch.isinf(e)], e[torch.isinf(e)]) \
            or not torch.isfinite(a[finite]).all():
        return float("inf")
    if not finite.any():
        return 0.0
    scale = e[finite].abs().max().item()
    error = (a[finite] - e[finite]).abs().max().item()
    return error / scale if scale > 0 else error


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0, atol: float = 0.0,
                 name: str = "tensor") -> None:
    """Assert ``actual`` matches ``expected`` element-wise (see the module docstring)."""
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise AssertionError(f"{name}: expected two tensors, got {type(actual).__name__} and "
                             f"{type(expected).__name__}")
    a, e = _as_double(actual), _as_double(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        where = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at index {where}: actual {a[tuple(where)].item()}, "
                             f"expected {e[tuple(where)].item()} ({int((nan_a != nan_e).sum())} elements)")
    inf_e = torch.isinf(e)
    inf_mismatch = (torch.isinf(a) | inf_e) & (a != e) & ~nan_e
    if inf_mismatch.any():
        where = inf_mismatch.nonzero()[0].tolist()
        raise AssertionError(f"{name}: infinity mismatch at index {where}: actual {a[tuple(where)].item()}, "
                             f"expected {e[tuple(where)].item()}")
    finite = torch.isfinite(e)
    if not finite.any():
        return
    scale = e[finite].abs().max().item()
    bound = atol + rtol * scale
    error = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    worst = int(error.argmax())
    worst_error = error.view(-1)[worst].item()
    if worst_error > bound:
        index = list(torch.unravel_index(torch.tensor(worst), e.shape)) if e.dim() else []
        index = [int(i) for i in index]
        raise AssertionError(
            f"{name}: worst element at index {index}: actual {a.view(-1)[worst].item():.17g}, expected "
            f"{e.view(-1)[worst].item():.17g}; |error| {worst_error:.3g} > bound {bound:.3g} "
            f"(atol {atol:g} + rtol {rtol:g} * max|expected| {scale:.3g}); relative error "
            f"{worst_error / scale if scale else worst_error:.3g}; {int((error > bound).sum())} of {e.numel()} "
            f"elements out of bound")


def low_precision_bound(reference_lowp: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype,
                        factor: float = LOW_PRECISION_FACTOR, floor_ulps: float = LOW_PRECISION_FLOOR_ULPS,
                        more_samples: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> float:
    """The relative bound for a fused result in ``dtype``: ``factor`` times the reference form's
    own relative error against the float64 ``oracle``, plus ``floor_ulps`` of ``dtype``'s epsilon.

    ``more_samples`` are further ``(reference_lowp, oracle)`` pairs at inputs moved by an ulp: an
    ill-conditioned result's rounding error varies from point to point, and the largest of a few
    samples measures it more steadily than one."""
    own_error = max(relative_error(r, o) for r, o in ((reference_lowp, oracle), *more_samples))
    return factor * own_error + floor_ulps * torch.finfo(dtype).eps


def assert_low_precision_close(fused: torch.Tensor, reference_lowp: torch.Tensor, oracle: torch.Tensor,
                               dtype: Optional[torch.dtype] = None, name: str = "tensor",
                               factor: float = LOW_PRECISION_FACTOR,
                               floor_ulps: float = LOW_PRECISION_FLOOR_ULPS,
                               more_samples: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
    """Adaptive low-precision check: ``fused`` (computed in ``dtype``) is within
    :func:`low_precision_bound` of the float64 ``oracle``, element-wise relative to its scale."""
    dtype = dtype or fused.dtype
    bound = low_precision_bound(reference_lowp, oracle, dtype, factor, floor_ulps, more_samples)
    own = max(relative_error(r, o) for r, o in ((reference_lowp, oracle), *more_samples))
    assert_close(fused, oracle, rtol=bound, name=f"{name} ({dtype}; bound = {factor:g} x reference's own error "
                                                  f"{own:.3g} + floor)")
