"""The three kernel ops compiled for real on a CUDA device, against float64 references.

Marked ``gpu`` and skipped without CUDA (``benchmarks/gpu_check.sh`` runs them). Unlike the
interpreter tests these go through Triton's real compiler, the GPU's tensor cores (fp16, bf16,
3×TF32), the launchers' CUDA configurations and autotuning, at MELP's own shapes: the beat
pooler (Q = 10, D = 256) and caption pooler (Q = 128, D = 768) over N = 312 tokens, the local
loss at Qb = 10, S = 18, D = 256, InfoNCE at D = 256. Every op also runs inside
torch.compile(fullgraph=True) with Inductor and inside a captured CUDA graph (no host sync).
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention_pool, infonce_loss, local_contrastive_loss, reference
from tests.kernel_utils import assert_rel_close, fresh_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# dtype -> (output / loss tolerance, gradient tolerance) relative to float64 on the same rounded
# inputs: the interpreter tests' bounds (tests/test_*.py), which already allow for tensor cores
POOL_TOLERANCES = {torch.float32: (1e-5, 2e-5), torch.float16: (1e-3, 5e-3), torch.bfloat16: (8e-3, 4e-2)}
LOSS_TOLERANCES = {torch.float32: (1e-5, 5e-5), torch.float16: (2e-5, 2e-3), torch.bfloat16: (2e-5, 1.6e-2)}


def _grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def _compare(names, out, ref, tolerances, context: str) -> None:
    for index, (name, value, expected) in enumerate(zip(names, out, ref)):
        assert_rel_close(name, value, expected, tolerances[0] if index == 0 else tolerances[1], context)


def _pool_inputs(batch, num_queries, num_keys, dim, dtype):
    queries = (3.0 * torch.randn(num_queries, dim, dtype=torch.float64)).to(dtype).cuda()
    keys = torch.randn(batch, num_keys, dim, dtype=torch.float64).to(dtype).cuda()
    values = torch.randn(batch, num_keys, dim, dtype=torch.float64).to(dtype).cuda()
    mask = torch.rand(batch, num_keys, device="cuda") < 0.25
    mask[:, 0] = False
    return queries, keys, values, mask


def _local_inputs(batch, dtype, num_beats=10, max_sentences=18, dim=256):
    counts = torch.randint(1, max_sentences + 1, (batch,))
    counts[0] = 0  # one text without sentences: its pair is left out
    beats = (torch.randn(batch, num_beats, dim, dtype=torch.float64) * dim**-0.25).to(dtype)
    valid = torch.arange(max_sentences)[None, :, None] < counts[:, None, None]
    sentences = (torch.randn(batch, max_sentences, dim, dtype=torch.float64) * dim**-0.25 * valid).to(dtype)
    return beats.cuda(), sentences.cuda(), counts.cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_queries,dim", [(10, 256), (128, 768)], ids=["beat_pooler", "caption_pooler"])
def test_attention_pool_on_cuda(num_queries: int, dim: int, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    queries, keys, values, mask = _pool_inputs(8, num_queries, 312, dim, dtype)
    grad_out = torch.randn(8, num_queries, dim, device="cuda")
    out = _grads(lambda q, k, v: attention_pool(q, k, v, 8, mask, impl="triton"), [queries, keys, values], grad_out)
    ref = _grads(lambda q, k, v: reference.attention_pool(q, k, v, 8, mask),
                 [t.double() for t in (queries, keys, values)], grad_out)
    _compare(("out", "dq", "dk", "dv"), out, ref, POOL_TOLERANCES[dtype], f"seed={seed} Q={num_queries} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [7, 64])
def test_local_loss_on_cuda(batch: int, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    beats, sentences, counts = _local_inputs(batch, dtype)
    grad_out = torch.tensor(0.8, device="cuda")
    out = _grads(lambda b, s: local_contrastive_loss(b, s, counts, impl="triton"), [beats, sentences], grad_out)
    ref = _grads(lambda b, s: reference.local_contrastive_loss(b, s, counts), [beats.double(), sentences.double()],
                 grad_out)
    _compare(("loss", "dbeats", "dsentences"), out, ref, LOSS_TOLERANCES[dtype], f"seed={seed} B={batch} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num", [64, 2048])
def test_infonce_on_cuda(num: int, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    x = torch.nn.functional.normalize(torch.randn(num, 256, dtype=torch.float64), dim=-1).to(dtype).cuda()
    t = torch.nn.functional.normalize(torch.randn(num, 256, dtype=torch.float64), dim=-1).to(dtype).cuda()
    scale = torch.tensor(2.659, device="cuda")
    grad_out = torch.tensor(1.3, device="cuda")
    out = _grads(lambda a, b, s: infonce_loss(a, b, s, impl="triton"), [x, t, scale], grad_out)
    ref = _grads(lambda a, b, s: reference.infonce_loss(a, b, s), [x.double(), t.double(), scale.double()], grad_out)
    _compare(("loss", "dx", "dt", "dscale"), out, ref, LOSS_TOLERANCES[dtype], f"seed={seed} N={num} {dtype}")


def _step_inputs(dtype: torch.dtype):
    queries, keys, values, mask = _pool_inputs(4, 10, 312, 256, dtype)
    beats, sentences, counts = _local_inputs(16, dtype)
    x = torch.nn.functional.normalize(torch.randn(16, 256, device="cuda"), dim=-1).to(dtype)
    return [queries, keys, values, beats, sentences, x], (mask, counts)


def _step(queries, keys, values, beats, sentences, x, mask, counts, impl):
    # the logit scale is built from a tensor already on the device (no host-to-device copy in a capture)
    scale = mask.new_ones((), dtype=torch.float32) * 2.659
    pooled = attention_pool(queries, keys, values, 8, mask, impl=impl)
    local = local_contrastive_loss(beats, sentences, counts, impl=impl)
    t = torch.nn.functional.normalize(pooled.float().mean(1)[:1].expand(16, -1) + x.float(), dim=-1).to(x.dtype)
    return local + infonce_loss(x, t, scale, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_all_ops_compile_fullgraph_on_cuda(impl: str) -> None:
    """One step through the three ops under torch.compile(fullgraph=True) with Inductor: no graph
    break, no host sync; loss and gradients equal eager."""
    seed = fresh_seed()
    tensors, (mask, counts) = _step_inputs(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _step(*a, mask, counts, impl), fullgraph=True)
    out = _grads(compiled, tensors, torch.tensor(1.0, device="cuda"))
    ref = _grads(lambda *a: _step(*a, mask, counts, impl), tensors, torch.tensor(1.0, device="cuda"))
    for name, value, expected in zip(("loss", "dq", "dk", "dv", "dbeats", "dsentences", "dx"), out, ref):
        assert_rel_close(name, value, expected, 2e-2, f"seed={seed} compiled {impl}")


def test_triton_ops_capture_in_a_cuda_graph() -> None:
    """Forward + backward of the three Triton ops captured once and replayed on new inputs:
    the replay equals an eager run (a host sync inside an op would make capture fail)."""
    seed = fresh_seed()
    tensors, (mask, counts) = _step_inputs(torch.bfloat16)
    static = [t.detach().clone().requires_grad_() for t in tensors]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: autotuning and compilation happen outside the capture
        for _ in range(2):
            loss = _step(*static, mask, counts, "triton")
            grads = torch.autograd.grad(loss, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _step(*static, mask, counts, "triton")
        grads = torch.autograd.grad(loss, static)
    fresh, _ = _step_inputs(torch.bfloat16)
    with torch.no_grad():
        for target, source in zip(static, fresh):
            target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    expected = _grads(lambda *a: _step(*a, mask, counts, "triton"), fresh, torch.tensor(1.0, device="cuda"))
    for name, value, ref in zip(("loss", "dq", "dk", "dv", "dbeats", "dsentences", "dx"), [loss, *grads], expected):
        # bf16 outputs: a reordered fp32 sum (atomics) may flip a rounding; stale results would be O(1) off
        assert_rel_close(name, value, ref, 5e-3, f"seed={seed} graph replay")
