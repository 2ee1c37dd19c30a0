"""Patient identification: is a later ECG of a patient closest to that patient's first one?

On a shard set with several records per patient (PTB-XL: 21,799 records of 18,869 patients;
``subject`` of the sample json is the patient):

- records are grouped by patient (within a source) and ordered by record id (PTB-XL's
  ``ecg_id``); a record cut into several windows counts once (its first window);
- **gallery**: the first record of every patient (patients with one record are distractors);
  **probes**: every later record of the patients with two or more;
- each probe is matched to the gallery by cosine similarity of its ECG features; top-k
  accuracy is the share of probes whose own patient is among the k most similar gallery
  entries (ties count against: a probe is found at rank r when fewer than r gallery
  entries score strictly higher, equal scores ranked first by another patient).
  Reported for the linear-probe feature (``ecg_features``) and the global embedding,
  with chance (k / gallery size), and the cumulative match characteristic (rank 1-20) as PNG.

Split: ``test`` is PTB-XL's benchmark test fold (``strat_fold`` 10: every record of a
patient is in one fold) when the samples have folds, else the shard set's val split;
``all`` uses every sample.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from melp_scale.evaluate.data import SampleRef

KS = (1, 5, 10)


def _order_key(record_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", record_id))


def gallery_and_probes(refs: list[SampleRef], positions: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gallery positions, gallery patient index, probe positions, probe patient index)."""
    records: dict[tuple[str, str], dict[str, int]] = {}
    for position in positions:
        meta = refs[position].meta
        patient = (str(meta.get("source")), str(meta.get("subject", meta.get("record_id"))))
        record = str(meta.get("record_id", refs[position].key))
        records.setdefault(patient, {}).setdefault(record, int(position))  # first window
    gallery, gallery_id, probes, probe_id = [], [], [], []
    for index, (_, by_record) in enumerate(sorted(records.items())):
        ordered = [by_record[r] for r in sorted(by_record, key=_order_key)]
        gallery.append(ordered[0])
        gallery_id.append(index)
        probes.extend(ordered[1:])
        probe_id.extend([index] * (len(ordered) - 1))
    return (np.asarray(gallery, dtype=np.int64), np.asarray(gallery_id), np.asarray(probes, dtype=np.int64),
            np.asarray(probe_id))


def match_ranks(gallery: np.ndarray, gallery_id: np.ndarray, probes: np.ndarray,
                probe_id: np.ndarray) -> np.ndarray:
    """1-based rank of each probe's own patient among the gallery by cosine similarity
    (``gallery`` (G, E), ``probes`` (P, E)); ties with other patients rank first."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(probes) @ unit(gallery).T  # (P, G)
    own = similarity[np.arange(len(probes)), np.searchsorted(gallery_id, probe_id)]
    others = gallery_id[None, :] != probe_id[:, None]
    return 1 + ((similarity >= own[:, None]) & others).sum(axis=1)


def patient_positions(refs: list[SampleRef], split: str) -> tuple[np.ndarray, str]:
    """Positions of the samples of ``split`` ("test" or "all") and how they were chosen."""
    if split == "all":
        return np.arange(len(refs)), "every sample"
    if split != "test":
        raise ValueError(f"--patient-split must be test or all, got {split!r}")
    folds = [r.meta.get("strat_fold") for r in refs]
    if any(f is not None for f in folds):
        return (np.asarray([i for i, f in enumerate(folds) if f is not None and int(f) == 10], dtype=np.int64),
                "PTB-XL strat_fold 10 (the benchmark test fold)")
    return (np.asarray([i for i, r in enumerate(refs) if r.split == "val"], dtype=np.int64),
            "the shard set's val split")


def run_patient_id(refs: list[SampleRef], features: dict[str, np.ndarray], split: str = "test",
                   out_png: str | None = None) -> dict[str, Any]:
    """Top-k patient identification accuracy (× 100) for each feature kind in ``features``
    (name -> (N_all, E)); writes the CMC curves to ``out_png``."""
    positions, rule = patient_positions(refs, split)
    gallery, gallery_id, probes, probe_id = gallery_and_probes(refs, positions)
    if probes.size == 0:
        raise ValueError(f"patient identification needs patients with two or more records in "
                         f"split {split!r} ({rule}); this shard set has none")
    result: dict[str, Any] = {
        "kind": "patient_id", "split": split, "split_rule": rule,
        "num_patients": int(len(gallery)), "num_gallery": int(len(gallery)),
        "num_probes": int(len(probes)), "num_patients_with_probes": int(len(set(probe_id.tolist()))),
        "chance": {f"top{k}": round(100 * min(1.0, k / len(gallery)), 4) for k in KS}}
    curves = {}
    for name, matrix in features.items():
        ranks = match_ranks(matrix[gallery], gallery_id, matrix[probes], probe_id)
        result[name] = {f"top{k}": round(float((ranks <= k).mean()) * 100, 4) for k in KS}
        curves[name] = [float((ranks <= k).mean()) for k in range(1, 21)]
    if out_png:
        plot_cmc(curves, out_png, f"patient identification ({len(gallery)} gallery, {len(probes)} probes)")
    result["probe_keys"] = [refs[p].key for p in probes[:5]]
    return result


def plot_cmc(curves: dict[str, list[float]], path: str, title: str) -> None:
    """Cumulative match characteristic: accuracy at rank <= k for k = 1..20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        axis.plot(range(1, len(values) + 1), [v * 100 for v in values], marker="o", ms=3, label=name)
    axis.set(xlabel="rank k", ylabel="accuracy at rank <= k (%)", title=title, ylim=(0, 101))
    axis.legend(loc="lower right")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
