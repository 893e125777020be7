"""What a CUDA graph captures, traced with fake CUDA tensors on a machine without a GPU.

For every backend in float32 and bf16 autocast, one training iteration as ``GraphedStep`` captures
it (forward with both losses, backward, gradient clipping, fused SGD and capturable AdamW at
device-side learning rates) and one inference forward as ``GraphedForward`` captures it run on
``FakeTensorMode`` tensors of device ``cuda`` in child processes (``tests/fake_cuda/``: a C++ shim
for the CUDA device guard and hooks a CPU-only torch lacks, and a recorder of every op). The
captured call must make no host read, create no CPU tensor and hand no CPU tensor to a CUDA op;
every ``aten`` op it dispatches must have a CUDA kernel (or a composite one) in a CUDA build of
this torch, and every custom op a fake implementation that runs. Faults put into the model's
forward show that each check catches what it is for.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from fake_cuda import capture_trace as ct
from fake_cuda.cuda_kernels import COMPOSITE, CUDA_KERNEL, composite_in_this_build, cuda_kernel_kind, \
    without_cuda_kernel
from fake_cuda.run_trace import trace_cases
from fake_cuda.shim import LIBRARY_PREFIX
from ipmt_fast.ops import extension, registry

CASES = [case.name for case in ct.all_cases()]
HOST_READ_OP = "aten::_local_scalar_dense"
# Per fault: the violation it must produce (kind, op, phase, the hook it comes from) and whether
# the trace stops there (a fake tensor has no value to read; an op without a fake cannot run).
FAULTS = {
    "host_read": (ct.HOST_READ, HOST_READ_OP, ct.WARMUP, "reads_a_value", True),
    "host_read_when_capturing": (ct.HOST_READ, HOST_READ_OP, ct.CAPTURE, "reads_a_value_when_capturing", True),
    "cpu_tensor": (ct.CPU_TENSOR, "aten::zeros", ct.CAPTURE, "makes_a_cpu_tensor", False),
    "cpu_operand": (ct.CPU_OPERAND, "aten::mul.Tensor", ct.CAPTURE, "uses_a_cpu_tensor", False),
    "op_without_fake": (ct.NO_FAKE, ct.SELFTEST_OP, ct.WARMUP, "calls_an_op_without_fake", True),
}
# The mode each fault is traced in: the training step for the faults the task names; the cheaper
# inference forward for the others (the recorder does not depend on the mode).
FAULT_MODES = {"host_read": "train", "host_read_when_capturing": "eval", "cpu_tensor": "train",
               "cpu_operand": "eval", "op_without_fake": "train"}
FAULT_CASES = {fault: ct.Case(mode, "torch", "none", fault).name for fault, mode in FAULT_MODES.items()}
# Ops of torch 2.13's forms that show a part of the training iteration was captured.
TRAINING_MARKERS = {
    "SGD, fused, at a device learning rate": "aten::_fused_sgd_.tensor_lr",
    "AdamW, capturable, foreach": "aten::_foreach_lerp_.Scalar",
    "gradient-norm clipping": "aten::_foreach_norm.Scalar",
}
BACKWARD_SUFFIX = "_backward"
CUSTOM_OP_PREFIX = "ipmt_fast::"
LOW_PRECISION_DTYPES = ("bfloat16", "float16")


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Every case and every fault, traced once for the module. Skips where the shim cannot be
    built or is not needed (as the compiled backend's tests skip for want of a build tool)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the fake CUDA shim loads Linux shared libraries")
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch has the CUDA guard and hooks the shim stands in for; on its GPU "
                    "test_graphs.py captures for real")
    reason = extension.build_tools_reason()
    if reason is not None:
        pytest.skip(f"the fake CUDA shim and the compiled backend need a C++ build: {reason}")
    return trace_cases(CASES + list(FAULT_CASES.values()), tmp_path_factory.mktemp("capture_trace"))


def _describe(report) -> str:
    return json.dumps({key: report.get(key) for key in ("error", "violations", "traceback")}, indent=1)[-4000:]


@pytest.mark.parametrize("name", CASES)
def test_the_captured_call_is_capture_safe(traces, name):
    report = traces["reports"][name]
    assert report["error"] is None, _describe(report)
    assert report["violations"] == [], _describe(report)
    assert all(report["custom_ops"].values()), report["custom_ops"]


@pytest.mark.parametrize("name", CASES)
def test_every_aten_op_has_a_cuda_kernel(traces, name):
    ops = traces["reports"][name]["ops"]
    assert without_cuda_kernel(ops) == []
    aten = [op for op in ops if op.startswith("aten::")]
    # The file's composite verdicts agree with this build's registrations.
    assert [op for op in aten if cuda_kernel_kind(op) == COMPOSITE and not composite_in_this_build(op)] == []


@pytest.mark.parametrize("name", CASES)
def test_the_trace_covers_the_iteration(traces, name):
    """Not a vacuous pass: the captured call holds the parts of the step, in the precision and
    with the backends asked for."""
    case, report = ct.Case.parse(name), traces["reports"][name]
    ops = report["ops"]
    backward = [op for op in ops if op.endswith(BACKWARD_SUFFIX)]
    if case.mode == "train":
        assert {part: op for part, op in TRAINING_MARKERS.items() if op not in ops} == {}
        assert backward, "no backward op in the captured training iteration"
    else:
        assert {part: op for part, op in TRAINING_MARKERS.items() if op in ops} == {}
        assert backward == []
    low_precision = {dtype: n for dtype, n in report["output_dtypes"].items() if dtype in LOW_PRECISION_DTYPES}
    assert set(low_precision) == ({"bfloat16"} if case.amp == "bf16" else set()), report["output_dtypes"]
    expected = ct.expected_auto_choices() if case.backend == "auto" else \
        {op: registry.resolve_backend_name(op, case.backend) for op in registry.registered_ops()}
    assert report["backends"] == expected
    custom = [op for op in ops if op.startswith(CUSTOM_OP_PREFIX)]
    kernel_backends = {"triton", "compiled"} & set(expected.values())
    assert bool(custom) == bool(kernel_backends), (custom, expected)
    if case.mode == "train" and kernel_backends:
        assert [op for op in custom if op.endswith(BACKWARD_SUFFIX)], custom


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_caught(traces, fault):
    kind, op, phase, hook, stops = FAULTS[fault]
    report = traces["reports"][FAULT_CASES[fault]]
    assert [(v["kind"], v["op"], v["phase"]) for v in report["violations"]] == [(kind, op, phase)], _describe(report)
    assert report["violations"][0]["where"].endswith(f"in {hook}"), report["violations"][0]
    assert (report["error"] is not None) == stops, _describe(report)
    if stops:
        assert op in report["error"] and phase in report["error"]
    else:  # the trace went on to the end of the call
        clean = traces["reports"][ct.Case(FAULT_MODES[fault], "torch", "none").name]
        assert set(report["ops"]) >= set(clean["ops"])


def test_the_fake_cuda_stays_in_the_child_processes(traces):
    for environment in traces["environment"]:
        assert environment == {"cuda_is_available": False, "accelerator": "cuda"}
    assert not torch.cuda.is_available()
    assert torch.accelerator.current_accelerator() is None
    maps = Path("/proc/self/maps")
    if maps.is_file():
        assert LIBRARY_PREFIX not in maps.read_text()


def test_cuda_kernel_verdicts_of_known_ops():
    assert cuda_kernel_kind("aten::mm") == CUDA_KERNEL  # structured: through mm.out
    assert cuda_kernel_kind("aten::add.Tensor") == CUDA_KERNEL  # through add.out's generated loops
    assert cuda_kernel_kind("aten::_foreach_add_.Scalar") == CUDA_KERNEL
    assert cuda_kernel_kind("aten::linear") == COMPOSITE  # no dispatch section
    assert cuda_kernel_kind("aten::_fused_sgd.tensor_lr") == COMPOSITE  # autogenerated
    assert cuda_kernel_kind("aten::to_mkldnn") is None  # CPU only
    assert cuda_kernel_kind("aten::no_such_op") is None
    assert without_cuda_kernel(["aten::mm", "aten::to_mkldnn", "ipmt_fast::feed_forward"]) == ["aten::to_mkldnn"]
