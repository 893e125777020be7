"""The backend registry: named backends fail loudly, auto falls back once with a warning."""
import warnings

import pytest
import torch

from ipmt_fast.ops import registry

FAKE_OP = "test_registry_fake_op"


@pytest.fixture(autouse=True)
def restored_registry():
    """Every test here leaves the registry as it found it (the suite passes in any order)."""
    saved_ops = {op: dict(impls) for op, impls in registry._REGISTRY.items()}
    saved_warned = set(registry._WARNED)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved_ops)
    registry._WARNED.clear()
    registry._WARNED.update(saved_warned)


def _register_fake_op():
    registry.register(FAKE_OP, "reference", lambda: "reference")
    registry.register(FAKE_OP, "torch", lambda: "torch")
    registry.register(FAKE_OP, "compiled", lambda: "compiled", availability=lambda device: "no compiler (test)")


def test_named_backend_that_cannot_run_fails_loudly_with_the_reason():
    _register_fake_op()
    with pytest.raises(RuntimeError, match=r"backend 'compiled' of 'test_registry_fake_op' cannot run here: no compiler"):
        registry.get_implementation(FAKE_OP, "compiled", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"has no 'triton' backend; it has \('reference', 'torch', 'compiled'\)"):
        registry.get_implementation(FAKE_OP, "triton", torch.device("cpu"))


def test_auto_falls_back_with_one_warning():
    _register_fake_op()
    registry._WARNED.discard((FAKE_OP, "compiled", "cpu"))
    with pytest.warns(RuntimeWarning, match="backend 'compiled' unavailable \\(no compiler \\(test\\)\\); falling back"):
        assert registry.get_implementation(FAKE_OP, "auto", torch.device("cpu"))() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get_implementation(FAKE_OP, "auto", torch.device("cpu"))() == "torch"


def test_model_wide_names_resolve_per_op():
    assert registry.resolve_backend_name("ms_deform_sample", "compiled") == "compiled"
    assert registry.resolve_backend_name("masked_prototype_attention", "compiled") == "compiled"
    assert registry.resolve_backend_name("feed_forward", "triton") == "torch"
    assert registry.resolve_backend_name("masked_prototype_attention", "auto") == "auto"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        registry.resolve_backend_name("ms_deform_sample", "fastest")
    with pytest.raises(KeyError, match="unknown op"):
        registry.get_implementation("no_such_op", "auto", torch.device("cpu"))


def test_fake_op_is_gone_after_its_test():
    """Runs after the tests that register the fake op (file order): the fixture removed it."""
    assert FAKE_OP not in registry.registered_ops()
