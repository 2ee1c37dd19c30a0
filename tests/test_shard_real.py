"""The shard builder on real recordings from ../shared/data (skipped where that folder is absent)."""
from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
import wfdb
from scipy.signal import decimate, resample

from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.preprocess import SignalConfig
from melp_scale.shard.sources import SourceOptions
from tests.test_shard import read_all

DATA = os.environ.get("MELP_SHARED_DATA",
                      os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"real ECG fixtures not found at {DATA} (set MELP_SHARED_DATA)")
GAIN = SignalConfig().gain


def test_ptb_diagnostic_1000hz_15_signals(tmp_path):
    root = tmp_path / "ptb"
    shutil.copytree(os.path.join(DATA, "ptb-diagnostic-s0010"), root)
    run_build(BuildConfig(source="wfdb-dir", root=str(root), out=str(tmp_path / "s"),
                          val_fraction=0.0))
    (ecg, meta, _), = read_all(str(tmp_path / "s")).values()
    assert ecg.shape == (12, 5000) and meta["fs"] == 500
    assert meta["flags"]["source_fs"] == 1000.0 and meta["flags"]["num_windows"] == 1
    record = wfdb.rdrecord(os.path.join(DATA, "ptb-diagnostic-s0010", "s0010_re"))
    lead_ii = record.p_signal[:, record.sig_name.index("ii")]
    # independent anti-aliased decimation (zero-phase FIR, scipy's decimate) of the first 10 s
    expected = decimate(lead_ii[:10_000 + 400], 2, ftype="fir", zero_phase=True)[:5000]
    got = ecg[1] / GAIN
    middle = slice(100, 4900)  # ignore the filters' edge transients
    relative = np.linalg.norm(got[middle] - expected[middle]) / np.linalg.norm(expected[middle])
    assert relative < 0.01, relative


def test_ptbxl_100hz_is_upsampled(tmp_path):
    root = tmp_path / "lr"
    os.makedirs(root)
    for ext in ("hea", "dat"):
        shutil.copy(os.path.join(DATA, "ecg-image-kit-samples", f"00001_lr.{ext}"), root)
    run_build(BuildConfig(source="wfdb-dir", root=str(root), out=str(tmp_path / "s"),
                          val_fraction=0.0))
    (ecg, meta, _), = read_all(str(tmp_path / "s")).values()
    assert ecg.shape == (12, 5000) and meta["flags"]["source_fs"] == 100.0
    record = wfdb.rdrecord(str(root / "00001_lr"))  # leads named AVR/AVL/AVF here
    expected = resample(record.p_signal, 5000, axis=0)  # FFT resampling, an independent method
    middle = slice(250, 4750)
    for lead, name in enumerate(["I", "II", "III", "AVR", "AVL", "AVF"]):
        want = expected[middle, record.sig_name.index(name)]
        relative = np.linalg.norm(ecg[lead, middle] / GAIN - want) / np.linalg.norm(want)
        assert relative < 0.05, (name, relative)


def _manifest_rows() -> dict[str, dict]:
    with open(os.path.join(DATA, "manifest.csv"), newline="") as handle:
        return {row["record"].split("/")[-1]: row for row in csv.DictReader(handle)
                if row["dataset"].startswith("challenge/")}


def test_challenge_folders_build_with_manifest_labels(tmp_path):
    tables = os.path.join(DATA, "challenge", "scoring-tables", "evaluation-2021")
    mapping = (os.path.join(tables, "dx_mapping_unscored.csv"),
               os.path.join(tables, "dx_mapping_scored.csv"))
    rows = _manifest_rows()
    assert len(rows) == 279

    def build(out: str, on_flat_lead: str) -> dict:
        return run_build(BuildConfig(source="challenge", root=os.path.join(DATA, "challenge"),
                                     out=out, val_fraction=0.0, workers=2, shard_size=100,
                                     signal=SignalConfig(on_flat_lead=on_flat_lead),
                                     options=SourceOptions(dx_mapping=mapping)))

    # Some Chapman records have leads that are exactly zero: skipped by default, with the reason.
    flat = set()
    for record_id, row in rows.items():
        record = wfdb.rdrecord(os.path.join(DATA, row["dataset"], record_id))
        if (np.ptp(record.p_signal[:5000], axis=0) == 0).any():
            flat.add(record_id)
    default = build(str(tmp_path / "default"), "skip")
    assert default["counts"]["skipped"] == {"flat_lead": len(flat)}
    assert {s["record_id"] for s in default["skipped_records"]} == flat

    out = str(tmp_path / "keep")
    manifest = build(out, "keep")
    assert manifest["counts"]["skipped"] == {} and manifest["counts"]["kept_records"] == 279
    samples = {meta["record_id"]: (ecg, meta) for ecg, meta, _ in read_all(out).values()}
    assert set(samples) == set(rows)
    for record_id, row in rows.items():
        ecg, meta = samples[record_id]
        assert ecg.shape == (12, 5000)
        assert meta["labels"]["dx"] == row["dx_codes"].split(","), record_id
        assert meta["labels"]["dx_abbrev"] == row["dx_abbrev"].split(";"), record_id
        assert meta["flags"]["source_samples"] == int(row["sig_len"])
        assert bool(meta["flags"]["flat_leads"]) == (record_id in flat)
    ecg, meta = samples["E07509"]  # a SNOMED code named through the scoring tables
    assert all(meta["labels"]["dx_names"])


def test_old_georgia_headers_read_like_fixed_ones(tmp_path):
    source = os.path.join(DATA, "challenge", "cinc2021-samples")
    quirky = tmp_path / "quirky"
    os.makedirs(quirky)
    names = sorted(n[:-9] for n in os.listdir(source) if n.endswith(".hea.orig"))
    assert names
    for name in names:
        shutil.copy(os.path.join(source, name + ".hea.orig"), quirky / (name + ".hea"))
        shutil.copy(os.path.join(source, name + ".mat"), quirky)
    run_build(BuildConfig(source="challenge", root=str(quirky), out=str(tmp_path / "s"),
                          val_fraction=0.0))
    quirk = {m["record_id"]: e for e, m, _ in read_all(str(tmp_path / "s")).values()}
    assert sorted(quirk) == names
    for name in names:
        record = wfdb.rdrecord(os.path.join(source, name))  # the corrected header, read by wfdb
        want = record.p_signal[:5000]
        assert np.abs(quirk[name].T / GAIN - want).max() <= 0.5 / GAIN + 1e-9, name
