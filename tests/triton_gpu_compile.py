"""Compile every Triton kernel for GPUs that are not here, as the launchers would launch it.

The launchers in ``ipmt_fast.kernels`` are called with fake CUDA tensors (``FakeTensorMode``:
shapes, strides and dtypes, no data) at the shapes IPMT gives them; their
``wrap_triton(kernel)[grid](...)`` launches are recorded instead of run. Each recorded launch is
specialised by Triton's own JIT binder for the target (argument dtypes and alignment, integers
equal to 1 or divisible by 16, constexprs, compile options such as ``num_warps``), as a launch on
that GPU would be, and compiled with ``triton.compile`` for the target architecture. Resources
come from the compiled metadata (shared memory) and from the log of the ``ptxas -v`` run that made
the cubin (registers, spill stores and loads). So the configurations checked are the launchers'
own choices: nothing here lists block sizes or warps.

By default one specialisation per configuration (kernel, constexprs, compile options, argument
dtypes) is compiled, the first the shapes below produce; ``--every-specialisation`` compiles
every distinct specialisation of every shape (how the integer arguments specialise too).

    python tests/triton_gpu_compile.py [--arch 80] [--every-specialisation] [--json]

prints the table (or JSON for the test suite). It needs Triton's NVIDIA backend (its ``ptxas``),
not a GPU, and must run without ``TRITON_INTERPRET=1`` (``triton.jit`` then makes interpreted
functions, which do not compile).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import pkgutil
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a target GPU allows one thread block, and its SM count (some launchers size grids by it)."""

    name: str
    # Most dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
    shared_memory_per_block: int
    # 32-bit registers of one block (regsPerBlock): threads x registers per thread may not exceed it.
    registers_per_block: int
    multiprocessors: int


KIB = 1024
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": compute
# capability 8.0 (A100) lets a block opt in to 163 KB of shared memory, 9.0 (H100) to 227 KB;
# both have 64 K registers per block. SM counts: A100 108, H100 SXM 132.
ARCHITECTURES = {
    80: Architecture("sm_80 (A100)", 163 * KIB, 64 * KIB, 108),
    90: Architecture("sm_90 (H100)", 227 * KIB, 64 * KIB, 132),
}

# IPMT's shapes: an input image of px pixels gives a map of ((px - 1) / 8 + 1)^2 tokens.
IMAGE_SIZES = (41, 49, 97, 473)
SHOTS = (1, 5)
CHANNELS = (384, 64)                  # the published width and the synthetic configuration's
DEFORM_HEADS = {384: (1, 4, 8), 64: (1,)}  # IPMT samples with 1 head; Deformable-DETR with 8
DEFORM_POINTS = 9
BATCH = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# CUDA allocations are aligned to at least this many bytes; a view adds its storage offset.
ALLOCATION_ALIGNMENT = 512


def tokens_per_map(image_size: int) -> int:
    side = (image_size - 1) // 8 + 1
    return side * side


def kernel_modules() -> list:
    """Every module of ``ipmt_fast.kernels``."""
    import ipmt_fast.kernels as package

    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def all_kernels() -> List[str]:
    """Names of the ``@triton.jit`` kernels (``*_kernel``) defined in ``ipmt_fast.kernels``."""
    from triton.runtime.jit import JITFunction

    return sorted({name for module in kernel_modules() for name, value in vars(module).items()
                   if isinstance(value, JITFunction) and name.endswith("_kernel")})


# ------------------------------------------------------------------------------------------------
# Recording the launchers' launches
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One ``wrap_triton(kernel)[grid](*args, **kwargs)`` call of a launcher."""

    kernel: object
    args: tuple
    kwargs: dict
    call_site: str


@contextlib.contextmanager
def recorded_launches(architecture: Architecture):
    """Launchers called inside record their kernel launches (and run none) into the yielded
    list; set ``call_site["name"]`` to label them. Call them with tensors made under
    ``FakeTensorMode`` on a ``cuda`` device so that they take their CUDA branches; the launchers
    that size their grids by the SM count get the target's."""
    from ipmt_fast.kernels import prototype_attention

    launches: List[Launch] = []
    call_site = {"name": ""}

    def record(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append(Launch(kernel, args, kwargs, call_site["name"]))
        return Grid()

    patches = [(module, "wrap_triton", record) for module in kernel_modules() if hasattr(module, "wrap_triton")]
    patches.append((prototype_attention, "_multiprocessor_count", lambda device_index: architecture.multiprocessors))
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield launches, call_site
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------------
# IPMT's calls of the launchers (what the ops in ipmt_fast/ops pass them, at the model's shapes)
# ------------------------------------------------------------------------------------------------

def _cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def _prototype_attention_calls(batch, tokens, shots, channels, dtype):
    from ipmt_fast.kernels import prototype_attention as kernels
    from ipmt_fast.ops.prototype_attention import MASKED_LOGIT_BIAS

    scale = channels ** -0.5
    # Support side: the shots' tokens side by side; query side: one map's tokens.
    for count in sorted({tokens * shots, tokens}):
        query_key = _cuda(batch, 1, channels, dtype=dtype)
        token_rows = _cuda(batch, count, channels, dtype=dtype)
        mask = _cuda(batch, count, dtype=torch.bool)
        for keep in (None, _cuda(batch, 1, count, dtype=dtype)):  # evaluation / attention dropout
            pooled, lse = kernels.softmax_pool_forward(query_key, token_rows, mask, keep, scale, MASKED_LOGIT_BIAS)
            for need_grad_tokens in (True, False):
                kernels.softmax_pool_backward(query_key, token_rows, mask, keep, scale, MASKED_LOGIT_BIAS, pooled,
                                              lse, _cuda(batch, 1, channels, dtype=dtype), need_grad_tokens)


def _mask_logits_calls(batch, tokens, shots, channels, dtype):
    from ipmt_fast.kernels import query_activation as kernels
    from ipmt_fast.ops.query_activation import mask_logit_threshold

    embedding = _cuda(batch, 1, channels, dtype=dtype)
    # The query map's tokens (a (B, N, C) view of a channels-first map, then contiguous after a
    # layer norm) and the support's (shots side by side).
    for token_rows in (_cuda(batch, channels, tokens, dtype=dtype).transpose(1, 2),
                       _cuda(batch, tokens, channels, dtype=dtype),
                       _cuda(batch, tokens * shots, channels, dtype=dtype)):
        logits, _ = kernels.thresholded_logits(embedding, token_rows, mask_logit_threshold(dtype))
        kernels.logits_backward(torch.empty_like(logits), embedding, token_rows)


def _query_update_calls(batch, tokens, shots, channels, dtype):
    from ipmt_fast.kernels import query_activation as kernels

    query = _cuda(batch, tokens, channels, dtype=dtype)
    query_weight = _cuda(channels, 2 * channels, dtype=dtype).narrow(1, 0, channels)  # half of the 1x1 conv
    bias = _cuda(batch, channels, dtype=kernels.accumulator_dtype(dtype))
    out = kernels.bias_relu_matmul(query, query_weight, bias)
    kernels.relu_grad_matmul(torch.empty_like(out), out, query_weight)


def _deform_sample_calls(batch, tokens, shots, channels, dtype):
    from ipmt_fast.kernels import deform_sample as kernels

    side = int(round(tokens ** 0.5))
    for heads in DEFORM_HEADS[channels]:
        value = _cuda(batch, tokens, heads, channels // heads, dtype=dtype)
        locations = _cuda(batch, tokens, heads, 1, DEFORM_POINTS, 2, dtype=dtype)
        weights = _cuda(batch, tokens, heads, 1, DEFORM_POINTS, dtype=dtype)
        for fused in (True, False):  # grid_sample's one or two roundings of the source coordinate
            out = kernels.ms_deform_sample_forward(value, [(side, side)], locations, weights, fused)
            kernels.ms_deform_sample_backward(torch.empty_like(out), value, [(side, side)], locations, weights, fused)


CALL_SITES: Dict[str, Callable] = {
    "masked_prototype_attention": _prototype_attention_calls,
    "prototype_mask_logits": _mask_logits_calls,
    "prototype_query_update": _query_update_calls,
    "ms_deform_sample": _deform_sample_calls,
}


def record_ipmt_launches(architecture: Architecture) -> List[Launch]:
    """Every launch the launchers make for IPMT's calls at every shape, dtype and variant."""
    with recorded_launches(architecture) as (launches, call_site), FakeTensorMode():
        for (op, calls), image_size, shots, channels, dtype in itertools.product(
                CALL_SITES.items(), IMAGE_SIZES, SHOTS, CHANNELS, DTYPES):
            call_site["name"] = f"{op} {image_size}px {shots}-shot C={channels} {str(dtype).split('.')[-1]}"
            calls(BATCH, tokens_per_map(image_size), shots, channels, dtype)
    return launches


# ------------------------------------------------------------------------------------------------
# Specialising and compiling a launch for a target, as Triton's JIT would
# ------------------------------------------------------------------------------------------------

class _DeviceArgument:
    """What Triton's JIT reads of a tensor argument to specialise a launch: dtype and address."""

    def __init__(self, tensor: torch.Tensor, allocation: int):
        self.dtype = tensor.dtype
        self._address = allocation * ALLOCATION_ALIGNMENT + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclasses.dataclass
class Specialisation:
    """A launch as Triton's JIT specialises it for one target: what it compiles."""

    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object            # the backend's compile options (CUDAOptions)
    launch_options: dict       # the launch's keyword arguments that are compile options
    call_sites: List[str]

    def configuration(self) -> str:
        """The launcher's choices: kernel, its constexpr parameters, options, argument dtypes."""
        chosen = {name: self.constexprs[(i,)] for i, name in enumerate(self.kernel.arg_names)
                  if self.kernel.params[i].is_constexpr}
        dtypes = sorted({kind for kind in self.signature.values() if kind.startswith("*")})
        return repr((self.kernel.__name__, sorted(chosen.items(), key=str), self.options.hash(), dtypes))

    def key(self) -> str:
        return repr((self.configuration(), self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items())))

    def describe(self) -> str:
        names = self.kernel.arg_names
        chosen = {names[path[0]]: value for path, value in self.constexprs.items()
                  if self.kernel.params[path[0]].is_constexpr}
        return ", ".join(f"{name}={getattr(value, 'name', value)}" for name, value in chosen.items())


def specialise(launch: Launch, target) -> Specialisation:
    """Triton's JIT binder and argument packing applied to a recorded launch, for ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kernel = launch.kernel
    allocations = itertools.count(1)
    args = [_DeviceArgument(a, next(allocations)) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: _DeviceArgument(v, next(allocations)) if isinstance(v, torch.Tensor) else v
              for k, v in launch.kwargs.items()}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound_args, specialization, options)
    launch_options = {k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names}
    return Specialisation(kernel, signature, constexprs, attrs, options, launch_options, [launch.call_site])


def distinct_specialisations(launches: Sequence[Launch], target, every_specialisation: bool) -> List[Specialisation]:
    """One specialisation per configuration (the first launch's), or every distinct one; each
    with every call site that made it."""
    distinct: Dict[str, Specialisation] = {}
    for launch in launches:
        spec = specialise(launch, target)
        key = spec.key() if every_specialisation else spec.configuration()
        if key in distinct:
            distinct[key].call_sites.append(launch.call_site)
        else:
            distinct[key] = spec
    return list(distinct.values())


@dataclasses.dataclass
class Resources:
    """What one specialisation compiled to."""

    kernel: str
    config: str
    launch_options: dict
    num_warps: int
    num_stages: int
    shared_memory: int
    registers: int
    spill_stores: int
    spill_loads: int
    fused_multiply_adds: Dict[str, int]   # source line -> fma instructions in the PTX
    call_sites: List[str]


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
UNATTRIBUTED = "<no source line>"


def fused_multiply_adds(ptx: str) -> Dict[str, int]:
    """The PTX's ``fma`` instructions, counted by the source line (its text) their ``.loc`` names."""
    files = {number: path for number, path in re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx)}
    sources: Dict[str, List[str]] = {}
    counts: Dict[str, int] = collections.Counter()
    line = UNATTRIBUTED
    for instruction in ptx.splitlines():
        location = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", instruction)
        if location:
            path, number = files.get(location.group(1)), int(location.group(2))
            if path is not None and path not in sources:
                with open(path, encoding="utf-8") as f:
                    sources[path] = f.read().splitlines()
            line = sources[path][number - 1].strip() if path is not None and number > 0 else UNATTRIBUTED
        elif re.match(r"\s*fma\.", instruction):
            counts[line] += 1
    return dict(counts)


def compile_specialisation(spec: Specialisation, target) -> Resources:
    """``triton.compile`` of one specialisation; registers and spills from its ``ptxas -v`` log."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True       # Triton runs ptxas -v; print its log
        knobs.compilation.always_compile = True  # a cache hit would run no ptxas
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=target, options=spec.options.__dict__)
    text = log.getvalue()
    registers, spills = PTXAS_REGISTERS.search(text), PTXAS_SPILLS.search(text)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas resource usage in the log of {spec.kernel.__name__}:\n{text}")
    return Resources(spec.kernel.__name__, spec.describe(), spec.launch_options, spec.options.num_warps,
                     spec.options.num_stages, compiled.metadata.shared, int(registers.group(1)),
                     int(spills.group(1)), int(spills.group(2)), fused_multiply_adds(compiled.asm["ptx"]),
                     spec.call_sites)


def contraction_contrast(spec: Specialisation, target) -> Resources:
    """``spec`` compiled with floating-point contraction on (what the launchers do not ask for)."""
    contracted = dataclasses.replace(spec, options=dataclasses.replace(spec.options, enable_fp_fusion=True))
    return compile_specialisation(contracted, target)


def compile_for(capability: int, every_specialisation: bool = False) -> dict:
    """Every recorded configuration (or specialisation) compiled for ``sm_<capability>``, and the
    two-rounding deformable sampling forward in float32 compiled again with contraction on."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    launches = record_ipmt_launches(ARCHITECTURES[capability])
    specs = distinct_specialisations(launches, target, every_specialisation)
    two_roundings = next(s for s in specs if s.kernel.__name__ == "_ms_deform_sample_fwd_kernel"
                         and "FUSED=False" in s.describe() and s.signature["value_ptr"] == "*fp32")
    return {"architecture": dataclasses.asdict(ARCHITECTURES[capability]), "kernels": all_kernels(),
            "launches": len(launches), "compiled": [dataclasses.asdict(compile_specialisation(s, target)) for s in specs],
            "contracted": dataclasses.asdict(contraction_contrast(two_roundings, target))}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHITECTURES),
                        help="compute capability (repeatable; default: all)")
    parser.add_argument("--every-specialisation", action="store_true",
                        help="compile every distinct specialisation, not one per configuration")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = {arch: compile_for(arch, args.every_specialisation) for arch in args.arch or sorted(ARCHITECTURES)}
    if args.json:
        json.dump(results, sys.stdout)
        return
    for arch, result in results.items():
        compiled = result["compiled"]
        spilling = [r for r in compiled if r["spill_stores"] or r["spill_loads"]]
        print(f"{result['architecture']['name']}: {result['launches']} launches, {len(compiled)} compiled, "
              f"max shared memory {max(r['shared_memory'] for r in compiled)} B, "
              f"max registers {max(r['registers'] for r in compiled)}, {len(spilling)} spilling")
        for r in compiled:
            print(f"  {r['kernel']:31s} warps={r['num_warps']:2d} stages={r['num_stages']} "
                  f"shared={r['shared_memory']:6d} regs={r['registers']:3d} "
                  f"spill={r['spill_stores']}/{r['spill_loads']}  {r['config']}  "
                  f"[{len(r['call_sites'])} launches, first {r['call_sites'][0]}]")


if __name__ == "__main__":
    main()
