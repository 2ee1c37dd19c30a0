"""The fused attention-pooling Triton op against the float64 reference (CPU: Triton's interpreter).

Every run draws fresh inputs (the seed is in each failure message). The output and the
gradients of queries, keys and values are compared by relative error ||out − ref|| / ||ref||
against autograd through ``kernels.reference.attention_pool`` in float64 on the same
(rounded) inputs, with a random grad_output; kernel outputs are allocated NaN-filled so an
unwritten element fails. The reference itself is checked against PyTorch's
scaled_dot_product_attention per head.

Parametrisation (the interpreter is slow): the full cross-product of shared/per-sample
queries, Q ∈ {1, 10, 128}, N ∈ {1, 17, 312}, padding mask and dtype at D/heads = 256/8, and
for the widths 768/8 (the caption pooler, d = 96 padded to 128) and 384/6 the two MELP shapes
(Q = 10 and 128 over N = 312) plus an awkward one, with (shared, masked, dtype) on a
pairwise-covering half of their eight combinations.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch.nn.functional as F

import kernels
from kernels import reference
from tests.kernel_utils import (
    INTERPRETER_HINT,
    assert_rel_close,
    fresh_seed,
    gpu_numerics,
    poisoned_allocations,
    use_triton_interpreter,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# `kernels.attention_pool` is the public function; the op module is reached through importlib
_module = importlib.import_module("kernels.attention_pool")
pool_op = _module if DEVICE == "cuda" else use_triton_interpreter(_module)


@pytest.fixture(autouse=True)
def _kernels_runnable() -> None:
    if pool_op is None:
        pytest.fail(INTERPRETER_HINT)


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """The interpreter runs each tl.dot as a small numpy matmul: multi-threaded OpenBLAS makes
    those ~100× slower on a busy 2-core machine, so the module runs with one BLAS thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# dtype -> (output tolerance, gradient tolerance), relative to the float64 reference of the same
# rounded inputs. Worst errors seen over 80 draws of the shapes below (QUERY_SCALE = 3):
#   fp32: out 8e-7, grads 1.8e-6 — fp32 products and statistics over ≤ 312 keys (3×TF32 dots on
#         a GPU add about as much); bound 1e-5 / 2e-5.
#   fp16: out 2.4e-4, dv 3.1e-4, dq and dk 1.4e-3 — the output and gradients are stored in fp16
#         (≈ 0.3 ulp rms = 3e-4) and, as in flash-attention, P and dS are cast to fp16 for the
#         tensor-core products; dS = P∘(dP − Δ) cancels where one key dominates (dP ≈ Δ), with Δ
#         from the stored fp16 O, so dq and dk carry ~5× the rounding; bound 1e-3 / 5e-3.
#   bf16 (CUDA): 8× fp16's unit roundoff, so 8× its bounds.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 2e-5),
    torch.float16: (1e-3, 5e-3),
    torch.bfloat16: (8e-3, 4e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
QUERY_SCALE = 3.0  # queries of std 3: logits of std ~3, peaked softmaxes (harder than the pooler's)


def _inputs(batch, num_queries, num_keys, dim, shared, masked, dtype):
    q_shape = (num_queries, dim) if shared else (batch, num_queries, dim)
    queries = (QUERY_SCALE * torch.randn(q_shape, dtype=torch.float64)).to(dtype).to(DEVICE)
    keys = torch.randn(batch, num_keys, dim, dtype=torch.float64).to(dtype).to(DEVICE)
    values = torch.randn(batch, num_keys, dim, dtype=torch.float64).to(dtype).to(DEVICE)
    mask = None
    if masked:
        mask = torch.rand(batch, num_keys, device=DEVICE) < 0.5
        mask[0, :] = True  # sample 0 keeps only its last key: whole key chunks are padded
        mask[torch.arange(batch), torch.randint(num_keys, (batch,))] = False
        mask[0, -1] = False
    return queries, keys, values, mask


def _reference_grads(queries, keys, values, num_heads, mask, grad_out):
    inputs = [t.detach().double().requires_grad_() for t in (queries, keys, values)]
    out = reference.attention_pool(*inputs, num_heads, mask)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.double())]


def _triton_grads(queries, keys, values, num_heads, mask, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (queries, keys, values)]
    with poisoned_allocations():
        out = pool_op.attention_pool(*inputs, num_heads, mask, impl="triton")
        grads = torch.autograd.grad(out, inputs, grad_out)
    return [out.detach(), *grads]


def _check(batch, num_queries, num_keys, dim, num_heads, shared, masked, dtype) -> None:
    seed = fresh_seed()
    queries, keys, values, mask = _inputs(batch, num_queries, num_keys, dim, shared, masked, dtype)
    grad_out = torch.randn(batch, num_queries, dim, device=DEVICE).to(dtype)
    out = _triton_grads(queries, keys, values, num_heads, mask, grad_out)
    ref = _reference_grads(queries, keys, values, num_heads, mask, grad_out)
    context = (f"seed={seed} B={batch} Q={num_queries} N={num_keys} D={dim} heads={num_heads} "
               f"shared={shared} masked={masked} {dtype}")
    assert [t.dtype for t in out] == [dtype] * 4, context
    out_tol, grad_tol = TOLERANCES[dtype]
    for name, value, expected, tol in zip(("out", "dq", "dk", "dv"), out, ref, (out_tol,) + 3 * (grad_tol,)):
        if expected.abs().max() == 0:
            # one key: the softmax is constant, dq = dk = 0 exactly, and the kernel's dS = dP − Δ
            # is rounding noise; measured against dv = Pᵀ·dO, the gradients' natural scale
            error = value.double().norm().item() / ref[3].norm().item()
            assert error <= tol, f"{name}: {error:.3e} of ||dv|| where the reference is 0 [{context}]"
        else:
            assert_rel_close(name, value, expected, tol, context)


MASK_CASES = [(1, False), (17, False), (17, True), (312, False), (312, True)]  # N = 1 cannot be padded


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_keys,masked", MASK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("num_queries", [1, 10, 128])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_attention_pool_matches_reference(shared: bool, num_queries: int, num_keys: int, masked: bool,
                                          dtype: torch.dtype) -> None:
    _check(2, num_queries, num_keys, 256, 8, shared, masked, dtype)


# (shared, masked, dtype): every pair of values appears; bf16 joins on CUDA
COVERING = [(True, True, torch.float32), (True, False, torch.float16),
            (False, True, torch.float16), (False, False, torch.float32)]
if DEVICE == "cuda":
    COVERING += [(True, True, torch.bfloat16), (False, False, torch.bfloat16)]


@pytest.mark.parametrize("shared,masked,dtype", COVERING, ids=lambda v: str(v))
@pytest.mark.parametrize("num_queries,num_keys", [(10, 312), (128, 312), (128, 17)])
@pytest.mark.parametrize("dim,num_heads", [(768, 8), (384, 6)])
def test_attention_pool_wide_heads(dim: int, num_heads: int, num_queries: int, num_keys: int, shared: bool,
                                   masked: bool, dtype: torch.dtype) -> None:
    _check(2, num_queries, num_keys, dim, num_heads, shared, masked, dtype)


def test_attention_pool_sample_groups_and_strided_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared-query dq summed over groups of 2 samples (the last one short), on strided views."""
    monkeypatch.setattr(pool_op, "TARGET_PROGRAMS", 9)  # B·H // 9 = 2 samples per program
    assert pool_op.batch_per_program(5, 4, shared_queries=True) == 2
    seed = fresh_seed()
    batch, num_queries, num_keys, dim, num_heads = 5, 10, 40, 64, 4
    queries = QUERY_SCALE * torch.randn(num_queries, 2 * dim, device=DEVICE)[:, ::2]  # last stride 2: copied
    keys = torch.randn(batch, num_keys, 2 * dim, device=DEVICE)[:, :, dim:]  # row stride 2D: used as is
    values = torch.randn(num_keys, batch, dim, device=DEVICE).transpose(0, 1)  # batch stride D
    mask = torch.rand(batch, num_keys, device=DEVICE) < 0.3
    mask[:, 3] = False
    grad_out = torch.randn(batch, dim, num_queries, device=DEVICE).transpose(1, 2)  # non-contiguous
    out = _triton_grads(queries, keys, values, num_heads, mask, grad_out)
    ref = _reference_grads(queries, keys, values, num_heads, mask, grad_out)
    for name, value, expected in zip(("out", "dq", "dk", "dv"), out, ref):
        assert_rel_close(name, value, expected, TOLERANCES[torch.float32][1], f"seed={seed} groups of 2")


def test_attention_pool_validation_and_dispatch() -> None:
    queries, keys = torch.randn(4, 32, device=DEVICE), torch.randn(2, 5, 32, device=DEVICE)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    mask[1] = True
    with pytest.raises(ValueError, match="masks every key of batch rows \\[1\\]"):
        pool_op.attention_pool(queries, keys, keys, 2, mask, impl="triton")
    with pytest.raises(ValueError, match="Q <= 256"):
        pool_op.attention_pool(torch.randn(257, 32, device=DEVICE), keys, keys, 2, impl="triton")
    with pytest.raises(ValueError, match="float64"):
        pool_op.attention_pool(queries.double(), keys.double(), keys.double(), 2, impl="triton")
    auto = kernels.attention_pool(queries, keys, keys, 2)  # the package's public op is this module's
    if DEVICE == "cpu":  # "auto" on CPU tensors is the reference, bit for bit
        assert torch.equal(auto, reference.attention_pool(queries, keys, keys, 2))
    else:
        assert_rel_close("out", auto, reference.attention_pool(queries, keys, keys, 2), 1e-5, "auto on CUDA")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_reference_equals_sdpa_per_head(shared: bool) -> None:
    """The reference is F.scaled_dot_product_attention over (B, H, Q, d) heads, padding as a bool mask."""
    seed = fresh_seed()
    batch, num_queries, num_keys, dim, num_heads = 3, 10, 23, 48, 6
    queries, keys, values, mask = _inputs(batch, num_queries, num_keys, dim, shared, True, torch.float64)
    inputs = [t.requires_grad_() for t in (queries, keys, values)]
    grad_out = torch.randn(batch, num_queries, dim, dtype=torch.float64, device=DEVICE)
    out = reference.attention_pool(*inputs, num_heads, mask)

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, d)
        return x.reshape(x.shape[0], x.shape[1], num_heads, dim // num_heads).transpose(1, 2)

    q = heads(inputs[0].expand(batch, -1, -1) if shared else inputs[0])
    sdpa = F.scaled_dot_product_attention(q, heads(inputs[1]), heads(inputs[2]), attn_mask=~mask[:, None, None, :])
    sdpa = sdpa.transpose(1, 2).reshape(batch, num_queries, dim)
    context = f"seed={seed} shared={shared}"
    assert_rel_close("out", out, sdpa, 1e-12, context)
    for name, g, g_sdpa in zip(("dq", "dk", "dv"), torch.autograd.grad(out, inputs, grad_out),
                               torch.autograd.grad(sdpa, inputs, grad_out)):
        assert_rel_close(name, g, g_sdpa, 1e-12, context)


# the launchers' CUDA configurations, on the interpreter with the bf16 shim (on a GPU: as is):
# (Q, N, D, heads) = the small-tile fused backward (BLOCK_M 16, 64-key chunks) and a large tile
# (BLOCK_M 128 × BLOCK_D 64) that takes the split two-pass backward; N = 37 leaves partial chunks
GPU_CONFIG_SHAPES = [(10, 37, 64, 2), (65, 37, 96, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_queries,num_keys,dim,num_heads", GPU_CONFIG_SHAPES)
def test_attention_pool_cuda_configs_low_precision(num_queries: int, num_keys: int, dim: int, num_heads: int,
                                                   dtype: torch.dtype) -> None:
    """bf16 and fp16 through the tile sizes a GPU runs, against float64 (issue 16, item 5)."""
    context = gpu_numerics() if DEVICE == "cpu" else contextlib.nullcontext()
    with context:
        split = pool_op._launch_config(num_queries, dim // num_heads, dtype, True, torch.device(DEVICE))
        assert split["SPLIT_BACKWARD"] == (num_queries > 64), split  # both backward structures are covered
        _check(2, num_queries, num_keys, dim, num_heads, num_queries % 2 == 1, True, dtype)


def test_attention_pool_double_backward_raises() -> None:
    """The backward is not differentiable: a second derivative must raise, not be silently wrong."""
    queries, keys, values, _ = _inputs(2, 4, 9, 32, True, False, torch.float32)
    inputs = [t.requires_grad_() for t in (queries, keys, values)]
    out = pool_op.attention_pool(*inputs, 2, impl="triton")
    grads = torch.autograd.grad((out * out).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)autograd|differentiab"):  # wording varies by torch version
        torch.autograd.grad(sum(g.sum() for g in grads), inputs)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_attention_pool_compiles_fullgraph(impl: str) -> None:
    """No host sync: the op (with a padding mask) traces with fullgraph=True, forward and backward."""
    seed = fresh_seed()
    queries, keys, values, mask = _inputs(3, 4, 21, 32, False, True, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: pool_op.attention_pool(q, k, v, 2, m, impl=impl),
                             fullgraph=True, backend="aot_eager")
    inputs = [t.detach().clone().requires_grad_() for t in (queries, keys, values)]
    grad_out = torch.randn(3, 4, 32, device=DEVICE)
    out = compiled(*inputs, mask)
    out.backward(grad_out)
    ref = _reference_grads(queries, keys, values, 2, mask, grad_out)
    for name, value, expected in zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in inputs], ref):
        assert_rel_close(name, value, expected, TOLERANCES[torch.float32][1], f"seed={seed} compiled {impl}")
