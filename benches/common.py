"""Timing, memory and output helpers shared by the benchmarks.

Timing follows the usual rules for honest numbers: warm every variant up first (module load,
Triton/inductor compilation, allocator growth), then time the variants *interleaved* round by
round (so drift in clocks or background load hits all of them alike), many samples each, and
report the median with its spread. On CUDA a sample is bracketed by CUDA events; a sample holds
enough back-to-back calls to last ``min_sample_s`` so that event resolution does not matter.

Memory: the peak allocated bytes of one call above what was allocated before it (on CUDA from
the caching allocator's counters, on the CPU from the profiler's allocation events); on every
device the bytes of the tensors autograd saves for backward (unique storages, parameters and
buffers excluded), and on the CPU the process's peak resident set during the call.
"""
from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20

# When a benchmark's inputs are smaller than this many times the last-level cache, calls rotate
# over several input sets so repeated calls do not measure a warm cache.
CACHE_ROTATION_FACTOR = 2
MAX_INPUT_SETS = 16
# Assumed last-level cache when the machine does not say (bytes).
DEFAULT_CACHE_BYTES = 32 * MIB
# A timed sample holds at least this long a run of back-to-back calls (seconds), at most this many.
DEFAULT_MIN_SAMPLE_S = 1e-3
MAX_CALLS_PER_SAMPLE = 1000
# Bytes copied when measuring device-to-device bandwidth.
BANDWIDTH_PROBE_BYTES = 1 << 30

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def parse_with_device_defaults(parser, argv, defaults, parsed=None):
    """Parse ``argv`` (or take the already ``parsed`` namespace), resolve ``--device``, and fill
    every option left at None from ``defaults['cuda' or 'cpu']``. Returns ``(args, device)``."""
    args = parser.parse_args(argv) if parsed is None else parsed
    device = resolve_device(args.device)
    for key, value in defaults["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, device


def cpu_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_label(device: torch.device) -> str:
    """A folder name for the machine, e.g. ``cpu-2core`` or ``cuda-NVIDIA-H100-80GB-HBM3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    return f"{device.type}-{cpu_core_count()}core"


def results_dir(device: torch.device, out: Optional[str] = None) -> Path:
    path = Path(out) if out else RESULTS_ROOT / device_label(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_CACHE_BYTES))
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return DEFAULT_CACHE_BYTES


def input_set_count(set_bytes: int, device: torch.device) -> int:
    """How many distinct input sets to rotate over so successive calls miss the cache."""
    needed = CACHE_ROTATION_FACTOR * last_level_cache_bytes(device)
    if set_bytes >= needed:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(needed / max(set_bytes, 1)))


def measure_copy_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_PROBE_BYTES, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stats = measure_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=3, repeats=repeats)
    del src, dst
    return 2 * nbytes / stats["copy"].median


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Seconds per call: median, quartiles and extremes over ``n`` samples."""
    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int
    calls_per_sample: int
    # CPU quiet gate (see measure_interleaved): samples retaken because other processes ran
    # during them, and samples kept although they did (after MAX_RETAKES).
    retaken: int = 0
    disturbed: int = 0
    # Median CPU time of the calling thread per call: the host's cost of issuing the work (on a
    # GPU the rest of the wall time is the device's; on the CPU with one thread it is all of it).
    host_median: Optional[float] = None
    # The samples in the order they were taken (measure_interleaved: one per round), for
    # paired_ratio.
    in_round_order: Tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float], calls_per_sample: int, retaken: int = 0, disturbed: int = 0,
           host_samples: Sequence[float] = ()) -> "Stats":
        ordered = sorted(samples)
        if len(ordered) > 1:
            p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            p25 = p75 = ordered[0]
        host = statistics.median(host_samples) if host_samples else None
        return cls(statistics.median(ordered), p25, p75, ordered[0], ordered[-1], len(ordered), calls_per_sample,
                   retaken, disturbed, host, tuple(samples))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else float("nan")


def paired_ratio(numerator: Stats, denominator: Stats) -> Optional[float]:
    """Median over rounds of ``numerator``'s sample time over ``denominator``'s from the same round
    (``measure_interleaved`` takes one sample of each variant per round, close together in time):
    unlike the ratio of medians it cancels what drifts from round to round (a shared machine's
    load, its clock). None unless both have a sample in every round."""
    a, b = numerator.in_round_order, denominator.in_round_order
    if not a or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def _time_calls(fn: Callable[[], object], calls: int, device: torch.device) -> Tuple[float, float]:
    """Seconds per call: ``(wall clock, or CUDA events on a GPU; the calling thread's CPU time
    until the last call returned)``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_begin = time.thread_time()
        for _ in range(calls):
            fn()
        host = time.thread_time() - host_begin
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls, host / calls
    begin, host_begin = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - begin) / calls, (time.thread_time() - host_begin) / calls


class OtherProcessesClock:
    """CPU seconds that *other* processes used since :meth:`start` (Linux ``/proc``; all CPUs,
    steal time included). Resolution: one clock tick (usually 10 ms)."""

    TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

    @staticmethod
    def available() -> bool:
        return Path("/proc/stat").is_file() and Path("/proc/self/stat").is_file()

    @staticmethod
    def _ticks():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        own = int(after_name[11]) + int(after_name[12])  # utime + stime of all our threads
        return user + nice + system + irq + softirq + steal, own

    def start(self) -> "OtherProcessesClock":
        self._busy, self._own = self._ticks()
        return self

    def seconds(self) -> float:
        busy, own = self._ticks()
        return max((busy - self._busy) - (own - self._own), 0) * self.TICK_S


# CPU quiet gate: a sample counts as disturbed when other processes used more than this share of
# one core during it (plus two ticks of slack); it is retaken up to MAX_RETAKES times, each time
# after waiting (up to the caller's limit) for a window in which the others stay under that share.
QUIET_OTHER_CORES = 0.1
QUIET_WINDOW_S = 0.3
MAX_RETAKES = 3
# The first call after the gate's sleep runs slower (measured: a 5 ms CPU matmul took 7 ms); a
# sample shorter than this gets one untimed call first. Longer samples absorb the lag (< 1%).
REWARM_BELOW_S = 0.1


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait until other processes stay under QUIET_OTHER_CORES for one window; returns seconds waited."""
    waited = 0.0
    while waited < max_wait_s:
        clock = OtherProcessesClock().start()
        time.sleep(QUIET_WINDOW_S)
        if clock.seconds() <= QUIET_OTHER_CORES * QUIET_WINDOW_S:
            break
        waited += QUIET_WINDOW_S
    return waited


def measure_interleaved(variants: Dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                        repeats: int = 20, min_sample_s: float = DEFAULT_MIN_SAMPLE_S,
                        failures: Optional[Dict[str, str]] = None, log: Callable[[str], None] = print,
                        quiet_wait_s: float = 0.0) -> Dict[str, Stats]:
    """Time every variant: warm all up, then ``repeats`` rounds, each round one sample of each.

    The order within a round rotates from round to round. A variant that raises during warm-up
    is dropped, its reason stored in ``failures`` (and logged). Returns seconds per call.

    ``quiet_wait_s > 0`` (CPU only) turns on the quiet gate for machines shared with other work:
    before each sample wait for other processes to go quiet, and retake a sample during which
    they ran (see QUIET_OTHER_CORES), waiting at most ``quiet_wait_s`` in all per sample; the
    counts of retaken and kept-although-disturbed samples land in ``Stats``.
    """
    gate = quiet_wait_s > 0 and device.type == "cpu" and OtherProcessesClock.available()
    failures = {} if failures is None else failures
    calls: Dict[str, int] = {}
    sample_s: Dict[str, float] = {}
    for name, fn in variants.items():
        try:
            for _ in range(max(warmup, 1)):
                fn()
            synchronize(device)
            once, _ = _time_calls(fn, 1, device)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, not fatal
            failures[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  skipping {name}: {failures[name]}")
            continue
        calls[name] = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_s / max(once, 1e-9))))
        sample_s[name] = once * calls[name]
    names = list(calls)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    host_samples: Dict[str, List[float]] = {name: [] for name in names}
    retaken = dict.fromkeys(names, 0)
    disturbed = dict.fromkeys(names, 0)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                wait_left = quiet_wait_s  # shared by the attempts at this sample
                for attempt in range(MAX_RETAKES + 1):
                    if gate:
                        wait_left -= wait_for_quiet(wait_left)
                        if sample_s[name] < REWARM_BELOW_S:
                            variants[name]()
                        clock = OtherProcessesClock().start()
                    seconds, host_seconds = _time_calls(variants[name], calls[name], device)
                    if not gate:
                        break
                    others_ran = clock.seconds() > QUIET_OTHER_CORES * seconds * calls[name] + 2 * clock.TICK_S
                    if not others_ran:
                        break
                    if attempt == MAX_RETAKES:
                        disturbed[name] += 1
                    else:
                        retaken[name] += 1
                samples[name].append(seconds)
                host_samples[name].append(host_seconds)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Stats.of(samples[name], calls[name], retaken[name], disturbed[name], host_samples[name])
            for name in names}


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


class SavedTensorBytes:
    """Context manager counting the bytes autograd saves for backward inside it.

    Each storage is counted once, whole (a saved view keeps its whole storage alive), and the
    storages of ``excluded`` tensors (parameters, buffers) are not counted. Tensors a custom
    ``autograd.Function`` keeps as plain ``ctx`` attributes instead of ``save_for_backward`` are
    invisible here.

    With ``trace=True`` each storage is also attributed to the source line that saved it (the
    innermost frame in the project's code), for :meth:`by_site`.
    """

    def __init__(self, excluded: Iterable[torch.Tensor] = (), trace: bool = False):
        self._excluded = {_storage_key(t) for t in excluded}
        self._seen: Dict[tuple, int] = {}
        self._sites: Dict[tuple, str] = {}
        self._trace = trace
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        try:
            key = _storage_key(t)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            key, nbytes = ("nostorage", id(t)), t.numel() * t.element_size()
        if key not in self._excluded and key[-1] != 0:
            self._seen[key] = nbytes
            if self._trace and key not in self._sites:
                self._sites[key] = f"{_project_frame()} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def by_site(self) -> List[tuple]:
        """``(bytes, count, site)`` per saving source line and tensor shape, largest first (trace=True)."""
        totals: Dict[str, List[int]] = {}
        for key, site in self._sites.items():
            entry = totals.setdefault(site, [0, 0])
            entry[0] += self._seen[key]
            entry[1] += 1
        return sorted(((b, n, site) for site, (b, n) in totals.items()), reverse=True)

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# Source folders whose frames name a saving site (the project's code, not torch's).
PROJECT_DIRS = ("ipmt_fast", "kernels")


def _project_frame() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        parts = Path(frame.filename).parts
        if any(d in parts for d in PROJECT_DIRS) and "benches" not in parts:
            return f"{'/'.join(parts[-2:])}:{frame.lineno} {frame.name}: {(frame.line or '').strip()[:60]}"
    return "(outside the project)"


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    if peak is None:  # no /proc: ru_maxrss (KiB on Linux, bytes on macOS), not resettable
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


# The name under which :func:`cpu_peak_bytes` marks the call it measures in the profiler's events.
MEASURED_CALL = "benches.measured_call"


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of CPU tensor memory live during one call of ``fn`` above what was live when
    it started: the CPU twin of CUDA's ``max_memory_allocated()`` after a reset, less
    ``memory_allocated()`` before the call (tensor bytes as requested, without the C allocator's
    own overhead). Read from ``torch.profiler``'s allocation events. The profiler sees the size of
    a freed block only if it saw its allocation, so ``fn`` runs twice under it and the second call
    is measured: the blocks it frees (last call's gradients, outputs) were allocated in the first.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function(MEASURED_CALL):
            fn()
    events, allocations, window = list(prof.profiler.kineto_results.experimental_event_tree()), [], None
    while events:
        event = events.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        elif event.name == MEASURED_CALL:
            window = (event.start_time_ns, event.end_time_ns)
        events.extend(event.children)
    if window is None:
        raise RuntimeError(f"the profiler recorded no {MEASURED_CALL!r} event")
    live = peak = 0
    for time_ns, size in sorted(allocations):
        if window[0] <= time_ns <= window[1]:
            live += size
            peak = max(peak, live)
    return peak


def measure_memory(fn: Callable[[], object], device: torch.device, excluded: Iterable[torch.Tensor] = ()) -> dict:
    """Run ``fn`` and report its memory.

    Keys: ``saved_bytes`` (autograd's saved tensors, see :class:`SavedTensorBytes`);
    ``peak_bytes``: on CUDA the peak allocated above the allocation before the call, on the CPU
    the same from the profiler's allocation events (:func:`cpu_peak_bytes`: two more calls);
    on the CPU also ``peak_rss_bytes`` (process peak resident set during the call) and
    ``rss_rise_bytes`` (that peak above the resident set before the call; the C allocator may
    reuse memory it already holds, so this is a lower bound).
    """
    gc.collect()
    synchronize(device)
    saved = SavedTensorBytes(excluded)
    result = {}
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with saved:
            fn()
        synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        rss_before = _proc_status_bytes("VmRSS") or 0
        resettable = reset_peak_rss()
        with saved:
            fn()
        peak = peak_rss_bytes()
        result["peak_rss_bytes"] = peak
        result["rss_rise_bytes"] = max(peak - rss_before, 0) if resettable else None
        result["peak_bytes"] = cpu_peak_bytes(fn)
    result["saved_bytes"] = saved.nbytes
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------
# Host work: ops dispatched, kernels launched
# ----------------------------------------------------------------------------------------------
# Device activity the profiler reports that is not a kernel launch.
NON_KERNEL_PREFIXES = ("Memcpy", "Memset")


def count_dispatches(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once under :class:`ipmt_fast.instrument.DispatchCounter`: ``ops`` (every op it
    dispatched from Python and autograd, forward and backward; an ``ipmt_fast`` custom op counts
    once), ``inner_ops`` (the ATen calls those custom ops made, from C++ or Python), ``device_ops``
    (those of both that do device work: no view, allocation or custom op; on a GPU, the kernels
    launched) and ``host_syncs`` (how many read device values on the host or moved data between
    host and device)."""
    from ipmt_fast.instrument import DispatchCounter

    with DispatchCounter(inside_custom_ops=True) as counter:
        fn()
    return {"ops": counter.total, "inner_ops": counter.inner_total,
            "device_ops": counter.device_total + counter.inner_device_total, "host_syncs": len(counter.host_syncs)}


# The ops whose arithmetic no fusion removes: convolutions and matrix products (their CPU kernels;
# the patch-row convolution's products are mm calls of its own; the frozen backbone's oneDNN
# convolutions with their ReLU or add as post-ops are counted whole).
DENSE_OPS = frozenset({"aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                       "aten::_slow_conv2d_backward", "aten::slow_conv_dilated2d",
                       "mkldnn::_convolution_pointwise", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"})


# Profiled calls per dense time: the least is kept (an op's time under the profiler is wall time,
# which a descheduled thread inflates).
DENSE_TIME_CALLS = 3


def dense_time_ms(fn: Callable[[], object], device: torch.device, calls: int = DENSE_TIME_CALLS) -> Optional[float]:
    """Milliseconds a call of ``fn`` spends inside ``DENSE_OPS`` (their self time under
    ``torch.profiler``, the least of ``calls`` calls), on the CPU; None elsewhere. A reference time
    over it is the largest speedup that fusing everything else could give."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    times = []
    for _ in range(calls):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        times.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in DENSE_OPS) / 1e3)
    return min(times)


# Probes of the machine's dense throughput, per device type: the side of a square matrix product
# and the (batch, channels, side) of a 3x3 convolution as large as the network's largest (ResNet
# layer4's at 473 px, query and support), batch raised on a GPU so that launches do not count.
PEAK_PROBE_MM_SIDE = {"cpu": 2048, "cuda": 8192}
PEAK_PROBE_CONV = {"cpu": (2, 512, 60), "cuda": (32, 512, 60)}
PEAK_PROBE_REPEATS = 3


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` in its matrix products and convolutions,
    forward and backward (PyTorch's ``FlopCounterMode``: two per multiply-add), with oneDNN off so
    that the backbone's fused CPU convolutions run as ATen convolutions it sees. Work inside a
    custom op is invisible to it: count a variant made of ATen ops."""
    from torch.utils.flop_counter import FlopCounterMode

    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mkldnn.enabled = onednn
    return counter.get_total_flops()


def dense_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The most floating-point operations per second this machine shows on the probes (a square
    matrix product and a 3x3 convolution, ``PEAK_PROBE_*``) in ``dtype``: the fastest sample of
    either. A call's FLOPs over it bound the call's time from below, as far as these probes know
    the machine."""
    side = PEAK_PROBE_MM_SIDE[device.type]
    batch, channels, size = PEAK_PROBE_CONV[device.type]
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    probes = {"mm": (lambda: a @ b, 2 * side ** 3),
              "conv": (lambda: torch.nn.functional.conv2d(x, w, padding=1),
                       2 * batch * channels * size * size * channels * 9)}
    stats = measure_interleaved({name: fn for name, (fn, _) in probes.items()}, device, warmup=1,
                                repeats=PEAK_PROBE_REPEATS, log=lambda _: None)
    return max(flops / stats[name].min for name, (_, flops) in probes.items())


def count_cuda_kernels(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """CUDA kernels ``fn`` launches in one call, as ``torch.profiler`` reports them (memory copies
    and sets left out; kernels replayed from a CUDA graph included); None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events()
               if e.device_type == DeviceType.CUDA and not e.name.startswith(NON_KERNEL_PREFIXES))


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
# Environment variables that change how the host allocates memory. On the CPU the fresh pages of
# each large tensor cost page faults that the allocator's policy decides (glibc's defaults return
# large blocks to the system on free; NOTES.md, "The CPU allocator's share"), and the fused and the
# published forms allocate differently: every result records which policy it ran under.
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "MALLOC_CONF", "THP_MEM_ALLOC_ENABLE")


def allocator_settings() -> Dict[str, str]:
    """The set variables of ``ALLOCATOR_ENV`` (empty: the C library's default allocator)."""
    return {name: os.environ[name] for name in ALLOCATOR_ENV if os.environ.get(name)}


def describe_allocator() -> str:
    """One phrase for a bench's header line: the allocator settings, or that there are none."""
    settings = allocator_settings()
    return " ".join(f"{k}={v}" for k, v in settings.items()) if settings else "default host allocator"


def machine_info(device: torch.device) -> dict:
    info = {"device": device_label(device), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": cpu_core_count(), "torch_threads": torch.get_num_threads(),
            "processor": _cpu_model_name(), "platform": platform.platform(),
            "allocator_env": allocator_settings()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", None), cuda=torch.version.cuda)
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    if device.type == "cuda":
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings: record it
        info["loadavg_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_metadata(device: torch.device, module: str) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "-m", module] + sys.argv[1:]), "machine": machine_info(device)}


def write_csv(rows: List[dict], path: Path) -> None:
    keys: List[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_json(payload: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def stats_fields(stats: Stats) -> dict:
    """Stats as milliseconds, for rows."""
    not_durations = ("n", "calls_per_sample", "retaken", "disturbed", "in_round_order")
    return {f"{k}_ms": None if v is None else v * 1e3 for k, v in asdict(stats).items() if k not in not_durations} | {
        "samples": stats.n, "calls_per_sample": stats.calls_per_sample, "retaken_samples": stats.retaken,
        "disturbed_samples": stats.disturbed}


def fmt_ms(seconds_or_ms: Optional[float], already_ms: bool = True) -> str:
    if seconds_or_ms is None or (isinstance(seconds_or_ms, float) and math.isnan(seconds_or_ms)):
        return "-"
    ms = seconds_or_ms if already_ms else seconds_or_ms * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_iqr(row: dict) -> str:
    """A row's interquartile range as a percentage of its median."""
    if row.get("median_ms") is None:
        return "-"
    return f"{100 * (row['p75_ms'] - row['p25_ms']) / row['median_ms']:.0f}"


def fmt_mib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def fmt_count(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0f}"


def fmt_fraction(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


def format_table(rows: List[dict], columns: Sequence[tuple]) -> str:
    """Plain fixed-width table. ``columns``: ``(header, key_or_callable)`` pairs."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([str(get(row) if callable(get) else row.get(get, "-")) for _, get in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ys over xs (None with fewer than two distinct xs)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)


def parse_int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_str_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def write_plot(draw: Callable[[object], None]) -> bool:
    """``draw(benches.plot)`` if matplotlib is installed; else say so (the results are written
    without their PNG). Returns whether it drew."""
    try:
        from . import plot
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        print("# no plot: matplotlib is not installed (pip install -e \".[bench]\")", flush=True)
        return False
    draw(plot)
    return True
