"""Synthetic 12-lead ECGs simulated with neurokit2, each with a truthful machine-style report.

Per subject (seeded from ``(seed, subject)``) the source draws a heart-rate class and a rhythm
regularity and simulates 20 s of 12-lead ECG (neurokit2's ``multileads`` ECGSYN model, 500 Hz)
in one call; its ``records_per_subject`` records are 10 s windows at evenly spaced offsets of
that simulation (overlapping: the ODE solver costs ~40 ms per simulated second per lead, and
overlap between records of one subject cannot leak, as the split is by subject), each with its
own amplitude scale and added noise. The report states exactly those simulated settings:

- rate class: "sinus bradycardia" (< 60 bpm), "sinus rhythm", "sinus tachycardia" (> 100 bpm);
- regularity: "regular rhythm" (heart-rate s.d. 1 bpm) or "irregular rhythm" (s.d. 12-20 bpm);
- amplitude: "normal voltage" (scale 0.9-1.3) or "low qrs voltages" (scale 0.3-0.45);
- noise: "good signal quality" (0.005 mV) or "noisy recording" (0.08-0.15 mV Gaussian).

The settings are also stored as labels (``rate``, ``regular``, ``low_voltage``, ``noisy``,
``heart_rate``) so synthetic shards double as a zero-shot / probe sanity task.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from melp_scale.shard.record import LEADS, RawSignal, RecordRef
from melp_scale.shard.sources import Listing, SourceOptions

FS = 500
RECORD_SECONDS = 10
SIMULATED_SECONDS = 20
RATE_CLASSES = {"brady": ((42, 56), "sinus bradycardia"), "normal": ((62, 95), "sinus rhythm"),
                "tachy": ((105, 140), "sinus tachycardia")}


def _subject_settings(seed: int, subject: int) -> dict:
    rng = np.random.default_rng([seed, subject])
    rate = str(rng.choice(list(RATE_CLASSES)))
    low, high = RATE_CLASSES[rate][0]
    regular = bool(rng.random() < 0.6)
    return {"rate": rate, "heart_rate": float(rng.uniform(low, high)), "regular": regular,
            "heart_rate_std": 1.0 if regular else float(rng.uniform(12, 20)),
            "random_state": int(rng.integers(2**31))}


def _record_settings(seed: int, subject: int, index: int) -> dict:
    rng = np.random.default_rng([seed, subject, index, 1])
    low_voltage = bool(rng.random() < 0.3)
    noisy = bool(rng.random() < 0.3)
    return {"low_voltage": low_voltage, "noisy": noisy,
            "scale": float(rng.uniform(0.3, 0.45) if low_voltage else rng.uniform(0.9, 1.3)),
            "noise_mv": float(rng.uniform(0.08, 0.15) if noisy else 0.005),
            "noise_seed": int(rng.integers(2**31))}


@functools.lru_cache(maxsize=4)
def _simulate_subject(heart_rate: float, heart_rate_std: float, random_state: int,
                      seconds: int) -> np.ndarray:
    """(samples, 12) mV; cached so a worker simulates each subject once for all its records."""
    import neurokit2 as nk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = nk.ecg_simulate(duration=seconds, sampling_rate=FS, heart_rate=heart_rate,
                                heart_rate_std=heart_rate_std, method="multileads", noise=0.0,
                                random_state=random_state)
    return frame[list(LEADS)].to_numpy(dtype=np.float64)


def simulate_record(subject_settings: dict, record_settings: dict, index: int,
                    records_per_subject: int) -> RawSignal:
    """The ``index``-th 10 s window of a subject's simulation, scaled and with its noise added."""
    full = _simulate_subject(subject_settings["heart_rate"], subject_settings["heart_rate_std"],
                             subject_settings["random_state"], SIMULATED_SECONDS)
    size = RECORD_SECONDS * FS
    spacing = (full.shape[0] - size) // max(records_per_subject - 1, 1)
    signal = full[index * spacing:index * spacing + size] * record_settings["scale"]
    rng = np.random.default_rng(record_settings["noise_seed"])
    signal = signal + rng.normal(0.0, record_settings["noise_mv"], size=signal.shape)
    return RawSignal(signal=signal, fs=float(FS), leads=list(LEADS))


def report_sentences(subject_settings: dict, record_settings: dict) -> list[str]:
    return [RATE_CLASSES[subject_settings["rate"]][1],
            "regular rhythm" if subject_settings["regular"] else "irregular rhythm",
            "low qrs voltages" if record_settings["low_voltage"] else "normal voltage",
            "noisy recording" if record_settings["noisy"] else "good signal quality"]


def list_records(root: str | None, options: SourceOptions) -> Listing:
    if options.count < 1 or options.records_per_subject < 1:
        raise ValueError("--count and --records-per-subject must be at least 1")
    refs = []
    for number in range(options.count):
        subject, index = divmod(number, options.records_per_subject)
        subject_settings = _subject_settings(options.seed, subject)
        record_settings = _record_settings(options.seed, subject, index)
        sentences = report_sentences(subject_settings, record_settings)
        labels = {key: subject_settings[key] for key in ("rate", "regular", "heart_rate")}
        labels.update({key: record_settings[key] for key in ("low_voltage", "noisy")})
        refs.append(RecordRef(
            record_id=f"{subject:05d}-{index}", subject=f"{subject:05d}",
            load=functools.partial(simulate_record, subject_settings, record_settings, index,
                                   options.records_per_subject),
            report=". ".join(sentences) + ".", sentences=sentences, labels=labels))
    return Listing(refs, [])
