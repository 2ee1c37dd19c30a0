"""The unit every source yields and every shard stores.

A source lists ``RecordRef``s cheaply (ids, subject, where the signal lives, report, labels)
in the main process; workers turn each into a preprocessed ``Sample`` or a skip reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

# Canonical 12-lead order of every shard; sources are mapped to it by lead name (MIMIC has aVF before aVL).
LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF",
                          "V1", "V2", "V3", "V4", "V5", "V6")


class SkipRecord(Exception):
    """A record that cannot become a sample; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class RawSignal:
    """A signal as read from disk, in physical units (mV), before preprocessing."""

    signal: np.ndarray  # (num_samples, num_leads) float64
    fs: float
    leads: list[str]


@dataclasses.dataclass
class RecordRef:
    """One record as listed by a source, before its signal is read.

    ``load`` runs in a worker process and must be picklable (a module-level function or
    a ``functools.partial`` of one) returning a :class:`RawSignal` or raising ``SkipRecord``.
    """

    record_id: str
    subject: str
    load: Callable[[], RawSignal]
    report: str | None = None  # None: the source has no text for this record
    sentences: list[str] | None = None  # pre-split sentences (MIMIC's report_k fields)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sample:
    """A preprocessed sample, exactly what one shard entry holds."""

    key: str  # "<source>_<record_id>", no dots
    ecg: np.ndarray  # (12, T) int16, canonical lead order, physical = ecg / gain (mV)
    meta: dict[str, Any]  # the sample's json member
    report: str  # the clean report ("" when the source has none)
