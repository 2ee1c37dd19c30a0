"""Reading WFDB and PhysioNet Challenge records into ``RawSignal``s, with skip reasons."""
from __future__ import annotations

import os

import numpy as np
import scipy.io
import wfdb

from melp_scale.shard.record import RawSignal, SkipRecord
from melp_scale.shard.sources import require_inside

INVALID_SAMPLE = -32768  # WFDB format 16's "no value"


def _signal_files(path: str, header: dict, root: str | None) -> list[str]:
    """The header's signal files, each checked to lie inside ``root`` (default: the record's
    folder) and to exist, before anything opens them."""
    folder = os.path.dirname(path)
    files = []
    for name in dict.fromkeys(header["files"]):
        file = os.path.join(folder, name)
        require_inside(root or folder, file)
        if not os.path.exists(file):
            raise SkipRecord("missing_signal", file)
        files.append(file)
    return files


def load_wfdb(path: str, root: str | None = None) -> RawSignal:
    """Read ``path`` (.hea/.dat without extension) in mV; invalid samples become NaN.

    ``root``: the dataset folder; a header or signal file that resolves outside it (default:
    outside the record's own folder) is skipped as ``outside_root`` without being read.

    Fast path: a single-file format-16 record (MIMIC-IV-ECG, PTB-XL, most 12-lead sets) is
    read with one header parse and one ``np.fromfile`` — wfdb parses each header with pandas
    (~6 ms, twice per record), which would dominate an 800k-record build. Anything else
    (format 212, several signal files, byte offsets) goes through ``wfdb.rdrecord``.
    """
    require_inside(root or os.path.dirname(path), path + ".hea")
    header = parse_header(path + ".hea")
    files = _signal_files(path, header, root)
    if set(header["formats"]) == {"16"} and len(files) == 1:
        return _read_format16(files[0], header)
    try:
        record = wfdb.rdrecord(path, physical=True)
    except ValueError as error:
        # wfdb's message when the signal file holds fewer samples than the header says
        raise SkipRecord("truncated_signal", f"{path}: {error}") from error
    except Exception as error:  # wfdb raises many types for malformed records
        raise SkipRecord("unreadable", f"{path}: {error}") from error
    signal = record.p_signal
    if signal is None or signal.shape[0] != header["num_samples"]:
        raise SkipRecord("truncated_signal", f"{path}: header says {header['num_samples']} samples")
    return RawSignal(signal=signal.astype(np.float64), fs=float(record.fs),
                     leads=list(record.sig_name))


def _read_format16(path: str, header: dict) -> RawSignal:
    num_signals, num_samples = len(header["leads"]), header["num_samples"]
    expected = num_signals * num_samples
    values = np.fromfile(path, dtype="<i2", count=expected)
    if values.size != expected:
        raise SkipRecord("truncated_signal", f"{path}: {values.size} of {expected} samples "
                         f"({num_samples} x {num_signals} signals declared in the header)")
    values = values.reshape(num_samples, num_signals)
    signal = (values - np.asarray(header["baselines"], dtype=np.float64)) / np.asarray(header["gains"])
    signal[values == INVALID_SAMPLE] = np.nan
    return RawSignal(signal=signal, fs=header["fs"], leads=header["leads"])


def parse_header(path: str) -> dict:
    """Parse a single-segment WFDB ``.hea`` by hand (the fields the builder needs).

    Tolerates the old Georgia Challenge header whose record name reads ``Exxxxx.mat`` (wfdb
    refuses it). Returns fs, num_samples, leads, formats, gains (adu/mV; WFDB's default 200
    when absent or 0), baselines (the ADC zero when not given), signal files and ``#Key:
    value`` comments.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except FileNotFoundError as error:
        raise SkipRecord("missing_header", path) from error
    comments = {}
    for line in lines:
        if line.startswith("#") and ":" in line:
            key, _, value = line.lstrip("#").partition(":")
            comments[key.strip()] = value.strip()
    lines = [line for line in lines if not line.startswith("#")]
    try:
        first = lines[0].split()
        if "/" in first[0]:
            raise SkipRecord("unsupported", f"{path}: multi-segment record")
        num_signals, fs, num_samples = int(first[1]), float(first[2].split("/")[0]), int(first[3])
        header = {"fs": fs, "num_samples": num_samples, "leads": [], "formats": [], "gains": [],
                  "baselines": [], "files": [], "comments": comments}
        for field in (line.split() for line in lines[1:1 + num_signals]):
            gain_text = field[2].split("/")[0] if len(field) > 2 else "200"
            adc_zero = int(field[4]) if len(field) > 4 else 0
            header["files"].append(field[0])
            header["formats"].append(field[1])
            header["gains"].append(float(gain_text.split("(")[0]) or 200.0)
            header["baselines"].append(int(gain_text.split("(")[1].rstrip(")"))
                                       if "(" in gain_text else adc_zero)
            header["leads"].append(field[8] if len(field) > 8 else f"signal{len(header['leads'])}")
    except (IndexError, ValueError) as error:
        raise SkipRecord("bad_header", f"{path}: {error}") from error
    if len(header["leads"]) != num_signals or num_signals == 0:
        raise SkipRecord("bad_header", f"{path}: {num_signals} signals declared, "
                         f"{len(header['leads'])} described")
    return header


def load_challenge(path: str, root: str | None = None) -> RawSignal:
    """Read a Challenge record (``path``.hea + MATLAB v4 ``val`` matrix) in mV (``root`` as
    for :func:`load_wfdb`)."""
    require_inside(root or os.path.dirname(path), path + ".hea")
    header = parse_header(path + ".hea")
    mat_path = _signal_files(path, header, root)[0]
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
