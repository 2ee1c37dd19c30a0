"""Build a shard set: list a source, split by subject, preprocess in workers, write shards.

Determinism: the plan (which record goes to which shard, in which order) depends only on the
listing, the split seed and the settings; each shard is built from its plan alone and written
with fixed tar headers, so the bytes do not depend on ``--workers``. Resume: every finished
shard leaves ``.build/<shard>.json`` (its manifest entry, skip counts and a fingerprint of its
plan); a re-run with the same arguments keeps shards whose file still matches that sha256 and
builds the rest. ``manifest.json`` is written last, atomically.

Ownership: ``--out`` must be new, empty or a shard set this builder wrote (files of any other
name are refused unless ``allow_foreign_out``), and one build at a time holds ``--out/.lock``
(an ``flock``, released by the kernel when its process dies, so a crashed build never leaves a
stale lock). Temporary files carry the writer's pid; leftovers of a crashed build are removed.
Sample keys are unique per build: two records whose ids map to one key stop the build.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from melp_scale import __version__
from melp_scale.shard.dedupe import HASH_VERSION, duplicate_counts
from melp_scale.shard.format import make_key, sha256_file, write_shard
from melp_scale.shard.preprocess import SignalConfig, preprocess_signal
from melp_scale.shard.record import LEADS, RecordRef, Sample, SkipRecord
from melp_scale.shard.sources import Listing, SourceOptions, list_source

FORMAT_NAME = "melp-scale-shards"
FORMAT_VERSION = 1
# Sources whose text is free-form pretraining text: MELP keeps reports of >= 4 words.
DEFAULT_MIN_WORDS = {"mimic-iv-ecg": 4, "ptbxl": 4, "synthetic": 4}
LOCK_NAME = ".lock"
# Everything a build writes into --out (temporaries: NAME.tmp or NAME.<pid>.tmp).
_OURS = re.compile(r"^(manifest\.json|\.build|\.lock|(train|val)-\d{6}\.tar)(\.\d+)?(\.tmp)?$")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """One shard build (``python -m melp_scale.shard build``)."""

    source: str  # dataset layout: mimic-iv-ecg, ptbxl, challenge, wfdb-dir, synthetic, code15
    out: str  # output folder (shards/NAME)
    root: str | None = None  # dataset folder (all sources but synthetic)
    val_fraction: float = 0.02  # share of subjects (patients) in the validation split
    seed: int = 0  # split (and synthetic simulation) seed
    exclude: str | None = None  # file of record ids (one per line) never to include
    shard_size: int = 1000  # records per shard (a shard may hold fewer after skips)
    workers: int = 1  # worker processes
    allow_foreign_out: bool = False  # build into an --out that holds files the builder did not write
    min_words: int | None = None  # drop reports with fewer words; None: the source's default
    signal: SignalConfig = dataclasses.field(default_factory=SignalConfig)
    options: SourceOptions = dataclasses.field(default_factory=SourceOptions)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("--shard-size and --workers must be at least 1")
        if self.exclude and not os.path.isfile(self.exclude):
            raise ValueError(f"--exclude {self.exclude!r} does not exist")

    @property
    def effective_min_words(self) -> int:
        return self.min_words if self.min_words is not None else DEFAULT_MIN_WORDS.get(self.source, 0)

    def settings(self) -> dict[str, Any]:
        """Everything that shapes the shards' content (recorded in the manifest)."""
        options = {k: v for k, v in dataclasses.asdict(self.options).items()
                   if k not in ("reports", "dx_mapping")}  # paths are machine-specific
        options["dx_mapping"] = [os.path.basename(p) for p in self.options.dx_mapping]
        return {"source": self.source, "signal": dataclasses.asdict(self.signal),
                "num_samples": self.signal.num_samples, "leads": list(LEADS),
                "min_words": self.effective_min_words, "shard_size": self.shard_size,
                "signal_hash": HASH_VERSION,
                "source_options": options}


@dataclasses.dataclass
class ShardPlan:
    name: str
    split: str
    refs: list[RecordRef]

    def fingerprint(self, settings: dict[str, Any]) -> str:
        payload = json.dumps([__version__, settings, self.name, [r.record_id for r in self.refs]],
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _filter(listing: Listing, config: BuildConfig) -> tuple[list[RecordRef], list[tuple]]:
    """Apply --exclude and the report word minimum; sort by record id."""
    excluded: set[str] = set()
    if config.exclude:
        with open(config.exclude, encoding="utf-8") as handle:
            excluded = {line.strip() for line in handle if line.strip()}
    skipped = list(listing.skipped)
    kept = []
    seen = set()
    for ref in sorted(listing.refs, key=lambda r: r.record_id):
        if ref.record_id in seen:
            skipped.append((ref.record_id, "duplicate_id", "listed twice"))
            continue
        seen.add(ref.record_id)
        if ref.record_id in excluded or make_key(config.source, ref.record_id) in excluded:
            skipped.append((ref.record_id, "excluded", "in --exclude"))
        elif ref.report is not None and len(ref.report.split()) < config.effective_min_words:
            skipped.append((ref.record_id, "short_report",
                            f"{len(ref.report.split())} words < {config.effective_min_words}"))
        else:
            kept.append(ref)
    _check_unique_keys(kept, config.source, config.signal.all_windows)
    return kept, skipped


def _check_unique_keys(refs: list[RecordRef], source: str, all_windows: bool) -> None:
    """ValueError naming both records when two would share a sample key (windows included)."""
    owners: dict[str, str] = {}
    for ref in refs:
        key = make_key(source, ref.record_id)
        if key in owners:
            raise ValueError(f"records {owners[key]!r} and {ref.record_id!r} both map to sample "
                             f"key {key!r}: rename one of them")
        owners[key] = ref.record_id
    for key, record_id in owners.items() if all_windows else ():
        stem, marker, number = key.rpartition("_w")
        if marker and number.isdigit() and stem in owners:
            raise ValueError(f"record {record_id!r} has the sample key {key!r} of window {number} "
                             f"of record {owners[stem]!r} (--all-windows): rename one of them")


def split_by_subject(refs: list[RecordRef], val_fraction: float, seed: int) -> dict[str, list]:
    """Patient-level split: a seeded permutation of the sorted subjects; val takes the first share.

    Records of one subject stay together and in record-id order (so a worker that simulates or
    caches per subject sees them in a row); the loader shuffles at training time.
    """
    by_subject: dict[str, list[RecordRef]] = collections.defaultdict(list)
    for ref in refs:
        by_subject[ref.subject].append(ref)
    subjects = sorted(by_subject)
    order = np.random.default_rng(seed).permutation(len(subjects))
    num_val = int(round(val_fraction * len(subjects)))
    if val_fraction > 0 and num_val == 0 and len(subjects) > 1:
        num_val = 1
    splits: dict[str, list[RecordRef]] = {"train": [], "val": []}
    for rank, index in enumerate(order):
        splits["val" if rank < num_val else "train"].extend(by_subject[subjects[index]])
    return splits


def make_plans(splits: dict[str, list[RecordRef]], shard_size: int) -> list[ShardPlan]:
    plans = []
    for split, refs in splits.items():
        for number, start in enumerate(range(0, len(refs), shard_size)):
            plans.append(ShardPlan(f"{split}-{number:06d}.tar", split, refs[start:start + shard_size]))
    return plans


def _samples(ref: RecordRef, config: BuildConfig) -> list[Sample]:
    """Load and preprocess one record (raises ``SkipRecord``)."""
    raw = ref.load()
    windows = preprocess_signal(raw, config.signal)
    samples = []
    for ecg, flags in windows:
        suffix = f"_w{flags['window']}" if len(windows) > 1 else ""
        meta = {"source": config.source, "record_id": ref.record_id, "subject": ref.subject,
                "fs": config.signal.fs, "gain": config.signal.gain, "leads": list(LEADS),
                "sentences": ref.sentences or [], "labels": ref.labels, "flags": flags,
                **ref.meta}
        samples.append(Sample(key=make_key(config.source, ref.record_id) + suffix, ecg=ecg,
                              meta=meta, report=ref.report or ""))
    return samples


def build_shard(plan: ShardPlan, config: BuildConfig, path: str) -> dict[str, Any]:
    """Build one shard file; return its manifest entry plus kept/skip statistics."""
    samples: list[Sample] = []
    skipped = []
    for ref in plan.refs:
        try:
            samples.extend(_samples(ref, config))
        except SkipRecord as skip:
            skipped.append((ref.record_id, skip.reason, skip.detail))
        except Exception as error:  # an unforeseen reader failure must not stop a 800k-record build
            skipped.append((ref.record_id, "error", f"{type(error).__name__}: {error}"))
    entry = write_shard(path, samples)
    entry["split"] = plan.split
    entry["samples"] = [[s.key, s.meta["record_id"], s.meta["flags"]["signal_hash"],
                         s.meta["flags"]["near_hash"]] for s in samples]  # melp_scale.shard.dedupe
    return {"entry": entry, "records": len(plan.refs), "kept_records": len(plan.refs) - len(skipped),
            "skipped": skipped}


def _build_one(args: tuple[ShardPlan, BuildConfig, str, str]) -> dict[str, Any]:
    plan, config, path, fingerprint = args
    result = build_shard(plan, config, path)
    result["fingerprint"] = fingerprint
    _write_json_atomic(_state_path(config.out, plan.name), result)
    return result


def _state_path(out: str, name: str) -> str:
    return os.path.join(out, ".build", name + ".json")


def _write_json_atomic(path: str, payload: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _finished(out: str, plan: ShardPlan, fingerprint: str) -> dict[str, Any] | None:
    """The saved result of a shard built earlier with the same plan, if its file still verifies."""
    try:
        with open(_state_path(out, plan.name), encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    path = os.path.join(out, plan.name)
    if result.get("fingerprint") != fingerprint or not os.path.exists(path):
        return None
    if sha256_file(path) != result["entry"]["sha256"]:
        return None
    return result


def _check_out(out: str, allow_foreign: bool) -> None:
    """ValueError when ``out`` holds files this builder did not write (unless allowed)."""
    if not os.path.isdir(out) or allow_foreign:
        return
    foreign = sorted(name for name in os.listdir(out) if not _OURS.match(name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"--out {out!r} holds files this builder did not write ({shown}): "
                         f"choose a new or empty folder, or pass --allow-foreign-out")


@contextlib.contextmanager
def _out_lock(out: str) -> Iterator[None]:
    """Hold ``out/.lock`` for the build; ValueError at once when another build holds it."""
    path = os.path.join(out, LOCK_NAME)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"--out {out!r} is being written by another build (pid {holder}, "
                             f"lock {path}): wait for it to finish or choose another --out") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        _remove_temporaries(out)
        yield
    finally:
        os.close(handle)


def _remove_temporaries(out: str) -> None:
    """Temporary files of builds that were killed (only the lock holder may call this)."""
    for folder in (out, os.path.join(out, ".build")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(folder, name))


def run_build(config: BuildConfig) -> dict[str, Any]:
    """Build (or finish) the shard set described by ``config``; return the manifest."""
    _check_out(config.out, config.allow_foreign_out)
    os.makedirs(os.path.join(config.out, ".build"), exist_ok=True)
    with _out_lock(config.out):
        return _build_locked(config)


def _build_locked(config: BuildConfig) -> dict[str, Any]:
    start = time.time()
    listing = list_source(config.source, config.root, config.options)
    refs, listing_skips = _filter(listing, config)
    if not refs:
        raise ValueError(f"--source {config.source} found no usable record under {config.root!r} "
                         f"({len(listing_skips)} skipped)")
    splits = split_by_subject(refs, config.val_fraction, config.seed)
    plans = make_plans(splits, config.shard_size)
    settings = config.settings()
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        fingerprint = plan.fingerprint(settings)
        done = _finished(config.out, plan, fingerprint)
        if done is not None:
            results[plan.name] = done
        else:
            todo.append((plan, config, os.path.join(config.out, plan.name), fingerprint))
    total = sum(len(p.refs) for p in plans)
    with tqdm(total=total, unit="rec", desc=f"build {os.path.basename(config.out)}",
              initial=sum(r["records"] for r in results.values()), file=sys.stderr) as bar:
        for result in _run(todo, config.workers):
            results[result["entry"]["name"]] = result
            bar.update(result["records"])
    manifest = _manifest(config, settings, plans, results, listing_skips, splits)
    _write_json_atomic(os.path.join(config.out, "manifest.json"), manifest)
    manifest_summary = dict(manifest, elapsed_s=time.time() - start,
                            reused_shards=len(plans) - len(todo))
    return manifest_summary


def _run(todo: list, workers: int):
    if workers == 1 or len(todo) <= 1:
        yield from map(_build_one, todo)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_build_one, item) for item in todo]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _manifest(config: BuildConfig, settings: dict, plans: list[ShardPlan], results: dict,
              listing_skips: list[tuple], splits: dict[str, list]) -> dict[str, Any]:
    skipped = sorted(listing_skips + [tuple(s) for r in results.values() for s in r["skipped"]])
    shards = [results[plan.name]["entry"] for plan in plans]
    samples = collections.Counter()
    for entry in shards:
        samples[entry["split"]] += entry["num_samples"]
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "builder": f"melp-scale {__version__}",
        "settings": settings,
        "split": {"rule": "by subject", "val_fraction": config.val_fraction, "seed": config.seed,
                  "num_subjects": {k: len({r.subject for r in v}) for k, v in splits.items()}},
        "shards": shards,
        "counts": {"listed": len(listing_skips) + sum(len(v) for v in splits.values()),
                   "kept_records": sum(r["kept_records"] for r in results.values()),
                   "samples": {"train": samples["train"], "val": samples["val"]},
                   "skipped": dict(sorted(collections.Counter(s[1] for s in skipped).items())),
                   "duplicate_signals": duplicate_counts(shards, config.out)},
        "skipped_records": [{"record_id": s[0], "reason": s[1], "detail": s[2]} for s in skipped],
    }
