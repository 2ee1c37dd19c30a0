"""fft_grouped_conv1d (the ``ecg.pos_conv_fft`` lever) against float64 ``F.conv1d``.

Odd lengths, even and odd kernels (the positional convolution's kernel is even: 128), grouped
and ungrouped, kernels longer than the input, gradients of the input, the weight and the bias;
relative error ‖out − ref‖ / ‖ref‖ below 1e-5 in fp32 (the direct fp32 convolution's own error
is ~2e-7 at the paper sizes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from melp_scale.model import ecg_encoder
from melp_scale.model.ecg_encoder import ConvPositionalEncoding, fft_grouped_conv1d
from tests.kernel_utils import relative_error


@pytest.mark.parametrize("batch,channels,length,kernel,groups", [
    (3, 12, 37, 8, 4), (2, 6, 29, 7, 3), (1, 5, 11, 5, 1), (2, 8, 9, 16, 2), (4, 48, 61, 32, 16),
    (2, 8, 60, 8, 2)])  # 60 + 2 * 4 just above a multiple of 32: the transform must not cut it
def test_matches_float64_conv1d(batch, channels, length, kernel, groups):
    x = torch.randn(batch, channels, length, dtype=torch.float64)
    weight = torch.randn(channels, channels // groups, kernel, dtype=torch.float64) / kernel
    bias = torch.randn(channels, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = F.conv1d(*leaves, padding=kernel // 2, groups=groups)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, grad)
    ours_in = [t.float().requires_grad_() for t in (x, weight, bias)]
    out = fft_grouped_conv1d(*ours_in, padding=kernel // 2, groups=groups)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert relative_error(out, ref) < 1e-5
    got = torch.autograd.grad(out, ours_in, grad.float())
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))


def test_positional_encoding_module_same_with_fft():
    """The weight-normalised module: same output and parameter gradients with ``fft`` on."""
    torch.manual_seed(0)
    plain = ConvPositionalEncoding(32, 8, 4)
    fft = ConvPositionalEncoding(32, 8, 4, fft=True)
    fft.load_state_dict(plain.state_dict())
    tokens = torch.randn(3, 23, 32)
    outs = [module(tokens) for module in (plain, fft)]
    assert relative_error(outs[1], outs[0]) < 1e-5
    grads = [torch.autograd.grad(out.square().sum(), list(module.parameters()))
             for out, module in zip(outs, (plain, fft))]
    for g, w in zip(grads[1], grads[0]):
        assert relative_error(g, w) < 1e-5


@pytest.fixture
def poisoned(monkeypatch):
    """Output and gradient buffers start as NaN: an element the op fails to write shows."""
    monkeypatch.setattr(ecg_encoder, "_buffer", lambda shape, like: torch.full(
        shape, float("nan"), dtype=like.dtype, device=like.device))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_gradients_of_each_input_alone_into_poisoned_buffers(poisoned, needs):
    """Every element of the output and of each requested gradient is written (groups of 3
    output channels over 2 input channels, odd kernel and length); unrequested ones are None."""
    batch, groups, length, kernel = 3, 4, 41, 9
    x = torch.randn(batch, 2 * groups, length, dtype=torch.float64)
    weight = torch.randn(3 * groups, 2, kernel, dtype=torch.float64) / kernel
    ref_in = [t.clone().requires_grad_(need) for t, need in zip((x, weight), needs)]
    ref = F.conv1d(*ref_in, padding=kernel // 2, groups=groups)
    grad = torch.randn_like(ref)
    ours_in = [t.float().requires_grad_(need) for t, need in zip((x, weight), needs)]
    out = fft_grouped_conv1d(*ours_in, None, padding=kernel // 2, groups=groups)
    assert relative_error(out, ref) < 1e-5
    out.backward(grad.float())
    for need, ours, theirs in zip(needs, ours_in, ref_in):
        if need:
            want = torch.autograd.grad(ref, theirs, grad, retain_graph=True)[0]
            assert relative_error(ours.grad, want) < 1e-5
        else:
            assert ours.grad is None


def test_float64_stays_float64():
    x, weight = torch.randn(2, 4, 19, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)
    out = fft_grouped_conv1d(x, weight, None, padding=3, groups=2)
    assert out.dtype == torch.float64
    assert relative_error(out, F.conv1d(x, weight, padding=3, groups=2)) < 1e-12


def test_keeps_only_input_and_weight_for_the_backward():
    """No spectrum is saved: at the paper sizes the kernel's alone is 3.5x the kernel (66 MB),
    and it stayed alive into the backward's peak. What autograd keeps is x and the weight."""
    x = torch.randn(2, 48, 57, requires_grad=True)
    weight = torch.randn(48, 12, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fft_grouped_conv1d(x, weight, None, padding=16, groups=4)
    assert sum(t.numel() * t.element_size() for t in saved) <= (x.numel() + weight.numel()) * 4
    assert not any(t.is_complex() for t in saved)


def test_refuses_shapes_that_are_no_grouped_conv():
    with pytest.raises(ValueError, match="groups"):
        fft_grouped_conv1d(torch.randn(2, 6, 10), torch.randn(6, 4, 3), None, padding=1, groups=2)
