"""InfoNCE as a GPU computes it, checked on the CPU: bf16, fp16 and fp32 inputs with the CUDA
launch configurations (tile sizes, warps) forced, against the float64 reference.

``gpu_numerics()`` (tests/kernel_utils.py) makes Triton's interpreter treat bf16 as a GPU does
(exact fp32 widening in tl.dot, round-to-nearest-even casts) and makes the launchers pick their
CUDA configs. The first test runs the default config (what a GPU runs before/without
autotuning); the second every config of the autotune space, forward and backward paired.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.kernel_utils import assert_rel_close, fresh_seed, gpu_numerics
from tests.test_infonce import (  # noqa: F401  (the fixture guards every test here as well)
    TOLERANCES,
    _kernels_runnable,
    _reference_grads,
    _triton_grads,
    _unit_rows,
    infonce,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter checks; on a GPU test_infonce runs these dtypes")


def _check(num_rows: int, dim: int, dtype: torch.dtype, scale: float, context: str) -> None:
    x, t = _unit_rows(num_rows, dim, dtype), _unit_rows(num_rows, dim, dtype)
    logit_scale = torch.tensor(math.log(scale))
    grad_out = torch.tensor(-1.3)
    with gpu_numerics():
        out = _triton_grads(x, t, logit_scale, grad_out)
    ref = _reference_grads(x, t, logit_scale, grad_out)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    loss_tol, grad_tol = TOLERANCES[dtype]
    for name, value, expected, tol in zip(("loss", "dx", "dt", "dlogit_scale"), out, ref, (loss_tol,) + 3 * (grad_tol,)):
        assert_rel_close(name, value, expected, tol, f"{context} N={num_rows} D={dim} {dtype} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("num_rows,dim", [(67, 256), (150, 72)])
def test_infonce_cuda_default_config(num_rows: int, dim: int, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    _check(num_rows, dim, dtype, 100.0, f"seed={seed} default CUDA config")


def test_infonce_every_autotune_config_bf16() -> None:
    """Each config the GPU's autotuner may pick at D = 256 (forward and backward paired)."""
    seed = fresh_seed()
    cuda = torch.device("cuda")
    fwd = infonce._launch_configs("fwd", 256, torch.bfloat16, cuda)
    bwd = infonce._launch_configs("bwd", 256, torch.bfloat16, cuda)
    for fwd_config, bwd_config in itertools.zip_longest(fwd, bwd, fillvalue=None):
        fwd_config, bwd_config = fwd_config or fwd[0], bwd_config or bwd[0]
        with infonce.forced_launch_config(fwd=fwd_config, bwd=bwd_config):
            _check(70, 256, torch.bfloat16, 30.0, f"seed={seed} fwd={fwd_config} bwd={bwd_config}")


def test_infonce_autotuner_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch path a GPU takes: triton.autotune over the CUDA configs (a stand-in for do_bench
    that runs each config twice and prefers the last), then the chosen config. Benchmark trials
    accumulate into the atomically-updated outputs; the result must still be exact."""
    seed = fresh_seed()
    trials: list[int] = []

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        trials.append(1)
        return [1.0 / len(trials)] * len(quantiles)

    monkeypatch.setattr(infonce, "AUTOTUNE_BENCH", bench)
    monkeypatch.setattr(infonce, "_AUTOTUNERS", {})
    bwd = infonce._launch_configs("bwd", 72, torch.float32, torch.device("cuda"))
    assert len({config["BLOCK_M"] for config in bwd}) > 1, "the backward space should vary BLOCK_M"
    _check(45, 72, torch.float32, 100.0, f"seed={seed} autotuned")
    fwd = infonce._launch_configs("fwd", 72, torch.float32, torch.device("cuda"))
    assert len(trials) == len(fwd) + len(bwd)
