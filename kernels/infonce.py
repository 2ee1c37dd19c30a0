"""Fused, tiled symmetric InfoNCE (the rhythm-level CLIP loss): Triton forward and backward.

Math (KERNELS.md §1), x_i, t_j ∈ R^D L2-normalised, s = exp(logit_scale), S_ij = s·⟨x_i, t_j⟩:

    rowLSE_i = log Σ_j exp(S_ij)      colLSE_j = log Σ_i exp(S_ij)
    L = 1/(2N) · [ Σ_i (rowLSE_i − S_ii) + Σ_j (colLSE_j − S_jj) ]
    G_ij = 1/(2N) · [ P_ij + Q_ij − 2δ_ij ],  P = exp(S − rowLSE_i),  Q = exp(S − colLSE_j)
    ∂L/∂x = s·G·T     ∂L/∂t = s·Gᵀ·X     ∂L/∂logit_scale = Σ_ij G_ij S_ij

Shapes: x, t (N, D) with D ≤ 512 (a row block keeps its D features on chip, padded to a
power of two); logit_scale 0-d; loss 0-d float32; gradients in the inputs' dtypes.

Kernels (no N × N tensor is ever stored):
    _infonce_fwd_kernel     one program per block of BLOCK_M rows, looping over column tiles:
                            online row log-sum-exp (m_i, l_i), the positive logit S_ii taken
                            from the tile that holds the diagonal, and per tile the column max
                            and Σexp relative to it, written to a (num_row_blocks × N) buffer
                            pair that a log-sum-exp over row blocks merges into colLSE. That
                            buffer is N²/BLOCK_M × 2 floats; above COLUMN_BUFFER_MAX_BYTES the
                            same kernel runs a second time with x and t swapped instead
                            (rowLSE of Sᵀ = colLSE; +1 N²D of work, no buffer).
    _infonce_bwd_dx_kernel  row blocks looping over column tiles: recompute S from x and t, form
                            G from the saved LSEs, accumulate G·T and Σ G∘S (d logit_scale).
    _infonce_bwd_dt_kernel  column blocks looping over row tiles: recompute Sᵀ, accumulate Gᵀ·X.
Work: forward 1 N²D multiply-adds (2 with the second pass), backward 2 + 2.

Numerics: logits in base 2 (log2(e) = 1.4427 folded into s, exp2; ln 2 = 0.6931 converts the
saved LSEs back to natural units), every dot product, softmax
statistic and gradient accumulated in fp32; fp32 inputs use 3×TF32 dots (near-fp32
accuracy). G is cast to the input dtype (fp16/bf16) for its tensor-core product, as in
flash-attention; it is formed without the 1/(2N) factor (so its entries are O(1), not
subnormal in fp16) and that factor is applied to the fp32 accumulator.

Distributed (``group`` given, W ranks, each with N_l rows; all ranks need the same N_l):
rank r all-gathers T (N × D), computes its N_l × N block-row once, and merges its partial
column statistics with a log-sum-exp all-reduce (2 all-reduces of N fp32: max, then sum).
Its loss is 1/(2N_l)·[Σ_{i∈r}(rowLSE_i − S_ii) + Σ_{j∈r}(colLSE_j − S_jj)]; the mean over
ranks is the full-batch L. Backward: the W upstream gradients are all-gathered (W floats) so
every column's Q term carries the weight of the rank whose loss holds it — exact for any
grad_output; dx stays local, dT (N × D, fp32) is reduce-scattered (sum). Each rank's
features get W·∂L/∂(features) and logit_scale the share of its rows (Σ over its rows of
G∘S: the shares sum to autograd's total, though split across ranks by rows rather than by
loss), so averaging gradients over ranks (DDP / DeepSpeed) gives every parameter ∂L/∂θ. Per step: all-gather N·D of t,
2N + W floats all-reduced/gathered, reduce-scatter N·D fp32 (gloo: all-reduce, then slice).
The kernels only see local tensors; the communication is in ``_DistributedInfoNCEFunction``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (
    Impl,
    contiguous,
    dot_precision,
    feature_block,
    require_interpreted,
    resolve_impl,
    validate_infonce,
)

MAX_BLOCK_D = 512
COLUMN_BUFFER_MAX_BYTES = 256 * 2**20  # above: colLSE by a second pass instead of the buffer pair


@triton.jit
def _infonce_fwd_kernel(
    x_ptr, t_ptr, logit_scale_ptr,
    row_lse_ptr, diag_ptr, col_max_ptr, col_sum_ptr,
    num_rows, num_cols, dim, diag_offset,
    stride_xm, stride_tn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COLUMN_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # rowLSE_i = log Σ_j exp(S_ij), diag_i = S_{i, i+diag_offset}; per tile (COLUMN_STATS):
    # col_max_j = max_{i∈block} S_ij, col_sum_j = Σ_{i∈block} exp(S_ij − col_max_j)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < num_rows
    d_mask = offs_d < dim
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    scale2 = tl.exp(tl.load(logit_scale_ptr).to(tl.float32)) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, num_cols, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < num_cols
        t = tl.load(
            t_ptr + offs_n[:, None].to(tl.int64) * stride_tn + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s2 = tl.dot(x, tl.trans(t), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N), base 2
        s2 = tl.where(col_mask[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)
        m_i = m_new
        is_diag = offs_n[None, :] == offs_m[:, None] + diag_offset
        diag += tl.sum(tl.where(is_diag, s2, 0.0), 1)
        if COLUMN_STATS:
            s2_rows = tl.where(row_mask[:, None], s2, float("-inf"))
            c_max = tl.where(col_mask, tl.max(s2_rows, 0), 0.0)
            c_sum = tl.sum(tl.exp2(s2_rows - c_max[None, :]), 0)
            col_offs = pid.to(tl.int64) * stride_cm + offs_n
            tl.store(col_max_ptr + col_offs, c_max * 0.6931471805599453, mask=col_mask)
            tl.store(col_sum_ptr + col_offs, c_sum, mask=col_mask)
    tl.store(row_lse_ptr + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_mask)
    tl.store(diag_ptr + offs_m, diag * 0.6931471805599453, mask=row_mask)


@triton.jit
def _infonce_bwd_dx_kernel(
    x_ptr, t_ptr, logit_scale_ptr, row_lse_ptr, col_lse_ptr, row_weight_ptr, col_weight_ptr,
    dx_ptr, dscale_ptr,
    num_rows, num_cols, dim, diag_offset, grad_factor,
    stride_xm, stride_tn, stride_dxm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # G'_ij = w_r·P_ij + w_j·Q_ij − (w_r + w_j)·δ_ij;  dx_i = grad_factor·s·Σ_j G'_ij t_j;
    # dscale[pid] = grad_factor·Σ_{i∈block, j} G'_ij S_ij
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < num_rows
    d_mask = offs_d < dim
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
    scale2 = scale * 1.4426950408889634
    row_lse2 = tl.load(row_lse_ptr + offs_m, mask=row_mask, other=0.0) * 1.4426950408889634
    row_weight = tl.load(row_weight_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, num_cols, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < num_cols
        t = tl.load(
            t_ptr + offs_n[:, None].to(tl.int64) * stride_tn + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :], other=0.0,
        )
        col_lse2 = tl.load(col_lse_ptr + offs_n, mask=col_mask, other=0.0) * 1.4426950408889634
        col_weight = tl.load(col_weight_ptr + offs_n, mask=col_mask, other=0.0)
        s2 = tl.dot(x, tl.trans(t), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s2 - row_lse2[:, None])
        q = tl.exp2(s2 - col_lse2[None, :])
        g = row_weight * p + col_weight[None, :] * q
        is_diag = offs_n[None, :] == offs_m[:, None] + diag_offset
        g = tl.where(is_diag, g - (row_weight + col_weight[None, :]), g)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        dscale += tl.sum(g * s2, 1)
        acc += tl.dot(g.to(t.dtype), t, input_precision=DOT_PRECISION)
    dx = acc * (scale * grad_factor)
    tl.store(
        dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_d[None, :],
        dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(dscale_ptr + pid, tl.sum(dscale, 0) * (grad_factor * 0.6931471805599453))


@triton.jit
def _infonce_bwd_dt_kernel(
    x_ptr, t_ptr, logit_scale_ptr, row_lse_ptr, col_lse_ptr, row_weight_ptr, col_weight_ptr,
    dt_ptr,
    num_rows, num_cols, dim, diag_offset, grad_factor,
    stride_xm, stride_tn, stride_dtn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # G'ᵀ_ji as in the dX kernel, seen from column block j:  dt_j = grad_factor·s·Σ_i G'_ij x_i
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = offs_n < num_cols
    d_mask = offs_d < dim
    t = tl.load(
        t_ptr + offs_n[:, None].to(tl.int64) * stride_tn + offs_d[None, :],
        mask=col_mask[:, None] & d_mask[None, :], other=0.0,
    )
    scale = tl.exp(tl.load(logit_scale_ptr).to(tl.float32))
    scale2 = scale * 1.4426950408889634
    col_lse2 = tl.load(col_lse_ptr + offs_n, mask=col_mask, other=0.0) * 1.4426950408889634
    col_weight = tl.load(col_weight_ptr + offs_n, mask=col_mask, other=0.0)
    row_weight = tl.load(row_weight_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, num_rows, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < num_rows
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :], other=0.0,
        )
        row_lse2 = tl.load(row_lse_ptr + offs_m, mask=row_mask, other=0.0) * 1.4426950408889634
        s2 = tl.dot(t, tl.trans(x), input_precision=DOT_PRECISION) * scale2  # Sᵀ: (BLOCK_N, BLOCK_M)
        p = tl.exp2(s2 - row_lse2[None, :])
        q = tl.exp2(s2 - col_lse2[:, None])
        g = row_weight * p + col_weight[:, None] * q
        is_diag = offs_n[:, None] == offs_m[None, :] + diag_offset
        g = tl.where(is_diag, g - (row_weight + col_weight[:, None]), g)
        g = tl.where(col_mask[:, None] & row_mask[None, :], g, 0.0)
        acc += tl.dot(g.to(x.dtype), x, input_precision=DOT_PRECISION)
    dt = acc * (scale * grad_factor)
    tl.store(
        dt_ptr + offs_n[:, None].to(tl.int64) * stride_dtn + offs_d[None, :],
        dt.to(dt_ptr.dtype.element_ty), mask=col_mask[:, None] & d_mask[None, :],
    )


def _launch_config(dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    block_d = feature_block(dim, "infonce_loss", MAX_BLOCK_D)
    if device.type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": block_d, "num_warps": 4}
    block = 64 if block_d <= 256 else 32
    num_warps = 4 if block_d <= 128 else 8
    if dtype == torch.float32:  # 3xTF32 dots stage split operands: 64-row fp32 tiles overflow
        block, num_warps = block // 2, 4  # an H100's 227 KiB of shared memory (compile_check.py)
    return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "num_warps": num_warps}


def _check_kernels(x: torch.Tensor) -> None:
    if not x.is_cuda:
        require_interpreted("infonce_loss", _infonce_fwd_kernel, _infonce_bwd_dx_kernel, _infonce_bwd_dt_kernel)


def _forward_pass(
    x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, diag_offset: int, column_stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward pass over x (rows) against t (columns): rowLSE, S_{i,i+diag_offset}, colLSE over these rows."""
    num_rows, dim = x.shape
    num_cols = t.shape[0]
    config = _launch_config(dim, x.dtype, x.device)
    num_row_blocks = triton.cdiv(num_rows, config["BLOCK_M"])
    row_lse = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    diag = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    col_shape = (num_row_blocks, num_cols) if column_stats else (1, 1)
    col_max = torch.empty(col_shape, device=x.device, dtype=torch.float32)
    col_sum = torch.empty(col_shape, device=x.device, dtype=torch.float32)
    _infonce_fwd_kernel[(num_row_blocks,)](
        x, t, logit_scale, row_lse, diag, col_max, col_sum,
        num_rows, num_cols, dim, diag_offset,
        x.stride(0), t.stride(0), col_max.stride(0),
        COLUMN_STATS=column_stats, DOT_PRECISION=dot_precision(x.dtype), **config,
    )
    col_lse = torch.logsumexp(col_max + col_sum.log(), dim=0) if column_stats else None  # (N,)
    return row_lse, diag, col_lse


def infonce_forward(
    x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, diag_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of S = s·x·tᵀ for x (N_l, D) against t (N, D), all fp32.

    Returns rowLSE (N_l,), the positive logits S_{i, i+diag_offset} (N_l,) and the column
    log-sum-exp over these N_l rows (N,).
    """
    _check_kernels(x)
    config = _launch_config(x.shape[1], x.dtype, x.device)
    buffer_bytes = triton.cdiv(x.shape[0], config["BLOCK_M"]) * t.shape[0] * 8
    if buffer_bytes <= COLUMN_BUFFER_MAX_BYTES:
        return _forward_pass(x, t, logit_scale, diag_offset, column_stats=True)
    row_lse, diag, _ = _forward_pass(x, t, logit_scale, diag_offset, column_stats=False)
    col_lse, _, _ = _forward_pass(t, x, logit_scale, -diag_offset, column_stats=False)
    return row_lse, diag, col_lse


def infonce_backward(
    x: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    row_weight: torch.Tensor,
    col_weight: torch.Tensor,
    diag_offset: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for G = grad_factor·[row_weight·P + col_weight_j·Q − (row_weight + col_weight_j)·δ].

    x (N_l, D), t (N, D); row_weight 0-d fp32 and col_weight (N,) fp32 are the upstream
    gradients of the losses that hold each row's and each column's terms. Returns dx
    (N_l, D, dtype of x), dt (N, D, fp32) and d logit_scale (0-d fp32).
    """
    _check_kernels(x)
    num_rows, dim = x.shape
    num_cols = t.shape[0]
    config = _launch_config(dim, x.dtype, x.device)
    precision = dot_precision(x.dtype)
    num_row_blocks = triton.cdiv(num_rows, config["BLOCK_M"])
    dx = torch.empty_like(x)
    dt = torch.empty(num_cols, dim, device=x.device, dtype=torch.float32)
    dscale_partial = torch.empty(num_row_blocks, device=x.device, dtype=torch.float32)
    common = dict(num_rows=num_rows, num_cols=num_cols, dim=dim, diag_offset=diag_offset, grad_factor=grad_factor)
    _infonce_bwd_dx_kernel[(num_row_blocks,)](
        x, t, logit_scale, row_lse, col_lse, row_weight, col_weight, dx, dscale_partial,
        stride_xm=x.stride(0), stride_tn=t.stride(0), stride_dxm=dx.stride(0),
        DOT_PRECISION=precision, **common, **config,
    )
    _infonce_bwd_dt_kernel[(triton.cdiv(num_cols, config["BLOCK_N"]),)](
        x, t, logit_scale, row_lse, col_lse, row_weight, col_weight, dt,
        stride_xm=x.stride(0), stride_tn=t.stride(0), stride_dtn=dt.stride(0),
        DOT_PRECISION=precision, **common, **config,
    )
    return dx, dt, dscale_partial.sum()


class InfoNCEFunction(torch.autograd.Function):
    """Single-process fused InfoNCE: loss = 1/(2N)·[Σ rowLSE + Σ colLSE − 2 Σ S_ii]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        x, t = contiguous(x), contiguous(t)
        row_lse, diag, col_lse = infonce_forward(x, t, logit_scale)
        ctx.save_for_backward(x, t, logit_scale, row_lse, col_lse)
        return (row_lse.sum() + col_lse.sum() - 2.0 * diag.sum()) / (2 * x.shape[0])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, t, logit_scale, row_lse, col_lse = ctx.saved_tensors
        weight = grad_loss.float().reshape(1)
        dx, dt, dscale = infonce_backward(
            x, t, logit_scale, row_lse, col_lse, weight, weight.expand(t.shape[0]).contiguous(),
            diag_offset=0, grad_factor=1.0 / (2 * x.shape[0]),
        )
        return dx, dt.to(t.dtype), dscale.to(logit_scale.dtype)


# Distributed: everything that communicates is below; the kernels above see local tensors only.


def _all_gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _all_reduce_logsumexp(lse: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """log Σ_ranks exp(lse_r), elementwise: all-reduce the max, rescale, all-reduce the sums."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(lse - top)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return top + total.log()


def _reduce_scatter_rows(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks of (N, D) partials, returning this rank's N_l rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_local = tensor.shape[0] // world
    if dist.get_backend(group) == "nccl":
        out = torch.empty(num_local, tensor.shape[1], device=tensor.device, dtype=tensor.dtype)
        dist.reduce_scatter_tensor(out, tensor, group=group)
        return out
    dist.all_reduce(tensor, group=group)  # gloo has no reduce-scatter
    return tensor[rank * num_local:(rank + 1) * num_local]


class _DistributedInfoNCEFunction(torch.autograd.Function):
    """Rank r's share of the InfoNCE loss over the group's full batch (see the module docstring)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, group: dist.ProcessGroup
    ) -> torch.Tensor:
        x, t = contiguous(x), contiguous(t)
        num_local = x.shape[0]
        offset = dist.get_rank(group) * num_local
        all_t = _all_gather_rows(t, group)  # (N, D)
        row_lse, diag, col_lse_local = infonce_forward(x, all_t, logit_scale, diag_offset=offset)
        col_lse = _all_reduce_logsumexp(col_lse_local, group)  # (N,)
        ctx.save_for_backward(x, all_t, logit_scale, row_lse, col_lse)
        ctx.group = group
        own_cols = col_lse[offset:offset + num_local]
        return (row_lse.sum() + own_cols.sum() - 2.0 * diag.sum()) / (2 * num_local)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, all_t, logit_scale, row_lse, col_lse = ctx.saved_tensors
        group = ctx.group
        num_local = x.shape[0]
        weight = grad_loss.float().reshape(1)
        rank_weights = _all_gather_rows(weight, group)  # (W,): column j's term is in its owner's loss
        col_weight = rank_weights.repeat_interleave(num_local)  # (N,)
        dx, dt_all, dscale = infonce_backward(
            x, all_t, logit_scale, row_lse, col_lse, weight, col_weight,
            diag_offset=dist.get_rank(group) * num_local, grad_factor=1.0 / (2 * num_local),
        )
        dt = _reduce_scatter_rows(dt_all, group)  # (N_l, D)
        return dx, dt.to(all_t.dtype), dscale.to(logit_scale.dtype), None


def infonce_loss(
    x: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised x, t (N, D) at scale exp(logit_scale); 0-d float32.

    With ``group`` each rank passes its own N_l rows (the same N_l on every rank) and gets
    its share of the full-batch loss (mean over ranks = full-batch loss); gradients follow
    the DDP convention described in the module docstring. ``impl``: "auto" | "reference" |
    "triton" (see ``kernels._utils.resolve_impl``).
    """
    validate_infonce(x, t, logit_scale)
    if resolve_impl(impl, "infonce_loss", [x, t, logit_scale], has_triton=True) == "reference":
        return reference.infonce_loss(x, t, logit_scale, group)
    if group is None:
        return InfoNCEFunction.apply(x, t, logit_scale)
    return _DistributedInfoNCEFunction.apply(x, t, logit_scale, group)
