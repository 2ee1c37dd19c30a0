"""Dataset sources: each lists ``RecordRef``s for one corpus layout.

A source is a function ``list_records(root, options) -> Listing``; records it cannot use at
listing time (a CSV row with no report, ...) are returned as skips with a reason.

Nothing is read outside ``--root``: a listed header or signal file whose real path (symlinks
and ``..`` resolved) lies outside it is skipped as ``outside_root`` before it is opened.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from melp_scale.shard.record import RecordRef, SkipRecord


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Source-specific settings (each used by the sources that name it)."""

    reports: str | None = None  # wfdb-dir: CSV with columns record, report (optional subject)
    dx_mapping: tuple[str, ...] = ()  # challenge: CSV tables SNOMED code -> Dx name, Abbreviation
    ptbxl_rate: int = 500  # ptbxl: read records500 (500) or records100 (100)
    count: int = 192  # synthetic: number of records
    records_per_subject: int = 6  # synthetic: 10 s records cut from one 20 s simulation per subject
    seed: int = 0  # synthetic: simulation seed


@dataclasses.dataclass
class Listing:
    refs: list[RecordRef]
    skipped: list[tuple[str, str, str]]  # (record_id, reason, detail)


def _registry() -> dict[str, Callable[[str | None, SourceOptions], Listing]]:
    from melp_scale.shard.sources import challenge, code15, mimic, ptbxl, synthetic, wfdb_dir

    return {"mimic-iv-ecg": mimic.list_records, "ptbxl": ptbxl.list_records,
            "challenge": challenge.list_records, "wfdb-dir": wfdb_dir.list_records,
            "synthetic": synthetic.list_records, "code15": code15.list_records}


SOURCE_NAMES = ("mimic-iv-ecg", "ptbxl", "challenge", "wfdb-dir", "synthetic", "code15")
NEEDS_ROOT = {"mimic-iv-ecg", "ptbxl", "challenge", "wfdb-dir", "code15"}


def list_source(source: str, root: str | None, options: SourceOptions) -> Listing:
    """List ``source`` under ``root``; ``ValueError`` for an unknown source or a bad root."""
    if source not in SOURCE_NAMES:
        raise ValueError(f"unknown --source {source!r}; choose one of {', '.join(SOURCE_NAMES)}")
    if source in NEEDS_ROOT:
        if not root:
            raise ValueError(f"--source {source} needs --root DIR")
        if not os.path.isdir(root):
            raise ValueError(f"--root {root!r} is not a directory")
    return _registry()[source](root, options)


def find_headers(root: str) -> list[str]:
    """Every ``*.hea`` under ``root`` (not ``.hea.orig`` and the like), as sorted paths without extension."""
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, name[:-4]) for name in files if name.endswith(".hea")]
    return sorted(found)


def require_file(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ValueError(f"--root {root!r} has no {name}: is it the right dataset folder?")
    return path


def inside_root(root: str, path: str) -> bool:
    """Whether ``path`` resolves (symlinks and '..' followed) to ``root`` or below it."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def require_inside(root: str, path: str) -> None:
    """``SkipRecord("outside_root")`` unless ``path`` resolves inside ``root`` (checked before
    any read)."""
    if not inside_root(root, path):
        raise SkipRecord("outside_root", f"{path} resolves to {os.path.realpath(path)}, "
                         f"outside --root {root}")
