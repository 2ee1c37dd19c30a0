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
