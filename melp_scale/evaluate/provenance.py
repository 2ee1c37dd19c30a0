"""What a checkpoint was pretrained on, and whether an evaluation would score those rows.

The pretraining export (``runs/<name>/export``) holds ``training_data.json``, written by
:func:`write_training_data` when the trainer exports:

- per shard set: its folder's name, the sha256 of its ``manifest.json``, the sha256 of every
  shard of each split, the manifest's split rule (by subject, val share, seed) and counts;
- the subjects (patients) of each split as salted, truncated sha256 keys of
  ``namespace:subject`` (the namespace is the source; for synthetic shards the source and
  the simulation seed) (16 hex digits; a per-file random salt, so no raw patient id is written
  and keys of two exports cannot be joined). This is not anonymisation: ids such as MIMIC's
  are enumerable; it only keeps them out of plain text.

Evaluation (:class:`PretrainingCheck`) compares the evaluated shard set with that record:
the same manifest or any shared shard file means the shard set itself was pretrained on; and
per scored split, how many subjects were in pretraining's train split (trained on) or val
split (only validated on). Subjects are compared within a source: the same patient under
two sources (a PTB-XL record copied into a Challenge tree as ``HR*``) is not detected.
A checkpoint without ``training_data.json`` (saved by hand, or before this record existed)
is reported as ``unknown``, never as clean.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sys
from typing import Any

from tqdm import tqdm

from melp_scale.shard.format import sha256_file

FILE_NAME = "training_data.json"
FORMAT = "melp-scale-training-data"
KEY_HEX = 16  # hex digits kept of each subject's sha256
_SUBJECTS: dict[tuple[str, str], dict[str, set[tuple[str, str]]]] = {}  # (folder, manifest sha256)


def subject_key(salt: str, source: Any, subject: Any) -> str:
    """The salted, truncated sha256 of ``source:subject``."""
    text = f"{salt}:{source}:{subject}".encode("utf-8")
    return hashlib.sha256(text).hexdigest()[:KEY_HEX]


def subject_namespace(settings: dict[str, Any]) -> str:
    """What a subject id is unique within: the source; for synthetic shards the source and
    the simulation seed (every seed numbers its simulated people from 00000)."""
    source = str(settings.get("source"))
    if source == "synthetic":
        return f"synthetic-seed{settings.get('source_options', {}).get('seed')}"
    return source


def _manifest(directory: str) -> tuple[dict[str, Any], str]:
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard manifest at {path}")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    return manifest, sha256_file(path)


def shard_subjects(directory: str, manifest: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """``(namespace, subject)`` pairs of each split, read from the samples' json members."""
    from melp_scale.stream import ShardReader

    namespace = subject_namespace(manifest.get("settings", {}))
    out: dict[str, set[tuple[str, str]]] = {}
    entries = [e for e in manifest["shards"] if e.get("num_samples", 0) > 0]
    for entry in tqdm(entries, desc=f"subjects of {os.path.basename(os.path.abspath(directory))}",
                      unit="shard", file=sys.stderr, disable=len(entries) < 8):
        reader = ShardReader(os.path.join(directory, entry["name"]), entry["name"],
                             int(entry["num_samples"]))
        try:
            for key, members in reader.samples:
                offset, size = members["json"]
                meta = json.loads(os.pread(reader.fd, size, offset))
                subject = meta.get("subject", meta.get("record_id", key))
                out.setdefault(entry["split"], set()).add((namespace, str(subject)))
        finally:
            reader.close()
    return out


def shard_set_record(directory: str, salt: str) -> dict[str, Any]:
    """One shard set's entry of ``training_data.json``."""
    manifest, digest = _manifest(directory)
    cache_key = (os.path.abspath(directory), digest)  # export-best re-exports: read shards once
    if cache_key not in _SUBJECTS:
        _SUBJECTS[cache_key] = shard_subjects(directory, manifest)
    subjects = _SUBJECTS[cache_key]
    shards: dict[str, list[str]] = {}
    for entry in manifest["shards"]:
        shards.setdefault(entry["split"], []).append(entry["sha256"])
    return {"name": os.path.basename(os.path.abspath(directory)), "manifest_sha256": digest,
            "split_rule": manifest.get("split", {}), "counts": manifest.get("counts", {}).get("samples", {}),
            "shard_sha256": shards,
            "subjects": {split: sorted(subject_key(salt, *pair) for pair in pairs)
                         for split, pairs in sorted(subjects.items())}}


def write_training_data(export_dir: str, shard_dirs: list[str], trained_splits: tuple[str, ...] = ("train",),
                        streamed: list[str] = ()) -> str:
    """Write ``export_dir/training_data.json`` for a model pretrained on ``trained_splits`` of
    ``shard_dirs`` (other splits: validation only); ``streamed``: shard sets read from URLs,
    named only (no local manifest to hash), which makes the record partial. Returns its path."""
    salt = secrets.token_hex(8)
    payload = {"format": FORMAT, "version": 1, "trained_splits": list(trained_splits),
               "subject_key": {"algorithm": "sha256(salt:namespace:subject)", "hex_digits": KEY_HEX,
                               "salt": salt},
               "shard_sets": [shard_set_record(d, salt) for d in shard_dirs],
               "unrecorded_shard_sets": [str(s).rstrip("/").rsplit("/", 1)[-1] for s in streamed]}
    os.makedirs(export_dir, exist_ok=True)
    path = os.path.join(export_dir, FILE_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)
    return path


def read_training_data(checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's ``training_data.json`` (None when it has none)."""
    path = os.path.join(checkpoint, FILE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r}, expected {FORMAT!r}")
    return payload


@dataclasses.dataclass
class PretrainingCheck:
    """The evaluated shard set against the checkpoint's pretraining record."""

    known: bool  # the checkpoint has training_data.json
    shard_sets: list[str]  # names of the pretraining shard sets
    same_shard_set: list[str]  # pretraining shard sets that share the manifest or a shard file
    unrecorded: list[str] = dataclasses.field(default_factory=list)  # streamed sets, not hashed
    salt: str = ""
    namespace: str = ""  # subject namespace of the evaluated shard set (subject_namespace)
    trained: frozenset = frozenset()  # subject keys of the trained-on splits
    validated: frozenset = frozenset()  # subject keys of the other (validation) splits

    @classmethod
    def of(cls, checkpoint: str, data_dir: str) -> "PretrainingCheck":
        record = read_training_data(checkpoint)
        if record is None:
            return cls(False, [], [])
        manifest, digest = _manifest(data_dir)
        shard_digests = {e["sha256"] for e in manifest["shards"]}
        trained_splits = set(record.get("trained_splits", ["train"]))
        same, trained, validated = [], set(), set()
        for entry in record["shard_sets"]:
            shared = shard_digests & {d for ds in entry["shard_sha256"].values() for d in ds}
            if entry["manifest_sha256"] == digest or shared:
                same.append(entry["name"])
            for split, keys in entry["subjects"].items():
                (trained if split in trained_splits else validated).update(keys)
        return cls(True, [e["name"] for e in record["shard_sets"]], same,
                   list(record.get("unrecorded_shard_sets", [])), record["subject_key"]["salt"], subject_namespace(manifest.get("settings", {})),
                   frozenset(trained), frozenset(validated))

    def seen(self, metas: list[dict[str, Any]]) -> dict[str, Any]:
        """Subjects of the samples ``metas`` and how many were in pretraining."""
        subjects = {(self.namespace, str(m.get("subject", m.get("record_id")))) for m in metas}
        if not self.known:
            return {"num_subjects": len(subjects), "seen_in_pretraining": "unknown"}
        keys = {subject_key(self.salt, *pair) for pair in subjects}
        trained, validated = len(keys & self.trained), len(keys & self.validated - self.trained)
        out = {"num_subjects": len(subjects), "seen_in_pretraining": trained > 0,
               "subjects_trained_on": trained, "subjects_validated_on": validated}
        if self.unrecorded:  # a streamed shard set may hold them: not provably clean
            out["record_partial"] = f"not checked against {', '.join(self.unrecorded)}"
        return out

    def summary(self) -> dict[str, Any]:
        """The record's part of results.json."""
        if not self.known:
            return {"record": "unknown: the checkpoint has no training_data.json, so rows seen "
                              "in pretraining cannot be ruled out"}
        out = {"record": FILE_NAME, "pretraining_shard_sets": self.shard_sets,
               "evaluated_shard_set_was_pretrained_on": bool(self.same_shard_set),
               "num_pretraining_subjects": len(self.trained)}
        if self.unrecorded:
            out["unrecorded_shard_sets"] = self.unrecorded  # streamed from URLs: not hashed
        return out
