"""Shard builder: preprocessing, sources, skips, split, determinism, resume, verify, CLI."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from scipy.signal import resample

from melp_scale.shard import build as build_module
from melp_scale.shard.__main__ import main
from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.format import decode_sample, iter_shard
from melp_scale.shard.preprocess import SignalConfig, clean_report, map_leads
from melp_scale.shard.record import RawSignal, SkipRecord
from melp_scale.shard.sources import SourceOptions
from melp_scale.shard.verify import verify
from tests.shard_trees import CANONICAL, ecg_like, mimic_tree, ptbxl_tree, write_challenge

GAIN = SignalConfig().gain


def read_all(folder: str) -> dict[str, tuple[np.ndarray, dict, str]]:
    with open(os.path.join(folder, "manifest.json")) as handle:
        manifest = json.load(handle)
    samples = {}
    for entry in manifest["shards"]:
        for key, members in iter_shard(os.path.join(folder, entry["name"])):
            ecg, meta, report = decode_sample(members)
            samples[key] = (ecg, dict(meta, split=entry["split"]), report)
    return samples


def manifest_of(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json")) as handle:
        return json.load(handle)


def test_clean_report_hand_checked():
    report, sentences = clean_report(["Sinus  rhythm", "", "*** EKG abnormal ***", "Rate =- 60="])
    assert sentences == ["sinus rhythm", "ecg abnormal", "rate 60"]
    assert report == "sinus rhythm. ecg abnormal. rate 60."
    assert clean_report(["", "  "]) == ("", [])


def test_map_leads_by_name_case_insensitive():
    names = ["v6", "AVF", "i", "II", "iii", "aVR", "avl", "V1", "V2", "V3", "v4", "V5", "vx"]
    signal = np.arange(len(names), dtype=float)[None, :].repeat(3, axis=0)
    mapped, missing = map_leads(RawSignal(signal, 500.0, names), "skip")
    assert missing == []
    assert [names[int(v)] .lower() for v in mapped[:, 0]] == [n.lower() for n in CANONICAL]
    with pytest.raises(SkipRecord) as error:
        map_leads(RawSignal(signal[:, :5], 500.0, names[:5]), "skip")
    assert error.value.reason == "missing_lead"
    zeroed, missing = map_leads(RawSignal(signal[:, :5], 500.0, names[:5]), "zero")
    assert "V1" in missing and not zeroed[CANONICAL.index("V1")].any()


def test_mimic_samples_skips_and_split(tmp_path):
    root = str(tmp_path / "mimic")
    expected = mimic_tree(root)
    out = str(tmp_path / "shards")
    config = BuildConfig(source="mimic-iv-ecg", root=root, out=out, val_fraction=0.34,
                         shard_size=3, workers=1)
    manifest = run_build(config)
    samples = read_all(out)
    kept = {k for k, v in expected.items() if v["skip"] is None}
    assert {meta["record_id"] for _, meta, _ in samples.values()} == kept
    for key, (ecg, meta, report) in samples.items():
        want = expected[meta["record_id"]]
        assert key == f"mimic-iv-ecg_{meta['record_id']}"
        assert ecg.dtype == np.int16 and ecg.shape == (12, 5000)
        # int16 at GAIN of a signal stored at 200/mV: both quantisation steps bound the error
        error = np.abs(ecg.T / GAIN - want["signal"]).max()
        assert error <= 0.5 / GAIN + 1e-9, (key, error)
        assert meta["subject"] == want["subject"] and meta["leads"] == CANONICAL
        assert meta["sentences"] == [clean_report([r])[0].rstrip(".") for r in want["reports"]]
        assert report == clean_report(want["reports"])[0]
    want_skips = {}
    for value in expected.values():
        if value["skip"]:
            want_skips[value["skip"]] = want_skips.get(value["skip"], 0) + 1
    assert manifest["counts"]["skipped"] == want_skips
    skipped_ids = {s["record_id"]: s["reason"] for s in manifest["skipped_records"]}
    assert skipped_ids == {k: v["skip"] for k, v in expected.items() if v["skip"]}
    # no subject in two splits
    splits: dict[str, set] = {}
    for _, meta, _ in samples.values():
        splits.setdefault(meta["subject"], set()).add(meta["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {"train", "val"} == {meta["split"] for _, meta, _ in samples.values()}
    assert verify(out) == []


def test_exclude_keeps_records_out(tmp_path):
    root = str(tmp_path / "mimic")
    expected = mimic_tree(root)
    good = sorted(k for k, v in expected.items() if v["skip"] is None)
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(f"{good[0]}\nmimic-iv-ecg_{good[1]}\n")
    out = str(tmp_path / "shards")
    manifest = run_build(BuildConfig(source="mimic-iv-ecg", root=root, out=out,
                                     exclude=str(exclude), val_fraction=0.0))
    ids = {meta["record_id"] for _, meta, _ in read_all(out).values()}
    assert good[0] not in ids and good[1] not in ids and set(good[2:]) <= ids
    assert manifest["counts"]["skipped"]["excluded"] == 2


def test_ptbxl_labels_and_signal(tmp_path):
    root = str(tmp_path / "ptbxl")
    expected = ptbxl_tree(root)
    out = str(tmp_path / "shards")
    run_build(BuildConfig(source="ptbxl", root=root, out=out, val_fraction=0.0, min_words=0))
    samples = read_all(out)
    assert len(samples) == len(expected)
    for ecg, meta, report in samples.values():
        want = expected[meta["record_id"]]
        for task, labels in want["labels"].items():
            assert meta["labels"][task] == sorted(labels), (meta["record_id"], task)
        assert np.abs(ecg.T / GAIN - want["signal"]).max() <= 0.5 / GAIN + 1e-9
        assert meta["subject"] == want["subject"]
    record3 = next(m for _, m, _ in samples.values() if m["record_id"] == "3")
    assert record3["sentences"] == ["inferior infarction, age undetermined", "t abnormal"]


def test_ptbxl_min_words_default_drops_short_reports(tmp_path):
    root = str(tmp_path / "ptbxl")
    ptbxl_tree(root)
    manifest = run_build(BuildConfig(source="ptbxl", root=root, out=str(tmp_path / "s"),
                                     val_fraction=0.0))
    assert manifest["counts"]["skipped"] == {"short_report": 1}  # "sinusrhythmus normales ekg"
    assert manifest["skipped_records"][0]["record_id"] == "4"


def test_challenge_layout_resampling_quirk_and_short(tmp_path):
    root = tmp_path / "challenge"
    rng = np.random.default_rng()
    long = ecg_like(rng, 7500, 500)  # 15 s: first 10 s window
    short = ecg_like(rng, 3000, 500)  # 6 s: padded and flagged
    slow = ecg_like(rng, 2500, 250)  # 10 s at 250 Hz: upsampled
    write_challenge(str(root / "cpsc"), "A0001", long, 500, "AF,RBBB")
    write_challenge(str(root / "georgia"), "E00001", short, 500, "164889003,59118001",
                    georgia_quirk=True)
    write_challenge(str(root / "other"), "Q0001", slow, 250, "426783006")
    mapping = tmp_path / "map.csv"
    mapping.write_text("Dx,SNOMEDCTCode,Abbreviation\natrial fibrillation,164889003,AF\n"
                       "right bundle branch block,59118001,RBBB\nsinus rhythm,426783006,SNR\n")
    out = str(tmp_path / "shards")
    run_build(BuildConfig(source="challenge", root=str(root), out=out, val_fraction=0.0,
                          options=SourceOptions(dx_mapping=(str(mapping),))))
    samples = {meta["record_id"]: (ecg, meta) for ecg, meta, _ in read_all(out).values()}
    ecg, meta = samples["A0001"]
    assert meta["labels"]["dx"] == ["AF", "RBBB"]
    assert meta["labels"]["dx_names"] == ["atrial fibrillation", "right bundle branch block"]
    assert np.abs(ecg.T / GAIN - np.round(long[:5000] * 1000) / 1000).max() <= 0.5 / GAIN + 1e-9
    ecg, meta = samples["E00001"]
    assert meta["labels"]["dx_abbrev"] == ["AF", "RBBB"]
    assert meta["flags"]["padded"] and meta["flags"]["pad_samples"] == 2000
    assert not ecg[:, 3000:].any()
    assert np.abs(ecg[:, :3000].T / GAIN - np.round(short * 1000) / 1000).max() <= 0.5 / GAIN + 1e-9
    ecg, meta = samples["Q0001"]
    # independent method: FFT resampling (the builder uses a polyphase FIR)
    reference = resample(np.round(slow * 1000) / 1000, 5000, axis=0)
    assert ecg.shape == (12, 5000) and meta["flags"]["source_fs"] == 250.0
    middle = slice(200, 4800)  # away from the filter's edge transients
    relative = (np.linalg.norm(ecg.T[middle] / GAIN - reference[middle])
                / np.linalg.norm(reference[middle]))
    assert relative < 5e-3, relative


def test_determinism_across_workers_and_resume(tmp_path, monkeypatch):
    root = str(tmp_path / "mimic")
    mimic_tree(root)

    def build(out: str, workers: int) -> dict:
        return run_build(BuildConfig(source="mimic-iv-ecg", root=root, out=out, shard_size=2,
                                     val_fraction=0.3, workers=workers))

    one = build(str(tmp_path / "w1"), 1)
    two = build(str(tmp_path / "w2"), 2)
    assert len(one["shards"]) > 3
    assert [e["sha256"] for e in one["shards"]] == [e["sha256"] for e in two["shards"]]
    assert manifest_of(str(tmp_path / "w1")) == manifest_of(str(tmp_path / "w2"))

    # interrupt a build after two shards, then finish it with the same arguments
    original, calls = build_module.build_shard, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(build_module, "build_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(resumed, 1)
    assert not os.path.exists(os.path.join(resumed, "manifest.json"))
    monkeypatch.setattr(build_module, "build_shard", original)
    second = build(resumed, 1)
    assert second["reused_shards"] == 2
    assert manifest_of(resumed) == manifest_of(str(tmp_path / "w1"))


def test_verify_detects_corruption_and_cli(tmp_path, capsys):
    root = str(tmp_path / "mimic")
    mimic_tree(root)
    out = str(tmp_path / "shards")
    assert main(["build", "--source", "mimic-iv-ecg", "--root", root, "--out", out,
                 "--workers", "1", "--shard-size", "4"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main(["verify", out]) == 0
    first = manifest_of(out)["shards"][0]["name"]
    with open(os.path.join(out, first), "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    assert main(["verify", out]) == 1
    assert "sha256 differs" in capsys.readouterr().out
    key = next(iter(read_all(out)))
    assert main(["inspect", out, "--plot", key, "--to", str(tmp_path / "chart.png")]) == 0
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    assert main(["inspect", out]) == 0


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert main(["build", "--source", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown --source 'nope'" in capsys.readouterr().err
    assert main(["build", "--source", "ptbxl", "--root", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["build", "--source", "mimic-iv-ecg", "--root", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no record_list.csv" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "empty")]) == 2


def test_format16_fast_path_equals_wfdb(tmp_path):
    import wfdb

    from melp_scale.shard.sources.wfdb_io import load_wfdb
    from tests.shard_trees import write_wfdb

    rng = np.random.default_rng()
    signal = ecg_like(rng, 1234, 250)
    signal[5:9, 2] = np.nan  # written as WFDB's invalid sample
    folder = str(tmp_path)
    wfdb.wrsamp("r", fs=250, units=["mV"] * 12, sig_name=CANONICAL, p_signal=signal,
                 fmt=["16"] * 12, adc_gain=[400.0] * 12, baseline=list(range(-6, 6)),
                 write_dir=folder)
    fast = load_wfdb(os.path.join(folder, "r"))
    reference = wfdb.rdrecord(os.path.join(folder, "r"))
    assert fast.fs == 250.0 and fast.leads == CANONICAL
    np.testing.assert_array_equal(np.isnan(fast.signal), np.isnan(reference.p_signal))
    np.testing.assert_allclose(fast.signal, reference.p_signal, rtol=0, atol=1e-12)
    write_wfdb(folder, "s", signal[:, :3], 250, ["I", "II", "III"])
    with open(os.path.join(folder, "s.dat"), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(SkipRecord) as error:
        load_wfdb(os.path.join(folder, "s"))
    assert error.value.reason == "truncated_signal"
