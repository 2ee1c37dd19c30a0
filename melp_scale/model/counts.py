"""Parameter counts per module in the official MELP naming (README, "Reproducing the paper").

Our model carries only what MELP's forward uses. The official ``MELPModel`` also holds tensors
that nothing in MELP reaches (the converter drops them, ``melp_scale.convert``):

- in ``ecg_encoder``: the wav2vec 2.0 pretraining heads ``mask_emb``, ``quantizer.*``,
  ``project_q.*``, ``final_proj.*`` and the ECG-FM wrapper's own ``logit_scale``
  (509,824 + 1 at the paper sizes; its ``bn`` BatchNorm has buffers only);
- in ``lm_model`` (a ``BertLMHeadModel``): the LM head's own tensors
  ``cls.predictions.transform.*`` and ``cls.predictions.bias`` (622,651 at V = 30523; its
  decoder weight/bias are tied to the word embeddings / that bias and not counted twice).

``parameter_counts(model)`` counts our parameters; with ``include_official_unused=True`` it adds
those tensors (trainable in the official model) so that the result equals the official table
exactly, e.g. 284,074,301 in all at Q = 10, V = 30523.
"""
from __future__ import annotations

from torch import nn

OFFICIAL_MODULES = ("ecg_encoder", "lm_model", "proj_t", "sent_proj", "text_decoder", "logit_scale")
"""Top-level modules of the official ``MELPModel``, in its order."""

# wav2vec 2.0 quantizer settings of the official ECG-FM backbone (fairseq-signals defaults)
_LATENT_VARS, _LATENT_GROUPS, _FINAL_DIM = 320, 2, 256


def official_unused_shapes(model) -> dict[str, tuple[int, ...]]:
    """Official parameter names -> shapes of the parameters MELP never uses, for ``model``'s
    sizes (tied duplicates and buffers excluded)."""
    ecg, width = model.config.ecg, model.config.ecg.width
    hidden, vocab = model.text.hidden_size, model.text.vocab_size
    codes = _LATENT_VARS * _LATENT_GROUPS
    backbone, head = "ecg_encoder.ecg_encoder.", "lm_model.cls.predictions."
    return {
        backbone + "mask_emb": (width,),
        backbone + "quantizer.vars": (1, codes, _FINAL_DIM // _LATENT_GROUPS),
        backbone + "quantizer.weight_proj.weight": (codes, ecg.conv_channels),
        backbone + "quantizer.weight_proj.bias": (codes,),
        backbone + "project_q.weight": (_FINAL_DIM, _FINAL_DIM),
        backbone + "project_q.bias": (_FINAL_DIM,),
        backbone + "final_proj.weight": (_FINAL_DIM, width),
        backbone + "final_proj.bias": (_FINAL_DIM,),
        "ecg_encoder.logit_scale": (),
        head + "transform.dense.weight": (hidden, hidden),
        head + "transform.dense.bias": (hidden,),
        head + "transform.LayerNorm.weight": (hidden,),
        head + "transform.LayerNorm.bias": (hidden,),
        head + "bias": (vocab,),
    }


def official_unused_counts(model) -> dict[str, int]:
    """Per official top-level module, the elements of :func:`official_unused_shapes`."""
    counts = dict.fromkeys(OFFICIAL_MODULES, 0)
    for name, shape in official_unused_shapes(model).items():
        numel = 1
        for size in shape:
            numel *= size
        counts[name.split(".")[0]] += numel
    return counts


def _official_groups(model) -> dict[str, list]:
    """Our parameters grouped under the official top-level module names."""
    def params(*modules: nn.Module) -> list:
        return [p for module in modules for p in module.parameters()]

    return {"ecg_encoder": params(model.ecg_encoder, model.beat_pooler, model.caption_pooler),
            "lm_model": params(model.text.bert),
            "proj_t": params(model.text.global_head),
            "sent_proj": params(model.text.sentence_proj),
            "text_decoder": params(model.decoder),
            "logit_scale": [model.logit_scale]}


def parameter_counts(model, include_official_unused: bool = False) -> dict[str, dict[str, int]]:
    """``{module: {"total", "trainable", "frozen"}}`` for the official module names plus a
    ``"total"`` row (tied parameters counted once). ``include_official_unused`` adds the
    official-only unused tensors (counted trainable, as there) to ``ecg_encoder`` / ``lm_model``."""
    groups = _official_groups(model)
    grouped = {id(p) for ps in groups.values() for p in ps}
    stray = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if stray:  # a new module must be assigned to an official group
        raise RuntimeError(f"parameter_counts: parameters outside the official groups: {stray[:5]}")
    unused = official_unused_counts(model) if include_official_unused else dict.fromkeys(groups, 0)
    counts: dict[str, dict[str, int]] = {}
    for name, group in groups.items():
        unique = {id(p): p for p in group}.values()
        trainable = sum(p.numel() for p in unique if p.requires_grad) + unused[name]
        frozen = sum(p.numel() for p in unique if not p.requires_grad)
        counts[name] = {"total": trainable + frozen, "trainable": trainable, "frozen": frozen}
    counts["total"] = {key: sum(row[key] for row in counts.values())
                       for key in ("total", "trainable", "frozen")}
    return counts
