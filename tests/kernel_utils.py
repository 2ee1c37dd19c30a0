"""Helpers for the kernel tests: fresh seeds, relative-error checks with useful reports."""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Iterator
from types import ModuleType

import torch


def fresh_seed() -> int:
    """Seed torch from the OS entropy pool and return the seed (printed in every failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out − ref|| / ||ref|| in float64 (absolute error when ref is all zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, context: str) -> None:
    """Fail with where and by how much ``out`` differs from ``ref`` when the relative error exceeds tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)} [{context}]"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~torch.isfinite(out64)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} non-finite values (first at {bad.nonzero()[0].tolist()}) [{context}]"
    )
    err = relative_error(out64, ref64)
    if err > tol:
        diff = (out64 - ref64).abs()
        where = diff.argmax().item()
        index = list(torch.unravel_index(torch.tensor(where), diff.shape)) if diff.ndim else []
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst at {[int(i) for i in index]}: "
            f"{out64.flatten()[where].item():.6g} vs {ref64.flatten()[where].item():.6g} [{context}]"
        )


INTERPRETER_HINT = (
    "Triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the CPU in "
    "this session: set TRITON_INTERPRET=1 in the environment, or at the top of tests/conftest.py "
    "before anything imports triton (every kernel test module sets it, but an earlier import wins)"
)


def use_triton_interpreter(module: ModuleType) -> ModuleType | None:
    """Return ``module`` with interpreted Triton kernels, or None when that is impossible.

    ``@triton.jit`` picks interpreter or compiler at decoration time, for triton.language's
    own jit'd helpers (tl.zeros, tl.max, ...) too. If only ``module`` was decorated early it
    is re-executed; if triton itself was imported before TRITON_INTERPRET=1, nothing helps.
    """
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1" or type(tl.zeros).__name__ == "JITFunction":
        return None
    compiled = [v for v in vars(module).values() if type(v).__name__ == "JITFunction"]
    return importlib.reload(module) if compiled else module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make torch.empty / torch.empty_like return NaN-filled floating tensors inside the block.

    Kernel outputs are allocated with these, so an element a kernel forgets to write shows
    up as NaN in the comparison instead of passing by luck.
    """
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    def empty(*args, **kwargs):
        return poison(original_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(original_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = original_empty, original_empty_like


# ---------------------------------------------------------------------------------------------
# bf16 under Triton's interpreter
#
# Triton 3.9's interpreter stores bf16 as raw uint16 bits. Its tl.dot multiplies those bits as
# integers, its elementwise ops do integer arithmetic on them, and its fp32 -> bf16 cast
# truncates the mantissa where the GPU rounds to nearest even. The shim below patches the
# interpreter's builder (class attributes, restored on exit) so bf16 behaves as on a GPU:
#   * tl.dot widens bf16 operands exactly to fp32 (bf16 is the top half of an fp32 word);
#   * casts from bf16 widen exactly, casts to bf16 round the fp32 value to nearest even;
#   * elementwise ops on bf16 compute in fp32 and round the result to bf16 (a correctly rounded
#     bf16 result, since fp32 carries more than 2·8 + 2 mantissa bits);
#   * tl.sum / tl.max / tl.min of bf16 reduce the fp32 values (the sum rounded once at the end).
# Not covered: scans (tl.cumsum) and tl.reduce with a custom combine function on bf16.
# fp16 needs no shim: numpy's float16 is IEEE binary16 with round-to-nearest-even casts.
# ---------------------------------------------------------------------------------------------


def bf16_bits_to_float32(bits):
    """uint16 bf16 bit patterns -> the exactly equal float32 values (numpy)."""
    import numpy as np

    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(values):
    """float32 values -> uint16 bf16 bit patterns, rounded to nearest even (NaN stays a quiet NaN)."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def _bf16_builder_patches() -> dict:
    """Replacement methods for triton.runtime.interpreter.InterpreterBuilder (see above)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original_dot, original_cast = builder_cls.create_dot, builder_cls.cast_impl
    original_binary, original_unary = builder_cls.binary_op, builder_cls.unary_op
    handle = interpreter.TensorHandle

    def is_bf16(tensor) -> bool:
        return tensor.dtype.scalar == tl.bfloat16

    def widened(tensor):
        return handle(bf16_bits_to_float32(tensor.data), tl.float32) if is_bf16(tensor) else tensor

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src) and dst != tl.bfloat16:
            return original_cast(self, widened(src), dst_type)
        if dst == tl.bfloat16 and not is_bf16(src):
            return handle(float32_to_bf16_bits(src.data.astype(np.float32)), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return original_binary(self, lhs, rhs, op)
        out = op(widened(lhs).data, widened(rhs).data)
        if out.dtype == np.float32:  # arithmetic: round back to bf16; comparisons stay bool
            return handle(float32_to_bf16_bits(out), tl.bfloat16)
        return handle(out, lhs.dtype.scalar)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original_unary(self, arg, op)
        return handle(float32_to_bf16_bits(op(widened(arg).data)), tl.bfloat16)

    return {"create_dot": create_dot, "cast_impl": cast_impl, "binary_op": binary_op, "unary_op": unary_op}


def _bf16_reduce_patches() -> dict:
    """Replacements for the interpreter's ReduceOps.sum / min_max: bf16 reduced as fp32 values
    (a sum rounded once to bf16 at the end: at least as accurate as a GPU's bf16 tree sum)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    reduce_cls = interpreter.ReduceOps
    original_sum, original_min_max = reduce_cls.sum, reduce_cls.min_max

    def widened(tensor):
        handle = interpreter.TensorHandle(bf16_bits_to_float32(tensor.handle.data), tl.float32)
        return tl.core.tensor(handle, tensor.type.with_element_ty(tl.float32) if tensor.type.is_block() else tl.float32)

    def narrowed(tensor):
        bits = float32_to_bf16_bits(np.asarray(tensor.handle.data, dtype=np.float32))
        handle = interpreter.TensorHandle(bits, tl.bfloat16)
        return tl.core.tensor(handle, tensor.type.with_element_ty(tl.bfloat16) if tensor.type.is_block() else tl.bfloat16)

    def is_bf16(tensor) -> bool:
        return isinstance(tensor, tl.core.tensor) and tensor.dtype.scalar == tl.bfloat16

    def sum_(self, input):
        return narrowed(original_sum(self, widened(input))) if is_bf16(input) else original_sum(self, input)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        value = input[0] if isinstance(input, tuple) else input
        if not is_bf16(value):
            return original_min_max(self, input, val_reduce_op, idx_reduce_op)
        out = original_min_max(self, widened(value), val_reduce_op, idx_reduce_op)
        if isinstance(out, tuple):
            return narrowed(out[0]), out[1]
        return out if idx_reduce_op is not None and val_reduce_op is None else narrowed(out)

    return {"sum": sum_, "min_max": min_max}


@contextlib.contextmanager
def bf16_interpreter_shim() -> Iterator[None]:
    """Inside the block, Triton's interpreter treats bf16 as a GPU does (dots, casts, arithmetic,
    sum / max / min reductions)."""
    from triton.runtime import interpreter

    targets = [(interpreter.InterpreterBuilder, _bf16_builder_patches()), (interpreter.ReduceOps, _bf16_reduce_patches())]
    originals = [(cls, {name: cls.__dict__[name] for name in patches}) for cls, patches in targets]
    for cls, patches in targets:
        for name, method in patches.items():
            setattr(cls, name, method)
    try:
        yield
    finally:
        for cls, saved in originals:
            for name, method in saved.items():
                setattr(cls, name, method)


@contextlib.contextmanager
def cuda_launch_configs() -> Iterator[None]:
    """Inside the block the launchers pick the tile sizes and warps they pick for CUDA tensors,
    so the interpreter checks the configurations a GPU runs (``kernels._utils.uses_cuda_launch_configs``)."""
    from kernels import _utils

    previous = _utils.FORCE_CUDA_LAUNCH_CONFIGS
    _utils.FORCE_CUDA_LAUNCH_CONFIGS = True
    try:
        yield
    finally:
        _utils.FORCE_CUDA_LAUNCH_CONFIGS = previous


@contextlib.contextmanager
def gpu_numerics() -> Iterator[None]:
    """Both of the above: what a CUDA run of the kernels computes, as far as the interpreter can tell."""
    with bf16_interpreter_shim(), cuda_launch_configs():
        yield
