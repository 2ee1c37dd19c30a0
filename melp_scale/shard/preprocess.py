"""ECG and report preprocessing (as MELP does; README, "Building shards"), shared by every source.

Signal: leads mapped by name (case-insensitively) to the canonical order, quality checks
before anything mixes samples, polyphase anti-aliasing resampling to ``fs``, a fixed window,
then int16 at a fixed gain. Report: cleaned, split into sentences, filtered by word count.
"""
from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from melp_scale.shard.dedupe import signal_hashes
from melp_scale.shard.record import LEADS, RawSignal, SkipRecord

_LEAD_INDEX = {name.lower(): i for i, name in enumerate(LEADS)}
_INT16_MAX = np.iinfo(np.int16).max


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    """How raw signals become shard samples."""

    fs: int = 500  # target sampling rate (Hz)
    seconds: float = 10.0  # window length (s)
    all_windows: bool = False  # longer records: every non-overlapping window, not just the first
    gain: float = 500.0  # int16 units per mV in the shard (2 µV steps, ±65 mV range)
    on_short: str = "pad"  # records shorter than a window: "pad" (zeros at the end, flagged) or "skip"
    on_nan: str = "skip"  # NaN/Inf or invalid (-32768) samples: "skip" or "repair" (linear interpolation)
    on_missing_lead: str = "skip"  # a canonical lead absent: "skip" or "zero" (zero-filled, flagged)
    on_flat_lead: str = "skip"  # a lead with (almost) no variation: "skip" or "keep" (flagged)
    flat_threshold_mv: float = 0.005  # peak-to-peak below this (mV) makes a lead flat

    def __post_init__(self) -> None:
        choices = {"on_short": ("pad", "skip"), "on_nan": ("skip", "repair"),
                   "on_missing_lead": ("skip", "zero"), "on_flat_lead": ("skip", "keep")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not 25 <= self.fs <= 10_000:
            raise ValueError(f"--fs must be between 25 and 10000 Hz, got {self.fs}")
        for name in ("seconds", "gain"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"--{name} must be a positive finite number, got {getattr(self, name)}")

    @property
    def num_samples(self) -> int:
        return int(round(self.fs * self.seconds))


def map_leads(raw: RawSignal, on_missing: str) -> tuple[np.ndarray, list[str]]:
    """Reorder ``raw`` to the canonical 12 leads by name; return (12, n) float64 and missing names."""
    index: dict[int, int] = {}
    for column, name in enumerate(raw.leads):
        canonical = _LEAD_INDEX.get(name.strip().lower())
        if canonical is not None and canonical not in index:
            index[canonical] = column
    missing = [LEADS[i] for i in range(len(LEADS)) if i not in index]
    if missing and on_missing == "skip":
        raise SkipRecord("missing_lead", "absent: " + ",".join(missing))
    num = raw.signal.shape[0]
    out = np.zeros((len(LEADS), num), dtype=np.float64)
    for canonical, column in index.items():
        out[canonical] = raw.signal[:, column]
    return out, missing


def _repair_nan(signal: np.ndarray) -> int:
    """Linearly interpolate non-finite samples in place, lead by lead; return how many."""
    bad = ~np.isfinite(signal)
    count = int(bad.sum())
    for lead in np.flatnonzero(bad.any(axis=1)):
        good = ~bad[lead]
        if not good.any():
            raise SkipRecord("nan", f"lead {LEADS[lead]} has no finite sample")
        positions = np.arange(signal.shape[1])
        signal[lead, ~good] = np.interp(positions[~good], positions[good], signal[lead, good])
    return count


def resample(signal: np.ndarray, fs_in: float, fs_out: int) -> np.ndarray:
    """Polyphase resampling along the last axis (scipy's Kaiser-windowed anti-aliasing FIR)."""
    if math.isclose(fs_in, fs_out):
        return signal
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1)


def windows(signal: np.ndarray, config: SignalConfig) -> list[tuple[np.ndarray, int]]:
    """Cut ``signal`` (12, n) into windows; return ``[(window, pad_samples)]``."""
    size = config.num_samples
    num = signal.shape[1]
    if num < size:
        if config.on_short == "skip":
            raise SkipRecord("too_short", f"{num / config.fs:.2f} s < {config.seconds} s")
        padded = np.zeros((signal.shape[0], size), dtype=signal.dtype)
        padded[:, :num] = signal
        return [(padded, size - num)]
    count = num // size if config.all_windows else 1
    return [(signal[:, k * size:(k + 1) * size], 0) for k in range(count)]


def quality_flags(window: np.ndarray, pad: int, config: SignalConfig,
                  missing: list[str]) -> list[str]:
    """Names of flat leads in ``window`` (ignoring zero-filled missing leads and padding)."""
    valid = window[:, : window.shape[1] - pad]
    if not np.any(valid):
        raise SkipRecord("all_zero", "every sample is zero")
    ptp = np.ptp(valid, axis=1)
    return [LEADS[i] for i in range(len(LEADS))
            if ptp[i] < config.flat_threshold_mv and LEADS[i] not in missing]


def quantize(window: np.ndarray, gain: float) -> np.ndarray:
    scaled = np.round(window * gain)
    if np.abs(scaled).max() > _INT16_MAX:
        raise SkipRecord("out_of_range",
                         f"|signal| up to {np.abs(window).max():.1f} mV exceeds int16 at gain {gain}")
    return scaled.astype(np.int16)


def preprocess_signal(raw: RawSignal, config: SignalConfig) -> list[tuple[np.ndarray, dict]]:
    """Raw signal -> ``[(int16 (12, T), flags)]``, one per window; raises ``SkipRecord``."""
    if raw.signal.ndim != 2 or raw.signal.shape[0] == 0 or raw.signal.shape[1] != len(raw.leads):
        raise SkipRecord("bad_shape", f"signal {raw.signal.shape} for {len(raw.leads)} leads")
    if not raw.fs or raw.fs <= 0:
        raise SkipRecord("bad_header", f"sampling rate {raw.fs}")
    signal, missing = map_leads(raw, config.on_missing_lead)
    num_nonfinite = int((~np.isfinite(signal)).sum())
    if num_nonfinite:
        if config.on_nan == "skip":
            raise SkipRecord("nan", f"{num_nonfinite} NaN/Inf or invalid samples")
        _repair_nan(signal)
    signal = resample(signal, raw.fs, config.fs)
    hashes = signal_hashes(signal, config.fs, config.gain, config.num_samples)  # before windowing
    out = []
    pieces = windows(signal, config)
    for number, (window, pad) in enumerate(pieces):
        flat = quality_flags(window, pad, config, missing)
        if flat and config.on_flat_lead == "skip":
            raise SkipRecord("flat_lead", "flat: " + ",".join(flat))
        flags = {"window": number, "num_windows": len(pieces), "pad_samples": pad,
                 "padded": pad > 0, "missing_leads": missing, "flat_leads": flat,
                 "nan_repaired": num_nonfinite, "source_fs": float(raw.fs),
                 "source_samples": int(raw.signal.shape[0]), **hashes}
        out.append((quantize(window, config.gain), flags))
    return out


_ARTEFACTS = re.compile(r"\*\*\*|=-|=")
_EKG = re.compile(r"\bekg\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_sentence(text: str) -> str:
    """One statement cleaned: EKG -> ECG, ``***``/``=-``/``=`` removed, lowercased, no final period."""
    text = _EKG.sub("ECG", text)
    text = _ARTEFACTS.sub(" ", text).lower()
    return _SPACE.sub(" ", text).strip(" .;,")


def clean_report(fields: list[str]) -> tuple[str, list[str]]:
    """Report fields (one statement each) -> (report ending in '.', non-empty sentences)."""
    sentences = [s for s in (clean_sentence(f) for f in fields if f) if s]
    report = ". ".join(sentences) + "." if sentences else ""
    return report, sentences


def split_free_text(text: str) -> list[str]:
    """Free-text report -> statements, split at '.' (and line breaks)."""
    return [part for part in re.split(r"[.\n]+", text) if part.strip()]
