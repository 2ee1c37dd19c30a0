"""The test-only bf16 shim for Triton's interpreter (tests/kernel_utils.bf16_interpreter_shim).

Without it the interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers and
truncates fp32 -> bf16 casts; with it a tiny bf16 dot matches float64 to fp32 accumulation
accuracy, casts equal torch's round-to-nearest-even bit for bit, and bf16 elementwise
arithmetic is correctly rounded. Also checks that cuda_launch_configs reaches the launchers.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import triton
import triton.language as tl

from kernels import _utils
from tests.kernel_utils import (
    bf16_interpreter_shim,
    cuda_launch_configs,
    fresh_seed,
    relative_error,
)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or type(tl.zeros).__name__ == "JITFunction",
    reason="the shim patches Triton's CPU interpreter (TRITON_INTERPRET=1 before triton's import)",
)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
    tl.store(out_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


@triton.jit
def _arith_kernel(x_ptr, y_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    tl.store(out_ptr + offs, x * y + x)  # bf16 × bf16 -> bf16, then + bf16 -> bf16


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs[:, None] * N + offs[None, :])  # bf16 (N, N)
    tl.store(out_ptr + offs, tl.sum(x, 1))
    tl.store(out_ptr + N + offs, tl.max(x, 1))
    tl.store(out_ptr + 2 * N + offs, tl.min(x, 0))


def _bf16_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    _dot_kernel[(1,)](a, b, out, N=a.shape[0])
    return out


def test_bf16_dot_is_wrong_without_the_shim_and_exact_with_it() -> None:
    seed = fresh_seed()
    a = torch.randn(16, 16).to(torch.bfloat16)
    b = torch.randn(16, 16).to(torch.bfloat16)
    expected = a.double() @ b.double()  # bf16 products are exact in fp32; fp32 accumulation differs by ~1e-7
    unshimmed = relative_error(_bf16_dot(a, b), expected)
    with bf16_interpreter_shim():
        shimmed = relative_error(_bf16_dot(a, b), expected)
    assert unshimmed > 1.0, f"seed={seed}: the interpreter's bf16 dot is expected to be wrong, rel err {unshimmed:.3g}"
    assert shimmed < 1e-6, f"seed={seed}: shimmed bf16 dot rel err {shimmed:.3g} vs float64"
    after = relative_error(_bf16_dot(a, b), expected)
    assert after == unshimmed, "the shim must be undone on exit"


def test_fp32_to_bf16_cast_rounds_to_nearest_even() -> None:
    seed = fresh_seed()
    # values with bits below bf16's mantissa, half-way cases both ways, specials and subnormals
    halfway = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8)], dtype=torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.0e38, 1e-40, -2e-39])
    x = torch.cat([torch.randn(41), halfway, specials, torch.randn(13) * 1e-3])  # 64 values
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even
    out = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, N=64)
    assert not torch.equal(out.view(torch.int16), expected.view(torch.int16)), "unshimmed cast should truncate"
    with bf16_interpreter_shim():
        _cast_kernel[(1,)](x, out, N=64)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (
        f"seed={seed}: {(out.float() - expected.float()).abs().max():.3g}"
    )


def test_bf16_elementwise_arithmetic_is_correctly_rounded() -> None:
    seed = fresh_seed()
    x = torch.randn(32).to(torch.bfloat16)
    y = torch.randn(32).to(torch.bfloat16)
    expected = ((x.float() * y.float()).to(torch.bfloat16).float() + x.float()).to(torch.bfloat16)
    out = torch.empty(32, dtype=torch.bfloat16)
    with bf16_interpreter_shim():
        _arith_kernel[(1,)](x, y, out, N=32)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), f"seed={seed}"


def test_bf16_reductions_reduce_values_not_bits() -> None:
    seed = fresh_seed()
    x = torch.randn(16, 16).to(torch.bfloat16)  # negative values: their bit patterns sort wrongly
    expected = torch.cat([x.float().sum(1).to(torch.bfloat16), x.max(1).values, x.min(0).values])
    out = torch.empty(48, dtype=torch.bfloat16)
    _reduce_kernel[(1,)](x, out, N=16)
    assert not torch.equal(out, expected), "unshimmed bf16 reductions are expected to be wrong"
    with bf16_interpreter_shim():
        _reduce_kernel[(1,)](x, out, N=16)
    assert torch.equal(out[16:], expected[16:]), f"seed={seed}: max/min"
    assert relative_error(out[:16], x.double().sum(1)) < 8e-3, f"seed={seed}: sum within a bf16 rounding"


def test_cuda_launch_configs_reach_the_launchers() -> None:
    cpu = torch.device("cpu")
    assert not _utils.uses_cuda_launch_configs(cpu)
    with cuda_launch_configs():
        assert _utils.uses_cuda_launch_configs(cpu)
    assert not _utils.uses_cuda_launch_configs(cpu)
