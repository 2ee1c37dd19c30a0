"""Records present in two shard sets: content hashes, ``dedupe``, and the exclusion list.

1. Hashes (at build time): each record's signal after lead mapping and resampling, before it is
   cut into windows, gets two 64-bit hashes (16 hex digits), stored in its samples' json
   ``flags`` and, per sample, in the manifest's shard entries (``samples``: key, record id,
   exact, near):
   - ``signal_hash``: sha256 of the whole signal as int32 at the shard gain (the shard's own
     resolution), with its length: the same record stored twice, under any name;
   - ``near_hash``: sha256 of the first window only (``--seconds``), averaged over 20 ms blocks
     and rounded to 0.1 mV: the same recording cut to another length, padded differently, or
     stored at another resolution or gain whose values round alike. Two copies that differ by
     noise or filtering hash apart: this is near-*exact*, not similarity search.
2. ``python -m melp_scale.shard dedupe A B ... --exclude-eval EVAL ...`` reads only manifests
   (local folders or URLs). A sample of A, B, ... is excluded when its hash (exact first, then
   near) belongs to an evaluation set (``eval-exact`` / ``eval-near``) or to another record
   seen earlier, in argument order and then manifest order (``exact`` / ``near``): the first
   copy stays. All windows of an excluded record go.
3. The exclusion list (JSON) names samples by shard set (a digest of the manifest's shard
   names and sha256), shard and index, so ``StreamConfig.exclude`` plans around them without
   reading a shard; their keys serve the text corpus (``corpus.exclude_file``).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np

EXCLUSIONS_FORMAT = "melp-scale-exclusions"
HASH_VERSION = "sha256-int32-gain/near-20ms-0.1mV-v1"  # recorded in the manifest's settings
NEAR_BLOCK_S = 0.02  # block averaged for the near hash
NEAR_STEP_MV = 0.1  # rounding step of the near hash


def signal_hashes(signal: np.ndarray, fs: int, gain: float, window: int) -> dict[str, str]:
    """``{"signal_hash", "near_hash"}`` of a (12, n) mV signal at ``fs`` (module docstring, 1)."""
    exact = hashlib.sha256(b"%d:" % signal.shape[1])
    exact.update(np.round(signal * gain).astype("<i4").tobytes())
    block = max(1, int(round(fs * NEAR_BLOCK_S)))
    first = signal[:, :window]
    usable = first.shape[1] // block * block
    means = first[:, :usable].reshape(first.shape[0], -1, block).mean(axis=2)  # (12, n / block)
    near = hashlib.sha256(np.round(means / NEAR_STEP_MV).astype("<i4").tobytes())
    return {"signal_hash": exact.hexdigest()[:16], "near_hash": near.hexdigest()[:16]}


def set_digest(manifest: dict[str, Any]) -> str:
    """A shard set's identity: its shards' names and sha256, whatever its location."""
    shards = sorted((e["name"], e["sha256"]) for e in manifest["shards"])
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SampleHash:
    shard: str
    index: int
    key: str
    record_id: str
    exact: str
    near: str


def manifest_samples(manifest: dict[str, Any], where: str) -> list[SampleHash]:
    """Every sample's hashes, in manifest order; ValueError for a set built without them."""
    samples = []
    for entry in manifest["shards"]:
        if "samples" not in entry:
            raise ValueError(f"{where}: shard {entry['name']} has no per-sample hashes "
                             "(built before melp-scale recorded them): rebuild the set")
        samples += [SampleHash(entry["name"], i, *row) for i, row in enumerate(entry["samples"])]
    return samples


def find_duplicates(sets: list[tuple[str, dict[str, Any]]],
                    eval_sets: Iterable[tuple[str, dict[str, Any]]] = ()) -> list[dict[str, Any]]:
    """The samples of ``sets`` (``(label, manifest)``) to exclude (module docstring, 2)."""
    # (kind, hash) -> (role, set label, record id, key) of the record that holds it first
    owners: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    for label, manifest in eval_sets:
        for s in manifest_samples(manifest, label):
            for kind, value in (("exact", s.exact), ("near", s.near)):
                owners.setdefault((kind, value), ("eval", label, s.record_id, s.key))
    excluded = []
    for label, manifest in sets:
        digest = set_digest(manifest)
        for s in manifest_samples(manifest, label):
            match = None
            for kind, value in (("exact", s.exact), ("near", s.near)):
                owner = owners.get((kind, value))
                if owner is not None and owner[1:3] != (label, s.record_id):  # not its own window
                    match = (kind, owner)
                    break
            if match is None:
                owners.setdefault(("exact", s.exact), ("train", label, s.record_id, s.key))
                owners.setdefault(("near", s.near), ("train", label, s.record_id, s.key))
                continue
            kind, (role, owner_label, _, owner_key) = match
            excluded.append({"set": digest, "spec": label, "shard": s.shard, "index": s.index,
                             "key": s.key, "record_id": s.record_id,
                             "reason": f"eval-{kind}" if role == "eval" else kind,
                             "duplicate_of": f"{owner_label}:{owner_key}"})
    return excluded


def duplicate_counts(entries: list[dict[str, Any]], where: str) -> dict[str, int]:
    """Samples of one set whose record duplicates an earlier record of it (the manifest's counts)."""
    found = find_duplicates([(where, {"shards": entries})])
    counts = collections.Counter(e["reason"] for e in found)
    return {"exact": counts["exact"], "near": counts["near"]}


def write_exclusions(path: str, sets: list[tuple[str, dict[str, Any]]],
                     eval_sets: list[tuple[str, dict[str, Any]]], excluded: list[dict[str, Any]]) -> dict:
    """Write the exclusion list; return its per-set counts."""
    reasons = ("exact", "near", "eval-exact", "eval-near")
    summary = []
    for label, manifest in sets:
        mine = [e for e in excluded if e["spec"] == label]
        summary.append({"spec": label, "digest": set_digest(manifest), "role": "train",
                        "samples": sum(e["num_samples"] for e in manifest["shards"]),
                        "excluded": {r: sum(e["reason"] == r for e in mine) for r in reasons}})
    summary += [{"spec": label, "digest": set_digest(m), "role": "eval",
                 "samples": sum(e["num_samples"] for e in m["shards"])} for label, m in eval_sets]
    payload = {"format": EXCLUSIONS_FORMAT, "version": 1, "hash": HASH_VERSION, "sets": summary,
               "excluded": excluded}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)
    return {"sets": summary}


def read_exclusions(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"exclusion list {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            payload = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not an exclusion list ({error})") from error
    if payload.get("format") != EXCLUSIONS_FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r}, expected {EXCLUSIONS_FORMAT!r}")
    return payload


def excluded_samples(path: str, manifest: dict[str, Any]) -> dict[str, list[int]]:
    """Shard name -> sample indices the list at ``path`` excludes from this manifest's set."""
    digest = set_digest(manifest)
    out: dict[str, list[int]] = collections.defaultdict(list)
    for entry in read_exclusions(path)["excluded"]:
        if entry["set"] == digest:
            out[entry["shard"]].append(int(entry["index"]))
    return dict(out)


def excluded_keys(path: str) -> set[str]:
    """Every excluded sample key (for the text corpus, which excludes by key in every set)."""
    return {entry["key"] for entry in read_exclusions(path)["excluded"]}


def run_dedupe(specs: list[str], eval_specs: list[str], out: str) -> str:
    """``python -m melp_scale.shard dedupe``: write the exclusion list, return a report."""
    from melp_scale.remote import read_manifest

    if not specs:
        raise ValueError("dedupe needs at least one shard set")
    sets = [(spec, read_manifest(spec)[0]) for spec in specs]
    eval_sets = [(spec, read_manifest(spec)[0]) for spec in eval_specs]
    excluded = find_duplicates(sets, eval_sets)
    summary = write_exclusions(out, sets, eval_sets, excluded)
    lines = [f"{'set':<40}{'samples':>9}{'exact':>7}{'near':>7}{'eval-ex':>9}{'eval-nr':>9}"]
    for row in summary["sets"]:
        if row["role"] == "train":
            counts = row["excluded"]
            lines.append(f"{row['spec'][-40:]:<40}{row['samples']:>9}{counts['exact']:>7}{counts['near']:>7}"
                         f"{counts['eval-exact']:>9}{counts['eval-near']:>9}")
    lines += [f"evaluation sets: {', '.join(eval_specs) or 'none'}",
              f"{len(excluded)} sample(s) excluded; list written to {out} "
              "(StreamConfig.exclude, corpus.exclude_file)"]
    lines += [f"  {e['spec']}:{e['key']} ({e['reason']} of {e['duplicate_of']})" for e in excluded[:10]]
    return "\n".join(lines)
