"""Packed sequences -> masked batches, with the Trainer's loader interface (``TrainLoader``).

The epoch plan is ``melp_scale.stream``'s, with every packed row a "shard" of one sample: the
rows are permuted by a generator seeded with ``(seed, epoch)`` (kept in order without
``shuffle``), every rank yields ``ceil(N / (W*B))`` batches, and the ``< W*B`` extra slots of
the last step repeat the start of that epoch's order (flagged ``is_repeat``, which validation
leaves out). Rank r reads the contiguous slots ``[r*n*B, (r+1)*n*B)``.

Masks are drawn when a batch is built, from a generator seeded by ``(seed, epoch, rank, batch)``
(epoch 0 always when masking is not dynamic): the position ``(epoch, batches_consumed)`` is the
whole state, so ``load_state_dict`` resumes exactly, masks included.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from melp_scale.stream import batches_per_rank, check_resume_state, rank_plan
from melp_scale.text_pretrain.masking import WholeWordMasker


class PackedLoader:
    """One rank's masked batches of packed rows (``input_ids``, ``attention_mask``, ``labels``,
    ``is_repeat``), an epoch per iteration."""

    def __init__(self, rows: torch.Tensor, masker: WholeWordMasker, *, batch_size: int, seed: int,
                 rank: int, world_size: int, shuffle: bool, dynamic_masks: bool, pad_id: int,
                 fingerprint: str):
        self.rows, self.masker = rows, masker
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.dynamic_masks, self.pad_id = shuffle, dynamic_masks, pad_id
        self.fingerprint = fingerprint
        self.num_batches = batches_per_rank(len(rows), world_size, batch_size, drop_last=False)
        self.epoch = 0
        self.batches_consumed = 0
        self.num_bad_samples = 0  # packed rows cannot be unreadable; the interface has the counter

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row index, is_repeat) of this rank's slots in ``epoch``, in batch order."""
        per_rank = self.num_batches * self.batch_size
        index, _, is_repeat = rank_plan(
            (1,) * len(self.rows), seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, batch_size=self.batch_size, drop_last=False,
            shuffle=self.shuffle, shuffle_window=per_rank)
        return index, is_repeat

    def batch(self, epoch: int, number: int, index: np.ndarray, is_repeat: np.ndarray
              ) -> dict[str, Any]:
        rows = slice(number * self.batch_size, (number + 1) * self.batch_size)
        ids = self.rows[torch.from_numpy(index[rows])].numpy()  # (B, L)
        mask_epoch = epoch if self.dynamic_masks else 0
        rng = np.random.default_rng([self.seed, mask_epoch, self.rank, number])
        inputs, labels = self.masker(ids, rng)
        return {"input_ids": torch.from_numpy(inputs),
                "attention_mask": torch.from_numpy((ids != self.pad_id).astype(np.int64)),
                "labels": torch.from_numpy(labels),
                "is_repeat": torch.from_numpy(is_repeat[rows].copy())}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        index, is_repeat = self.plan(epoch)
        for number in range(self.batches_consumed, self.num_batches):
            batch = self.batch(epoch, number, index, is_repeat)
            self.batches_consumed += 1
            yield batch
        self.epoch, self.batches_consumed = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The position, plus what must match for the plan to be the same on resume."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_rows": len(self.rows), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; ValueError when the data or plan would differ."""
        check_resume_state(state, self.state_dict(),
                           ("seed", "batch_size", "world_size", "num_rows", "fingerprint"),
                           self.num_batches, " (the corpus or settings changed)")
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]
