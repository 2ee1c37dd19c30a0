"""Load official MELP weights (HKU-MedAI/MELP) into ``melp_scale.model.MELP``.

    python -m melp_scale.convert melp-official CKPT --out DIR [--text-model ID_OR_FOLDER]
    model, report = melp_scale.convert.from_official(CKPT, text_model=None)
    model = MELP.from_official(CKPT)

CKPT: a Lightning ``.ckpt`` of the official training code, a state dict (``.safetensors``,
``.bin``, ``.pt``), or a release folder (``model.safetensors``). Sizes (beat queries Q, vocabulary
V, layers) are read from the shapes; head counts are the official ones (ECG width / 64, 8 in the
poolers and the decoder, BERT width / 64).

- A full checkpoint carries every MELP weight; ``text_model`` names the text model whose
  tokenizer it was trained with (default: the checkpoint's ``text_encoder_name`` when it has one),
  its vocabulary plus [BOS] must equal V.
- The public ``MELP_Encoder`` release is the ECG tower only: ``text_model`` is then required and
  supplies the text encoder's weights and tokenizer; ``proj_t``, ``sent_proj``, the caption decoder
  and ``logit_scale`` are NOT in the file and start freshly initialised (listed in the report as
  ``fresh``): ECG embeddings and linear probes are the released ones, zero-shot scores are not.

Every key must be placed (or be a known unused/tied tensor, dropped and listed) and every shape
must agree with the built model, else ValueError lists all offenders.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from melp_scale.model import MELP, MELPConfig
from melp_scale.model.config import DecoderConfig, ECGEncoderConfig, PoolerConfig, TextEncoderConfig

from .official import Conversion, convert_state_dict
from .reader import read_checkpoint

__all__ = ["from_official", "convert_state_dict", "read_checkpoint", "infer_config", "Conversion"]

HEAD_DIM = 64  # wav2vec 2.0 / BERT heads are 64 wide at every official size
POOLER_HEADS = DECODER_HEADS = 8


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for key in state for m in [re.fullmatch(pattern, key)] if m})


def infer_config(state: dict[str, torch.Tensor], text_model: str | None) -> MELPConfig:
    """The ``paper`` preset with the sizes read from converted (our-named) tensors."""
    config = MELPConfig.preset("paper")
    conv0 = state["ecg_encoder.feature_extractor.conv_layers.0.0.weight"]
    width = state["ecg_encoder.post_extract_proj.weight"].shape[0]
    pos_v = state["ecg_encoder.pos_conv.conv.parametrizations.weight.original1"]
    config.ecg = ECGEncoderConfig(
        in_channels=conv0.shape[1], conv_channels=conv0.shape[0],
        num_conv_layers=_count(state, r"ecg_encoder\.feature_extractor\.conv_layers\.(\d+)\.0\.weight"),
        width=width, num_layers=_count(state, r"ecg_encoder\.layers\.(\d+)\.fc1\.weight"),
        num_heads=width // HEAD_DIM, ffn_dim=state["ecg_encoder.layers.0.fc1.weight"].shape[0],
        pos_conv_kernel=pos_v.shape[2], pos_conv_groups=width // pos_v.shape[1])
    beats, captions = state["beat_pooler.pool.queries"], state["caption_pooler.pool.queries"]
    config.pooler = PoolerConfig(embed_dim=beats.shape[1], num_beat_queries=beats.shape[0],
                                 beat_heads=POOLER_HEADS, num_caption_queries=captions.shape[0],
                                 caption_heads=POOLER_HEADS)
    embeddings = state.get("text.bert.embeddings.word_embeddings.weight")
    if embeddings is None:  # ECG tower only: the text encoder comes from text_model
        config.text = TextEncoderConfig(name_or_path=text_model, load_weights=True, causal=True,
                                        num_frozen_layers=6, max_length=128)
        return config
    hidden = embeddings.shape[1]
    config.text = TextEncoderConfig(
        name_or_path=text_model, load_weights=False, causal=True, num_frozen_layers=6, max_length=128,
        architecture={
            "model_type": "bert", "vocab_size": embeddings.shape[0], "hidden_size": hidden,
            "num_hidden_layers": _count(state, r"text\.bert\.encoder\.layer\.(\d+)\.output\.dense\.weight"),
            "num_attention_heads": hidden // HEAD_DIM,
            "intermediate_size": state["text.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_position_embeddings": state["text.bert.embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": state["text.bert.embeddings.token_type_embeddings.weight"].shape[0]})
    layers = _count(state, r"decoder\.resblocks\.(\d+)\.ln_1\.weight")
    if layers:
        fc = state["decoder.resblocks.0.mlp.c_fc.weight"]
        config.decoder = DecoderConfig(num_layers=layers, num_heads=DECODER_HEADS,
                                       mlp_ratio=fc.shape[0] / fc.shape[1])
    return config


def _check_against(model: MELP, conversion: Conversion, ecg_only: bool) -> list[str]:
    """Our keys that start fresh (ECG-only release); raises on any shape disagreement."""
    ours = model.state_dict()
    problems = []
    for name, tensor in conversion.state.items():
        if name not in ours:
            problems.append(f"{name}: no such parameter in the model built from the shapes")
        elif ours[name].shape != tensor.shape:
            source = next(k for k, v in conversion.placed.items() if name in v)
            problems.append(f"{source} -> {name}: shape {tuple(tensor.shape)}, the model has "
                            f"{tuple(ours[name].shape)}")
    missing = [name for name in ours if name not in conversion.state]
    ecg_names = ("ecg_encoder.", "beat_pooler.", "caption_pooler.")
    if ecg_only:
        problems += [f"{n}: missing from the checkpoint" for n in missing if n.startswith(ecg_names)]
    elif missing:
        problems += [f"{n}: missing from the checkpoint" for n in missing]
    if problems:
        raise ValueError(f"cannot convert: {len(problems)} disagreement(s):\n  " + "\n  ".join(problems))
    return missing


def _text_model_for(conversion: Conversion, text_model: str | None, hparams: dict[str, Any],
                    ecg_only: bool) -> str:
    if text_model:
        return text_model
    if isinstance(hparams.get("text_encoder_name"), str):  # a Lightning checkpoint names it
        return hparams["text_encoder_name"]
    what = ("the ECG-tower-only release needs a text encoder" if ecg_only
            else "the checkpoint does not name its text model; its tokenizer is needed")
    raise ValueError(f"text_model: {what}; pass --text-model (a HF id or folder, e.g. "
                     "fuyingw/heart_bert, the official model's text encoder)")


def from_official(path: str | os.PathLike | dict, text_model: str | None = None) -> tuple[MELP, dict]:
    """Build a ``MELP`` holding the official weights of ``path`` (a file, a release folder, or
    an already loaded state dict) and a report: what was placed, dropped, tied, left fresh."""
    if isinstance(path, dict):
        official, hparams, source = path, {}, "<state dict>"
    else:
        official, hparams = read_checkpoint(path)
        source = os.fspath(path)
    conversion = convert_state_dict(official)
    ecg_only = "text" not in conversion.prefixes
    text_model = _text_model_for(conversion, text_model, hparams, ecg_only)
    config = infer_config(conversion.state, text_model)
    model = MELP(config)
    vocab = conversion.state.get("text.bert.embeddings.word_embeddings.weight")
    if vocab is not None and len(model.tokenizer.tokenizer) != vocab.shape[0]:
        raise ValueError(f"text_model {text_model!r}: its tokenizer has {len(model.tokenizer.tokenizer)} "
                         f"tokens with [BOS]; the checkpoint's vocabulary is {vocab.shape[0]}")
    caption_width = conversion.state["caption_pooler.pool.queries"].shape[1]
    if caption_width != model.text.hidden_size:
        raise ValueError(f"text_model {text_model!r}: hidden size {model.text.hidden_size}, but the "
                         f"checkpoint's caption pooler (the decoder's memory) is {caption_width} wide")
    fresh = _check_against(model, conversion, ecg_only)
    model.load_state_dict(conversion.state, strict=False)
    report = {"source": source, "prefixes": conversion.prefixes, "ecg_only": ecg_only,
              "text_model": text_model, "placed": len(conversion.placed),
              "parameters_loaded": sum(t.numel() for t in conversion.state.values()),
              "dropped": conversion.dropped, "dropped_elements": sum(conversion.dropped.values()),
              "tied": conversion.tied, "fresh": fresh,
              "sizes": {"beat_queries": config.pooler.num_beat_queries,
                        "vocab": model.text.vocab_size, "ecg_layers": config.ecg.num_layers}}
    return model.eval(), report
