"""The analytic FLOP count of a training step (melp_scale/train/flops.py) against PyTorch's
measured count (torch.utils.flop_counter.FlopCounterMode) on a small model, and the MFU table.

Tolerance: 1 % per component and in total (the count is exact for the products it models; the
margin only absorbs a future PyTorch that counts an op slightly differently). Attention runs
through SDPA's math backend here, because FlopCounterMode has no formula for the CPU flash
kernel (it would count 0) while the math backend is plain batched products. The positional
conv has one group: FlopCounterMode's grouped-conv weight-gradient formula ignores the groups
(it counts g x the real work), so grouped convs are checked on the forward only.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from melp_scale.model import MELP, MELPConfig
from melp_scale.model.config import (
    DecoderConfig,
    ECGEncoderConfig,
    PoolerConfig,
    TextEncoderConfig,
)
from melp_scale.train.flops import (
    COMPONENTS,
    StepShape,
    peak_for_name,
    step_flops,
    step_shape,
    text_sizes_of,
    throughput,
)

TOLERANCE = 0.01
REPORTS = ["sinus rhythm. normal ecg.",
           "atrial fibrillation with rapid ventricular response. left axis deviation.",
           "low qrs voltages."]
# forward rows measured per top-level module: the text rows add up to MELP.text
MODULE_ROWS = {"ecg_encoder": ("ecg_encoder",), "beat_pooler": ("beat_pooler",),
               "caption_pooler": ("caption_pooler",),
               "text": ("text_frozen", "text_trainable", "text_heads"), "decoder": ("decoder",)}


def small_config(freeze_embeddings: bool, groups: int) -> MELPConfig:
    return MELPConfig(
        ecg=ECGEncoderConfig(conv_channels=16, width=32, num_layers=2, num_heads=4, ffn_dim=64,
                             pos_conv_kernel=8, pos_conv_groups=groups),
        pooler=PoolerConfig(embed_dim=16, num_beat_queries=3, beat_heads=2, num_caption_queries=5,
                            caption_heads=2),
        text=TextEncoderConfig(
            architecture={"model_type": "bert", "vocab_size": 30523, "hidden_size": 24,
                          "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 40,
                          "max_position_embeddings": 64},
            load_weights=False, num_frozen_layers=1, freeze_embeddings=freeze_embeddings, max_length=32),
        decoder=DecoderConfig(num_layers=2, num_heads=2, mlp_ratio=2.0))


def _measure(model: MELP, batch: dict, backward: bool) -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        loss = model(batch).loss
        if backward:
            loss.backward()
    return counter


def _close(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("freeze_embeddings", [False, True], ids=["embeddings-trained", "embeddings-frozen"])
@pytest.mark.parametrize("groups", [1, 4], ids=["pos-conv-1-group", "pos-conv-4-groups"])
def test_step_flops_match_flop_counter(freeze_embeddings, groups):
    torch.manual_seed(0)
    model = MELP(small_config(freeze_embeddings, groups))
    batch = model.tokenizer.batch(REPORTS)
    batch["ecg"] = torch.rand(len(REPORTS), 12, 500)
    rows = step_flops(model.config, text_sizes_of(model), step_shape(batch))
    assert set(rows) == {*COMPONENTS, "total"}

    forward = _measure(model, batch, backward=False)
    measured = {name.removeprefix("MELP."): sum(ops.values())
                for name, ops in forward.get_flop_counts().items()}
    for module, names in MODULE_ROWS.items():
        predicted = sum(rows[name]["forward"] for name in names)
        assert _close(predicted, measured[module]), (module, predicted, measured[module])
    assert _close(rows["total"]["forward"], forward.get_total_flops())
    if groups > 1:
        return  # FlopCounterMode miscounts grouped-conv weight gradients (module docstring)
    step = _measure(model, batch, backward=True).get_total_flops()
    backward = step - forward.get_total_flops()
    assert _close(rows["total"]["backward"], backward), (rows["total"]["backward"], backward)
    assert _close(rows["total"]["total"], step)
    # the frozen layer: no backward when the embeddings below it are frozen, else its input gradient
    if freeze_embeddings:
        assert rows["text_frozen"]["backward"] == 0
    else:
        assert 0 < rows["text_frozen"]["backward"] < 2 * rows["text_frozen"]["forward"]


def test_step_shape_hand_checked():
    # rows of 5 and 3 real tokens ([BOS] w.. [SEP] [CLS]) padded to 7: trimmed length 5,
    # targets (5 - 2) + (3 - 2) = 4; sentence counts capped by the index (2 and 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    index = torch.tensor([[-1, 0, 1, -1, -1, -1, -1], [-1, 0, -1, -1, -1, -1, -1]])
    batch = {"attention_mask": mask, "sentence_index": index, "sentence_counts": torch.tensor([3, 1]),
             "ecg": torch.zeros(2, 12, 321)}
    assert step_shape(batch, world_size=4) == StepShape(batch=2, ecg_samples=321, text_length=5,
                                                        caption_targets=4, sentences=2, world_size=4)


def test_vocab_projection_and_infonce_by_hand():
    config = MELPConfig.preset("demo")
    from melp_scale.train.flops import TextSizes

    text = TextSizes(hidden=384, layers=6, intermediate=1536, vocab=30523)
    shape = StepShape(batch=8, ecg_samples=5000, text_length=20, caption_targets=100, sentences=3)
    rows = step_flops(config, text, shape)
    assert rows["vocab_projection"]["forward"] == 2 * 100 * 384 * 30523
    assert rows["vocab_projection"]["backward"] == 2 * rows["vocab_projection"]["forward"]
    # demo: embeddings and 3 layers frozen -> the frozen layers have no backward
    assert rows["text_frozen"]["backward"] == 0
    # InfoNCE gathers the negatives of every rank: two (B x B*W) products instead of one B x B
    gathered = step_flops(config, text, StepShape(8, 5000, 20, 100, 3, world_size=4))
    infonce_local = 2 * 8 * 8 * 256
    infonce_gathered = 2 * 2 * 8 * 32 * 256
    assert gathered["losses"]["forward"] - rows["losses"]["forward"] == infonce_gathered - infonce_local


def test_peak_table_and_mfu():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert peak_for_name("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == ("A100", 312e12)
    assert peak_for_name("NVIDIA A10G") == ("A10G", 70e12)
    assert peak_for_name("NVIDIA A10") == ("A10", 125e12)
    assert peak_for_name("NVIDIA L40S") == ("L40S", 362e12)
    assert peak_for_name("NVIDIA L4") == ("L4", 121e12)
    assert peak_for_name("Some Future GPU") == (None, None)
    assert throughput(989e12, 2.0, 989e12) == {"tflops_per_s": 494.5, "mfu": 0.5}
    assert throughput(1e12, 1.0, None)["mfu"] is None
