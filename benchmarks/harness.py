"""Shared benchmark harness for the kernel ops: reference vs torch.compile vs Triton kernel.

A ``Workload`` is one op at one size: a factory for fresh inputs plus the op's useful
FLOPs and minimal HBM bytes (read inputs once, write outputs once) for the forward and the
backward. A ``Variant`` is one implementation. ``run_benchmarks`` times every variant on
every workload for the forward and forward+backward, and reports

    median and spread (20th–80th percentile) in ms     triton.testing.do_bench on CUDA,
                                                        perf_counter repeats on the CPU
    peak memory above the inputs (CUDA only)            torch.cuda.max_memory_allocated
    achieved TFLOP/s, GB/s and the fraction of the      roofline time = max(FLOPs / peak FLOP/s,
    device roofline (known GPUs only)                   bytes / HBM bandwidth); fraction =
                                                        roofline time / measured time

Results: a table on stdout, a JSON file (device, torch/triton/python versions, git revision,
date, every figure) and a PNG plot under the output folder (default benchmarks/results/).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Dense peak rates (FLOP/s by compute dtype) and HBM bandwidth (B/s), from the vendors' sheets.
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "H100": {"bandwidth": 3.35e12, "float32": 67e12, "tf32": 494e12, "bfloat16": 989e12, "float16": 989e12},
    "H200": {"bandwidth": 4.8e12, "float32": 67e12, "tf32": 494e12, "bfloat16": 989e12, "float16": 989e12},
    "A100": {"bandwidth": 2.0e12, "float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12},
}
MODES = ("forward", "forward+backward")


@dataclass
class Workload:
    """One op at one size. ``make_inputs`` returns (positional args, differentiable leaves)."""

    op: str
    label: str
    params: dict[str, Any]
    make_inputs: Callable[[], tuple[list[Any], list[torch.Tensor]]]
    flops: dict[str, float]  # per mode: useful FLOPs
    min_bytes: dict[str, float]  # per mode: bytes a perfect kernel must move
    dtype: torch.dtype = torch.float32


@dataclass
class Variant:
    name: str
    fn: Callable[..., torch.Tensor]


@dataclass
class Result:
    op: str
    label: str
    params: dict[str, Any]
    variant: str
    mode: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_memory_mb: float | None
    tflops: float | None
    gbytes_per_s: float | None
    roofline_fraction: float | None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def device_peaks(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in DEVICE_PEAKS.items() if key in name), None)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, git revision and date: recorded with every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = None, None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
        "num_cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_revision": revision,
        "git_dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _step(variant: Variant, workload: Workload, mode: str) -> Callable[[], None]:
    """A closure running one forward (and backward) on inputs made once, outside the timing."""
    args, leaves = workload.make_inputs()
    grad_output: list[torch.Tensor | None] = [None]

    def forward() -> None:
        variant.fn(*args)

    def forward_backward() -> None:
        out = variant.fn(*args)
        if grad_output[0] is None:
            grad_output[0] = torch.randn_like(out)
        torch.autograd.backward(out, grad_output[0])
        for leaf in leaves:
            leaf.grad = None

    return forward if mode == "forward" else forward_backward


def _time(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float, float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(step, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    step()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), quantiles[1], quantiles[7]


def _peak_memory_mb(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(workload: Workload, variant: Variant, mode: str, device: torch.device, repeats: int) -> Result:
    """Time one (workload, variant, mode); a failure (e.g. out of memory) is recorded, not raised."""
    try:
        step = _step(variant, workload, mode)
        median, p20, p80 = _time(step, device, repeats)
        peak = _peak_memory_mb(step, device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return Result(workload.op, workload.label, workload.params, variant.name, mode,
                      None, None, None, None, None, None, None, error=f"{type(error).__name__}: {error}"[:300])
    flops, nbytes = workload.flops[mode], workload.min_bytes[mode]
    seconds = median / 1e3
    fraction = None
    peaks = device_peaks(device)
    if peaks is not None:
        compute_key = "tf32" if workload.dtype == torch.float32 else str(workload.dtype).removeprefix("torch.")
        roofline_s = max(flops / peaks[compute_key], nbytes / peaks["bandwidth"])
        fraction = roofline_s / seconds
    return Result(workload.op, workload.label, workload.params, variant.name, mode, median, p20, p80, peak,
                  flops / seconds / 1e12, nbytes / seconds / 1e9, fraction)


def run_benchmarks(
    workloads: list[Workload], variants_for: Callable[[Workload], list[Variant]], device: torch.device, repeats: int
) -> list[Result]:
    results = []
    for workload in workloads:
        for variant in variants_for(workload):
            for mode in MODES:
                result = measure(workload, variant, mode, device, repeats)
                results.append(result)
                print(format_row(result), flush=True)
    return results


TABLE_HEADER = (
    f"{'op':<15} {'size':<24} {'impl':<18} {'mode':<17} {'median ms':>10} {'p20–p80 ms':>17} "
    f"{'peak MB':>9} {'TFLOP/s':>8} {'GB/s':>8} {'roofline':>8}"
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(result: Result) -> str:
    if result.error is not None:
        return f"{result.op:<15} {result.label:<24} {result.variant:<18} {result.mode:<17} failed: {result.error[:60]}"
    spread = f"{_fmt(result.p20_ms, '.3f')}–{_fmt(result.p80_ms, '.3f')}"
    return (
        f"{result.op:<15} {result.label:<24} {result.variant:<18} {result.mode:<17} {_fmt(result.median_ms, '10.3f')} "
        f"{spread:>17} {_fmt(result.peak_memory_mb, '9.1f'):>9} {_fmt(result.tflops, '8.3f'):>8} "
        f"{_fmt(result.gbytes_per_s, '8.1f'):>8} {_fmt(result.roofline_fraction, '8.1%'):>8}"
    )


def write_results(results: list[Result], env: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stem}-{stamp}.json"
    path.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=1))
    return path


def plot_results(results: list[Result], path: Path, title: str) -> Path:
    """One panel per op: forward+backward median time per size, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for axis, op in zip(axes[0], ops):
        rows = [r for r in results if r.op == op and r.mode == "forward+backward" and r.median_ms is not None]
        labels = list(dict.fromkeys(r.label for r in results if r.op == op))
        for variant in dict.fromkeys(r.variant for r in rows):
            points = [(labels.index(r.label), r.median_ms) for r in rows if r.variant == variant]
            axis.plot(*zip(*points), marker="o", label=variant)
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        axis.set_yscale("log")
        axis.set_ylabel("forward+backward, median ms")
        axis.set_title(op)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
