"""``verify`` (checksums, decoding, counts against the manifest) and ``inspect`` (summary table)."""
from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from melp_scale.shard.format import decode_sample, iter_shard, sha256_file
from melp_scale.shard.record import LEADS

REQUIRED_META = ("source", "record_id", "subject", "fs", "gain", "leads", "sentences", "labels",
                 "flags")


def read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} has no manifest.json: not a finished shard set "
                         f"(build it with `python -m melp_scale.shard build`)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _check_sample(shard: str, key: str, members: dict[str, bytes], num_samples: int) -> list[str]:
    try:
        ecg, meta, _ = decode_sample(members)
    except Exception as error:  # any decoding failure is a fault to report, not to raise
        return [f"{shard}: sample {key!r} does not decode: {error}"]
    faults = []
    if ecg.dtype != np.int16 or ecg.shape != (len(LEADS), num_samples):
        faults.append(f"{shard}: sample {key!r} has ecg {ecg.dtype} {ecg.shape}, "
                      f"expected int16 {(len(LEADS), num_samples)}")
    missing = [name for name in REQUIRED_META if name not in meta]
    if missing:
        faults.append(f"{shard}: sample {key!r} json lacks {', '.join(missing)}")
    return faults


def verify(folder: str) -> list[str]:
    """Every fault found in the shard set at ``folder`` (empty when all is well)."""
    manifest = read_manifest(folder)
    num_samples = manifest["settings"]["num_samples"]
    faults = []
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard"):
        path = os.path.join(folder, entry["name"])
        if not os.path.isfile(path):
            faults.append(f"{entry['name']}: missing")
            continue
        if os.path.getsize(path) != entry["bytes"]:
            faults.append(f"{entry['name']}: {os.path.getsize(path)} bytes, manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            faults.append(f"{entry['name']}: sha256 differs from the manifest")
        count = 0
        try:
            for key, members in iter_shard(path):
                count += 1
                faults += _check_sample(entry["name"], key, members, num_samples)
        except Exception as error:  # a truncated tar or a missing member
            faults.append(f"{entry['name']}: unreadable after {count} samples: {error}")
            continue
        if count != entry["num_samples"]:
            faults.append(f"{entry['name']}: {count} samples, manifest says {entry['num_samples']}")
    leftovers = sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))
    faults += [f"{name}: incomplete file left by an interrupted build" for name in leftovers]
    return faults


def summary(folder: str) -> str:
    """A one-screen table of a shard set."""
    manifest = read_manifest(folder)
    rows = collections.defaultdict(lambda: [0, 0, 0])
    for entry in manifest["shards"]:
        row = rows[entry["split"]]
        row[0] += 1
        row[1] += entry["num_samples"]
        row[2] += entry["bytes"]
    settings, counts = manifest["settings"], manifest["counts"]
    signal = settings["signal"]
    lines = [f"{folder}: {manifest['builder']}, source {settings['source']}",
             f"signal: {signal['fs']} Hz x {signal['seconds']} s ({settings['num_samples']} samples), "
             f"int16 at {signal['gain']}/mV, min words {settings['min_words']}",
             f"split: {manifest['split']['rule']}, val fraction {manifest['split']['val_fraction']}, "
             f"seed {manifest['split']['seed']}, subjects {manifest['split']['num_subjects']}",
             "", f"{'split':<8}{'shards':>8}{'samples':>10}{'MB':>10}"]
    for split, (num_shards, num, size) in sorted(rows.items()):
        lines.append(f"{split:<8}{num_shards:>8}{num:>10}{size / 1e6:>10.1f}")
    lines += ["", f"records listed {counts['listed']}, kept {counts['kept_records']}, "
              f"skipped {sum(counts['skipped'].values())}"]
    lines += [f"  {reason:<20}{num:>8}" for reason, num in counts["skipped"].items()]
    return "\n".join(lines)


def find_sample(folder: str, key: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """Decode the sample ``key`` from whichever shard holds it."""
    manifest = read_manifest(folder)
    for entry in manifest["shards"]:
        for found, members in iter_shard(os.path.join(folder, entry["name"])):
            if found == key:
                return decode_sample(members)
    raise ValueError(f"no sample with key {key!r} in {folder!r}")
