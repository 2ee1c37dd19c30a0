"""Tiny raw-dataset trees in the MIMIC-IV-ECG, PTB-XL and Challenge layouts, for shard tests.

Each writer returns, per record id, the signal it wrote in mV (samples, 12) in *canonical* lead
order, so tests can compare shards with what went in, independently of the builder.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.io
import wfdb

CANONICAL = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def ecg_like(rng: np.random.Generator, num_samples: int, fs: float) -> np.ndarray:
    """(samples, 12) smooth signals in mV with ECG-like amplitude (sums of low sines + noise)."""
    t = np.arange(num_samples) / fs
    signal = np.zeros((num_samples, 12))
    for lead in range(12):
        for _ in range(3):
            signal[:, lead] += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(0.5, 20) * t
                                                             + rng.uniform(0, 6.28))
    return signal + rng.normal(0, 0.01, signal.shape)


def write_wfdb(folder: str, name: str, signal: np.ndarray, fs: float, leads: list[str],
               gain: float = 200.0) -> None:
    os.makedirs(folder, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal,
                fmt=["16"] * len(leads), adc_gain=[gain] * len(leads), baseline=[0] * len(leads),
                write_dir=folder)


def quantized(signal: np.ndarray, gain: float) -> np.ndarray:
    """What a reader gets back from a format-16 file written at ``gain``."""
    return np.round(signal * gain) / gain


def mimic_tree(root: str, seed: int = 0) -> dict[str, dict]:
    """A MIMIC-IV-ECG tree: 10 good records of 6 subjects + one of each fault.

    Returns {study_id: {"signal": (5000, 12) canonical mV or None, "subject", "skip": reason}}.
    """
    rng = np.random.default_rng(seed)
    expected: dict[str, dict] = {}
    record_rows, measurement_rows = [], []

    def add(study: int, subject: int, reports: list[str], kind: str = "good") -> None:
        study_id, subject_id = str(study), str(subject)
        rel = f"files/p{subject_id[:4]}/p{subject_id}/s{study_id}"
        folder = os.path.join(root, rel)
        canonical = ecg_like(rng, 5000, 500)
        mimic = canonical[:, [CANONICAL.index(n) for n in MIMIC_ORDER]]
        leads = [n.lower() for n in MIMIC_ORDER] if study % 2 else list(MIMIC_ORDER)
        skip = None
        if kind == "nan":
            mimic[100:110, 3] = np.nan
            skip = "nan"
        if kind == "flat":
            mimic[:, 7] = 0.25
            skip = "flat_lead"
        if kind != "missing_header":
            write_wfdb(folder, study_id, mimic, 500, leads)
        if kind == "truncated":
            with open(os.path.join(folder, study_id + ".dat"), "r+b") as handle:
                handle.truncate(5000 * 12)  # half the samples
            skip = "truncated_signal"
        if kind == "missing_signal":
            os.remove(os.path.join(folder, study_id + ".dat"))
            skip = "missing_signal"
        if kind == "lying_header":
            path = os.path.join(folder, study_id + ".hea")
            text = open(path).read().replace(" 500 5000", " 500 6000", 1)
            open(path, "w").write(text)
            skip = "truncated_signal"
        if kind == "missing_header":
            skip = "missing_header"
        if kind == "no_report":
            skip = "no_report"
        record_rows.append(f"{subject_id},{study_id},{study_id},2180-01-01 00:00:00,{rel}/{study_id}")
        fields = reports + [""] * (18 - len(reports))
        if kind != "no_report":
            measurement_rows.append(f"{subject_id},{study_id}," + ",".join(fields))
        expected[study_id] = {"signal": quantized(canonical, 200.0) if skip is None else None,
                              "subject": subject_id, "skip": skip, "reports": reports}

    good_reports = [["Sinus rhythm", "Normal ECG"], ["Sinus tachycardia", "*** EKG abnormal ***"],
                    ["Atrial fibrillation", "Left axis deviation", "Abnormal ECG"]]
    for number in range(10):
        add(40000000 + number, 10000000 + number // 2, good_reports[number % 3])
    faults = ["nan", "flat", "truncated", "missing_signal", "lying_header", "missing_header",
              "no_report"]
    for number, kind in enumerate(faults):
        add(41000000 + number, 11000000 + number, good_reports[0], kind)
    add(42000000, 12000000, ["Sinus", "rhythm"])  # 2 words: below the 4-word minimum
    expected["42000000"]["skip"] = "short_report"
    expected["42000000"]["signal"] = None
    with open(os.path.join(root, "record_list.csv"), "w") as handle:
        handle.write("subject_id,study_id,file_name,ecg_time,path\n" + "\n".join(record_rows) + "\n")
    with open(os.path.join(root, "machine_measurements.csv"), "w") as handle:
        header = "subject_id,study_id," + ",".join(f"report_{k}" for k in range(18))
        handle.write(header + "\n" + "\n".join(measurement_rows) + "\n")
    return expected


SCP_STATEMENTS = """,description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass
NORM,normal ECG,1.0,,,NORM,NORM
IMI,inferior myocardial infarction,1.0,,,MI,IMI
LVOLT,low QRS voltages,,1.0,,,
SR,sinus rhythm,,,1.0,,
AFIB,atrial fibrillation,,,1.0,,
NDT,non-diagnostic T abnormalities,1.0,1.0,,STTC,STTC
"""


def ptbxl_tree(root: str, seed: int = 0) -> dict[str, dict]:
    """A PTB-XL tree of 4 records (3 patients) with hand-written labels to expect."""
    rng = np.random.default_rng(seed)
    rows = [  # ecg_id, patient, report, scp_codes, expected labels (super, sub, form, rhythm)
        (1, 101, "sinus rhythm. normal ecg, nothing else.", "{'NORM': 100.0, 'SR': 0.0}",
         (["NORM"], ["NORM"], [], ["SR"])),
        (2, 101, "atrial fibrillation with low voltage in limb leads.", "{'AFIB': 100.0, 'LVOLT': 0.0}",
         ([], [], ["LVOLT"], ["AFIB"])),
        (3, 202, "inferior infarction, age undetermined. t abnormal.", "{'IMI': 50.0, 'NDT': 100.0, 'SR': 0.0}",
         (["MI", "STTC"], ["IMI", "STTC"], ["NDT"], ["SR"])),
        (4, 303, "sinusrhythmus normales ekg", "{'NORM': 100.0}",
         (["NORM"], ["NORM"], [], [])),
    ]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "scp_statements.csv"), "w") as handle:
        handle.write(SCP_STATEMENTS)
    lines = ["ecg_id,patient_id,age,sex,report,scp_codes,strat_fold,filename_lr,filename_hr"]
    expected = {}
    for ecg_id, patient, report, codes, labels in rows:
        rel = f"records500/00000/{ecg_id:05d}_hr"
        canonical = ecg_like(rng, 5000, 500)
        write_wfdb(os.path.join(root, "records500/00000"), f"{ecg_id:05d}_hr", canonical, 500,
                   CANONICAL, gain=1000.0)
        codes_csv = codes.replace('"', '""')
        lines.append(f'{ecg_id},{patient}.0,60.0,1,"{report}","{codes_csv}",{ecg_id % 10 + 1},'
                     f"records100/00000/{ecg_id:05d}_lr,{rel}")
        expected[str(ecg_id)] = {"signal": quantized(canonical, 1000.0), "subject": str(patient),
                                 "labels": dict(zip(("ptbxl_super", "ptbxl_sub", "ptbxl_form",
                                                     "ptbxl_rhythm"), labels))}
    with open(os.path.join(root, "ptbxl_database.csv"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return expected


def write_challenge(folder: str, name: str, signal: np.ndarray, fs: int, dx: str,
                    georgia_quirk: bool = False) -> None:
    """A Challenge-format record: MATLAB v4 ``val`` (int, 1000/mV) + header with #Dx."""
    os.makedirs(folder, exist_ok=True)
    values = np.round(signal.T * 1000).astype(np.int16)
    scipy.io.savemat(os.path.join(folder, name + ".mat"), {"val": values}, format="4")
    record_name = name + ".mat" if georgia_quirk else name
    lines = [f"{record_name} 12 {fs} {signal.shape[0]} 05-May-2020 14:50:55"]
    for lead, column in zip(CANONICAL, values):
        lines.append(f"{name}.mat 16+24 1000/mV 16 0 {column[0]} 0 0 {lead}")
    lines += ["#Age: 60", "#Sex: Female", f"#Dx: {dx}", "#Rx: Unknown"]
    with open(os.path.join(folder, name + ".hea"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
