"""The synthetic source: lead laws, truthful reports, bounded simulation for every seed.

The checks are independent of the simulator's internals: the lead laws are checked on the
stored int16 shards, the report's rate claim against R peaks found in the signal, the
voltage claim against measured limb / chest amplitudes, and every seed 0-20 of the real
builder runs in a subprocess under a time limit (neurokit2's ECGSYN used to loop forever on
some of them).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.signal import find_peaks

from melp_scale.shard.build import run_build
from melp_scale.shard.sources import SourceOptions, synthetic
from melp_scale.stream import ShardReader, load_shard_set


def _records(seed: int, count: int, records_per_subject: int = 1):
    listing = synthetic.list_records(None, SourceOptions(count=count, seed=seed,
                                                         records_per_subject=records_per_subject))
    return [(ref, ref.load()) for ref in listing.refs]


def _limb_law_residuals(leads: np.ndarray) -> dict[str, float]:
    """Largest violation of each law; ``leads`` (12, T) in LEADS order."""
    i, ii, iii, avr, avl, avf = leads[:6].astype(np.float64)
    return {"III = II - I": np.abs(iii - (ii - i)).max(),
            "aVR = -(I + II) / 2": np.abs(avr + (i + ii) / 2).max(),
            "aVL = I - II / 2": np.abs(avl - (i - ii / 2)).max(),
            "aVF = II - I / 2": np.abs(avf - (ii - i / 2)).max()}


def test_simulated_limb_leads_obey_einthoven_and_goldberger():
    for ref, raw in _records(seed=5, count=6):
        assert raw.leads == list(synthetic.LEADS)
        residuals = _limb_law_residuals(raw.signal.T)
        assert max(residuals.values()) < 1e-9, (ref.record_id, residuals)
        assert np.ptp(raw.signal[:, 0]) > 0.05  # not trivially zero


def test_stored_shards_obey_the_lead_laws_to_int16_rounding(tmp_path):
    out = str(tmp_path / "synth")
    config = synthetic.demo_build_config(out, count=8, val_fraction=0.0)
    run_build(config)
    shards = load_shard_set(out, "train")
    checked = 0
    for name, size in zip(shards.names, shards.sizes):
        reader = ShardReader(str(tmp_path / "synth" / name), name, size)
        try:
            for index in range(size):
                _, ecg, meta, _ = reader.read(index)
                assert meta["fs"] == synthetic.DEMO_SET["fs"]
                residuals = _limb_law_residuals(ecg)
                # each stored lead is rounded to 1 unit on its own: at most 1.5 units apart
                assert max(residuals.values()) <= 1.5, (meta["record_id"], residuals)
                checked += 1
        finally:
            reader.close()
    assert checked == 8


def _measured_rate(raw) -> float:
    """Beats per minute from R peaks of the heart-vector magnitude proxy |I| + |V5| + |V1|."""
    signal = raw.signal
    proxy = np.abs(signal[:, 0]) + np.abs(signal[:, 10]) + np.abs(signal[:, 6])
    peaks, _ = find_peaks(proxy, height=0.5 * proxy.max(), distance=int(0.28 * raw.fs))
    return 60.0 * (len(peaks) - 1) / ((peaks[-1] - peaks[0]) / raw.fs)


def test_reports_state_what_the_signal_shows():
    bounds = {"brady": (35, 62), "normal": (58, 100), "tachy": (100, 160)}
    seen = set()
    for ref, raw in _records(seed=11, count=40):
        labels, sentences = ref.labels, ref.sentences
        assert sentences[0] == synthetic.RATE_CLASSES[labels["rate"]][1]
        assert (sentences[1] == "sinus rhythm") == labels["regular"]
        assert (sentences[2] == "wide qrs, bundle branch block") == labels["wide_qrs"]
        assert (sentences[3] == "low qrs voltages in the limb leads") == labels["low_voltage"]
        assert (sentences[4] == "noisy recording") == labels["noisy"]
        seen.add(labels["rate"])
        if labels["noisy"] or not labels["regular"]:
            continue
        low, high = bounds[labels["rate"]]
        assert low <= _measured_rate(raw) <= high, (ref.record_id, labels, _measured_rate(raw))
    assert seen == set(bounds)


def _rr_cv_and_p_ratio(raw) -> tuple[float, float]:
    """RR coefficient of variation from R peaks, and the mean lead-II amplitude in the PR window
    (200-100 ms before each R) relative to the R amplitude."""
    signal = raw.signal
    proxy = np.abs(signal[:, 0]) + np.abs(signal[:, 10]) + np.abs(signal[:, 6])
    peaks, _ = find_peaks(proxy, height=0.5 * proxy.max(), distance=int(0.28 * raw.fs))
    rr = np.diff(peaks) / raw.fs
    lead_ii = signal[:, 1] - np.median(signal[:, 1])
    windows = [lead_ii[p - int(0.2 * raw.fs):p - int(0.1 * raw.fs)] for p in peaks if p >= 0.2 * raw.fs]
    p_wave = np.mean([w.max() for w in windows])
    return float(rr.std() / rr.mean()), float(p_wave / np.abs(lead_ii[peaks]).mean())


def test_atrial_fibrillation_is_irregular_without_p_waves():
    """Clean records: atrial fibrillation has an RR c.v. above any sinus record's and no P wave
    peak in the PR window (only f waves, well below a sinus P wave)."""
    cv, p_ratio = {True: [], False: []}, {True: [], False: []}
    for ref, raw in _records(seed=5, count=60):
        if ref.labels["noisy"]:
            continue
        rr_cv, ratio = _rr_cv_and_p_ratio(raw)
        cv[ref.labels["regular"]].append(rr_cv)
        p_ratio[ref.labels["regular"]].append(ratio)
    assert len(cv[True]) >= 5 and len(cv[False]) >= 5
    assert max(cv[True]) < 0.05 and min(cv[False]) > 0.08, cv
    assert np.median(p_ratio[False]) < 0.6 * np.median(p_ratio[True]), p_ratio


def test_low_voltage_records_have_small_limb_leads_relative_to_chest_leads():
    ratios = {True: [], False: []}
    for ref, raw in _records(seed=3, count=60):
        if ref.labels["noisy"]:
            continue
        limb = np.ptp(raw.signal[:, :2], axis=0).max()
        chest = np.ptp(raw.signal[:, 6:], axis=0).max()
        ratios[ref.labels["low_voltage"]].append(limb / chest)
    assert ratios[True] and ratios[False]
    assert max(ratios[True]) < min(ratios[False]), ratios


def test_wide_qrs_records_have_longer_qrs_than_narrow_ones():
    """QRS width at half maximum of the |V6| R wave, clean records only."""
    widths = {True: [], False: []}
    for ref, raw in _records(seed=4, count=40):
        if ref.labels["noisy"]:
            continue
        lead = np.abs(raw.signal[:, 11] - np.median(raw.signal[:, 11]))
        peak = int(np.argmax(lead))
        half = lead[peak] / 2
        left = peak - int(np.argmax(lead[peak::-1] < half))
        right = peak + int(np.argmax(lead[peak:] < half))
        widths[ref.labels["wide_qrs"]].append((right - left) / raw.fs)
    assert np.median(widths[True]) > 1.5 * np.median(widths[False]), widths


def test_rr_intervals_stay_bounded_at_the_extreme_settings():
    rng = np.random.default_rng(0)
    for rate in (20.0, 42.0, 145.0, 200.0):
        times = synthetic.beat_times(rate, 0.5, 10.0, rng)
        rr = np.diff(times)
        assert rr.min() >= synthetic.RR_MIN_S - 1e-12 and rr.max() <= synthetic.RR_MAX_S + 1e-12
        assert times[0] <= 0.0 and times[-1] >= 10.0 - synthetic.RR_MAX_S
    with pytest.raises(ValueError, match="heart rate"):
        synthetic.beat_times(0.0, 0.1, 10.0, rng)


def test_every_seed_0_to_20_builds_within_a_time_limit(tmp_path):
    """The real builder for seeds 0-20 (small sets) in one subprocess; a hang fails the test."""
    script = textwrap.dedent(f"""
        import json, sys
        from melp_scale.shard.build import run_build
        from melp_scale.shard.sources import synthetic
        kept = {{}}
        for seed in range(21):
            out = {str(tmp_path)!r} + f"/seed{{seed}}"
            manifest = run_build(synthetic.demo_build_config(out, seed=seed, count=12,
                                                             val_fraction=0.25))
            kept[seed] = manifest["counts"]["kept_records"]
        print(json.dumps(kept))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = json.loads(done.stdout.strip().splitlines()[-1])
    assert kept == {str(seed): 12 for seed in range(21)}
