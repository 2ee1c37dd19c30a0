"""Reading WFDB and PhysioNet Challenge records into ``RawSignal``s, with skip reasons."""
from __future__ import annotations

import os

import numpy as np
import scipy.io
import wfdb

from melp_scale.shard.record import RawSignal, SkipRecord

INVALID_SAMPLE = -32768  # WFDB format 16's "no value"


def load_wfdb(path: str) -> RawSignal:
    """Read ``path`` (.hea/.dat without extension) in mV; invalid samples become NaN."""
    if not os.path.exists(path + ".hea"):
        raise SkipRecord("missing_header", path + ".hea")
    try:
        header = wfdb.rdheader(path)
    except Exception as error:  # wfdb raises many types for malformed headers
        raise SkipRecord("bad_header", f"{path}.hea: {error}") from error
    for name in set(header.file_name or []):
        if not os.path.exists(os.path.join(os.path.dirname(path), name)):
            raise SkipRecord("missing_signal", os.path.join(os.path.dirname(path), name))
    try:
        record = wfdb.rdrecord(path, physical=True)
    except ValueError as error:
        # wfdb's message when the signal file holds fewer samples than the header says
        raise SkipRecord("truncated_signal", f"{path}: {error}") from error
    except Exception as error:
        raise SkipRecord("unreadable", f"{path}: {error}") from error
    signal = record.p_signal
    if signal is None or signal.shape[0] != header.sig_len:
        raise SkipRecord("truncated_signal", f"{path}: header says {header.sig_len} samples")
    return RawSignal(signal=signal.astype(np.float64), fs=float(record.fs),
                     leads=list(record.sig_name))


def parse_challenge_header(path: str) -> dict:
    """Parse a Challenge ``.hea`` by hand: tolerant of the old Georgia ``Exxxxx.mat`` record name.

    Returns fs, num_samples, leads, gains, baselines, signal file name and ``#Key: value`` comments.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except FileNotFoundError as error:
        raise SkipRecord("missing_header", path) from error
    try:
        first = lines[0].split()
        num_signals, fs, num_samples = int(first[1]), float(first[2].split("/")[0]), int(first[3])
        leads, gains, baselines, files = [], [], [], []
        for line in lines[1:1 + num_signals]:
            fields = line.split()
            gain_field = fields[2].split("/")[0]  # "1000/mV" or "1000(0)/mV"
            gains.append(float(gain_field.split("(")[0]))
            baselines.append(int(gain_field.split("(")[1].rstrip(")")) if "(" in gain_field else 0)
            files.append(fields[0])
            leads.append(fields[-1])
    except (IndexError, ValueError) as error:
        raise SkipRecord("bad_header", f"{path}: {error}") from error
    if len(leads) != num_signals:
        raise SkipRecord("bad_header", f"{path}: {num_signals} signals declared, {len(leads)} found")
    comments = {}
    for line in lines[1 + num_signals:]:
        if line.startswith("#") and ":" in line:
            key, _, value = line.lstrip("#").partition(":")
            comments[key.strip()] = value.strip()
    return {"fs": fs, "num_samples": num_samples, "leads": leads, "gains": gains,
            "baselines": baselines, "file": files[0], "comments": comments}


def load_challenge(path: str) -> RawSignal:
    """Read a Challenge record (``path``.hea + MATLAB v4 ``val`` matrix) in mV."""
    header = parse_challenge_header(path + ".hea")
    mat_path = os.path.join(os.path.dirname(path), header["file"])
    if not os.path.exists(mat_path):
        raise SkipRecord("missing_signal", mat_path)
    try:
        values = scipy.io.loadmat(mat_path)["val"]
    except Exception as error:
        raise SkipRecord("unreadable", f"{mat_path}: {error}") from error
    expected = (len(header["leads"]), header["num_samples"])
    if values.shape != expected:
        raise SkipRecord("truncated_signal", f"{mat_path}: {values.shape}, header says {expected}")
    signal = values.astype(np.float64)
    signal[values == INVALID_SAMPLE] = np.nan
    signal = (signal - np.asarray(header["baselines"])[:, None]) / np.asarray(header["gains"])[:, None]
    return RawSignal(signal=signal.T, fs=header["fs"], leads=header["leads"])
