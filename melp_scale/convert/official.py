"""Official MELP state_dict (HKU-MedAI/MELP ``MELPModel``) -> ``melp_scale.model.MELP``.

Names and shapes: the official ``MELPModel.state_dict()``, as ``tests/test_convert.py``'s
``official_state`` builds it (README, "Loading the released weights"). The official model has
four parts, each found by an anchor key whatever prefix a file puts in front of it
(``model.``, ``module.``, a release's own prefix):

- ECG backbone (fairseq-signals wav2vec 2.0): anchor ``feature_extractor.conv_layers.0.0.weight``
  (officially under ``ecg_encoder.ecg_encoder.``);
- ECG poolers (ECG-FM wrapper): anchor ``attn_pool_contrast.query`` (under ``ecg_encoder.``);
- text model (HF BertLMHeadModel): anchor ``bert.embeddings.word_embeddings.weight``
  (under ``lm_model.``);
- heads: ``proj_t``, ``sent_proj``, ``text_decoder``, ``logit_scale`` at the model root.

Conversions: weight-norm ``original0/original1`` or ``weight_g/weight_v`` (or a plain weight,
factored into g and v); fused ``in_proj_weight`` split into q/k/v; raw matrices used as x @ M
(``proj_contrast``, ``text_projection``) transposed into ``nn.Linear`` weights; the 0-d
``logit_scale`` reshaped to (1,). Tied copies (``cls.predictions.decoder.*``) are checked equal to
their originals. Tensors MELP never uses (wav2vec 2.0 pretraining heads, the wrapper's
``logit_scale`` and ``bn`` buffers, the BERT LM head) are dropped and listed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

Transform = Callable[[torch.Tensor], "dict[str, torch.Tensor]"]

ANCHORS = {"backbone": "feature_extractor.conv_layers.0.0.weight",
           "pooler": "attn_pool_contrast.query",
           "text": "bert.embeddings.word_embeddings.weight"}
ROOT_NAMES = ("proj_t.", "sent_proj.", "text_decoder.", "logit_scale")
CANONICAL = {"backbone": "ecg_encoder.ecg_encoder.", "pooler": "ecg_encoder.", "text": "lm_model.", "root": ""}

# official names (after the part's prefix) MELP never uses: dropped and reported
UNUSED = {
    "backbone": r"(mask_emb|quantizer\..+|project_q\..+|final_proj\..+)",
    "pooler": r"(logit_scale|bn\.(running_mean|running_var|num_batches_tracked))",
    "text": r"cls\.predictions\.(transform\..+|bias)",
}
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}


@dataclass
class Conversion:
    """Result of :func:`convert_state_dict`."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Our parameter names -> tensors (fp32)."""
    placed: dict[str, list[str]] = field(default_factory=dict)
    """Official key (as in the file) -> our keys it filled."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Official key -> elements, for the unused tensors that were dropped."""
    tied: list[str] = field(default_factory=list)
    """Tied duplicates checked equal to their original and dropped."""
    prefixes: dict[str, str] = field(default_factory=dict)
    """Part -> the prefix found in the file."""


def _same(name: str) -> Transform:
    return lambda t: {name: t}


def _transposed(name: str) -> Transform:
    return lambda t: {name: t.t().contiguous()}


def _split3(names: tuple[str, str, str]) -> Transform:
    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        if t.shape[0] % 3:
            raise ValueError(f"first dimension {t.shape[0]} is not 3 x the width")
        return {n: part.contiguous() for n, part in zip(names, t.chunk(3, dim=0))}
    return split


def _plain_weight_norm(prefix: str) -> Transform:
    def factor(w: torch.Tensor) -> dict[str, torch.Tensor]:  # w = v * g / ||v||, with v = w
        return {prefix + "original0": w.norm(dim=(0, 1), keepdim=True), prefix + "original1": w}
    return factor


def _backbone_rules() -> list[tuple[str, Callable[[re.Match], Transform]]]:
    ours = "ecg_encoder."
    wn = ours + "pos_conv.conv.parametrizations.weight."
    return [
        (r"feature_extractor\.conv_layers\.\d+\.[02]\.(weight|bias)", lambda m: _same(ours + m.group(0))),
        (r"(layer_norm|post_extract_proj)\.(weight|bias)", lambda m: _same(ours + m.group(0))),
        (r"conv_pos\.pos_conv\.0\.(parametrizations\.weight\.original0|weight_g)", lambda m: _same(wn + "original0")),
        (r"conv_pos\.pos_conv\.0\.(parametrizations\.weight\.original1|weight_v)", lambda m: _same(wn + "original1")),
        (r"conv_pos\.pos_conv\.0\.weight", lambda m: _plain_weight_norm(wn)),
        (r"conv_pos\.pos_conv\.0\.bias", lambda m: _same(ours + "pos_conv.conv.bias")),
        (r"encoder\.layer_norm\.(weight|bias)", lambda m: _same(ours + "encoder_norm." + m.group(1))),
        (r"encoder\.layers\.(\d+)\.((self_attn\.(q|k|v|out)_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)"
         r"\.(weight|bias))", lambda m: _same(f"{ours}layers.{m.group(1)}.{m.group(2)}")),
    ]


def _pooler_rules() -> list[tuple[str, Callable[[re.Match], Transform]]]:
    pools = {"contrast": "beat_pooler.", "caption": "caption_pooler."}

    def attn(m: re.Match) -> Transform:
        pool = pools[m.group(1)] + "pool."
        name = m.group(2)
        if name == "in_proj_weight":
            return _split3(tuple(f"{pool}{x}_proj.weight" for x in "qkv"))
        if name == "in_proj_bias":
            return _split3(tuple(f"{pool}{x}_proj.bias" for x in "qkv"))
        if name.endswith("_proj_weight"):
            return _same(f"{pool}{name[0]}_proj.weight")
        return _same(pool + name)  # out_proj.weight / out_proj.bias

    return [
        (r"attn_pool_(contrast|caption)\.query", lambda m: _same(pools[m.group(1)] + "pool.queries")),
        (r"attn_pool_(contrast|caption)\.attn\.(in_proj_weight|in_proj_bias|[qkv]_proj_weight|"
         r"out_proj\.weight|out_proj\.bias)", attn),
        (r"attn_pool_(contrast|caption)\.ln_(q|k)\.(weight|bias)",
         lambda m: _same(f"{pools[m.group(1)]}pool.norm_{'queries' if m.group(2) == 'q' else 'context'}"
                         f".{m.group(3)}")),
        (r"ln_(contrast|caption)\.(weight|bias)", lambda m: _same(f"{pools[m.group(1)]}norm.{m.group(2)}")),
        (r"proj_contrast", lambda m: _transposed("beat_pooler.proj_contrast.weight")),
    ]


def _text_rules() -> list[tuple[str, Callable[[re.Match], Transform]]]:
    return [(r"bert\.(embeddings\..+|encoder\.layer\.\d+\..+)", lambda m: _same("text.bert." + m.group(1)))]


def _root_rules() -> list[tuple[str, Callable[[re.Match], Transform]]]:
    block = r"text_decoder\.(resblocks|cross_attn)\.(\d+)\.(ln_1|ln_1_kv|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
    return [
        (r"proj_t\.([02])\.(weight|bias)", lambda m: _same(f"text.global_head.{m.group(1)}.{m.group(2)}")),
        (r"sent_proj\.(weight|bias)", lambda m: _same("text.sentence_proj." + m.group(1))),
        (block, lambda m: _same("decoder." + m.group(0)[len("text_decoder."):])),
        (r"text_decoder\.(resblocks|cross_attn)\.(\d+)\.attn\.in_proj_(weight|bias)",
         lambda m: _same("decoder." + m.group(0)[len("text_decoder."):])),
        (r"text_decoder\.ln_final\.(weight|bias)", lambda m: _same("decoder.ln_final." + m.group(1))),
        (r"text_decoder\.text_projection", lambda m: _transposed("decoder.text_projection.weight")),
        (r"logit_scale", lambda m: (lambda t: {"logit_scale": t.reshape(1)})),
    ]


RULES = {"backbone": _backbone_rules(), "pooler": _pooler_rules(), "text": _text_rules(), "root": _root_rules()}


def find_prefixes(keys: list[str]) -> dict[str, str]:
    """Part -> prefix of its anchor key (absent parts left out). The root prefix is the text or
    pooler prefix minus its official ``lm_model.`` / ``ecg_encoder.``, else where a root name sits."""
    prefixes: dict[str, str] = {}
    for part, anchor in ANCHORS.items():
        hits = [key[:-len(anchor)] for key in keys if key.endswith(anchor)
                and (len(key) == len(anchor) or key[-len(anchor) - 1] == ".")]
        if len(hits) > 1:
            raise ValueError(f"ambiguous checkpoint: {len(hits)} copies of '*{anchor}' under prefixes {hits}")
        if hits:
            prefixes[part] = hits[0]
    for part, official in (("text", "lm_model."), ("pooler", "ecg_encoder.")):
        if part in prefixes and prefixes[part].endswith(official):
            prefixes["root"] = prefixes[part][:-len(official)]
            break
    else:
        roots = set()
        for key in keys:
            for name in ROOT_NAMES[:3]:  # logit_scale also names the ECG wrapper's unused one
                at = key.find(name)
                if at == 0 or (at > 0 and key[at - 1] == "."):
                    roots.add(key[:at])
        if len(roots) == 1:
            prefixes["root"] = roots.pop()
    return prefixes


def _classify(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    """(part, name after the part's prefix) for the longest prefix whose rules know the name."""
    for part, prefix in sorted(prefixes.items(), key=lambda item: -len(item[1])):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        known = any(re.fullmatch(pattern, rest) for pattern, _ in RULES[part])
        if known or (part in UNUSED and re.fullmatch(UNUSED[part], rest)) or (part == "text" and rest in TIED):
            return part, rest
    return None


def convert_state_dict(official: dict[str, torch.Tensor]) -> Conversion:
    """Map an official state dict onto our names; raises ValueError listing every key that
    cannot be placed (shapes are checked against the built model by the caller)."""
    prefixes = find_prefixes(list(official))
    if "backbone" not in prefixes or "pooler" not in prefixes:
        raise ValueError("not an official MELP checkpoint: no ECG encoder found (no key ending in "
                         f"'{ANCHORS['backbone']}' and one ending in '{ANCHORS['pooler']}')")
    result = Conversion(prefixes=prefixes)
    unknown, problems = [], []
    for key, tensor in official.items():
        found = _classify(key, prefixes)
        if found is None:
            unknown.append(key)
            continue
        part, rest = found
        if part == "text" and rest in TIED:
            original = official.get(prefixes["text"] + TIED[rest])
            if original is None or original.shape != tensor.shape or not torch.equal(original, tensor):
                problems.append(f"{key}: should be tied to {prefixes['text'] + TIED[rest]} but differs")
            result.tied.append(key)
            continue
        if part in UNUSED and re.fullmatch(UNUSED[part], rest):
            result.dropped[key] = tensor.numel()
            continue
        pattern, make = next((p, f) for p, f in RULES[part] if re.fullmatch(p, rest))
        try:
            mapped = make(re.fullmatch(pattern, rest))(tensor.detach().to(torch.float32))
        except ValueError as error:
            problems.append(f"{key} {tuple(tensor.shape)}: {error}")
            continue
        for name, value in mapped.items():
            if name in result.state:
                problems.append(f"{key}: {name} filled twice")
            result.state[name] = value
        result.placed[key] = list(mapped)
    if unknown or problems:
        lines = [f"  unknown key: {k} {tuple(official[k].shape)}" for k in unknown] + [f"  {p}" for p in problems]
        raise ValueError(f"cannot convert: {len(unknown)} unknown key(s), {len(problems)} problem(s) "
                         f"(prefixes found: {prefixes}):\n" + "\n".join(lines))
    return result
