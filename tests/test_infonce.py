"""The fused InfoNCE Triton op against the float64 reference (CPU: Triton's interpreter).

Every run draws fresh inputs (the seed is in each failure message). Loss and the
gradients of x, t and logit_scale are compared by relative error ||out − ref|| / ||ref||
with a grad_output != 1; kernel outputs are allocated NaN-filled so an unwritten element
fails (dx and dt are accumulated atomically into zeroed buffers: a missing contribution
shows up as an error against the reference). The interpreter's grid has several column
splits at these sizes, so the (m, l) merge is exercised. A 2-process gloo test checks that the sharded loss and gradients equal the
single-process ones on the concatenated batch, for the reference and the Triton op.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels.infonce
from kernels import reference
from tests.kernel_utils import (
    INTERPRETER_HINT,
    assert_rel_close,
    free_port,
    fresh_seed,
    poisoned_allocations,
    use_triton_interpreter,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
infonce = kernels.infonce if DEVICE == "cuda" else use_triton_interpreter(kernels.infonce)


@pytest.fixture(autouse=True)
def _kernels_runnable() -> None:
    if infonce is None:
        pytest.fail(INTERPRETER_HINT)

# dtype -> (loss tolerance, gradient tolerance), relative to the float64 reference of the same
# (rounded) inputs. The loss comes from fp32 statistics of exact products: fp32-level error.
# Gradients: fp32 — 3×TF32 / fp32 dots put ~1e-6 relative error on S (|S| <= 100), hence 2e-5;
# fp16/bf16 — the gradients are stored in the input dtype (rounding alone is ~0.3 ulp rms:
# 3e-4 fp16, 2.3e-3 bf16) and G is cast to it for the tensor-core product (as much again).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 2e-5),
    torch.float16: (2e-5, 2e-3),
    torch.bfloat16: (2e-5, 1.6e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _unit_rows(num_rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(num_rows, dim, dtype=torch.float64), dim=-1).to(dtype)


def _reference_grads(x, t, logit_scale, grad_out):
    inputs = [v.detach().double().requires_grad_() for v in (x, t, logit_scale)]
    loss = reference.infonce_loss(*inputs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out.double())]


def _triton_grads(x, t, logit_scale, grad_out):
    inputs = [v.detach().clone().requires_grad_() for v in (x, t, logit_scale)]
    with poisoned_allocations():
        loss = infonce.infonce_loss(*inputs, impl="triton")
        grads = torch.autograd.grad(loss, inputs, grad_out)
    return [loss.detach(), *grads]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [64, 72, 256, 384])
@pytest.mark.parametrize("num_rows", [37, 67, 131])
def test_infonce_matches_reference(num_rows: int, dim: int, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    x, t = _unit_rows(num_rows, dim, dtype).to(DEVICE), _unit_rows(num_rows, dim, dtype).to(DEVICE)
    logit_scale = torch.tensor(math.log(100.0), device=DEVICE)  # the clamp's maximum: sharpest softmaxes
    grad_out = torch.tensor(-0.7, device=DEVICE)
    out = _triton_grads(x, t, logit_scale, grad_out)
    ref = _reference_grads(x, t, logit_scale, grad_out)
    loss_tol, grad_tol = TOLERANCES[dtype]
    context = f"seed={seed} N={num_rows} D={dim} {dtype} scale={logit_scale.exp().item():.1f}"
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[3].dtype == logit_scale.dtype
    for name, value, expected, tol in zip(("loss", "dx", "dt", "dlogit_scale"), out, ref, (loss_tol,) + 3 * (grad_tol,)):
        assert_rel_close(name, value, expected, tol, context)


def test_infonce_column_pass_equals_column_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the buffer limit colLSE comes from a second pass: same loss, same gradients."""
    seed = fresh_seed()
    x, t = _unit_rows(45, 64, torch.float32).to(DEVICE), _unit_rows(45, 64, torch.float32).to(DEVICE)
    logit_scale, grad_out = torch.tensor(math.log(100.0), device=DEVICE), torch.tensor(1.7, device=DEVICE)
    monkeypatch.setattr(infonce, "COLUMN_BUFFER_MAX_BYTES", 0)
    out = _triton_grads(x, t, logit_scale, grad_out)
    ref = _reference_grads(x, t, logit_scale, grad_out)
    for name, value, expected in zip(("loss", "dx", "dt", "dlogit_scale"), out, ref):
        assert_rel_close(name, value, expected, TOLERANCES[torch.float32][1], f"seed={seed} second pass")


def test_infonce_single_row_and_validation() -> None:
    x = _unit_rows(1, 16, torch.float32).to(DEVICE)
    loss = infonce.infonce_loss(x, x, torch.tensor(2.0, device=DEVICE), impl="triton")
    assert abs(loss.item()) < 1e-6  # one pair: both softmaxes are certain
    with pytest.raises(ValueError, match="D <= 512"):
        infonce.infonce_loss(_unit_rows(4, 600, torch.float32), _unit_rows(4, 600, torch.float32),
                             torch.tensor(2.0), impl="triton")
    with pytest.raises(ValueError, match="float64"):
        infonce.infonce_loss(x.double(), x.double(), torch.tensor(2.0, device=DEVICE), impl="triton")


def test_infonce_auto_dispatch() -> None:
    x = _unit_rows(5, 16, torch.float32).to(DEVICE)
    logit_scale = torch.tensor(2.0, device=DEVICE)
    loss = infonce.infonce_loss(x, x, logit_scale)
    if DEVICE == "cpu":  # "auto" on CPU tensors is the reference, bit for bit
        assert torch.equal(loss, reference.infonce_loss(x, x, logit_scale))
    else:
        assert_rel_close("loss", loss, reference.infonce_loss(x, x, logit_scale), 1e-5, "auto on CUDA")


WORLD_SIZE = 2
ROWS_PER_RANK = 19
DIST_DIM = 72


def _distributed_worker(rank: int, port: int, x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor,
                        grad_outs: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        results = {}
        for impl in ("reference", "triton"):
            for case, grad_out in (("equal", grad_outs[0]), ("unequal", grad_outs[rank])):
                inputs = [x[rows].clone().requires_grad_(), t[rows].clone().requires_grad_(),
                          logit_scale.clone().requires_grad_()]
                loss = infonce.infonce_loss(*inputs, group=dist.group.WORLD, impl=impl)
                grads = torch.autograd.grad(loss, inputs, grad_out)
                results[(impl, case)] = [loss.detach(), *grads]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_infonce_distributed_equals_full_batch(tmp_path) -> None:
    seed = fresh_seed()
    num_rows = WORLD_SIZE * ROWS_PER_RANK
    x, t = _unit_rows(num_rows, DIST_DIM, torch.float32), _unit_rows(num_rows, DIST_DIM, torch.float32)
    logit_scale = torch.tensor(math.log(50.0))
    grad_outs = torch.tensor([0.8, -1.9])
    mp.spawn(_distributed_worker, args=(free_port(), x, t, logit_scale, grad_outs, str(tmp_path)),
             nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    tol = TOLERANCES[torch.float32][1]
    # equal grad_output g on every rank: mean loss = L, features get W·g·∂L/∂f, mean d logit_scale = g·∂L/∂s
    full = _reference_grads(x, t, logit_scale, grad_outs[0])
    for impl in ("reference", "triton"):
        losses, dxs, dts, dscales = zip(*(result[(impl, "equal")] for result in per_rank))
        context = f"seed={seed} impl={impl}"
        assert_rel_close("mean loss", torch.stack(losses).mean(), full[0], tol, context)
        assert_rel_close("dx", torch.cat(dxs) / WORLD_SIZE, full[1], tol, context)
        assert_rel_close("dt", torch.cat(dts) / WORLD_SIZE, full[2], tol, context)
        assert_rel_close("mean dlogit_scale", torch.stack(dscales).mean(), full[3], tol, context)
    # different grad_output per rank: loss, dx and dt are autograd's; the logit-scale shares are
    # split across ranks differently (by rows, not by loss), and their sum is autograd's
    for rank, result in enumerate(per_rank):
        for name, value, expected in zip(("loss", "dx", "dt"), result[("triton", "unequal")],
                                         result[("reference", "unequal")]):
            assert_rel_close(name, value, expected, tol, f"seed={seed} rank={rank} unequal grad_output")
    dscales = [torch.stack([result[(impl, "unequal")][3] for result in per_rank]).sum() for impl in ("triton", "reference")]
    assert_rel_close("summed dlogit_scale", dscales[0], dscales[1], tol, f"seed={seed} unequal grad_output")
