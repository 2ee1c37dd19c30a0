"""Multi-head attention pooling of few queries over a sample's keys: Triton forward and backward.

Math: per sample b and head h, d = D / heads, queries q (Q × d) shared by the batch or per
sample, keys K and values V (N × d):

    S = q·Kᵀ/√d (padded keys → −∞)    P = softmax over keys    O = P·V    lse = log Σ_n exp(S_n)
    Δ = rowsum(dO ∘ O);  dP = dO·Vᵀ;  dS = P ∘ (dP − Δ)
    dV = Pᵀ·dO;  dK = dSᵀ·q/√d;  dq = dS·K/√d  (summed over b when q is shared)

Shapes: queries (Q, D) or (B, Q, D) with Q ≤ 256; keys, values (B, N, D) with d ≤ 256;
key_padding_mask (B, N) bool, True = padded (a row that pads every key is a ValueError);
output (B, Q, D) and gradients in the inputs' dtype.

Kernels (no Q × N or N × N tensor is ever stored; P lives one BLOCK_N chunk at a time):
    _attention_pool_fwd_kernel  one program per (b, h) holds all Q queries (BLOCK_M = next
                                power of two ≥ max(Q, 16)) and streams the keys in BLOCK_N
                                chunks with the online softmax (m_i, l_i); writes O and
                                lse (B, H, Q) fp32 — the only state saved besides the inputs.
    _attention_pool_bwd_kernel  one program per (group of samples, h): per sample, Δ from O
                                and dO, then per key chunk P recomputed from lse, dV and dK
                                written directly (each key chunk belongs to one program), dq
                                accumulated in fp32 registers over the chunks — and, for shared
                                queries, over the group's samples. Large tiles (BLOCK_M·BLOCK_D
                                > 64², the caption pooler) run it as two passes, dK/dV then dq
                                (constexprs WITH_DKV / WITH_DQ), which avoids register spills.
Registered with torch.library (``melp_kernels::attention_pool`` and its backward): no host sync
inside (an all-padded mask row is checked with torch._assert_async on CUDA), torch.compile
traces it with fullgraph=True, CUDA graphs capture it; double backward raises.
Shared queries: dq = Σ_b dq_b. Each program sums its group of BATCH_PER_PROGRAM samples on
chip and writes one fp32 (Q, D) slice of a (num_groups, Q, D) buffer, summed by torch. The
group size keeps about TARGET_PROGRAMS programs in the grid (enough to fill an H100) while
shrinking the buffer: B = 1024, 8 heads gives groups of 8, 128 slices (50 MB at Q = 128,
D = 768, instead of the 400 MB of a (B, Q, D) buffer). fp32 atomics on one (Q, D) buffer
would need no buffer but make dq non-deterministic and serialise B-way on each address.
Per-sample queries: groups of one sample; dq is written straight into the (B, Q, D) output.
Work: forward 2 QNd multiply-adds per (b, h), backward 5 (recomputed S, dP, dV, dK, dq; 7
when split: S and dP again for dq); K and V are read once by each pass, so the op is bandwidth-bound
(≈ Q FLOP/byte, under an H100's ridge for Q = 10 and 128).

Numerics: scores in base 2 (log2(e)/√d folded into one scale, exp2), softmax statistics, O's
accumulator, Δ and every gradient accumulated in fp32; fp32 inputs use 3×TF32 dots (near-fp32
accuracy). As in flash-attention, P and dS are cast to the input dtype (fp16/bf16) for their
tensor-core products. Δ uses the stored O (input dtype). A chunk whose keys are all padded
leaves (m_i, l_i) untouched (the −∞ max is replaced by 0 before exponentiating).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (
    Impl,
    contiguous,
    dot_precision,
    feature_block,
    next_power_of_2,
    require_interpreted,
    resolve_impl,
    uses_cuda_launch_configs,
    validate_attention_pool,
)

MAX_BLOCK_D = 256  # head dims up to 256 (the pooler's are 32 and 96)
MAX_QUERIES = 256  # all queries of a (b, h) are held by one program
TARGET_PROGRAMS = 1024  # backward grid size aimed at when grouping samples of shared queries
LOG2E = 1.4426950408889634
SPLIT_DQ_BLOCK_N = 16  # key chunk of the split backward's dq pass: no spills at 128 × 128, 8 warps (bf16/fp16)


@triton.jit
def _attention_pool_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    num_queries, num_keys, head_dim, scale2,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_mb,
    stride_ob, stride_om, stride_lb, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # S2 = log2(e)·q·Kᵀ/√d (padded keys → −∞);  O = softmax(S)·V;  lse = ln 2 · (m_i + log2 l_i)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_queries
    d_mask = offs_d < head_dim
    cols = h * head_dim + offs_d  # this head's features
    q = tl.load(
        q_ptr + b * stride_qb + offs_m[:, None] * stride_qm + cols[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, num_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < num_keys
        kv_mask = n_in[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + cols[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + cols[None, :], mask=kv_mask, other=0.0)
        valid = n_in
        if HAS_MASK:
            padded = tl.load(mask_ptr + b * stride_mb + offs_n, mask=n_in, other=1)
            valid = valid & (padded == 0)
        s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
        s2 = tl.where(valid[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far padded
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * stride_ob + offs_m[:, None] * stride_om + cols[None, :],
        out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453,
             mask=m_mask)


@triton.jit
def _attention_pool_bwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    batch, num_queries, num_keys, head_dim, scale, scale2,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_mb,
    stride_ob, stride_om, stride_dob, stride_dom, stride_lb, stride_lh,
    stride_dqb, stride_dqm, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
    BATCH_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, WITH_DKV: tl.constexpr, WITH_DQ: tl.constexpr,
):
    # P = exp(S − lse);  Δ = rowsum(dO∘O);  dV = Pᵀ·dO;  dS = P∘(dO·Vᵀ − Δ);  dK = dSᵀ·q/√d;
    # dq[group] = Σ_{b∈group} dS_b·K_b/√d.  WITH_DKV / WITH_DQ: which gradients this launch
    # writes (both: one pass; large tiles run two passes so dq's accumulator is not live
    # next to dK and dV's)
    group = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_queries
    d_mask = offs_d < head_dim
    qd_mask = m_mask[:, None] & d_mask[None, :]
    cols = h * head_dim + offs_d
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_start = group * BATCH_PER_PROGRAM
    num_samples = tl.minimum(b_start + BATCH_PER_PROGRAM, batch) - b_start  # the last group may be short
    for i in range(num_samples):
        b = b_start.to(tl.int64) + i
        q = tl.load(q_ptr + b * stride_qb + offs_m[:, None] * stride_qm + cols[None, :], mask=qd_mask, other=0.0)
        o = tl.load(out_ptr + b * stride_ob + offs_m[:, None] * stride_om + cols[None, :], mask=qd_mask, other=0.0)
        do = tl.load(dout_ptr + b * stride_dob + offs_m[:, None] * stride_dom + cols[None, :], mask=qd_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
        lse2 = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        for start_n in range(0, num_keys, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_in = offs_n < num_keys
            kv_mask = n_in[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + cols[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + b * stride_vb + offs_n[:, None] * stride_vn + cols[None, :], mask=kv_mask, other=0.0)
            valid = n_in
            if HAS_MASK:
                padded = tl.load(mask_ptr + b * stride_mb + offs_n, mask=n_in, other=1)
                valid = valid & (padded == 0)
            s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(s2 - lse2[:, None])
            p = tl.where(m_mask[:, None] & valid[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            if WITH_DQ:
                dq_acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            if WITH_DKV:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale
                tl.store(dk_ptr + b * stride_dkb + offs_n[:, None] * stride_dkn + cols[None, :],
                         dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
                tl.store(dv_ptr + b * stride_dvb + offs_n[:, None] * stride_dvn + cols[None, :],
                         dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if WITH_DQ:
        tl.store(
            dq_ptr + group.to(tl.int64) * stride_dqb + offs_m[:, None] * stride_dqm + cols[None, :],
            (dq_acc * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask,
        )


def _launch_config(num_queries: int, head_dim: int, dtype: torch.dtype, backward: bool,
                   device: torch.device) -> dict[str, int]:
    if num_queries > MAX_QUERIES:
        raise ValueError(
            f"attention_pool: the Triton kernel holds all queries of a head on chip and supports Q <= "
            f"{MAX_QUERIES}, got {num_queries}; use impl='reference' for more queries"
        )
    block_m = max(16, next_power_of_2(num_queries))
    block_d = feature_block(head_dim, "attention_pool", MAX_BLOCK_D)
    if not uses_cuda_launch_configs(device):  # the interpreter: fewer, larger chunks run faster
        return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_D": block_d, "DOT_PRECISION": dot_precision(dtype),
                "num_warps": 4, "num_stages": 1, **({"SPLIT_BACKWARD": False} if backward else {})}
    tile = block_m * block_d  # registers per program grow with the resident (BLOCK_M, BLOCK_D) tiles
    # the fused backward holds q, dO (input dtype), dq's fp32 accumulator and dK, dV chunks per
    # (b, h) in registers: at 128 × 128 (the caption pooler) that spills in fp16/bf16 whatever the
    # warps and chunk (compile_check), so large tiles run it as two passes (dK, dV; then dq on
    # SPLIT_DQ_BLOCK_N-key chunks), recomputing S and dP: 7 instead of 5 QNd multiply-adds, no spills
    block_n = 64 if tile <= 64 * 64 else 32
    num_warps = 4 if tile <= 64 * 64 else 8
    split = backward and tile > 64 * 64
    precision, num_stages = dot_precision(dtype), 3
    if dtype == torch.float32 and tile > 64 * 64:
        # 3xTF32 stages split fp32 operands: the caption pooler's backward (128 queries x 128)
        # would ask 608 KiB of shared memory, an H100 has 227 (benchmarks/compile_check.py);
        # exact fp32 FMA dots on smaller key chunks fit (fp32 is the checking path, bf16 trains)
        precision, block_n, num_stages = "ieee", 16, 1
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "DOT_PRECISION": precision,
            "num_warps": num_warps, "num_stages": num_stages, **({"SPLIT_BACKWARD": split} if backward else {})}


def _check_kernels(keys: torch.Tensor) -> None:
    if not keys.is_cuda:
        require_interpreted("attention_pool", _attention_pool_fwd_kernel, _attention_pool_bwd_kernel)


def _mask_args(keys: torch.Tensor, key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The mask as uint8 (same bytes as bool) and its batch stride; keys stand in when absent."""
    if key_padding_mask is None:
        return keys, 0
    mask = key_padding_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def batch_per_program(batch: int, num_heads: int, shared_queries: bool) -> int:
    """Samples per backward program: 1 for per-sample queries; for shared ones, enough to keep
    about TARGET_PROGRAMS programs (each group sums its dq on chip: a smaller dq buffer)."""
    if not shared_queries:
        return 1
    return max(1, batch * num_heads // TARGET_PROGRAMS)


def attention_pool_forward(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns O (B, Q, D, dtype of values) and lse (B, H, Q) fp32. Last dims must be unit-stride."""
    _check_kernels(keys)
    batch, num_keys, dim = keys.shape
    num_queries = queries.shape[-2]
    head_dim = dim // num_heads
    config = _launch_config(num_queries, head_dim, keys.dtype, False, keys.device)
    out = torch.empty(batch, num_queries, dim, device=keys.device, dtype=values.dtype)
    lse = torch.empty(batch, num_heads, num_queries, device=keys.device, dtype=torch.float32)
    mask, stride_mb = _mask_args(keys, key_padding_mask)
    _attention_pool_fwd_kernel[(batch, num_heads)](
        queries, keys, values, mask, out, lse,
        num_queries=num_queries, num_keys=num_keys, head_dim=head_dim, scale2=LOG2E / math.sqrt(head_dim),
        stride_qb=queries.stride(0) if queries.ndim == 3 else 0, stride_qm=queries.stride(-2),
        stride_kb=keys.stride(0), stride_kn=keys.stride(1), stride_vb=values.stride(0), stride_vn=values.stride(1),
        stride_mb=stride_mb, stride_ob=out.stride(0), stride_om=out.stride(1),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        HAS_MASK=key_padding_mask is not None, **config,
    )
    return out, lse


def attention_pool_backward(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (shape of queries), dk, dv (B, N, D), all in the inputs' dtype."""
    _check_kernels(keys)
    batch, num_keys, dim = keys.shape
    num_queries = queries.shape[-2]
    head_dim = dim // num_heads
    shared = queries.ndim == 2
    config = _launch_config(num_queries, head_dim, keys.dtype, True, keys.device)
    group_size = batch_per_program(batch, num_heads, shared)
    num_groups = triton.cdiv(batch, group_size)
    # shared: one fp32 partial dq per group, summed below; per-sample: dq written in place
    dq = (torch.empty(num_groups, num_queries, dim, device=keys.device, dtype=torch.float32) if shared
          else torch.empty(batch, num_queries, dim, device=keys.device, dtype=queries.dtype))
    dk = torch.empty(batch, num_keys, dim, device=keys.device, dtype=keys.dtype)
    dv = torch.empty(batch, num_keys, dim, device=keys.device, dtype=values.dtype)
    mask, stride_mb = _mask_args(keys, key_padding_mask)
    split = config.pop("SPLIT_BACKWARD")
    for with_dkv, with_dq in ((True, False), (False, True)) if split else ((True, True),):
        pass_config = {**config, "BLOCK_N": SPLIT_DQ_BLOCK_N} if split and with_dq else config
        _attention_pool_bwd_pass(queries, keys, values, mask, stride_mb, out, grad_out, lse, dq, dk, dv,
                                 num_heads, shared, group_size, num_groups, pass_config, with_dkv, with_dq)
    if shared:
        dq = dq.sum(0).to(queries.dtype)  # (Q, D)
    return dq, dk, dv


def _attention_pool_bwd_pass(queries, keys, values, mask, stride_mb, out, grad_out, lse, dq, dk, dv,
                             num_heads, shared, group_size, num_groups, config, with_dkv, with_dq) -> None:
    batch, num_keys, dim = keys.shape
    head_dim = dim // num_heads
    _attention_pool_bwd_kernel[(num_groups, num_heads)](
        queries, keys, values, mask, out, grad_out, lse, dq, dk, dv,
        batch=batch, num_queries=queries.shape[-2], num_keys=num_keys, head_dim=head_dim,
        scale=1.0 / math.sqrt(head_dim), scale2=LOG2E / math.sqrt(head_dim),
        stride_qb=0 if shared else queries.stride(0), stride_qm=queries.stride(-2),
        stride_kb=keys.stride(0), stride_kn=keys.stride(1), stride_vb=values.stride(0), stride_vn=values.stride(1),
        stride_mb=stride_mb, stride_ob=out.stride(0), stride_om=out.stride(1),
        stride_dob=grad_out.stride(0), stride_dom=grad_out.stride(1),
        stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        stride_dqb=dq.stride(0), stride_dqm=dq.stride(1), stride_dkb=dk.stride(0), stride_dkn=dk.stride(1),
        stride_dvb=dv.stride(0), stride_dvn=dv.stride(1),
        BATCH_PER_PROGRAM=group_size, HAS_MASK=mask is not keys, WITH_DKV=with_dkv, WITH_DQ=with_dq, **config,
    )


# --- torch.library registration: opaque to torch.compile (fake shapes), capturable by CUDA graphs ----


def _define_ops() -> tuple:
    @torch.library.custom_op("melp_kernels::attention_pool", mutates_args=())
    def attention_pool_op(
        queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int,
        key_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_pool_forward(queries, keys, values, num_heads, key_padding_mask)

    @attention_pool_op.register_fake
    def _(queries, keys, values, num_heads, key_padding_mask):
        batch, _, dim = keys.shape
        num_queries = queries.shape[-2]
        return (values.new_empty(batch, num_queries, dim),
                keys.new_empty(batch, num_heads, num_queries, dtype=torch.float32))

    @torch.library.custom_op("melp_kernels::attention_pool_backward", mutates_args=())
    def attention_pool_backward_op(
        queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int,
        key_padding_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attention_pool_backward(queries, keys, values, num_heads, key_padding_mask, out, lse, grad_out)

    @attention_pool_backward_op.register_fake
    def _(queries, keys, values, num_heads, key_padding_mask, out, lse, grad_out):
        return torch.empty_like(queries), torch.empty_like(keys), torch.empty_like(values)

    def setup_context(ctx, inputs, output) -> None:
        queries, keys, values, num_heads, key_padding_mask = inputs
        out, lse = output
        ctx.save_for_backward(queries, keys, values, key_padding_mask, out, lse)
        ctx.num_heads = num_heads
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        # the backward op has no autograd formula: differentiating it (double backward) raises
        queries, keys, values, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_pool_backward_op(
            queries, keys, values, ctx.num_heads, key_padding_mask, out, lse, contiguous(grad_out))
        return dq, dk, dv, None, None

    attention_pool_op.register_autograd(backward, setup_context=setup_context)
    return attention_pool_op, attention_pool_backward_op


if "_OPS" not in globals():  # importlib.reload (tests/kernel_utils.use_triton_interpreter) must not redefine
    _OPS = _define_ops()


def attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Multi-head softmax(q·kᵀ/√d)·v of shared (Q, D) or per-sample (B, Q, D) queries over
    keys/values (B, N, D); (B, Q, D) in the values' dtype. ``key_padding_mask`` (B, N) bool,
    True = padded key. ``impl``: "auto" | "reference" | "triton" (``kernels._utils.resolve_impl``).
    """
    validate_attention_pool(queries, keys, values, num_heads, key_padding_mask)
    if resolve_impl(impl, "attention_pool", [queries, keys, values], has_triton=True) == "reference" \
            or keys.shape[0] == 0:  # an empty batch: no grid to launch
        return reference.attention_pool(queries, keys, values, num_heads, key_padding_mask)
    queries, keys, values = contiguous(queries), contiguous(keys), contiguous(values)
    out, _ = _OPS[0](queries, keys, values, num_heads, key_padding_mask)
    return out
