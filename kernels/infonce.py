"""Fused, tiled symmetric InfoNCE (the rhythm-level CLIP loss): Triton forward and backward.

Math: x_i, t_j ∈ R^D L2-normalised, s = exp(logit_scale), S_ij = s·⟨x_i, t_j⟩:

    rowLSE_i = log Σ_j exp(S_ij)      colLSE_j = log Σ_i exp(S_ij)
    L = 1/(2N) · Σ_i [ (rowLSE_i − S_ii) + (colLSE_i − S_ii) ]       (a sum of per-row terms ≥ 0)
    G_ij = 1/(2N) · [ P_ij + Q_ij − 2δ_ij ],  P = exp(S − rowLSE_i),  Q = exp(S − colLSE_j)
    ∂L/∂x = s·G·T     ∂L/∂t = s·Gᵀ·X     ∂L/∂logit_scale = Σ_ij G_ij S_ij

Shapes: x (N_l, D) rows against t (N, D) columns (N_l = N on one process), D ≤ 512 (a row
block keeps its D features on chip, padded to a power of two); logit_scale 0-d; loss 0-d
float32; gradients in the inputs' dtypes.

Kernels (no N × N tensor is ever stored); the grid is (row blocks × column splits), so
even 64 rows fill the GPU: each program owns BLOCK_M rows and a contiguous range of columns.
    _infonce_fwd_kernel  per program: online off-diagonal row statistics (m_i, l_i) over its
                         columns, the positive logit S_{i,i+o} when the diagonal falls in its
                         range, and per column tile the off-diagonal column max and Σexp over
                         its rows. The host merges the row partials over splits and the
                         column partials over row blocks by log-sum-exp (O(N·splits) work).
                         Above COLUMN_BUFFER_MAX_BYTES the column buffer is replaced by a
                         second run with x and t swapped (+1 N²D).
    _infonce_bwd_kernel  recomputes the S tile once, forms G and does both products: G·T is
                         accumulated over the program's columns and added to dx, Gᵀ·X is
                         added to dt tile by tile (fp32 atomics; run-to-run bit differences
                         on a GPU, none under the interpreter).
Work per forward+backward: 4 N_l·N·D multiply-adds (S in the forward; S, G·T, Gᵀ·X in the
backward) and 4 exp2 per logit (row and column statistics; P and Q).

Numerics: logits in base 2 (log2 e folded into s, exp2), every dot product, statistic and
gradient accumulated in fp32; fp32 inputs use 3×TF32 dots (near-fp32 accuracy). The loss
is Σ of per-row terms rowLSE_i − S_ii = log1p(Σ_{j≠i} exp(S_ij − S_ii)) computed from the
off-diagonal statistics, never as Σrow + Σcol − 2Σdiag (which cancels to noise when the
loss is near zero); G's diagonal P_ii − 1 = expm1(−term_i) comes from the same terms. G
is cast to the input dtype for its tensor-core products (as in flash-attention) only after
dividing the upstream gradients by their largest magnitude, so |G| ≤ 2 whatever the loss
scale (fp16 under a scale of 2¹⁶ stays finite); 1/(2N), s and that magnitude multiply the
fp32 accumulators.

Launch: on CUDA, @triton.autotune picks tile sizes (BLOCK_N; BLOCK_M too in the backward),
warps and stages per (N_l, N, D, dtype) from ``_launch_configs``; the interpreter, or
``forced_launch_config``, runs one fixed config (tests, compile_check.py). The column split
is fixed before autotuning (about PROGRAMS_PER_SM programs per SM). The single-process op
is the torch.library custom op ``melp_kernels::infonce_forward`` (with its backward op),
free of host synchronisation, so torch.compile(fullgraph=True) and CUDA graphs capture it.

Distributed (``group`` given, W ranks, each with N_l rows; all ranks need the same N_l,
checked with one all-gather of W ints read on the host, a ValueError on every rank
otherwise; the distributed path is therefore not graph-capturable): rank r
all-gathers T (N × D), computes its N_l × N block-row once and merges its partial column
statistics with a log-sum-exp all-reduce (max over N, then the sums and the diagonal, 2N).
Its loss is 1/(2N_l)·Σ_{i∈r}[row term + column term of its own columns]; the mean over
ranks is the full-batch L. Backward: the W upstream gradients are all-gathered so every
column's Q term carries the weight of the rank whose loss holds it — exact for any
grad_output; dx stays local, dT (N × D, fp32) is reduce-scattered (sum). Each rank's
features get W·∂L/∂(features) and logit_scale the share of its rows (the shares sum to
autograd's total), so averaging gradients over ranks (DDP / DeepSpeed) gives ∂L/∂θ.
The kernels only see local tensors; the communication is in ``_DistributedInfoNCEFunction``.

Multi-positive targets (``positive_ids`` (N_l,) int, e.g. report hashes): the target of row i
is T_ij = [id_i = id_j]/c_i, c_i = #{j : id_j = id_i} over the (global) batch, columns alike
(T is symmetric). Then rowLSE_i − Σ_j T_ij S_ij = (rowLSE_i − S_ii) + s·⟨x_i, t_i − U_i/c_i⟩
with U_i = Σ_{j: id_j = id_i} t_j (columns: V_j = Σ_{i: id_i = id_j} x_i): the soft loss is the
kernels' loss plus an O(N·D) term that autograd differentiates, so the total gradient on the
logits is G = (P + Q)/(2N) − (T_row + T_col)/(2N), and the N × N target matrix never exists.
The group sums come from a sort of the ids (no host sync, static shapes; graph-capturable);
distributed, x and t are all-gathered with gradient for them (2 N·D more traffic). All ids
distinct makes the extra term exactly 0 (t_i − t_i/1), so loss and gradients equal the
single-positive op bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import reference
from kernels._utils import (
    Impl,
    contiguous,
    dot_precision,
    feature_block,
    require_interpreted,
    resolve_impl,
    uses_cuda_launch_configs,
    validate_infonce,
    validate_positive_ids,
)

MAX_BLOCK_D = 512
COLUMN_BUFFER_MAX_BYTES = 256 * 2**20  # above: colLSE by a second pass instead of the buffer pair
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
PROGRAMS_PER_SM = 2  # column splits are chosen so the grid holds about this many programs per SM
INTERPRETER_PROGRAMS = 16  # the interpreter's "grid target": enough to exercise several splits


@triton.jit
def _infonce_fwd_kernel(
    x_ptr, t_ptr, logit_scale_ptr,
    row_max_ptr, row_sum_ptr, diag_ptr, col_max_ptr, col_sum_ptr,
    num_rows, num_cols, dim, diag_offset, cols_per_split,
    stride_xm, stride_tn, stride_rs, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COLUMN_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Base 2 (s2 = S·log2 e), over this program's columns c ∈ split, j ≠ i + diag_offset:
    # row_max_i = max_c s2_ic, row_sum_i = Σ_c 2^(s2_ic − row_max_i), diag_i = s2_{i,i+o} (or 0);
    # per tile (COLUMN_STATS): col_max_c = max_{i∈block} s2_ic, col_sum_c = Σ_i 2^(s2_ic − col_max_c)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_cols)
    for start_n in range(col_start, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < col_end
        t = tl.load(
            t_ptr + offs_n[:, None].to(tl.int64) * stride_tn + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s2 = tl.dot(x, tl.trans(t), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
        is_diag = offs_n[None, :] == offs_m[:, None] + diag_offset
        diag += tl.sum(tl.where(is_diag, s2, 0.0), 1)
        s2 = tl.where(is_diag | (col_mask[None, :] == 0), float("-inf"), s2)  # off-diagonal only
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s2 - m_ref[:, None]), 1)
        m_i = m_new
        if COLUMN_STATS:
            s2_rows = tl.where(row_mask[:, None], s2, float("-inf"))
            c_max = tl.max(s2_rows, 0)
            c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp2(s2_rows - c_ref[None, :]), 0)
            col_offs = pid_m.to(tl.int64) * stride_cm + offs_n
            tl.store(col_max_ptr + col_offs, c_max, mask=col_mask)
            tl.store(col_sum_ptr + col_offs, c_sum, mask=col_mask)
    row_offs = pid_s.to(tl.int64) * stride_rs + offs_m
    tl.store(row_max_ptr + row_offs, m_i, mask=row_mask)
    tl.store(row_sum_ptr + row_offs, l_i, mask=row_mask)
    tl.store(diag_ptr + row_offs, diag, mask=row_mask)


@triton.jit
def _infonce_bwd_kernel(
    x_ptr, t_ptr, logit_scale_ptr, row_lse_ptr, col_lse_ptr, row_diag_ptr, col_diag_ptr,
    row_weight_ptr, col_weight_ptr, out_factor_ptr,
    dx_ptr, dt_ptr, dscale_ptr,
    num_rows, num_cols, dim, diag_offset, cols_per_split,
    stride_xm, stride_tn, stride_dxm, stride_dtn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # g_ij = w_r·P_ij + w_j·Q_ij (i ≠ j), g_ii = w_r·(P_ii − 1) + w_j·(Q_jj − 1) from the saved
    # expm1 terms (|w| ≤ 1, so |g| ≤ 2); with f = out_factor: dx_i += f·Σ_c g_ic t_c,
    # dt_c += f·Σ_i g_ic x_i (atomics), dscale[program] = Σ g∘s2 (scaled on the host)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < num_rows
    d_mask = offs_d < dim
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    scale2 = tl.exp(tl.load(logit_scale_ptr).to(tl.float32)) * 1.4426950408889634
    row_lse2 = tl.load(row_lse_ptr + offs_m, mask=row_mask, other=0.0)
    row_diag = tl.load(row_diag_ptr + offs_m, mask=row_mask, other=0.0)
    row_weight = tl.load(row_weight_ptr)
    out_factor = tl.load(out_factor_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_cols)
    for start_n in range(col_start, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_mask = offs_n < col_end
        t = tl.load(
            t_ptr + offs_n[:, None].to(tl.int64) * stride_tn + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :], other=0.0,
        )
        col_lse2 = tl.load(col_lse_ptr + offs_n, mask=col_mask, other=0.0)
        col_diag = tl.load(col_diag_ptr + offs_n, mask=col_mask, other=0.0)
        col_weight = tl.load(col_weight_ptr + offs_n, mask=col_mask, other=0.0)
        s2 = tl.dot(x, tl.trans(t), input_precision=DOT_PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
        g = row_weight * tl.exp2(s2 - row_lse2[:, None]) + col_weight[None, :] * tl.exp2(s2 - col_lse2[None, :])
        is_diag = offs_n[None, :] == offs_m[:, None] + diag_offset
        g = tl.where(is_diag, row_weight * row_diag[:, None] + (col_weight * col_diag)[None, :], g)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        dscale += tl.sum(g * s2, 1)
        g = g.to(t.dtype)
        acc += tl.dot(g, t, input_precision=DOT_PRECISION)
        dt_tile = tl.dot(tl.trans(g), x, input_precision=DOT_PRECISION) * out_factor  # (BLOCK_N, BLOCK_D)
        tl.atomic_add(
            dt_ptr + offs_n[:, None].to(tl.int64) * stride_dtn + offs_d[None, :], dt_tile,
            mask=col_mask[:, None] & d_mask[None, :],
        )
    tl.atomic_add(
        dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_d[None, :], acc * out_factor,
        mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_s, tl.sum(dscale, 0))


# --- launch configuration ---------------------------------------------------------------------

_FORCED: dict[str, dict[str, int]] = {}
_AUTOTUNERS: dict[tuple, object] = {}
# A stand-in for triton's do_bench: when set, CPU tensors go through the autotuner too (tests
# run its path — every config, reset_to_zero between trials — under the interpreter).
AUTOTUNE_BENCH: Callable | None = None


def _launch_configs(kind: str, dim: int, dtype: torch.dtype, device: torch.device) -> list[dict[str, int]]:
    """Launch configs of the "fwd" or "bwd" kernel; on CUDA the autotune space, default first.

    Forward configs share BLOCK_M (the column-statistics buffer has a row per row block).
    Every BLOCK_N divides the split granule (the largest BLOCK_N of the list). On sm_90 no
    fp16/bf16 config spills registers at D = 128, 256 or 512 (AOT-compiled with triton 3.9,
    D = 256 also with 3.6: benchmarks/compile_check.py); fp32's 3×TF32 dots spill at any
    tile that fits the shared memory.
    """
    block_d = feature_block(dim, "infonce_loss", MAX_BLOCK_D)
    if not uses_cuda_launch_configs(device):  # the interpreter (unless a test forces the CUDA configs)
        return [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 1}]
    if dtype == torch.float32:  # 3xTF32 dots stage split operands: 32-row tiles fit 227 KiB of shared memory
        tiles = [(32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)] if kind == "fwd" else \
            [(16, 32, 4, 2), (32, 16, 8, 2), (32, 32, 4, 2)]
    elif kind == "fwd":  # small accumulators: (m, l) per row
        block_m = 64 if block_d <= 256 else 32
        tiles = [(block_m, n, w, s) for n in (64, 32) for w in (8, 4) for s in (3, 2)]
    elif block_d <= 128:  # bwd: a (BLOCK_M, BLOCK_D) fp32 dx accumulator plus a (BLOCK_N, BLOCK_D) dt tile
        tiles = [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 3)]
    elif block_d == 256:
        tiles = [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2), (32, 64, 8, 1)]
    else:
        tiles = [(32, 32, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1), (16, 16, 4, 2)]
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "num_warps": w, "num_stages": s} for m, n, w, s in tiles]


@contextlib.contextmanager
def forced_launch_config(fwd: dict[str, int] | None = None, bwd: dict[str, int] | None = None) -> Iterator[None]:
    """Run the kernels with these configs (no autotuning) inside the block: tests and compile_check."""
    saved = dict(_FORCED)
    _FORCED.update({kind: config for kind, config in (("fwd", fwd), ("bwd", bwd)) if config is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _kernel_and_configs(kind: str, x: torch.Tensor) -> tuple[object, list[dict[str, int]], dict[str, int]]:
    """(kernel to launch, configs it may run, launch keywords): the autotuner on CUDA, else one config."""
    kernel = _infonce_fwd_kernel if kind == "fwd" else _infonce_bwd_kernel
    if kind in _FORCED:
        return kernel, [_FORCED[kind]], dict(_FORCED[kind])
    configs = _launch_configs(kind, x.shape[1], x.dtype, x.device)
    if not (x.is_cuda or AUTOTUNE_BENCH is not None) or len(configs) == 1:
        return kernel, configs[:1], dict(configs[0])
    key = (kind, x.dtype, configs[0]["BLOCK_D"], AUTOTUNE_BENCH)
    if key not in _AUTOTUNERS:
        _AUTOTUNERS[key] = triton.autotune(
            configs=[
                triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                              num_stages=c["num_stages"])
                for c in configs
            ],
            key=["num_rows", "num_cols", "dim"],  # the autotuner adds the tensors' dtypes
            reset_to_zero=["dx_ptr", "dt_ptr", "dscale_ptr"] if kind == "bwd" else None,
            do_bench=AUTOTUNE_BENCH,
        )(kernel)
    return _AUTOTUNERS[key], configs, {}


def _grid(num_rows: int, num_cols: int, configs: list[dict[str, int]], device: torch.device) -> tuple[int, int]:
    """(column splits, columns per split): about PROGRAMS_PER_SM programs per SM with the largest
    BLOCK_M of ``configs`` (row blocks × splits; smaller row blocks only add programs)."""
    num_row_blocks = triton.cdiv(num_rows, max(config["BLOCK_M"] for config in configs))
    granule = max(config["BLOCK_N"] for config in configs)
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    num_granules = triton.cdiv(num_cols, granule)
    splits = max(1, min(num_granules, triton.cdiv(target, num_row_blocks)))
    cols_per_split = triton.cdiv(num_granules, splits) * granule
    return triton.cdiv(num_cols, cols_per_split), cols_per_split


def _check_kernels(x: torch.Tensor) -> None:
    if not x.is_cuda:
        require_interpreted("infonce_loss", _infonce_fwd_kernel, _infonce_bwd_kernel)


# --- launchers --------------------------------------------------------------------------------


def _merge(maxima: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge base-2 partials (max, Σ2^(s − max)) over dim 0; a max of −inf means "no entry"."""
    top = maxima.amax(0)
    ref = torch.where(top == float("-inf"), 0.0, top)
    return top, (sums * torch.exp2(maxima - ref)).sum(0)


def _forward_pass(
    x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, diag_offset: int, column_stats: bool
) -> tuple[torch.Tensor, ...]:
    """One kernel run over x (rows) against t (columns): merged off-diagonal (max, sum) per row,
    S_{i,i+o} (base 2), and per column over these rows (when ``column_stats``)."""
    num_rows, dim = x.shape
    num_cols = t.shape[0]
    kernel, configs, meta = _kernel_and_configs("fwd", x)
    num_row_blocks = triton.cdiv(num_rows, configs[0]["BLOCK_M"])
    num_splits, cols_per_split = _grid(num_rows, num_cols, configs, x.device)
    row_stats = torch.empty(3, num_splits, num_rows, device=x.device, dtype=torch.float32)  # max, sum, diag
    col_shape = (num_row_blocks, num_cols) if column_stats else (1, 1)
    col_max = torch.empty(col_shape, device=x.device, dtype=torch.float32)
    col_sum = torch.empty(col_shape, device=x.device, dtype=torch.float32)
    kernel[(num_row_blocks, num_splits)](
        x, t, logit_scale, row_stats[0], row_stats[1], row_stats[2], col_max, col_sum,
        num_rows, num_cols, dim, diag_offset, cols_per_split,
        x.stride(0), t.stride(0), row_stats.stride(1), col_max.stride(0),
        COLUMN_STATS=column_stats, DOT_PRECISION=dot_precision(x.dtype), **meta,
    )
    row_max, row_sum = _merge(row_stats[0], row_stats[1])
    columns = _merge(col_max, col_sum) if column_stats else (None, None)
    return row_max, row_sum, row_stats[2].sum(0), *columns


def infonce_forward(
    x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, diag_offset: int = 0
) -> tuple[torch.Tensor, ...]:
    """Base-2 statistics of S = s·x·tᵀ for x (N_l, D) against t (N, D), all fp32.

    Returns the off-diagonal row max and Σ2^(s2 − max) (N_l,), the positive logits
    s2_{i,i+diag_offset} (N_l,), and the off-diagonal column max and sum over these rows (N,).
    """
    _check_kernels(x)
    configs = _FORCED.get("fwd") or _launch_configs("fwd", x.shape[1], x.dtype, x.device)[0]
    if triton.cdiv(x.shape[0], configs["BLOCK_M"]) * t.shape[0] * 8 <= COLUMN_BUFFER_MAX_BYTES:
        return _forward_pass(x, t, logit_scale, diag_offset, column_stats=True)
    row_max, row_sum, diag, _, _ = _forward_pass(x, t, logit_scale, diag_offset, column_stats=False)
    col_max, col_sum, _, _, _ = _forward_pass(t, x, logit_scale, -diag_offset, column_stats=False)
    return row_max, row_sum, diag, col_max, col_sum


def positive_terms(top: torch.Tensor, total: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """LSE − positive in base 2: log2(2^diag + total·2^top) − diag = log2(1 + total·2^(top − diag)),
    through log1p, so a term near zero keeps its relative accuracy."""
    gap = top - diag  # −inf when the row/column has no off-diagonal entry
    near = torch.log1p(total * torch.exp2(gap.clamp(max=64.0))) * LOG2E
    far = gap + torch.log2(total + torch.exp2(-gap))  # gap > 64: total ≥ 1, no overflow
    return torch.where(gap > 64.0, far, near)


def infonce_backward(
    x: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    row_weight: torch.Tensor,
    col_weight: torch.Tensor,
    diag_offset: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for G = grad_factor·[w_r·P + w_j·Q − (w_r + w_j)·δ].

    x (N_l, D), t (N, D); stats = (rowLSE (N_l,), colLSE (N,), row terms (N_l,), column terms
    (N,)) in base 2; row_weight 0-d and col_weight (N,) fp32 are the upstream gradients of the
    losses that hold each row's and each column's terms. Returns dx (N_l, D, dtype of x),
    dt (N, D, fp32) and d logit_scale (0-d fp32). No host synchronisation.
    """
    _check_kernels(x)
    num_rows, dim = x.shape
    num_cols = t.shape[0]
    row_lse2, col_lse2, row_terms, col_terms = stats
    magnitude = torch.maximum(row_weight.abs().amax(), col_weight.abs().amax()).clamp_min(torch.finfo(torch.float32).tiny)
    out_factor = (logit_scale.detach().float().exp() * (grad_factor * magnitude)).reshape(1)
    kernel, configs, meta = _kernel_and_configs("bwd", x)
    num_splits, cols_per_split = _grid(num_rows, num_cols, configs, x.device)
    dx = torch.zeros(num_rows, dim, device=x.device, dtype=torch.float32)
    dt = torch.zeros(num_cols, dim, device=x.device, dtype=torch.float32)
    max_row_blocks = triton.cdiv(num_rows, min(config["BLOCK_M"] for config in configs))
    dscale_partial = torch.zeros(max_row_blocks * num_splits, device=x.device, dtype=torch.float32)
    kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), num_splits)](
        x, t, logit_scale, row_lse2, col_lse2, torch.expm1(-LN2 * row_terms), torch.expm1(-LN2 * col_terms),
        (row_weight / magnitude).reshape(1), (col_weight / magnitude).contiguous(), out_factor,
        dx, dt, dscale_partial,
        num_rows, num_cols, dim, diag_offset, cols_per_split,
        x.stride(0), t.stride(0), dx.stride(0), dt.stride(0),
        DOT_PRECISION=dot_precision(x.dtype), **meta,
    )
    return dx.to(x.dtype), dt, dscale_partial.sum() * (LN2 * grad_factor) * magnitude


# --- single process: a torch.library custom op (compile- and graph-capturable) -----------------


def _single_forward(x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, t = contiguous(x), contiguous(t)
    row_max, row_sum, diag, col_max, col_sum = infonce_forward(x, t, logit_scale)
    row_terms = positive_terms(row_max, row_sum, diag)  # (N,) base 2
    col_terms = positive_terms(col_max, col_sum, diag)
    loss = (row_terms.sum() + col_terms.sum()) * (LN2 / (2 * x.shape[0]))
    return loss, diag + row_terms, diag + col_terms, row_terms, col_terms


def _single_backward(
    grad_loss: torch.Tensor, x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor,
    row_lse2: torch.Tensor, col_lse2: torch.Tensor, row_terms: torch.Tensor, col_terms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, t = contiguous(x), contiguous(t)
    weight = grad_loss.float().reshape(1)
    dx, dt, dscale = infonce_backward(
        x, t, logit_scale, (row_lse2, col_lse2, row_terms, col_terms), weight, weight.expand(t.shape[0]),
        diag_offset=0, grad_factor=1.0 / (2 * x.shape[0]),
    )
    return dx, dt.to(t.dtype), dscale.to(logit_scale.dtype)


def _register_ops() -> None:
    """melp_kernels::infonce_forward / infonce_backward (once per process; the bodies look up
    this module's functions at call time, so a reloaded module is used)."""
    if hasattr(torch.ops.melp_kernels, "infonce_forward"):
        return

    @torch.library.custom_op("melp_kernels::infonce_forward", mutates_args=())
    def forward_op(x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(v.contiguous() for v in _single_forward(x, t, logit_scale))

    @forward_op.register_fake
    def _(x, t, logit_scale):
        rows = x.new_empty(x.shape[0], dtype=torch.float32)
        return x.new_empty((), dtype=torch.float32), rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)

    @torch.library.custom_op("melp_kernels::infonce_backward", mutates_args=())
    def backward_op(grad_loss: torch.Tensor, x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor,
                    row_lse2: torch.Tensor, col_lse2: torch.Tensor, row_terms: torch.Tensor,
                    col_terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _single_backward(grad_loss, x, t, logit_scale, row_lse2, col_lse2, row_terms, col_terms)

    @backward_op.register_fake
    def _(grad_loss, x, t, logit_scale, row_lse2, col_lse2, row_terms, col_terms):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
            t, memory_format=torch.contiguous_format), torch.empty_like(logit_scale)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, *output[1:])
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_loss, *unused):  # its op has no autograd formula: double backward raises
        return backward_op(grad_loss, *ctx.saved_tensors)

    forward_op.register_autograd(backward, setup_context=setup_context)


_register_ops()


# --- distributed: everything that communicates is below; the kernels above see local tensors only


def _all_gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def check_equal_rows(x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Raise the same ValueError on every rank unless all ranks hold as many rows (W ints gathered)."""
    counts = _all_gather_rows(torch.tensor([x.shape[0]], device=x.device), group).tolist()
    if len(set(counts)) > 1:
        raise ValueError(
            f"infonce_loss: with a process group every rank must pass the same number of rows; got "
            f"{counts} rows on ranks 0..{len(counts) - 1} (make the per-rank batch equal, e.g. drop the "
            "last incomplete batch)"
        )


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
        row_max, row_sum, diag, col_max, col_sum = infonce_forward(x, all_t, logit_scale, diag_offset=offset)
        top = col_max.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        packed = torch.zeros(2, all_t.shape[0], device=x.device, dtype=torch.float32)  # column sums, diagonal
        packed[0] = col_sum * torch.exp2(col_max - torch.where(top == float("-inf"), 0.0, top))
        packed[1, offset:offset + num_local] = diag
        dist.all_reduce(packed, group=group)
        row_terms = positive_terms(row_max, row_sum, diag)  # (N_l,)
        col_terms = positive_terms(top, packed[0], packed[1])  # (N,)
        ctx.save_for_backward(x, all_t, logit_scale, diag + row_terms, packed[1] + col_terms, row_terms, col_terms)
        ctx.group = group
        own_terms = row_terms.sum() + col_terms[offset:offset + num_local].sum()
        return own_terms * (LN2 / (2 * num_local))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, all_t, logit_scale, *stats = ctx.saved_tensors
        group = ctx.group
        num_local = x.shape[0]
        weight = grad_loss.float().reshape(1)
        rank_weights = _all_gather_rows(weight, group)  # (W,): column j's term is in its owner's loss
        col_weight = rank_weights.repeat_interleave(num_local)  # (N,)
        dx, dt_all, dscale = infonce_backward(
            x, all_t, logit_scale, tuple(stats), weight, col_weight,
            diag_offset=dist.get_rank(group) * num_local, grad_factor=1.0 / (2 * num_local),
        )
        dt = _reduce_scatter_rows(dt_all, group)  # (N_l, D)
        return dx, dt.to(all_t.dtype), dscale.to(logit_scale.dtype), None


def group_sums(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{j: ids_j = ids_i} values_j (N, D), #{j : ids_j = ids_i} (N,)) for every row i.

    Group numbers from a sort of the ids (static shapes, no host sync); differentiable in values.
    """
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.int64)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    group = torch.empty_like(starts).scatter_(0, order, torch.cumsum(starts, 0) - 1)  # (N,) in [0, N)
    sums = values.new_zeros(values.shape).index_add(0, group, values)
    counts = values.new_zeros(values.shape[0]).index_add(0, group, torch.ones_like(values[:, 0]))
    return sums[group], counts[group]


def multi_positive_correction(
    x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, positive_ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Soft-target loss − single-positive loss (this rank's share), fp32, differentiable:
    1/(2N_l)·Σ_{i∈r} s·[⟨x_i, t_i − U_i/c_i⟩ + ⟨t_i, x_i − V_i/c_i⟩] (module docstring)."""
    x32, t32 = x.float(), t.float()
    all_x, all_t, all_ids, offset = x32, t32, positive_ids, 0
    if group is not None:
        all_x = reference._AllGatherWithGrad.apply(x32, group)
        all_t = reference._AllGatherWithGrad.apply(t32, group)
        all_ids = _all_gather_rows(positive_ids, group)
        offset = dist.get_rank(group) * x.shape[0]
    rows = slice(offset, offset + x.shape[0])
    t_sums, counts = group_sums(all_ids, all_t)
    x_sums, _ = group_sums(all_ids, all_x)
    inv_counts = (1.0 / counts[rows])[:, None]
    row_part = (x32 * (t32 - t_sums[rows] * inv_counts)).sum()
    col_part = (t32 * (x32 - x_sums[rows] * inv_counts)).sum()
    return logit_scale.float().exp() * (row_part + col_part) / (2 * x.shape[0])


def infonce_loss(
    x: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    impl: Impl = "auto",
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised x, t (N, D) at scale exp(logit_scale); 0-d float32.

    With ``group`` each rank passes its own N_l rows (the same N_l on every rank, else a
    ValueError on every rank) and gets its share of the full-batch loss (mean over ranks =
    full-batch loss); gradients follow the DDP convention described in the module docstring.
    ``impl``: "auto" | "reference" | "triton" (see ``kernels._utils.resolve_impl``).
    ``positive_ids`` (N,) int: rows with equal ids are each other's positives (soft targets,
    module docstring); None is the paper's one-positive loss.
    """
    validate_infonce(x, t, logit_scale)
    validate_positive_ids("infonce_loss", positive_ids, x.shape[0], x.device)
    use_triton = resolve_impl(impl, "infonce_loss", [x, t, logit_scale], has_triton=True) == "triton"
    if group is not None:
        check_equal_rows(x, group)
    if not use_triton:
        return reference.infonce_loss(x, t, logit_scale, group, positive_ids)
    if group is None:
        feature_block(x.shape[1], "infonce_loss", MAX_BLOCK_D)  # a clear error before entering the op
        _check_kernels(x)
        loss = torch.ops.melp_kernels.infonce_forward(x, t, logit_scale)[0]
    else:
        loss = _DistributedInfoNCEFunction.apply(x, t, logit_scale, group)
    if positive_ids is None:
        return loss
    return loss + multi_positive_correction(x, t, logit_scale, positive_ids, group)


__all__ = [
    "forced_launch_config", "group_sums", "infonce_backward", "infonce_forward", "infonce_loss",
    "multi_positive_correction", "positive_terms",
]
