"""ECG <-> report retrieval on a split of a shard set (any set with reports).

The samples of the shard set's own ``val`` split (``split="train"``, ``"all"``, or ``"test"``:
PTB-XL's test fold 10 when the samples have folds) are ECG-report pairs; the ECG global embeddings (data.py, cached) and the reports' global text
embeddings, tokenized as in pretraining (``ReportTokenizer`` with the json's sentence list), are
compared by cosine. Recall@k (k = 1, 5, 10) in both directions is
``melp_scale.train.metrics.retrieval_recall``: a pair counts as found when fewer than k
candidates score strictly higher than the true match. Reports repeated word for word (the
synthetic set has only 24 distinct ones) embed identically and tie, never outrank, the match;
the number of distinct reports is given with the result.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from melp_scale.evaluate.data import SampleRef
from melp_scale.train.metrics import retrieval_recall


def split_positions(refs: list[SampleRef], split: str) -> np.ndarray:
    """Positions of the samples of ``split``: the shard set's "train" or "val", "all", or
    "test" (PTB-XL's benchmark test fold, strat_fold 10, when the samples have folds, else the
    shard set's val split)."""
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split must be train, val, test or all for retrieval and caption, "
                         f"got {split!r}")
    if split == "test":
        folds = [r.meta.get("strat_fold") for r in refs]
        if any(f is not None for f in folds):
            keep = [i for i, f in enumerate(folds) if f is not None and int(f) == 10]
        else:
            keep = [i for i, r in enumerate(refs) if r.split == "val"]
        positions = np.asarray(keep, dtype=np.int64)
    else:
        positions = np.asarray([i for i, ref in enumerate(refs) if split == "all" or ref.split == split],
                               dtype=np.int64)
    if positions.size == 0:
        raise ValueError(f"the shard set has no sample in split {split!r} (--split)")
    return positions


@torch.no_grad()
def encode_reports(model, refs: list[SampleRef], batch_size: int = 64) -> np.ndarray:
    """(N, E) L2-normalised text embeddings of the samples' reports."""
    model.eval()
    out = []
    for start in range(0, len(refs), batch_size):
        chunk = refs[start:start + batch_size]
        batch = model.tokenizer.batch([r.report for r in chunk],
                                      [r.meta.get("sentences") or [] for r in chunk])
        out.append(model.encode_text(batch).float().cpu())
    return torch.cat(out).numpy()


def run_retrieval(model, refs: list[SampleRef], ecg_global: np.ndarray, split: str = "val",
                  ks: tuple[int, ...] = (1, 5, 10), max_samples: int | None = None) -> dict[str, Any]:
    """Recall@k of ECG->report and report->ECG on ``split``; ``ecg_global`` (N_all, E)."""
    positions = split_positions(refs, split)[:max_samples]
    chosen = [refs[i] for i in positions]
    if not all(r.report.strip() for r in chosen):
        raise ValueError("retrieval needs reports: some samples of this shard set have none")
    text = encode_reports(model, chosen)
    recall = retrieval_recall(torch.from_numpy(ecg_global[positions]), torch.from_numpy(text), ks)
    return {"kind": "retrieval", "split": split, "num_pairs": int(len(positions)),
            "num_distinct_reports": len({r.report for r in chosen}),
            **{k: round(v * 100, 4) for k, v in recall.items()}}
