"""Whole-word masking for WordPiece tokenizers (BERT's recipe, as in Google's ``wwm`` models).

A word is a token that does not start with ``##`` plus the ``##`` tokens that follow it;
special tokens ([CLS], [SEP], [PAD], ...) belong to no word and are never selected. A ``##``
token right after a special token (a packed row that starts mid-word) starts a word.

Per row: the budget is ``max(1, round(mask_prob x real tokens))``; words are visited in a
random order and taken whole while they fit in the budget (a word that would overshoot is
skipped, as in BERT's ``create_pretraining_data.py``). Every selected token becomes a label;
``replace_with_mask`` of them are replaced by [MASK], ``replace_with_random`` by a random
non-special token, the rest kept. With ``whole_word`` off every token is its own word.

All randomness comes from the generator the caller passes (seeded per (seed, epoch, rank,
batch) by the loader), so a resumed run masks exactly as the uninterrupted one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from melp_scale.text_pretrain.config import MaskingConfig

IGNORE_INDEX = -100  # label of tokens that are not predicted (torch's cross-entropy default)


def word_ids(ids: np.ndarray, is_continuation: np.ndarray, is_special: np.ndarray) -> np.ndarray:
    """(L,) token ids -> (L,) word index of each token, -1 for special tokens."""
    special = is_special[ids]
    previous_special = np.concatenate([[True], special[:-1]])
    starts = (~is_continuation[ids] | previous_special) & ~special
    words = np.cumsum(starts) - 1
    words[special] = -1
    return words


class WholeWordMasker:
    """(B, L) packed rows -> (masked input ids, labels); see the module docstring."""

    def __init__(self, tokenizer: Any, config: MaskingConfig):
        vocab_size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[tokenizer.all_special_ids] = True
        self.is_continuation = np.array([t is not None and t.startswith("##") for t in tokens])
        if not config.whole_word:  # every token a word of its own
            self.is_continuation[:] = False
        self.random_ids = np.flatnonzero(~self.is_special)
        self.mask_id = tokenizer.mask_token_id
        self.config = config

    def select(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(L,) bool: the tokens of ``row`` chosen for prediction (whole words)."""
        words = word_ids(row, self.is_continuation, self.is_special)
        num_words = int(words.max()) + 1
        selected = np.zeros(len(row), dtype=bool)
        if num_words == 0:
            return selected
        lengths = np.bincount(words[words >= 0], minlength=num_words)
        budget = max(1, round(self.config.mask_prob * int(lengths.sum())))
        chosen, count = np.zeros(num_words, dtype=bool), 0
        for word in rng.permutation(num_words):
            if count >= budget:
                break
            if count + lengths[word] > budget:
                continue
            chosen[word] = True
            count += lengths[word]
        return (words >= 0) & chosen[np.maximum(words, 0)]

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(B, L) int ids -> (input ids, labels), both (B, L) int64."""
        rows = rows.astype(np.int64)
        selected = np.stack([self.select(row, rng) for row in rows])  # (B, L)
        labels = np.where(selected, rows, IGNORE_INDEX)
        draw = rng.random(rows.shape)
        to_mask = selected & (draw < self.config.replace_with_mask)
        to_random = selected & ~to_mask & (
            draw < self.config.replace_with_mask + self.config.replace_with_random)
        inputs = rows.copy()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = rng.choice(self.random_ids, size=int(to_random.sum()))
        return inputs, labels
