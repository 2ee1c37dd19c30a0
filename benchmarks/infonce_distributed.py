"""The 2-rank distributed InfoNCE case of ``benchmarks/loss_kernels.py`` (``--ops infonce_dist``).

Two processes: NCCL on two GPUs when the machine has them, else gloo on the CPU (fp32, the
eager implementation only: the Triton interpreter is no benchmark). Each rank holds N_l rows
of x and t, drawn from one seeded full batch of 2·N_l rows. Implementations: ``eager`` —
open_clip's scheme in the inputs' dtype (x and t all-gathered with gradient, both N_l × N
directions on every rank); ``triton`` — ``kernels.infonce_loss(..., group=...)`` (t
gathered, one pass over the N_l × N block-row, dT reduce-scattered).

Before timing, each implementation's mean loss over ranks and every rank's gradients
(divided by the world size, the DDP convention) are compared with the single-process
reference on the full batch. Timing: every rank runs the same fixed number of repeats
(a data-dependent count, as ``do_bench`` uses, would desynchronise the collectives), each
after a barrier; a repeat's time is the slower rank's.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels
from benchmarks.harness import Result, device_peaks, format_row
from kernels import reference

WORLD_SIZE = 2
WARMUP = 2
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def eager_distributed_infonce(x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor,
                              group: dist.ProcessGroup) -> torch.Tensor:
    """open_clip's "local loss + gather with grad" in the inputs' dtype."""
    all_x = reference._AllGatherWithGrad.apply(x, group)  # (N, D)
    all_t = reference._AllGatherWithGrad.apply(t, group)
    labels = torch.arange(x.shape[0], device=x.device) + dist.get_rank(group) * x.shape[0]
    scale = logit_scale.exp().to(x.dtype)
    logits_x, logits_t = scale * x @ all_t.T, scale * t @ all_x.T  # (N_l, N) each
    return 0.5 * (F.cross_entropy(logits_x, labels) + F.cross_entropy(logits_t, labels))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) ms over ``repeats`` of the slower rank's time."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    values = slowest.tolist()
    quantiles = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return statistics.median(values), quantiles[1], quantiles[7]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def _check(fn, x, t, logit_scale, full_ref, rows, world: int) -> dict[str, float]:
    """Relative errors of the mean loss and this rank's gradients (÷ W) against the full batch, max over ranks."""
    inputs = [v.detach().clone().requires_grad_() for v in (x, t, logit_scale)]
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    mean_loss = loss.detach().float().clone()
    dist.all_reduce(mean_loss)
    errors = torch.tensor([
        _relative_error(mean_loss / world, full_ref[0]),
        _relative_error(grads[0] / world, full_ref[1][rows]),
        _relative_error(grads[1] / world, full_ref[2][rows]),
    ], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return dict(zip(("loss", "dx", "dt"), errors.tolist()))


def _worker(rank: int, port: int, sizes: list[int], dim: int, dtype_name: str, use_nccl: bool, repeats: int,
            out_path: str) -> None:
    device = torch.device(f"cuda:{rank}") if use_nccl else torch.device("cpu")
    if use_nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=WORLD_SIZE)
    try:
        group = dist.group.WORLD
        dtype = getattr(torch, dtype_name)
        variants = {"eager": lambda x, t, s: eager_distributed_infonce(x, t, s, group)}
        if use_nccl:
            variants["triton"] = lambda x, t, s: kernels.infonce_loss(x, t, s, group=group, impl="triton")
        peaks = device_peaks(device)
        rows_out = []
        for num_local in sizes:
            generator = torch.Generator().manual_seed(num_local)
            full_x, full_t = (F.normalize(torch.randn(WORLD_SIZE * num_local, dim, generator=generator), dim=-1)
                              .to(device, dtype) for _ in range(2))
            logit_scale = torch.tensor(math.log(1 / 0.07), device=device)
            full_inputs = [v.detach().clone().requires_grad_() for v in (full_x, full_t, logit_scale)]
            full_loss = reference.infonce_loss(*full_inputs)  # fp32 math, one process
            full_ref = [full_loss.detach(), *torch.autograd.grad(full_loss, full_inputs)]
            rows = slice(rank * num_local, (rank + 1) * num_local)
            x, t = full_x[rows].contiguous(), full_t[rows].contiguous()
            label = f"N_l={num_local} W={WORLD_SIZE} D={dim}"
            params = {"N_l": num_local, "N": WORLD_SIZE * num_local, "D": dim, "backend": "nccl" if use_nccl else "gloo"}
            for name, fn in variants.items():
                errors = _check(fn, x, t, logit_scale, full_ref, rows, WORLD_SIZE)
                bad = {k: v for k, v in errors.items() if not v <= CHECK_TOLERANCE[dtype]}
                for mode in ("forward", "forward+backward"):
                    leaves = [v.detach().clone().requires_grad_() for v in (x, t, logit_scale)]

                    def step(fn=fn, leaves=leaves, mode=mode) -> None:
                        loss = fn(*leaves)
                        if mode != "forward":
                            loss.backward()
                            for leaf in leaves:
                                leaf.grad = None

                    result = Result("infonce_dist", label, params, name, mode, *(None,) * 7,
                                    error=f"output check: relative errors {bad}" if bad else None,
                                    extra={"relative_errors": errors})
                    if not bad:
                        median, p20, p80 = _timed(step, device, repeats)
                        flops = 2.0 * num_local * WORLD_SIZE * num_local * dim * (1 if mode == "forward" else 3)
                        result.median_ms, result.p20_ms, result.p80_ms = median, p20, p80
                        result.tflops = flops / (median / 1e3) / 1e12
                        if peaks is not None:
                            result.roofline_fraction = flops / peaks[dtype_name] / (median / 1e3)
                    if rank == 0:
                        print(format_row(result), flush=True)
                    rows_out.append(result.__dict__)
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows_out))
    finally:
        dist.destroy_process_group()


def run_distributed_infonce(sizes: list[int], dim: int, dtype: torch.dtype, on_cuda: bool, repeats: int) -> list[Result]:
    """Spawn the 2 ranks, return rank 0's rows (see the module docstring)."""
    use_nccl = on_cuda and torch.cuda.device_count() >= WORLD_SIZE
    if not use_nccl:
        dtype = torch.float32
        print(f"infonce_dist: {'one GPU' if on_cuda else 'no GPU'}: 2 gloo ranks on the CPU, fp32, eager only")
    with tempfile.TemporaryDirectory(prefix="infonce_dist_") as folder:
        path = Path(folder) / "rows.json"
        mp.spawn(_worker, args=(_free_port(), list(sizes), dim, str(dtype).removeprefix("torch."), use_nccl, repeats,
                                str(path)), nprocs=WORLD_SIZE, join=True)
        return [Result(**row) for row in json.loads(path.read_text())]
