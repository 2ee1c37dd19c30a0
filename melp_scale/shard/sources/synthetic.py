"""Synthetic 12-lead ECGs from a heart-vector model, each with a truthful machine-style report.

The model (written for this project; the wave shapes follow McSharry et al. 2003, "A dynamical
model for generating synthetic electrocardiogram signals", whose ECGSYN places five Gaussian
waves P, Q, R, S, T per beat): every wave of every beat is a Gaussian in time times a 3-D
heart vector (x left, y inferior, z anterior), in mV. The 12 leads are projections of that one
vector, so they are consistent with each other the way real leads are:

- limb leads: I = x, II = the projection on +60°; then, exactly, III = II - I,
  aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2 (Einthoven's and Goldberger's laws;
  the noise is added to I and II before the others are derived, so the laws hold for it too);
- precordial leads V1-V6: projections on horizontal-plane directions from 115° (V1, right of
  the sternum) to 0° (V6, left), scaled by 1.4 (chest leads are larger).

The waveform is written in closed form (beat times from an RR series, then a sum of
Gaussians), not integrated: a record costs a few milliseconds and the simulation cannot loop.
(neurokit2's ECGSYN integrates an ODE whose RR loop never ends when the RR process it draws goes
negative, as it does for large heart-rate s.d. at low rates; it also scales each lead to a fixed
range on its own, breaking the lead laws.) Every setting is drawn from a bounded range and the
RR intervals are clipped to [``RR_MIN_S``, ``RR_MAX_S``], so a 10 s record has at most
``10 / RR_MIN_S + 2`` beats whatever the seed.

Per subject (seeded from ``(seed, subject)``): the rate class, the rhythm regularity, the QRS
width class and the subject's own morphology (heart-vector rotation, per-wave amplitudes, PR
interval). Per record (seeded from ``(seed, subject, index)``): the beat phase and RR draws, the
limb-lead voltage class, the noise class, a global gain and baseline wander. The report states
exactly the simulated classes, one sentence per factor:

- rate: "bradycardia" (42-55 bpm), "normal heart rate" (65-92), "tachycardia" (110-145);
- rhythm: "sinus rhythm" (RR s.d. 1.5 %, a P wave before every QRS) or "atrial fibrillation"
  (irregularly irregular: RR s.d. 15-25 % beat to beat, no P waves, fibrillatory waves of
  0.05-0.10 mV at 5-8 Hz on the baseline, largest in V1 and the inferior leads);
- QRS: "normal qrs duration" or "wide qrs, bundle branch block" (QRS waves 1.8x wider plus a
  terminal R' wave pointing anteriorly and to the right, a right-bundle-branch-like pattern);
- voltage: "normal voltage" or "low qrs voltages in the limb leads" (limb leads x 0.3-0.45);
- noise: "good signal quality" (0.005 mV) or "noisy recording" (0.06-0.12 mV Gaussian).

Why the voltage factor is about the limb leads: MELP's preprocessing scales every record to
[0, 1] (per-record min-max), and its ECG encoder's first block normalises each channel over time
per sample (GroupNorm), so an ECG and the same ECG x 0.35 give the same embedding: a *global*
low-voltage claim is unlearnable by construction (docs/learning_sanity.md). Limb leads small
relative to the chest leads is visible through both, and is what machine reports say
("low qrs voltages in the limb leads"). A global gain (0.7-1.4, not reported) varies every
record so that nothing can key on absolute amplitude.

The settings are also stored as labels (``rate``, ``regular``, ``wide_qrs``, ``low_voltage``,
``noisy``, ``heart_rate``) so synthetic shards double as zero-shot / probe sanity tasks.
"""
from __future__ import annotations

import functools

import numpy as np

from melp_scale.shard.record import LEADS, RawSignal, RecordRef
from melp_scale.shard.sources import Listing, SourceOptions

FS = 500  # simulation rate (Hz); the builder resamples to its --fs
RECORD_SECONDS = 10
RR_MIN_S, RR_MAX_S = 0.3, 2.0  # every RR interval is clipped into this range
# The rate statements name the rate only ("sinus" belongs to the rhythm factor, which is
# independent of the rate).
RATE_CLASSES = {"brady": ((42, 55), "bradycardia"), "normal": ((65, 92), "normal heart rate"),
                "tachy": ((110, 145), "tachycardia")}
# Statements of one factor differ in more than one word: "irregular rhythm" / "regular rhythm"
# and "wide" / "narrow qrs complexes" embed almost identically in the text tower, which then
# gives the InfoNCE no signal for them (docs/learning_sanity.md).
SENTENCES = {"regular": ("atrial fibrillation", "sinus rhythm"),
             "wide_qrs": ("normal qrs duration", "wide qrs, bundle branch block"),
             "low_voltage": ("normal voltage", "low qrs voltages in the limb leads"),
             "noisy": ("good signal quality", "noisy recording")}

# Waves: name -> (time of the peak relative to the R peak in s, Gaussian s.d. in s, heart vector
# in mV (x left, y inferior, z anterior)). T moves with the RR interval (QT ~ sqrt(RR)).
WAVES = {"P": (-0.16, 0.022, (0.10, 0.14, 0.03)), "Q": (-0.028, 0.009, (-0.12, -0.02, 0.22)),
         "R": (0.0, 0.011, (0.95, 0.75, -0.55)), "S": (0.028, 0.010, (-0.25, -0.30, -0.35)),
         "T": (0.26, 0.050, (0.28, 0.26, 0.06))}
F_WAVE_VECTOR = (-0.25, 0.55, 0.60)  # atrial fibrillatory activity: inferior and anterior-right
WIDE_QRS_FACTOR = 1.8  # QRS wave s.d. and Q/S offsets x this in the wide class
R_PRIME = (0.075, 0.018, (-0.30, 0.0, 0.55))  # the wide class's terminal, anterior-right wave
PRECORDIAL_DEG = (115.0, 94.0, 76.0, 60.0, 30.0, 0.0)  # V1..V6 in the horizontal plane, from +x
PRECORDIAL_SCALE = 1.4
# The demo set: many subjects (the factors are per subject or per record, and a model must not
# memorise a few dozen subjects), 100 Hz (as PTB-XL's records100: a narrow QRS spans ~9 samples,
# a wide one ~15; a fifth of the encoder's work of 500 Hz on the CPU).
DEMO_SET = {"count": 1536, "records_per_subject": 2, "fs": 100, "val_fraction": 0.0625,
            "shard_size": 256}
HELDOUT_SEED, HELDOUT_COUNT = 1000, 256  # the demo's separately simulated held-out set


def _subject_settings(seed: int, subject: int) -> dict:
    rng = np.random.default_rng([seed, subject])
    rate = str(rng.choice(list(RATE_CLASSES)))
    low, high = RATE_CLASSES[rate][0]
    regular = bool(rng.random() < 0.5)
    return {"rate": rate, "heart_rate": float(rng.uniform(low, high)), "regular": regular,
            "rr_cv": 0.015 if regular else float(rng.uniform(0.15, 0.25)),
            "f_wave_mv": 0.0 if regular else float(rng.uniform(0.05, 0.10)),
            "f_wave_hz": float(rng.uniform(5.0, 8.0)),
            "wide_qrs": bool(rng.random() < 0.5),
            "rotation_deg": [float(v) for v in rng.uniform(-15.0, 15.0, size=3)],
            "wave_gain": [float(v) for v in rng.uniform(0.8, 1.2, size=len(WAVES))],
            "pr_s": float(rng.uniform(0.14, 0.19))}


def _record_settings(seed: int, subject: int, index: int) -> dict:
    rng = np.random.default_rng([seed, subject, index, 1])
    low_voltage = bool(rng.random() < 0.5)
    noisy = bool(rng.random() < 0.5)
    return {"low_voltage": low_voltage, "noisy": noisy,
            "limb_scale": float(rng.uniform(0.3, 0.45) if low_voltage else 1.0),
            "gain": float(rng.uniform(0.7, 1.4)),
            "noise_mv": float(rng.uniform(0.06, 0.12) if noisy else 0.005),
            "wander_mv": float(rng.uniform(0.01, 0.05)), "wander_hz": float(rng.uniform(0.1, 0.4)),
            "record_seed": int(rng.integers(2**31))}


def _rotation(degrees: list[float]) -> np.ndarray:
    """(3, 3) rotation by the given angles about x, y and z."""
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def beat_times(heart_rate: float, rr_cv: float, seconds: float, rng: np.random.Generator
               ) -> np.ndarray:
    """R-peak times (s) covering [-0.5, seconds + 0.5]: RR = 60 / rate x (1 + cv x N(0, 1)),
    clipped to [RR_MIN_S, RR_MAX_S], drawn beat by beat; a random phase."""
    if not 20.0 <= heart_rate <= 200.0 or not 0.0 <= rr_cv <= 0.5:
        raise ValueError(f"synthetic: heart rate {heart_rate} bpm / rr cv {rr_cv} out of range")
    mean_rr = 60.0 / heart_rate
    count = int(np.ceil((seconds + 1.0) / RR_MIN_S)) + 1  # enough beats even at the shortest RR
    rr = np.clip(mean_rr * (1.0 + rr_cv * rng.standard_normal(count)), RR_MIN_S, RR_MAX_S)
    times = -0.5 - rng.uniform(0.0, mean_rr) + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    return times[times <= seconds + 0.5]


def heart_vector(subject: dict, times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(3, len(t)) heart vector (mV) of the beats at ``times`` sampled at ``t`` (s)."""
    rotation = _rotation(subject["rotation_deg"])
    waves = []
    for (name, (offset, width, vector)), gain in zip(WAVES.items(), subject["wave_gain"]):
        if name == "P":
            if not subject["regular"]:
                continue  # atrial fibrillation: no organised atrial activity, no P wave
            offset = -subject["pr_s"]
        if subject["wide_qrs"] and name in ("Q", "R", "S"):
            offset, width = offset * WIDE_QRS_FACTOR, width * WIDE_QRS_FACTOR
        waves.append((offset, width, gain * np.asarray(vector), name == "T"))
    if subject["wide_qrs"]:
        waves.append((R_PRIME[0], R_PRIME[1], np.asarray(R_PRIME[2]), False))
    # each beat's cycle length (the last beat's: the mean of the others)
    rr = np.append(np.diff(times), np.diff(times).mean() if times.size > 1 else 1.0)
    signal = np.zeros((3, t.size))
    for offset, width, vector, follows_rr in waves:
        # T: QT shortens at fast rates (Bazett-like sqrt(RR)), and the wave narrows with it
        scale = np.sqrt(np.clip(rr, RR_MIN_S, RR_MAX_S)) if follows_rr else np.ones_like(times)
        centres = times + offset * scale  # (beats,)
        shape = np.exp(-0.5 * ((t[None, :] - centres[:, None]) / (width * scale[:, None])) ** 2)
        signal += (rotation @ vector)[:, None] * shape.sum(axis=0)[None, :]  # (3, T)
    return signal


def fibrillatory_waves(subject: dict, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3, len(t)) heart vector (mV) of atrial fibrillation's f waves: an oscillation at the
    subject's f-wave frequency whose amplitude and phase drift (zero in sinus rhythm)."""
    if subject["f_wave_mv"] == 0.0:
        return np.zeros((3, t.size))
    drift = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * subject["f_wave_hz"] * t + 1.5 * np.sin(
        2 * np.pi * rng.uniform(0.2, 0.5) * t + rng.uniform(0, 2 * np.pi))
    wave = subject["f_wave_mv"] * (0.5 + drift) * np.sin(phase)
    direction = _rotation(subject["rotation_deg"]) @ np.asarray(F_WAVE_VECTOR)
    return direction[:, None] / np.linalg.norm(direction) * wave[None, :]


def leads_from_vector(vector: np.ndarray, limb_scale: float = 1.0,
                      limb_noise: np.ndarray | None = None) -> np.ndarray:
    """(3, T) heart vector -> (T, 12) leads in ``LEADS`` order. ``limb_noise`` (2, T) is added
    to I and II before III, aVR, aVL and aVF are derived from them."""
    lead_i = vector[0]
    lead_ii = 0.5 * vector[0] + np.sqrt(3.0) / 2.0 * vector[1]
    limb = limb_scale * np.stack([lead_i, lead_ii])
    if limb_noise is not None:
        limb = limb + limb_noise
    lead_i, lead_ii = limb
    angles = np.deg2rad(PRECORDIAL_DEG)
    chest = PRECORDIAL_SCALE * (np.stack([np.cos(angles), np.zeros_like(angles), np.sin(angles)]).T
                                @ vector)  # (6, T)
    out = np.stack([lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2.0,
                    lead_i - lead_ii / 2.0, lead_ii - lead_i / 2.0, *chest])
    return out.T


def simulate_record(subject_settings: dict, record_settings: dict) -> RawSignal:
    """One 10 s 12-lead record (mV) of a subject with the record's settings."""
    rng = np.random.default_rng(record_settings["record_seed"])
    t = np.arange(RECORD_SECONDS * FS) / FS
    times = beat_times(subject_settings["heart_rate"], subject_settings["rr_cv"], RECORD_SECONDS, rng)
    vector = record_settings["gain"] * (heart_vector(subject_settings, times, t)
                                        + fibrillatory_waves(subject_settings, t, rng))
    noise_mv = record_settings["noise_mv"]
    wander = record_settings["wander_mv"] * np.sin(
        2 * np.pi * record_settings["wander_hz"] * t + rng.uniform(0, 2 * np.pi))
    limb_noise = rng.normal(0.0, noise_mv, size=(2, t.size)) + wander
    signal = leads_from_vector(vector, record_settings["limb_scale"], limb_noise)
    signal[:, 6:] += rng.normal(0.0, noise_mv, size=(t.size, 6)) + wander[:, None]
    return RawSignal(signal=signal, fs=float(FS), leads=list(LEADS))


def report_sentences(subject_settings: dict, record_settings: dict) -> list[str]:
    settings = subject_settings | record_settings
    return [RATE_CLASSES[subject_settings["rate"]][1],
            *(SENTENCES[key][int(settings[key])] for key in SENTENCES)]


def demo_build_config(out: str, workers: int = 1, seed: int = 0, count: int | None = None,
                      val_fraction: float | None = None):
    """The synthetic demo set's build (``launch/configs/demo.yaml`` trains on it; the learning
    sanity benchmark also simulates its held-out set with it, under another seed)."""
    from melp_scale.shard.build import BuildConfig
    from melp_scale.shard.preprocess import SignalConfig

    return BuildConfig(
        source="synthetic", out=out, seed=seed, workers=workers, shard_size=DEMO_SET["shard_size"],
        val_fraction=DEMO_SET["val_fraction"] if val_fraction is None else val_fraction,
        signal=SignalConfig(fs=DEMO_SET["fs"]),
        options=SourceOptions(count=DEMO_SET["count"] if count is None else count,
                              records_per_subject=DEMO_SET["records_per_subject"], seed=seed))


def build_demo_sets(train: str | None, select_sets: list[dict], workers: int = 1) -> None:
    """What the demo run builds when missing: the demo set at ``train`` (unless None) and, for
    each selection set whose tasks are all synthetic, a separately simulated held-out set (other
    subjects: seed ``HELDOUT_SEED``; every sample is scored) at its folder."""
    import logging
    import os

    from melp_scale.shard.build import run_build

    log = logging.getLogger("melp_scale.train")
    wanted = [(train, {})] if train is not None else []
    held_out = {s["shards"] for s in select_sets}
    held_out -= {s["shards"] for s in select_sets if not str(s["task"]).startswith("synthetic-")}
    wanted += [(path, {"seed": HELDOUT_SEED, "count": HELDOUT_COUNT, "val_fraction": 0.0})
               for path in sorted(held_out - {train})]
    for path, settings in wanted:
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            log.info("no shards at %s: simulating the synthetic demo %s set there", path,
                     "held-out" if settings else "training")
            run_build(demo_build_config(path, workers=workers, **settings))


def list_records(root: str | None, options: SourceOptions) -> Listing:
    if options.count < 1 or options.records_per_subject < 1:
        raise ValueError("--count and --records-per-subject must be at least 1")
    refs = []
    for number in range(options.count):
        subject, index = divmod(number, options.records_per_subject)
        subject_settings = _subject_settings(options.seed, subject)
        record_settings = _record_settings(options.seed, subject, index)
        sentences = report_sentences(subject_settings, record_settings)
        labels = {key: subject_settings[key] for key in ("rate", "regular", "wide_qrs", "heart_rate")}
        labels.update({key: record_settings[key] for key in ("low_voltage", "noisy")})
        refs.append(RecordRef(
            record_id=f"{subject:05d}-{index}", subject=f"{subject:05d}",
            load=functools.partial(simulate_record, subject_settings, record_settings),
            report=". ".join(sentences) + ".", sentences=sentences, labels=labels))
    return Listing(refs, [])
