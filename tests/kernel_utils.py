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
