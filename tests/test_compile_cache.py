"""torch.compile's on-disk caches are keyed to this version's operators (ipmt_fast.compile_cache):
a graph compiled against one definition of the custom ops is never served for another."""
import sys

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomSchedulerPass
from torch._inductor.utils import fresh_cache

from ipmt_fast import compile_cache, inductor_fix


def test_operator_sources_are_the_files_that_define_the_ops():
    names = {path.name for path in compile_cache.operator_sources()}
    # Python registration and fakes, C++ schemas and kernels, CUDA kernels, Triton kernels.
    assert {"blocks.py", "_library.py", "registry.py", "ops.cpp", "blocks.cpp", "autograd.cpp",
            "ms_deform_sample_cuda.cu", "tensor_utils.h", "deform_sample.py", "prototype_attention.py"} <= names
    assert not names & {"network.py", "transformer.py", "backbone.py"}  # traced code keys the graph itself


def test_digest_follows_every_byte(tmp_path):
    first, second = tmp_path / "ops.cpp", tmp_path / "blocks.py"
    first.write_text("m.def(\"op(Tensor x) -> (Tensor out, Tensor saved)\");\n")
    second.write_text("def fake(x):\n    return x, x\n")
    before = compile_cache.digest_of([first, second])
    assert compile_cache.digest_of([first, second]) == before
    first.write_text("m.def(\"op(Tensor x) -> (Tensor out)\");\n")
    assert compile_cache.digest_of([first, second]) != before
    assert compile_cache.operators_digest() == compile_cache.digest_of(compile_cache.operator_sources())


def test_the_installed_pass_salts_the_key_and_leaves_the_graph():
    salt = inductor_config._pre_fusion_custom_pass
    assert isinstance(salt, CustomSchedulerPass)
    assert salt.uuid() == compile_cache.cache_key_salt()
    assert compile_cache.operators_digest() in salt.uuid()
    fix_applied = torch._inductor.scheduler.SchedulerNode.recompute_size_and_body is inductor_fix._recompute_size_and_body
    assert (inductor_fix.FIX_IDENTIFIER in salt.uuid()) == fix_applied
    assert salt(["node"]) == ["node"]
    assert compile_cache.install() is True
    assert inductor_config._pre_fusion_custom_pass is salt  # idempotent: not wrapped twice


def test_a_users_pass_keeps_running_inside_the_salt():
    class Reverse(CustomSchedulerPass):
        def __call__(self, nodes):
            return nodes[::-1]

        def uuid(self):
            return "users-reverse-pass"

    # inductor_config.patch, not monkeypatch: undoing a monkeypatch deletes the setting from
    # Inductor's config module.
    with inductor_config.patch(_pre_fusion_custom_pass=Reverse()):
        assert compile_cache.install() is True
        salt = inductor_config._pre_fusion_custom_pass
        assert salt([1, 2, 3]) == [3, 2, 1]
        assert salt.uuid() == f"{compile_cache.cache_key_salt()}; wrapped: users-reverse-pass"

    def uncacheable(nodes):  # a plain callable: Inductor bypasses its caches for it anyway
        return nodes
    with inductor_config.patch(_pre_fusion_custom_pass=uncacheable):
        assert compile_cache.install() is False
        assert inductor_config._pre_fusion_custom_pass is uncacheable
    assert isinstance(inductor_config._pre_fusion_custom_pass, CustomSchedulerPass)


def test_without_inductors_custom_passes_nothing_is_installed(monkeypatch):
    installed = inductor_config._pre_fusion_custom_pass
    monkeypatch.setitem(sys.modules, "torch._inductor.custom_graph_pass", None)  # its import fails
    assert compile_cache.install() is False
    assert inductor_config._pre_fusion_custom_pass is installed


def _compile_and_count(fn, x):
    """Compile ``fn`` afresh (Dynamo's in-memory cache cleared), call it, return the on-disk
    cache's (hits, misses) that compilation counted."""
    torch._dynamo.reset()
    counters.clear()
    torch.compile(fn, fullgraph=True)(x)
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def test_changed_operators_miss_the_cache(monkeypatch):
    """The failure this guards against: an upgrade changed a block's outputs, and Inductor served
    the graph compiled before it (an output size assertion at the first call)."""
    def fn(x):
        return (x * 2).sin().sum()

    x = torch.randn(8)
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True):
        assert _compile_and_count(fn, x) == (0, 1)
        assert _compile_and_count(fn, x) == (1, 0)  # same operators: served from disk
        monkeypatch.setattr(compile_cache, "operators_digest", lambda: "0" * 64)  # as after an upgrade
        assert _compile_and_count(fn, x) == (0, 1)
    torch._dynamo.reset()
