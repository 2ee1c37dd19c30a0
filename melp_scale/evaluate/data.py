"""Labelled shard sets -> per-task label matrices, splits, and model features (cached).

Reading: every sample of a shard set (its ``train`` and ``val`` shards) is indexed through
``melp_scale.stream``'s shard reader, and ECGs go through the pretraining ``EcgTransform``
with the pretraining settings (``normalize="minmax"`` over the whole record, no lead mask,
the shard's fs / window / lead order as built; ``crop_samples`` centred when set), so inputs
equal what the model trained on. ``head_samples`` (``--protocol melp`` for CPSC2018) keeps
the first samples and zero-pads the rest before normalising, as the MERL/MELP code does.

Evaluation splits, per task:

- ``ptbxl-*``: the PTB-XL benchmark folds from the sample json's ``strat_fold``: 1-8 train,
  9 val, 10 test;
- ``cpsc2018``, ``csn``, ``synthetic-*``, by **subject** (``subject`` of the json: the
  patient; a Challenge record is its own subject). When the shard set has its own subject
  split (train and val shards, ``python -m melp_scale.shard build --val-fraction``), it is
  kept: its val subjects are the test split, and its train subjects are divided (seeded) into
  train and val. So a model pretrained on the train shards is never tested on its own
  training subjects. Otherwise the sorted subjects are permuted by
  ``numpy.random.default_rng(seed)``: the first ``test_fraction`` go to test, the next
  ``val_fraction`` to val, the rest to train (defaults 0.2 / 0.1, the published CPSC2018 /
  CSN proportions). No subject is in two splits;
- ``--split-csv SPLIT=PATH`` (any task): the published split files (splitcsv.py): records
  matched by id or file path, classes by normalised column name; labels come from the CSV.
  Samples named by no CSV are left out, CSV rows with no sample are counted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator

import numpy as np
import torch

from melp_scale.evaluate.splitcsv import read_split_csv, read_split_files, record_name  # noqa: F401
from melp_scale.evaluate.tasks import Task
from melp_scale.stream import EcgTransform, ShardReader, load_shard_set

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class DataConfig:
    """Where the labelled shards are and how samples are preprocessed and split."""

    data: str  # shard folder (manifest.json + tars) built by ``python -m melp_scale.shard build``
    normalize: str = "minmax"  # as in pretraining (StreamConfig.normalize)
    crop_samples: int | None = None  # centred crop to this many samples (None: the shard's window)
    batch_size: int = 32  # ECGs per forward pass
    seed: int = 0  # seeds the subject split of tasks without fixed folds
    val_fraction: float = 0.1  # seeded split: share of subjects in val
    test_fraction: float = 0.2  # seeded split: share of subjects in test
    split_csvs: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> published CSV
    record_column: str | None = None  # split CSV column naming records (None: auto-detect)
    head_samples: int | None = None  # keep the first samples, zero-pad the rest (None: all)

    def __post_init__(self) -> None:
        if self.normalize not in ("minmax", "zscore", "none"):
            raise ValueError(f"--normalize must be minmax, zscore or none, got {self.normalize!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (0 <= self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("--val-fraction and --test-fraction must be in [0, 1) with a sum below 1")
        if self.head_samples is not None and self.head_samples < 1:
            raise ValueError(f"head_samples must be >= 1, got {self.head_samples}")
        bad = set(self.split_csvs) - set(SPLITS)
        if bad:
            raise ValueError(f"--split-csv: unknown split(s) {sorted(bad)}; use train=, val=, test=")


@dataclasses.dataclass
class SampleRef:
    """Where one sample lives and what its json says."""

    shard: str  # path of its tar
    shard_size: int  # samples in that shard (the manifest's count)
    index: int  # position in the shard
    split: str  # the shard set's own split ("train" / "val"), used by retrieval and caption
    key: str
    meta: dict[str, Any]
    report: str


@dataclasses.dataclass
class TaskData:
    """One task's samples: rows into the shard set's sample list, 0/1 labels, splits."""

    task: Task
    rows: np.ndarray  # (N,) indices into the shard set's SampleRef list
    labels: np.ndarray  # (N, C) uint8
    splits: np.ndarray  # (N,) "train" / "val" / "test"
    split_rule: str  # how the splits were made, for the results
    left_out: dict[str, int]  # samples of the shard set not used, by reason

    def split_rows(self, split: str) -> np.ndarray:
        """Positions (into ``rows``/``labels``) of the samples of ``split``."""
        return np.flatnonzero(self.splits == split)


# ----------------------------------------------------------------------------- reading


def index_shards(directory: str) -> tuple[list[SampleRef], dict[str, Any]]:
    """Every sample of a shard set (all its splits) with its json and report; and the
    manifest's preprocessing settings."""
    refs: list[SampleRef] = []
    settings: dict[str, Any] = {}
    for split in ("train", "val"):
        try:
            shards = load_shard_set(directory, split)
        except ValueError as error:
            if "no non-empty shard" in str(error):
                continue
            raise
        settings = shards.settings
        for name, size in zip(shards.names, shards.sizes):
            path = os.path.join(directory, name)
            reader = ShardReader(path, name, size)
            try:
                for index, (key, members) in enumerate(reader.samples):
                    meta = json.loads(_pread(reader.fd, members["json"]))
                    report = _pread(reader.fd, members["txt"]).decode("utf-8")
                    refs.append(SampleRef(path, size, index, split, key, meta, report))
            finally:
                reader.close()
    if not refs:
        raise ValueError(f"--data {directory!r}: the shard set has no samples")
    return refs, settings


def _pread(fd: int, member: tuple[int, int]) -> bytes:
    offset, size = member
    return os.pread(fd, size, offset)


def iter_ecg_batches(refs: list[SampleRef], transform: EcgTransform, batch_size: int
                     ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(positions, ecg (B, 12, T) float32)`` for ``refs`` in order, preprocessed."""
    readers: dict[str, ShardReader] = {}
    rng = np.random.default_rng(0)  # unused: no lead mask and a centred crop
    try:
        for start in range(0, len(refs), batch_size):
            batch = []
            for ref in refs[start:start + batch_size]:
                if ref.shard not in readers:
                    name = os.path.basename(ref.shard)
                    readers[ref.shard] = ShardReader(ref.shard, name, ref.shard_size)
                _, ecg, meta, _ = readers[ref.shard].read(ref.index)
                batch.append(transform(ecg, meta["gain"], rng))
            yield np.arange(start, start + len(batch)), torch.from_numpy(np.stack(batch))
    finally:
        for reader in readers.values():
            reader.close()


class HeadTransform:
    """Keep the first ``head`` samples of the (cropped) window, zero-pad (0 mV) back to its
    length, then normalise: the MERL/MELP input for CPSC2018 (first 5 s of 10)."""

    def __init__(self, transform: EcgTransform, head: int):
        self.transform, self.head = transform, head
        self.crop, transform.crop_samples = transform.crop_samples, None

    def __call__(self, ecg: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
        if self.crop is not None:
            start = (ecg.shape[1] - self.crop) // 2
            if start < 0:
                raise ValueError(f"{ecg.shape[1]} time steps, shorter than crop_samples={self.crop}")
            ecg = ecg[:, start:start + self.crop]
        padded = np.zeros_like(ecg)
        padded[:, :self.head] = ecg[:, :self.head]
        return self.transform(padded, gain, rng)


def make_transform(config: DataConfig):
    """The pretraining ECG transform with evaluation settings (no mask, centred crop)."""
    transform = EcgTransform(config.normalize, lead_mask_p=0.0, crop_samples=config.crop_samples,
                             random_crop=False)
    return transform if config.head_samples is None else HeadTransform(transform, config.head_samples)


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(model, refs: list[SampleRef], config: DataConfig,
                     cache_dir: str | None, checkpoint: str | None = None) -> dict[str, np.ndarray]:
    """``global`` (N, E) L2-normalised ECG embeddings and ``features`` (N, E) linear-probe
    features of every sample, computed once and cached in ``cache_dir`` under a key of the
    checkpoint files, the shard manifest and the preprocessing settings."""
    path = None
    if cache_dir is not None:
        key = _cache_key(checkpoint, config)
        path = os.path.join(cache_dir, f"features-{key}.npz")
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as cached:  # a cache is data, never code
                if cached["global"].shape[0] == len(refs):
                    return {"global": cached["global"], "features": cached["features"]}
    model.eval()
    device = next(model.parameters()).device
    out_global, out_features = [], []
    fast = None  # the one-pass path, once checked against the public API
    for _, ecg in iter_ecg_batches(refs, make_transform(config), config.batch_size):
        ecg = ecg.to(device)
        if fast is None:
            fast = _fast_path_agrees(model, ecg[:2])
        ecg_global, features = ecg_outputs(model, ecg, fast)
        out_global.append(ecg_global.float().cpu())
        out_features.append(features.float().cpu())
    result = {"global": torch.cat(out_global).numpy(), "features": torch.cat(out_features).numpy()}
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **result)
        os.replace(tmp, path)
    return result


def ecg_outputs(model, ecg: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(global L2-normalised embedding, linear-probe feature) of a batch: the public API
    (``encode_ecg``, ``ecg_features``: two encoder passes), or with ``fast`` one pass through
    the beat pooler's parts (``_fast_path_agrees`` checks it gives the same numbers)."""
    if fast:
        pooled = model.beat_pooler.pooled(model.ecg_encoder(ecg))  # (B, Q_b, E) before proj
        beats = model.beat_pooler.proj_contrast(pooled)  # (B, Q_b, E)
        return torch.nn.functional.normalize(beats.mean(dim=1), dim=-1), pooled.mean(dim=1)
    return model.encode_ecg(ecg)[0], model.ecg_features(ecg)


def _fast_path_agrees(model, ecg: torch.Tensor) -> bool:
    pooler = getattr(model, "beat_pooler", None)
    if pooler is None or not hasattr(pooler, "pooled") or not hasattr(pooler, "proj_contrast"):
        return False
    try:
        fast = ecg_outputs(model, ecg, fast=True)
    except (AttributeError, TypeError, RuntimeError):
        return False
    public = ecg_outputs(model, ecg, fast=False)
    return all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(fast, public))


def _cache_key(checkpoint: str | None, config: DataConfig) -> str:
    digest = hashlib.sha256()
    files = ((checkpoint, ("config.json", "model.safetensors")), (config.data, ("manifest.json",)))
    for folder, names in files:
        for name in names:
            file = os.path.join(folder or "", name)
            if os.path.isfile(file):
                stat = os.stat(file)
                digest.update(f"{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(f"{config.normalize}:{config.crop_samples}:{config.head_samples}".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- labels, splits


def task_data(task: Task, refs: list[SampleRef], config: DataConfig) -> TaskData:
    """Labels and splits of ``task`` over the shard set ``refs`` (see the module docstring)."""
    pattern = re.compile(task.record_pattern) if task.record_pattern else None
    candidates = [i for i, ref in enumerate(refs) if ref.meta.get("source") == task.source
                  and (pattern is None or pattern.fullmatch(str(ref.meta.get("record_id", ""))))]
    left_out = {"other_source_or_database": len(refs) - len(candidates)}
    if not candidates:
        raise ValueError(f"task {task.name} needs samples of source {task.source!r}; --data "
                         f"{config.data!r} has none (sources: "
                         f"{sorted({str(r.meta.get('source')) for r in refs})})")
    if config.split_csvs:
        rows, labels, splits, counts, rule = _from_split_csvs(task, refs, candidates, config)
        left_out["not_in_split_csv"] = len(candidates) - len(set(rows.tolist()))
        left_out.update(counts)
        return TaskData(task, rows, labels, splits, rule, {k: v for k, v in left_out.items() if v})
    rows = np.asarray(candidates, dtype=np.int64)
    labels = np.asarray([task.label_row(refs[i].meta.get("labels", {})) for i in rows],
                        dtype=np.uint8).reshape(len(rows), len(task.classes))
    if task.split_rule == "ptbxl-folds":
        splits = np.asarray([_fold_split(refs[i].meta.get("strat_fold")) for i in rows])
        rule = "PTB-XL strat_fold: 1-8 train, 9 val, 10 test"
    else:
        splits, rule = _subject_splits([refs[i] for i in rows], config)
    keep = splits != ""
    left_out["no_fold"] = int((~keep).sum())
    if task.drop_unlabelled:
        left_out["no_label_of_task"] = int((keep & (labels.sum(axis=1) == 0)).sum())
        keep &= labels.sum(axis=1) > 0
    rows, labels, splits = rows[keep], labels[keep], splits[keep]
    return TaskData(task, rows, labels, splits, rule, {k: v for k, v in left_out.items() if v})


def _subject_splits(refs: list[SampleRef], config: DataConfig) -> tuple[np.ndarray, str]:
    """Splits by subject. When the shard set has its own subject split (train and val shards),
    it is kept: its val subjects are the test split, its train subjects are split (seeded)
    into train and val; otherwise one seeded split of every subject."""
    subjects = [str(r.meta.get("subject", r.key)) for r in refs]
    own = np.asarray([r.split for r in refs])
    if (own == "val").any() and (own == "train").any():
        splits = np.full(len(refs), "test", dtype=object)
        train = np.flatnonzero(own == "train")
        fraction = config.val_fraction / max(1e-9, 1 - config.test_fraction)
        train_subjects = [subjects[i] for i in train]
        inner = (seeded_split(train_subjects, config.seed, 0.0, min(fraction, 0.5))
                 if config.val_fraction > 0 and len(set(train_subjects)) > 2
                 else np.full(len(train), "train"))
        splits[train] = np.where(inner == "test", "val", "train")
        return splits.astype(str), (
            "the shard set's own subject split: its val shards are the test split, its train "
            f"shards' subjects are split into train/val (seed {config.seed}, val share "
            f"{min(fraction, 0.5):.3g})")
    splits = seeded_split(subjects, config.seed, config.val_fraction, config.test_fraction)
    return splits, (f"seeded subject split (seed {config.seed}, val {config.val_fraction}, "
                    f"test {config.test_fraction})")


def _fold_split(fold: Any) -> str:
    if fold is None:
        return ""
    fold = int(fold)
    return "test" if fold == 10 else "val" if fold == 9 else "train" if 1 <= fold <= 8 else ""


def seeded_split(subjects: list[str], seed: int, val_fraction: float, test_fraction: float
                 ) -> np.ndarray:
    """``train``/``val``/``test`` per sample from a seeded permutation of the unique subjects."""
    unique = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(unique))
    num_test = max(1, round(test_fraction * len(unique)))
    num_val = round(val_fraction * len(unique)) if val_fraction > 0 else 0
    if len(unique) > 2 and val_fraction > 0:
        num_val = max(1, num_val)
    assigned = {}
    for position, subject_index in enumerate(order):
        assigned[unique[subject_index]] = ("test" if position < num_test else
                                           "val" if position < num_test + num_val else "train")
    return np.asarray([assigned[s] for s in subjects])


def _from_split_csvs(task: Task, refs: list[SampleRef], candidates: list[int], config: DataConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], str]:
    """Rows, labels and splits from the published split files (every window of a record)."""
    by_name: dict[str, list[int]] = {}
    for i in candidates:
        by_name.setdefault(record_name(refs[i].meta.get("record_id", refs[i].key)), []).append(i)
    frames = read_split_files(config.split_csvs, task, config.record_column, set(by_name))
    rows, labels, splits = [], [], []
    counts = {"split_csv_rows_without_sample": 0, "split_csv_repeated_rows": 0}
    for split, frame in frames.items():
        counts["split_csv_repeated_rows"] += frame.attrs.get("repeated_rows", 0)
        for record, row in zip(frame["record"], frame[task.class_names].to_numpy()):
            indices = by_name.get(record)
            if indices is None:
                counts["split_csv_rows_without_sample"] += 1
                continue
            rows.extend(indices)
            labels.extend([row] * len(indices))
            splits.extend([split] * len(indices))
    if not rows:
        raise ValueError(f"--split-csv: no record of {sorted(config.split_csvs.values())} is in "
                         f"--data {config.data!r} (records are matched by id or file name)")
    rule = "split CSV: " + ", ".join(
        f"{s}={os.path.basename(p)} (records by column {frames[s].attrs['record_column']!r})"
        for s, p in sorted(config.split_csvs.items()))
    return (np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.uint8),
            np.asarray(splits), counts, rule)
