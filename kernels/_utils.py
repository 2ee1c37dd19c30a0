"""Helpers shared by the kernel ops: implementation dispatch, input checks, block sizes.

Dispatch (``impl``):
    "auto"      -> the Triton kernel for CUDA tensors of a supported dtype, else the reference;
    "reference" -> the PyTorch reference in ``kernels/reference.py``;
    "triton"    -> the Triton kernel; on CPU tensors only under ``TRITON_INTERPRET=1``
                   (Triton's numpy interpreter, set before ``kernels`` is first imported,
                   because ``@triton.jit`` decides at decoration time).

Input checks raise ``ValueError`` naming the argument and what is expected; every
op validates through the functions here so the reference and the kernels accept
exactly the same inputs.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Impl = Literal["auto", "reference", "triton"]
IMPLS: tuple[str, ...] = ("auto", "reference", "triton")

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


# Tests set this (tests/kernel_utils.cuda_launch_configs) to make the launchers choose the tile
# sizes and warps they would choose for CUDA tensors while running under the interpreter.
FORCE_CUDA_LAUNCH_CONFIGS = False


def uses_cuda_launch_configs(device: torch.device) -> bool:
    """True when a launcher should pick its CUDA configuration (CUDA tensors, or forced by a test)."""
    return device.type == "cuda" or FORCE_CUDA_LAUNCH_CONFIGS


def triton_interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_impl(impl: str, op_name: str, tensors: list[torch.Tensor], has_triton: bool) -> str:
    """Turn ``impl`` into "reference" or "triton" for these inputs, or raise ``ValueError``."""
    if impl not in IMPLS:
        raise ValueError(f"{op_name}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    dtype_ok = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if impl == "reference":
        return "reference"
    if impl == "auto":
        # MELP_KERNEL_IMPL=reference turns every "auto" into the reference (A/B runs, debugging)
        forced = os.environ.get("MELP_KERNEL_IMPL", "auto") == "reference"
        return "triton" if (has_triton and on_cuda and dtype_ok and not forced) else "reference"
    if not has_triton:
        raise ValueError(f"{op_name}: there is no Triton kernel for this op yet; use impl='reference' or 'auto'")
    if not dtype_ok:
        raise ValueError(
            f"{op_name}: the Triton kernel takes {[str(d) for d in TRITON_DTYPES]} inputs, got "
            f"{[str(t.dtype) for t in tensors if t.is_floating_point()]}; use impl='reference' for float64"
        )
    if not on_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"{op_name}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
            "(set before `kernels` is imported); otherwise pass CUDA tensors or impl='reference'"
        )
    return "triton"


def require_interpreted(op_name: str, *kernels: object) -> None:
    """Raise when CPU tensors meet kernels compiled for a GPU (env var set after the import)."""
    for kernel in kernels:
        if type(kernel).__name__ != "InterpretedFunction":
            raise ValueError(
                f"{op_name}: the Triton kernels were defined before TRITON_INTERPRET=1 was set; set it "
                "before the first `import kernels` (or reload kernels.<op>) to run them on CPU tensors"
            )


def defer_value_checks(tensor: torch.Tensor) -> bool:
    """True when checks of tensor *values* must not synchronise with the host: CUDA tensors
    (a device-side torch._assert_async instead: no sync, CUDA-graph safe) and torch.compile
    tracing (no data-dependent Python control flow). CPU tensors in eager mode raise ValueError."""
    return tensor.is_cuda or torch.compiler.is_compiling()


def check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor ({[str(d) for d in FLOAT_DTYPES]}), got {tensor.dtype}")


def check_ndim(name: str, tensor: torch.Tensor, ndims: tuple[int, ...], layout: str) -> None:
    if tensor.ndim not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def check_same_device(op_name: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op_name}: all inputs must be on one device, got {devices}")


def check_same_dtype(op_name: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{op_name}: inputs must share one dtype, got {dtypes}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the accumulation dtype of every op."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with a unit stride on its last dimension (what the kernels' loads assume)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def validate_attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None,
) -> None:
    op = "attention_pool"
    for name, tensor in (("queries", queries), ("keys", keys), ("values", values)):
        check_float(name, tensor)
    check_ndim("queries", queries, (2, 3), "(Q, D) or (B, Q, D)")
    check_ndim("keys", keys, (3,), "(B, N, D)")
    if values.shape != keys.shape:
        raise ValueError(f"{op}: values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    batch, num_keys, dim = keys.shape
    if queries.shape[-1] != dim:
        raise ValueError(f"{op}: queries' last dimension {queries.shape[-1]} must equal the keys' D = {dim}")
    if queries.ndim == 3 and queries.shape[0] != batch:
        raise ValueError(f"{op}: per-sample queries need batch {batch}, got {queries.shape[0]}")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive divisor of D = {dim}, got {num_heads!r}")
    if num_keys == 0 or queries.shape[-2] == 0:
        raise ValueError(f"{op}: needs at least one query and one key, got Q={queries.shape[-2]}, N={num_keys}")
    check_same_dtype(op, queries=queries, keys=keys, values=values)
    tensors = {"queries": queries, "keys": keys, "values": values}
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (batch, num_keys):
            raise ValueError(
                f"{op}: key_padding_mask must be a bool tensor of shape {(batch, num_keys)} "
                f"(True = padded key), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        tensors["key_padding_mask"] = key_padding_mask
    check_same_device(op, **tensors)
    if key_padding_mask is not None:
        all_padded = key_padding_mask.all(dim=1)
        if defer_value_checks(key_padding_mask):
            torch._assert_async(~all_padded.any(), f"{op}: key_padding_mask masks every key of a batch row")
        elif bool(all_padded.any()):
            rows = all_padded.nonzero().flatten().tolist()
            raise ValueError(f"{op}: key_padding_mask masks every key of batch rows {rows}")


def validate_local_contrastive(
    beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor
) -> None:
    op = "local_contrastive_loss"
    check_float("beats", beats)
    check_float("sentences", sentences)
    check_ndim("beats", beats, (3,), "(B, Qb, D)")
    check_ndim("sentences", sentences, (3,), "(B, S, D)")
    if beats.shape[0] != sentences.shape[0] or beats.shape[2] != sentences.shape[2]:
        raise ValueError(
            f"{op}: beats (B, Qb, D) and sentences (B, S, D) must agree on B and D, got "
            f"{tuple(beats.shape)} and {tuple(sentences.shape)}"
        )
    if beats.shape[1] == 0:
        raise ValueError(f"{op}: beats must hold at least one beat per ECG, got {tuple(beats.shape)}")
    if not isinstance(sentence_counts, torch.Tensor) or sentence_counts.shape != (beats.shape[0],):
        raise ValueError(f"{op}: sentence_counts must be a tensor of shape ({beats.shape[0]},)")
    if sentence_counts.is_floating_point() or sentence_counts.is_complex() or sentence_counts.dtype == torch.bool:
        raise ValueError(f"{op}: sentence_counts must be an integer tensor, got {sentence_counts.dtype}")
    check_same_dtype(op, beats=beats, sentences=sentences)
    check_same_device(op, beats=beats, sentences=sentences, sentence_counts=sentence_counts)
    if not sentence_counts.numel():
        return
    if defer_value_checks(sentence_counts):
        in_range = (sentence_counts.min() >= 0) & (sentence_counts.max() <= sentences.shape[1])
        torch._assert_async(in_range, f"{op}: sentence_counts must lie in [0, S={sentences.shape[1]}]")
        return
    if int(sentence_counts.min()) < 0 or int(sentence_counts.max()) > sentences.shape[1]:
        raise ValueError(
            f"{op}: sentence_counts must lie in [0, S={sentences.shape[1]}], got "
            f"[{int(sentence_counts.min())}, {int(sentence_counts.max())}]"
        )


def validate_infonce(x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> None:
    op = "infonce_loss"
    check_float("x", x)
    check_float("t", t)
    check_float("logit_scale", logit_scale)
    check_ndim("x", x, (2,), "(N, D)")
    if t.shape != x.shape:
        raise ValueError(f"{op}: t must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: needs N >= 1 rows of D >= 1 features, got {tuple(x.shape)}")
    if logit_scale.ndim != 0:
        raise ValueError(f"{op}: logit_scale must be a 0-d tensor (log of the scale), got {tuple(logit_scale.shape)}")
    check_same_dtype(op, x=x, t=t)
    check_same_device(op, x=x, t=t, logit_scale=logit_scale)


def validate_positive_ids(op: str, positive_ids: torch.Tensor | None, num_rows: int, device: torch.device) -> None:
    """Multi-positive ids: None, or an integer (N,) tensor on the features' device (equal ids
    mark pairs that are each other's positives, e.g. identical reports)."""
    if positive_ids is None:
        return
    if not isinstance(positive_ids, torch.Tensor) or positive_ids.shape != (num_rows,):
        raise ValueError(f"{op}: positive_ids must be a tensor of shape ({num_rows},) (one id per pair)")
    if positive_ids.is_floating_point() or positive_ids.is_complex() or positive_ids.dtype == torch.bool:
        raise ValueError(f"{op}: positive_ids must be an integer tensor (e.g. int64 report hashes), "
                         f"got {positive_ids.dtype}")
    if positive_ids.device != device:
        raise ValueError(f"{op}: positive_ids is on {positive_ids.device}, the features on {device}")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs use 3×TF32 (≈ fp32 accuracy on tensor cores).

    Plain TF32 rounds inputs to 10 mantissa bits: at a logit scale of 100 that is an error
    of ~0.1 in a logit. fp16/bf16 inputs ignore the setting (fp32 accumulation either way).
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


def feature_block(dim: int, op_name: str, max_block: int) -> int:
    """BLOCK_D: the feature width padded to a power of two ≥ 16 (``tl.dot``'s minimum)."""
    block = max(16, next_power_of_2(dim))
    if block > max_block:
        raise ValueError(
            f"{op_name}: the Triton kernel holds a row's {dim} features on chip and supports D <= "
            f"{max_block}; use impl='reference' for wider features"
        )
    return block
