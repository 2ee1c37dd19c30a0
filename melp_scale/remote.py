"""Shards read as streams: URLs (object stores, HTTP, ``pipe:`` commands) and sample-level plans.

The local loader (``melp_scale.stream``) reads a shard folder with random access. This module
reads the same shards where only a sequential byte stream exists, with the same plan, so a
run gives the same batches from a bucket as from a folder:

1. Where: ``StreamConfig.shards`` names a folder (the local path), a base URL ending in ``/``,
   one URL or brace pattern (``https://host/demo/train-{000000..000009}.tar``), or a list of
   URLs. ``s3://``/``gs://`` URLs become ``pipe:aws s3 cp URL -`` / ``pipe:gsutil cat URL``;
   every URL is opened with webdataset's ``gopen`` (``pipe:``, ``http(s)://`` through curl).
   The manifest is ``manifest.json`` next to the shards (the shard's file name in the URL,
   ``pipe:`` commands included, replaced by ``manifest.json``): a remote set still needs it,
   because the plan is made from its per-shard sample counts before a byte is read.
2. The plan: one epoch is a flat list of ``(shard, index)`` pairs (the shards in the epoch's
   order, each shard's samples in file order, minus samples an exclusion list removes,
   ``melp_scale.shard.dedupe``); ``stream.rank_plan`` over that list's length gives every rank
   its slots, windows and repeats exactly as for a folder. With nothing excluded the pairs are
   those of the folder's plan, batch for batch (tested).
3. Reading: a rank's slots are a contiguous run of the flat list, permuted within windows of
   ``shuffle_window`` (``batch_size`` without shuffle). Before its first batch in a window, a
   worker reads the pairs of that window that its own batches need, in flat order, through one
   sequential cursor per source; it keeps the raw members of those samples (about
   ``shuffle_window / num_workers`` samples) until the window is done, as a WebDataset shuffle
   buffer would. A cursor goes forward within a shard and reopens the shard to go back.
   Each worker streams the shards under its rank's windows itself: K workers download a rank's
   run K times (the price of batches that do not depend on K; the decode, transform and
   tokenize work is still split K ways).
4. Resume: batch k's windows are found from the plan; the cursor opens the shard holding the
   window's first pair and skips to it (re-reading that shard from its start).
5. Failures: a read that fails (a dropped connection, a command's or curl's nonzero exit
   status, checked when each archive ends, a truncated tar) is retried ``RETRIES`` times with
   exponential backoff from ``BACKOFF_S``, re-opening the URL and skipping to the sample; then
   ``OSError`` names the URL, the sample and the last error. (curl itself also retries
   timeouts and HTTP 5xx answers, up to 30 times 2 s, before it reports a failure.)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tarfile
import time
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from melp_scale.stream import (MANIFEST_FORMAT, ShardReader, ShardSet, ShardStream, decode_members,
                               epoch_order, load_shard_set, rank_plan)

log = logging.getLogger(__name__)

_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "file:")
_SHARD_NAME = re.compile(r"[^/\s]+\.tar")
RETRIES = 3  # attempts after the first failed read of a shard
BACKOFF_S = 0.5  # first retry delay; doubled each attempt


def is_url(spec: str) -> bool:
    return spec.startswith(_SCHEMES)


def to_gopen_url(url: str) -> str:
    """The URL webdataset's ``gopen`` can open: object-store URLs become CLI pipes."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {url} -"
    if url.startswith("gs://"):
        return f"pipe:gsutil cat {url}"
    return url


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """A URL, brace pattern or list of them -> the URLs, in the order given."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for item in specs for url in braceexpand(item)]


def manifest_url(url: str) -> str:
    """``manifest.json`` beside the shard ``url`` names (or inside the base URL ``.../``)."""
    if url.endswith("/"):
        return url + "manifest.json"
    names = _SHARD_NAME.findall(url)
    if not names:
        raise ValueError(f"StreamConfig.shards: {url!r} names no .tar shard and is no base URL ending in '/'")
    # every mention of the shard (a pipe: command may name it twice), not other .tar names
    return _SHARD_NAME.sub(lambda m: "manifest.json" if m[0] == names[-1] else m[0], url)


def shard_name(url: str) -> str:
    matches = _SHARD_NAME.findall(url)
    if not matches:
        raise ValueError(f"StreamConfig.shards: {url!r} names no .tar shard")
    return matches[-1]


def _close(stream: Any) -> None:
    """Close a gopen stream we may have left mid-way (a pipe's child is killed first). A
    failure it reports now either was already raised by a read or concerns bytes we no
    longer want: reads, not closes, decide whether a shard was read whole."""
    process = getattr(stream, "proc", None)
    if process is not None and process.poll() is None:
        process.kill()
    try:
        stream.close()
    except OSError:
        pass


def read_url(url: str) -> bytes:
    """The whole content at ``url`` (a manifest), with retries; ``OSError`` names the URL."""
    from webdataset.gopen import gopen

    error: Exception | None = None
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            stream = gopen(to_gopen_url(url), "rb")
            try:
                data = stream.read()
            finally:
                stream.close()  # raises for a pipe / curl that failed
            if data:
                return data
            error = OSError("empty response")
        except (OSError, ValueError) as failure:
            error = failure
    raise OSError(f"cannot read {url} after {RETRIES + 1} attempts: {error}")


def read_manifest(spec: str) -> tuple[dict[str, Any], str]:
    """The manifest of a shard folder or of the shards a URL names, and where it was read."""
    if not is_url(spec):
        path = os.path.join(spec, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no shard manifest at {path}")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle), path
    url = manifest_url(expand_urls(spec)[0])
    try:
        return json.loads(read_url(url)), url
    except ValueError as error:  # not JSON, or not text
        raise ValueError(f"{url}: not a JSON manifest ({error})") from error


# ----------------------------------------------------------------------------- shard sets


@dataclasses.dataclass(frozen=True)
class PlannedShardSet(ShardSet):
    """A shard set read through a sample-level plan: shards by location (URL or path), each
    with the sample indices it contributes (``None``: all)."""

    locations: tuple[str, ...] = ()  # per shard: a URL or a local file path
    kept: tuple[tuple[int, ...] | None, ...] = ()  # per shard: indices in the plan (None: all)
    source_of: tuple[int, ...] = ()  # per shard: the source it belongs to (mixing; else 0)
    source_names: tuple[str, ...] = ("shards",)  # per source: a name for logs and counts

    @property
    def num_samples(self) -> int:
        return sum(self.sizes[i] if k is None else len(k) for i, k in enumerate(self.kept))

    @property
    def plan_id(self) -> str:
        """What a resume must find unchanged beyond the sample count: '' when the plan is the
        folder's (one source, nothing excluded: a run may move between folder and URLs)."""
        if len(self.source_names) == 1 and all(k is None for k in self.kept):
            return ""
        payload = [self.names, self.sizes, [None if k is None else list(k) for k in self.kept],
                   self.source_names, list(getattr(self, "weights", ()))]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def epoch_pairs(self, seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's flat list ``(shard, index)``: shards in ``stream.epoch_order``, samples
        in file order, excluded ones left out."""
        order = epoch_order(len(self.sizes), seed, epoch, shuffle)
        return _pairs(order, self.sizes, self.kept)

    def plan(self, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
             drop_last: bool, shuffle: bool, shuffle_window: int) -> "Plan":
        shard, index = self.epoch_pairs(seed, epoch, shuffle)
        return plan_over(shard, index, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         batch_size=batch_size, drop_last=drop_last, shuffle=shuffle,
                         shuffle_window=shuffle_window)


def _pairs(order: np.ndarray, sizes: Sequence[int], kept: Sequence[tuple[int, ...] | None]
           ) -> tuple[np.ndarray, np.ndarray]:
    shards, indices = [], []
    for shard in order.tolist():
        chosen = np.arange(sizes[shard]) if kept[shard] is None else np.asarray(kept[shard], np.int64)
        shards.append(np.full(len(chosen), shard, np.int64))
        indices.append(chosen.astype(np.int64))
    return np.concatenate(shards), np.concatenate(indices)


@dataclasses.dataclass
class Plan:
    """One rank's epoch in batch order: which sample fills each slot."""

    shard: np.ndarray  # (num_batches * B,) shard of each slot
    index: np.ndarray  # sample index within that shard
    is_repeat: np.ndarray  # epoch-padding repeat
    position: np.ndarray  # position in the epoch's flat list (the reading order)


def plan_over(shard: np.ndarray, index: np.ndarray, **plan_settings: Any) -> Plan:
    """``stream.rank_plan`` over a flat list of pairs: its slot, window and repeat logic applied
    to one virtual shard of ``len(shard)`` samples, then mapped back to the pairs."""
    _, position, is_repeat = rank_plan((len(shard),), **plan_settings)
    return Plan(shard[position], index[position], is_repeat, position)


def load_planned_set(spec: str | Sequence[str], split: str, exclude: dict[str, list[int]] | None = None,
                     manifest: dict[str, Any] | None = None, where: str = "") -> PlannedShardSet:
    """The split's shards of ``spec`` (a folder or URLs) as a :class:`PlannedShardSet`;
    ``exclude`` maps shard names to sample indices the plan leaves out."""
    if manifest is None:
        manifest, where = read_manifest(spec if isinstance(spec, str) else list(spec)[0])
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{where}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    entries = {e["name"]: e for e in manifest["shards"]
               if e.get("split") == split and e["num_samples"] > 0}
    if isinstance(spec, str) and not is_url(spec):  # a folder
        locations = {name: os.path.join(spec, name) for name in entries}
        for name, path in locations.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {name} listed in {where} is missing")
    elif isinstance(spec, str) and spec.endswith("/"):  # a base URL: every shard of the split
        locations = {name: spec + name for name in entries}
    else:
        locations = {}
        for url in expand_urls(spec):
            name = shard_name(url)
            if not any(e["name"] == name for e in manifest["shards"]):
                raise ValueError(f"StreamConfig.shards: {url} names shard {name}, which {where} "
                                 "does not list")
            if name in entries:
                locations[name] = url
    names = [e["name"] for e in manifest["shards"] if e["name"] in locations]  # manifest order
    if not names:
        raise ValueError(f"{where}: no non-empty shard of split {split!r} among StreamConfig.shards")
    exclude = exclude or {}
    kept = tuple(None if name not in exclude else
                 tuple(sorted(set(range(entries[name]["num_samples"])) - set(exclude[name])))
                 for name in names)
    base = spec if isinstance(spec, str) else where
    return PlannedShardSet(base, tuple(names), tuple(int(entries[n]["num_samples"]) for n in names),
                           manifest.get("settings", {}), locations=tuple(locations[n] for n in names),
                           kept=kept, source_of=(0,) * len(names))


# ----------------------------------------------------------------------------- reading


class ShardCursor:
    """Sequential reader of one shard URL: ``read(index)`` for non-decreasing indices."""

    def __init__(self, url: str, name: str, expected: int):
        self.url, self.name, self.expected = url, name, expected
        self.next_index = 0
        self._stream: Any = None
        self._samples: Iterator[tuple[str, dict[str, bytes]]] | None = None

    def _open(self) -> None:
        from webdataset.gopen import gopen

        self.close()
        self._stream = gopen(to_gopen_url(self.url), "rb")
        self._samples = _tar_samples(tarfile.open(fileobj=self._stream, mode="r|"), self._finish)
        self.next_index = 0

    def _finish(self) -> None:
        """At the end of the archive: read the stream out and close it, so a pipe or curl that
        failed (a connection closed early looks like a short tar) raises here, not later."""
        stream, self._stream = self._stream, None
        while stream.read(1 << 16):
            pass
        stream.close()  # raises OSError for a nonzero exit status

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        """The raw members of sample ``index``; reopens (with backoff) after a failed read."""
        error: Exception | None = None
        for attempt in range(RETRIES + 1):
            try:
                if attempt:
                    time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                    log.warning("retrying %s (attempt %d of %d): %s", self.url, attempt + 1,
                                RETRIES + 1, error)
                if self._samples is None or self.next_index > index:
                    self._open()
                assert self._samples is not None
                while True:
                    sample = next(self._samples, None)
                    if sample is None:  # a short shard, or a connection closed between members
                        raise EOFError(f"the stream ends after {self.next_index} samples, the "
                                       f"manifest lists {self.expected}")
                    self.next_index += 1
                    if self.next_index - 1 == index:
                        return sample
            except (OSError, tarfile.TarError, EOFError) as failure:
                error = failure
                self.close()
        raise OSError(f"cannot read sample {index} of {self.url} after {RETRIES + 1} "
                      f"attempts: {error}")

    def close(self) -> None:
        if self._stream is not None:
            _close(self._stream)
        self._stream, self._samples = None, None


def _tar_samples(tar: tarfile.TarFile, on_end: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {member: bytes})`` of consecutive members sharing a key, from a streamed tar;
    ``on_end()`` runs when the archive ends, before its last sample is handed out."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        name, _, member = info.name.partition(".")
        if name != key and key is not None:
            yield key, members
            members = {}
        handle = tar.extractfile(info)
        assert handle is not None
        key, members[member] = name, handle.read()
    on_end()
    if key is not None:
        yield key, members


class _Buffered:
    """``ShardReader``'s ``read(index)`` over the samples a window prefetched."""

    def __init__(self, reads: "WindowReads", shard: int):
        self.reads, self.shard = reads, shard

    def read(self, index: int) -> tuple[str, np.ndarray, dict, str]:
        key, members = self.reads.buffer[(self.shard, index)]
        return decode_members(self.reads.shards.names[self.shard], key, members)


class WindowReads:
    """The samples a worker's batches need, read window by window (module docstring, step 3)."""

    def __init__(self, shards: PlannedShardSet, plan: Plan, batches: Sequence[int], batch_size: int,
                 window: int, max_open: int = 4):
        self.shards, self.plan, self.batch_size, self.window = shards, plan, batch_size, window
        self.mine = np.zeros(len(plan.shard), dtype=bool)  # rows of this worker's batches
        for b in batches:
            self.mine[b * batch_size:(b + 1) * batch_size] = True
        self.remote = np.array([is_url(loc) for loc in shards.locations], dtype=bool)
        self.buffer: dict[tuple[int, int], tuple[str, dict[str, bytes]]] = {}
        self.last_window: dict[tuple[int, int], int] = {}  # a pair's last loaded window (repeats)
        self.loaded: set[int] = set()
        self.cursors: dict[int, ShardCursor] = {}  # source -> its open cursor
        self.local: OrderedDict[int, ShardReader] = OrderedDict()
        self.max_open = max_open

    def prepare(self, b: int) -> None:
        """Load the windows batch ``b`` draws from (and drop the ones before them)."""
        first, last = b * self.batch_size // self.window, ((b + 1) * self.batch_size - 1) // self.window
        if any(window < first for window in self.loaded):
            self.loaded = {window for window in self.loaded if window >= first}
            for pair in [p for p, window in self.last_window.items() if window < first]:
                del self.buffer[pair], self.last_window[pair]
        for window in range(first, last + 1):
            if window not in self.loaded:
                self._load(window)
                self.loaded.add(window)

    def _load(self, window: int) -> None:
        rows = np.arange(window * self.window, min((window + 1) * self.window, len(self.plan.shard)))
        rows = rows[self.mine[rows] & self.remote[self.plan.shard[rows]]]
        rows = rows[np.argsort(self.plan.position[rows], kind="stable")]  # the reading order
        for shard, index in zip(self.plan.shard[rows].tolist(), self.plan.index[rows].tolist()):
            self.last_window[(shard, index)] = window
            if (shard, index) in self.buffer:  # a repeat of a sample an earlier window holds
                continue
            source = self.shards.source_of[shard]
            cursor = self.cursors.get(source)
            if cursor is None or cursor.url != self.shards.locations[shard]:
                if cursor is not None:
                    cursor.close()
                cursor = self.cursors[source] = ShardCursor(
                    self.shards.locations[shard], self.shards.names[shard], self.shards.sizes[shard])
            self.buffer[(shard, index)] = cursor.read(index)

    def reader(self, shard: int) -> Any:
        if self.remote[shard]:
            return _Buffered(self, shard)
        if shard in self.local:
            self.local.move_to_end(shard)
            return self.local[shard]
        self.local[shard] = ShardReader(self.shards.locations[shard], self.shards.names[shard],
                                        self.shards.sizes[shard])
        if len(self.local) > self.max_open:
            self.local.popitem(last=False)[1].close()
        return self.local[shard]

    def close(self) -> None:
        for cursor in self.cursors.values():
            cursor.close()
        for reader in self.local.values():
            reader.close()


class PlannedShardStream(ShardStream):
    """:class:`stream.ShardStream` over a :class:`PlannedShardSet`: the same batches, read
    through :class:`WindowReads`; each batch also carries ``source_index`` (B,) int64."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        c, shards = self.config, self.shards
        assert isinstance(shards, PlannedShardSet)
        plan = shards.plan(seed=c.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                           batch_size=c.batch_size, drop_last=c.drop_last, shuffle=c.shuffle,
                           shuffle_window=c.shuffle_window)
        num_batches = len(plan.shard) // c.batch_size
        batches = range(self.start_batch + worker, num_batches, num_workers)
        reads = WindowReads(shards, plan, batches, c.batch_size,
                            c.shuffle_window if c.shuffle else c.batch_size, self.max_open)
        source_of = np.asarray(shards.source_of, dtype=np.int64)
        try:
            for b in batches:
                reads.prepare(b)
                rows = slice(b * c.batch_size, (b + 1) * c.batch_size)
                batch = self._batch(b, plan.shard[rows], plan.index[rows], plan.is_repeat[rows], reads)
                batch["source_index"] = torch.from_numpy(source_of[plan.shard[rows]])  # (B,)
                yield batch
        finally:
            reads.close()

    def _reader(self, shard: int, readers: Any) -> Any:
        return readers.reader(shard)


PlannedShardSet.stream_class = PlannedShardStream  # what StreamLoader iterates for such a set


def open_shard_set(config: Any, rank: int, world_size: int) -> ShardSet:
    """The shard set a ``StreamConfig`` names: a folder as ``stream.load_shard_set`` reads it,
    URLs, a weighted mix of sets (``melp_scale.mixing``), each less its excluded samples."""
    if config.sources:
        from melp_scale.mixing import load_mixed_set

        return load_mixed_set(config.sources, config.split, config.exclude,
                              weighted=config.split == "train", verify=config.verify, rank=rank,
                              world_size=world_size)
    spec = config.shards if config.shards is not None else config.shard_dir
    if isinstance(spec, str) and not is_url(spec) and not config.exclude:
        return load_shard_set(spec, config.split, config.verify, rank, world_size)
    return load_set(spec, config.split, config.exclude, config.verify, rank, world_size)


def load_set(spec: str | Sequence[str], split: str, exclude_path: str | None, verify: bool = False,
             rank: int = 0, world_size: int = 1) -> PlannedShardSet:
    """One shard set (folder or URLs) as a :class:`PlannedShardSet`, less the samples the
    exclusion list ``exclude_path`` names for it. A folder gets ``stream.load_shard_set``'s
    checks (files, sizes, and sha256 with ``verify``); URLs cannot be verified at start."""
    from melp_scale.shard.dedupe import excluded_samples

    if isinstance(spec, str) and not is_url(spec):
        load_shard_set(spec, split, verify, rank, world_size)
    elif verify:
        raise ValueError("StreamConfig.verify hashes whole shards: run `python -m melp_scale.shard "
                         "verify` on the store's copy instead of verifying remote shards at start")
    manifest, where = read_manifest(spec if isinstance(spec, str) else list(spec)[0])
    exclude = excluded_samples(exclude_path, manifest) if exclude_path else None
    return load_planned_set(spec, split, exclude, manifest, where)
