"""The shard format: deterministic tar files of (ecg.npy, json, txt) samples.

Each sample ``KEY`` is three consecutive tar members, in this order:

- ``KEY.ecg.npy``: int16 array (12, T), canonical lead order, physical mV = value / gain;
- ``KEY.json``: metadata (source, record_id, subject, fs, gain, leads, sentences, labels, flags);
- ``KEY.txt``: the clean report, UTF-8.

Tar headers carry no time, owner or host, so the same samples give the same bytes (and sha256)
on any machine and with any number of build workers. A shard is written to ``NAME.tmp`` and
renamed to ``NAME`` only once complete and synced: a name without ``.tmp`` is always whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from typing import Any, Iterable, Iterator

import numpy as np

from melp_scale.shard.record import Sample

MEMBERS = ("ecg.npy", "json", "txt")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def make_key(source: str, record_id: str) -> str:
    """``<source>_<record_id>`` with every character WebDataset would misread replaced by '-'.

    When that replacement changes the id, ``-`` and the first 8 hex digits of the id's sha256
    are appended, so two ids that differ only in such characters (``a/b``, ``a.b``) never share
    a key.
    """
    raw = f"{source}_{record_id}"
    key = _KEY_UNSAFE.sub("-", raw)
    if key != raw:
        key += "-" + hashlib.sha256(record_id.encode()).hexdigest()[:8]
    return key


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str, samples: Iterable[Sample]) -> dict[str, Any]:
    """Write ``samples`` to the tar ``path`` atomically; return its manifest entry."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: never two writers of one temporary file
    count = 0
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                assert "." not in sample.key, sample.key
                assert sample.ecg.dtype == np.int16 and sample.ecg.ndim == 2, sample.key
                _add_member(tar, f"{sample.key}.ecg.npy", encode_npy(sample.ecg))
                _add_member(tar, f"{sample.key}.json", encode_json(sample.meta))
                _add_member(tar, f"{sample.key}.txt", sample.report.encode())
                count += 1
        raw.flush()
        os.fsync(raw.fileno())
    entry = {"name": os.path.basename(path), "num_samples": count,
             "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp)}
    os.replace(tmp, path)
    return entry


def iter_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {member: bytes})`` per sample of a shard, in file order.

    Raises ``ValueError`` naming the shard and key when a sample lacks a member.
    """
    current: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, member = info.name.partition(".")
            if key != current:
                if current is not None:
                    yield current, _complete(path, current, members)
                current, members = key, {}
            handle = tar.extractfile(info)
            assert handle is not None
            members[member] = handle.read()
    if current is not None:
        yield current, _complete(path, current, members)


def _complete(path: str, key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise ValueError(f"{path}: sample {key!r} lacks member(s) {', '.join(missing)}")
    return members


def decode_sample(members: dict[str, bytes]) -> tuple[np.ndarray, dict[str, Any], str]:
    """Decode one sample's members to ``(ecg int16 (12, T), meta, report)``."""
    return (decode_npy(members["ecg.npy"]), json.loads(members["json"]),
            members["txt"].decode("utf-8"))


def check_sample(shard: str, key: str, ecg: np.ndarray, meta: Any,
                 num_samples: int | None = None) -> None:
    """ValueError naming the sample unless its json is an object with a positive finite gain,
    sentences a list of strings, as many leads as the array and (when known) the set's length."""
    def fail(reason: str) -> None:
        raise ValueError(f"shard {shard}: sample {key!r}: {reason}")

    if not isinstance(meta, dict):
        fail(f"json is a {type(meta).__name__}, not an object")
    gain = meta.get("gain")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain < float("inf"):
        fail(f"gain {gain!r} is not a positive finite number")
    sentences = meta.get("sentences")
    if sentences is not None and (not isinstance(sentences, list)
                                  or not all(isinstance(s, str) for s in sentences)):
        fail(f"sentences {sentences!r:.80} is not a list of strings")
    leads = meta.get("leads")
    if leads is not None and (not isinstance(leads, list) or len(leads) != ecg.shape[0]):
        fail(f"json lists {leads!r:.80} leads for an array of {ecg.shape[0]}")
    if num_samples is not None and ecg.shape[1] != num_samples:
        fail(f"ecg has {ecg.shape[1]} time steps, the shard set's are {num_samples}")


def expected_length(settings: dict[str, Any]) -> int | None:
    """Time steps of every sample of a set, from its manifest settings (None when unknown)."""
    if isinstance(settings.get("num_samples"), int):
        return settings["num_samples"]
    fs, seconds = settings.get("fs"), settings.get("seconds")
    if isinstance(fs, (int, float)) and isinstance(seconds, (int, float)):
        return int(round(fs * seconds))
    return None
