"""InfoNCE inside torch.compile(fullgraph=True): a training step's forward and backward.

Both paths are captured by Dynamo and AOTAutograd (backend aot_eager: the graphs Inductor
would get); the reference path also goes through Inductor (marked slow: C++ codegen on the
CPU). The Triton path is the torch.library custom op, run by the interpreter on the CPU,
traced through its fake implementation and autograd formula. A graph break (a host
synchronisation such as .item(), a data-dependent shape) fails fullgraph=True.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernel_utils import assert_rel_close, fresh_seed
from tests.test_infonce import DEVICE, _kernels_runnable, infonce  # noqa: F401


class _Towers(torch.nn.Module):
    """Two linear encoders and a learned logit scale: the shape of MELP's global loss."""

    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.ecg = torch.nn.Linear(dim_in, dim)
        self.text = torch.nn.Linear(dim_in, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, signals: torch.Tensor, texts: torch.Tensor, impl: str) -> torch.Tensor:
        x = torch.nn.functional.normalize(self.ecg(signals), dim=-1)
        t = torch.nn.functional.normalize(self.text(texts), dim=-1)
        return infonce.infonce_loss(x, t, self.logit_scale, impl=impl)


def _step(model: torch.nn.Module, signals, texts, impl: str, compiled) -> list[torch.Tensor]:
    model.zero_grad()
    loss = compiled(signals, texts, impl)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("impl,backend", [
    ("reference", "aot_eager"),
    pytest.param("reference", "inductor", marks=pytest.mark.slow),  # ~1.5 min of C++ codegen on 2 busy cores
    ("triton", "aot_eager"),
])
def test_training_step_compiles_fullgraph(impl: str, backend: str) -> None:
    seed = fresh_seed()
    torch._dynamo.reset()
    model = _Towers(24, 32).to(DEVICE)
    signals, texts = torch.randn(21, 24, device=DEVICE), torch.randn(21, 24, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager = _step(model, signals, texts, impl, model)
    for _ in range(2):  # the second call reuses the graph
        out = _step(model, signals, texts, impl, compiled)
    names = ["loss"] + [name for name, _ in model.named_parameters()]
    for name, value, expected in zip(names, out, eager):
        assert_rel_close(name, value, expected, 1e-5, f"seed={seed} impl={impl} backend={backend}")
