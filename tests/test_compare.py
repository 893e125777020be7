"""The shared comparison helper fails where it should and says where."""
import math

import pytest
import torch

from compare import assert_close, assert_low_precision_close, low_precision_bound, relative_error


def test_equal_tensors_with_nan_and_inf_in_the_same_places_pass():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert_close(t.clone(), t)
    assert relative_error(t.clone(), t) == 0.0


@pytest.mark.parametrize("actual, message", [
    ([1.0, 2.0, float("nan")], "NaN mismatch at index [2]"),
    ([1.0, float("inf"), 3.0], "infinity mismatch at index [1]"),
    ([1.0, 2.0, 3.5], "worst element at index [2]: actual 3.5, expected 3"),
])
def test_mismatches_name_the_worst_element(actual, message):
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        assert_close(torch.tensor(actual), torch.tensor([1.0, 2.0, 3.0]), rtol=1e-3)


def test_bound_is_relative_to_the_largest_expected_magnitude():
    expected = torch.tensor([[100.0, 0.0], [0.0, 1e-6]], dtype=torch.float64)
    actual = expected + torch.tensor([[0.0, 0.05], [0.0, 0.04]], dtype=torch.float64)  # worst: 5e-4 of max|expected|
    assert_close(actual, expected, rtol=1e-3)
    with pytest.raises(AssertionError, match=r"index \[0, 1\]"):
        assert_close(actual, expected, rtol=1e-4)
    assert math.isclose(relative_error(actual, expected), 5e-4, rel_tol=1e-9)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2, 3), torch.zeros(3, 2))


def test_low_precision_bound_scales_with_the_reference_error():
    oracle = torch.linspace(-3, 3, 101, dtype=torch.float64).exp()
    reference_lowp = oracle.to(torch.bfloat16)
    bound = low_precision_bound(reference_lowp, oracle, torch.bfloat16)
    assert bound >= 2 * relative_error(reference_lowp, oracle)
    assert_low_precision_close(reference_lowp, reference_lowp, oracle)
    worse = (oracle * (1 + 8 * bound)).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="bfloat16"):
        assert_low_precision_close(worse, reference_lowp, oracle)
