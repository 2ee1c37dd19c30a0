"""Published split CSVs (MERL/MELP layouts): class columns matched ignoring case, spaces,
underscores; records matched by id or path column; malformed files refused with rows named;
the CSN class -> SNOMED table against the PhysioNet/CinC Challenge 2021 scoring tables."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from melp_scale.evaluate.data import DataConfig, index_shards, task_data
from melp_scale.evaluate.splitcsv import read_split_csv, read_split_files, record_name
from melp_scale.evaluate.tasks import TASKS, get_task, normalise_name
from melp_scale.shard.build import BuildConfig, run_build
from tests.shard_trees import ecg_like, ptbxl_tree, write_challenge

# The published headers, verbatim (MERL-ICML2024 finetune/data_split/*): note the classes'
# order differs between files of one task, and PTB-XL's NST_/ISC_/_AVB/STD_/NT_/TAB_/STE_
# are written without underscores.
PTBXL_META = "ecg_id,patient_id,strat_fold,filename_lr,filename_hr,{list}"
HEADERS = {
    "ptbxl-super": (PTBXL_META.format(list="super_class") + ",HYP,NORM,MI,CD,STTC"),
    "ptbxl-sub": (PTBXL_META.format(list="sub_class") + ",AMI,LAFB/LPFB,LVH,STTC,IMI,SEHYP,CRBBB,"
                  "WPW,LAO/LAE,NORM,AVB,RAO/RAE,ISC,LMI,ISCI,ISCA,NST,CLBBB,ILBBB,IRBBB,PMI,RVH,IVCD"),
    "ptbxl-form": (PTBXL_META.format(list="form") + ",PAC,DIG,HVOLT,STD,LPR,QWAVE,VCLVH,NDT,TAB,"
                   "LOWT,ABQRS,LNGQT,PRC(S),NT,STE,NST,PVC,INVT,LVOLT"),
    "ptbxl-rhythm": (PTBXL_META.format(list="rhythm") + ",SVARR,BIGU,STACH,SARRH,SBRAD,TRIGU,AFIB,"
                     "SR,SVTAC,PSVT,AFLT,PACE"),
    "cpsc2018": ("patient_id,ecg_id,filename,validation,age,sex,scp_codes,"
                 "AFIB,VPC,NORM,1AVB,CRBBB,STE,PAC,CLBBB,STD"),
    "csn": ("ecg_path,age,diagnose,AQW,UW,SR,WPW,2AVB,AT,VB,ARS,STTC,SA,STE,VPB,TWO,STTU,ALS,APB,"
            "2AVB1,PRIE,CCR,CR,AF,AVB,QTIE,LBBB,VEB,SVT,RBBB,1AVB,STDD,MI,AFIB,TWC,PWC,ERV,RVH,LVH,ST,JEB"),
}
NUM_META = {"ptbxl-super": 6, "ptbxl-sub": 6, "ptbxl-form": 6, "ptbxl-rhythm": 6, "cpsc2018": 7, "csn": 3}
# our class -> the published column, where the names differ (checked by hand against the files)
PTBXL_RENAMED = {"NST_": "NST", "ISC_": "ISC", "_AVB": "AVB", "STD_": "STD", "NT_": "NT", "TAB_": "TAB",
                 "STE_": "STE"}
RENAMED = {"cpsc2018": {"AF": "AFIB", "I-AVB": "1AVB", "LBBB": "CLBBB", "RBBB": "CRBBB", "PVC": "VPC"}}


def _meta(task: str, number: int) -> list[str]:
    if task.startswith("ptbxl"):
        return [str(number), f"{15000 + number}.0", "10", f"records100/00000/{number:05d}_lr",
                f"records500/00000/{number:05d}_hr", "['X']"]
    if task == "cpsc2018":  # ecg_id is a renumbering: only ``filename`` names the record
        return [str(number), str(number), f"A{number + 6000:04d}", "False", "61.0", "0", "{}"]
    return [f"/chapman/WFDBRecords/18/186/JS{number:05d}.mat", "12", "AF"]


def _published_csv(path, task: str, numbers: list[int]) -> np.ndarray:
    """A file in the published layout; row k is positive for column k % C (and row 0 also
    for the last column). Returns the (rows, columns) label matrix in file column order."""
    header = HEADERS[task].split(",")
    columns = header[NUM_META[task]:]
    labels = np.zeros((len(numbers), len(columns)), dtype=np.uint8)
    for k in range(len(numbers)):
        labels[k, k % len(columns)] = 1
    labels[0, -1] = 1
    lines = [HEADERS[task]]
    for number, row in zip(numbers, labels):
        lines.append(",".join(_meta(task, number) + [str(v) for v in row]))
    path.write_text("\n".join(lines) + "\n")
    return labels


@pytest.mark.parametrize("task_name", list(HEADERS))
def test_every_published_layout_is_read_by_column_name(tmp_path, task_name):
    task = get_task(task_name)
    columns = HEADERS[task_name].split(",")[NUM_META[task_name]:]
    assert len(columns) == len(task.classes)
    numbers = list(range(1, len(columns) + 3))
    labels = _published_csv(tmp_path / "split.csv", task_name, numbers)
    known = {record_name(_meta(task_name, n)[{"cpsc2018": 2}.get(task_name, 0)]) for n in numbers}
    frame = read_split_csv(str(tmp_path / "split.csv"), task, known=known)
    # PTB-XL: ecg_id, filename_lr and filename_hr all name the records: the preferred path column
    expected_column = {"cpsc2018": "filename", "csn": "ecg_path"}.get(task_name, "filename_hr")
    assert frame.attrs["record_column"] == expected_column
    for cls in task.class_names:
        column = columns.index(RENAMED.get(task_name, PTBXL_RENAMED).get(cls, cls))
        assert frame[cls].tolist() == labels[:, column].tolist(), cls
    if task_name == "cpsc2018":
        assert frame["record"].tolist()[:2] == ["A6001", "A6002"]
    if task_name == "csn":
        assert frame["record"].tolist()[0] == "JS00001"


def test_record_column_is_the_one_that_names_the_samples(tmp_path):
    """ICBEB's ecg_id (677) is not the record (A6729): the column naming samples wins."""
    csv = tmp_path / "icbeb_test.csv"
    csv.write_text(HEADERS["cpsc2018"] + "\n677,677,A6729,False,61.0,0,{},0,0,0,0,0,0,0,0,1\n")
    assert read_split_csv(str(csv), get_task("cpsc2018"), known={"A6729"}).attrs["record_column"] == "filename"
    assert read_split_csv(str(csv), get_task("cpsc2018"), known={"677"}).attrs["record_column"] == "ecg_id"
    frame = read_split_csv(str(csv), get_task("cpsc2018"), record_column="ecg_id")
    assert frame["record"].tolist() == ["677"]
    with pytest.raises(ValueError, match="--record-column 'nope'"):
        read_split_csv(str(csv), get_task("cpsc2018"), record_column="nope")


def test_class_names_are_unique_per_task_after_normalising():
    for task in TASKS.values():
        owners: dict[str, str] = {}
        for cls in task.classes:
            for name in {normalise_name(n) for n in (cls.name, *cls.aliases)}:
                assert owners.setdefault(name, cls.name) == cls.name, (task.name, name)
    assert normalise_name(" NST_ ") == normalise_name("nst") and normalise_name("I-AVB") == "iavb"


# ----------------------------------------------------------------------------- refusals (15.9)


def test_labels_other_than_0_1_true_false_are_refused_with_lines(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text(HEADERS["ptbxl-super"] + "\n"
                   "1,1.0,1,a/00001_lr,a/00001_hr,[],0,1,0,0,0\n"
                   "2,1.0,1,a/00002_lr,a/00002_hr,[],TRUE,false,1.0,0.0,0\n"  # all accepted
                   "3,1.0,1,a/00003_lr,a/00003_hr,[],0,2,0,0,0\n"
                   "4,1.0,1,a/00004_lr,a/00004_hr,[],0,yes,0,0,0\n")
    with pytest.raises(ValueError, match=r"column 'NORM'.*'2', 'yes'.*line\(s\) 4, 5") as error:
        read_split_csv(str(csv), get_task("ptbxl-super"))
    assert str(csv) in str(error.value)
    csv.write_text(HEADERS["ptbxl-super"] + "\n1,1.0,1,a/00001_lr,a/00001_hr,[],0,1,0,,0\n")
    with pytest.raises(ValueError, match=r"column 'CD'.*''.*line\(s\) 2"):
        read_split_csv(str(csv), get_task("ptbxl-super"))
    csv.write_text(HEADERS["ptbxl-super"] + "\n1,1.0,1,a/00001_lr,a/00001_hr,[],TRUE,false,1.0,0.0,0\n")
    frame = read_split_csv(str(csv), get_task("ptbxl-super"))
    assert frame[["NORM", "MI", "STTC", "CD", "HYP"]].iloc[0].tolist() == [0, 1, 0, 0, 1]


def test_a_record_twice_with_other_labels_or_in_two_splits_is_refused(tmp_path):
    task = get_task("ptbxl-super")
    twice = tmp_path / "twice.csv"
    twice.write_text(HEADERS["ptbxl-super"] + "\n"
                     "7,1.0,1,a/00007_lr,a/00007_hr,[],0,1,0,0,0\n"
                     "8,1.0,1,a/00008_lr,a/00008_hr,[],0,1,0,0,0\n"
                     "7,1.0,1,a/00007_lr,a/00007_hr,[],1,0,0,0,0\n")
    with pytest.raises(ValueError, match=r"twice with different labels: 7 \(lines 2, 4\)"):
        read_split_csv(str(twice), task)
    same = tmp_path / "same.csv"  # an identical repeat is kept once and counted
    same.write_text(HEADERS["ptbxl-super"] + "\n"
                    "7,1.0,1,a/00007_lr,a/00007_hr,[],0,1,0,0,0\n"
                    "7,1.0,1,a/00007_lr,a/00007_hr,[],0,1,0,0,0\n")
    frame = read_split_csv(str(same), task)
    assert frame["record"].tolist() == ["7"] and frame.attrs["repeated_rows"] == 1
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text(HEADERS["ptbxl-super"] + "\n8,1.0,1,a/00008_lr,a/00008_hr,[],0,1,0,0,0\n"
                     "9,1.0,1,a/00009_lr,a/00009_hr,[],0,1,0,0,0\n")
    test.write_text(HEADERS["ptbxl-super"] + "\n9,1.0,10,a/00009_lr,a/00009_hr,[],0,1,0,0,0\n")
    with pytest.raises(ValueError, match=r"in two splits: 9 \(.*test.csv line 2, .*train.csv line 3\)"):
        read_split_files({"train": str(train), "test": str(test)}, task, None, {"8", "9"})


# ----------------------------------------------------------------------------- end to end


def test_published_layouts_end_to_end_on_shards(tmp_path):
    """cpsc2018 (icbeb_*.csv: record by filename), csn (chapman_*.csv: by ecg_path) and
    ptbxl-sub (by filename_hr, NST/ISC/AVB columns) through task_data on real shards."""
    root = tmp_path / "challenge"
    rng = np.random.default_rng(0)
    for name, dx in {"A0001": "AF", "A0002": "Normal", "JS00001": "164889003", "JS00002": "426783006"}.items():
        write_challenge(str(root / name[:1]), name, ecg_like(rng, 5000, 500), 500, dx)
    shards = str(tmp_path / "shards")
    run_build(BuildConfig(source="challenge", root=str(root), out=shards, val_fraction=0.0))
    refs, _ = index_shards(shards)
    icbeb_train, icbeb_test = tmp_path / "icbeb_train.csv", tmp_path / "icbeb_test.csv"
    icbeb_train.write_text(HEADERS["cpsc2018"] + "\n12,12,A0001,False,61.0,0,{},0,0,0,0,1,0,0,0,0\n")
    icbeb_test.write_text(HEADERS["cpsc2018"] + "\n13,13,A0002,False,61.0,0,{},0,0,1,0,0,0,0,0,0\n"
                          "14,14,A0999,False,61.0,0,{},0,0,1,0,0,0,0,0,0\n")
    data = task_data(get_task("cpsc2018"), refs, DataConfig(
        shards, split_csvs={"train": str(icbeb_train), "test": str(icbeb_test)}))
    by_record = {refs[r].meta["record_id"]: (s, dict(zip(data.task.class_names, row.tolist())))
                 for r, s, row in zip(data.rows, data.splits, data.labels)}
    assert by_record["A0001"][0] == "train" and by_record["A0001"][1]["RBBB"] == 1  # the CSV's label
    assert sum(by_record["A0001"][1].values()) == 1 and by_record["A0002"] == (
        "test", {c: int(c == "NORM") for c in data.task.class_names})
    assert data.left_out["split_csv_rows_without_sample"] == 1
    assert "records by column 'filename'" in data.split_rule
    chapman = tmp_path / "chapman_test.csv"
    columns = HEADERS["csn"].split(",")[3:]
    row = ["1" if c in ("AF", "AFIB") else "0" for c in columns]  # as published: AFIB rows are AF too
    chapman.write_text(HEADERS["csn"] + "\n/chapman/WFDBRecords/01/010/JS00001.mat,40,AFIB,"
                       + ",".join(row) + "\n")
    csn = task_data(get_task("csn"), refs, DataConfig(shards, split_csvs={"test": str(chapman)}))
    assert [refs[r].meta["record_id"] for r in csn.rows] == ["JS00001"]
    assert {c for c, v in zip(csn.task.class_names, csn.labels[0]) if v} == {"AF", "AFIB"}
    assert "records by column 'ecg_path'" in csn.split_rule


def test_ptbxl_sub_layout_without_underscores_on_shards(tmp_path):
    root = str(tmp_path / "ptbxl")
    ptbxl_tree(root)
    shards = str(tmp_path / "shards")
    run_build(BuildConfig(source="ptbxl", root=root, out=shards, val_fraction=0.0, min_words=0))
    refs, _ = index_shards(shards)
    csv = tmp_path / "ptbxl_sub_class_test.csv"
    columns = HEADERS["ptbxl-sub"].split(",")[6:]
    values = ["1" if c in ("NST", "AVB", "ISC") else "0" for c in columns]
    csv.write_text(HEADERS["ptbxl-sub"] + "\n3,1.0,10,records100/00000/00003_lr,"
                   "records500/00000/00003_hr,\"['NST', 'AVB']\"," + ",".join(values) + "\n")
    data = task_data(get_task("ptbxl-sub"), refs, DataConfig(shards, split_csvs={"test": str(csv)}))
    assert [refs[r].meta["record_id"] for r in data.rows] == ["3"]
    assert {c for c, v in zip(data.task.class_names, data.labels[0]) if v} == {"NST_", "_AVB", "ISC_"}


# ----------------------------------------------------------------------------- CSN codes

SCORING = os.path.join(
    os.environ.get("MELP_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")),
    "challenge", "scoring-tables", "evaluation-2021")
# CSN acronym -> the Challenge 2021 diagnosis name of its (first) SNOMED code, by hand from the
# Chapman-Shaoxing-Ningbo condition table (acronym, full name, SNOMED CT).
CSN_NAMES = {
    "AQW": "qwave abnormal", "UW": "u wave abnormal", "SR": "sinus rhythm",
    "WPW": "wolff parkinson white pattern", "2AVB": "2nd degree av block", "AT": "atrial tachycardia",
    "VB": "ventricular bigeminy", "ARS": "right axis deviation", "STTC": "nonspecific st t abnormality",
    "SA": "sinus arrhythmia", "STE": "st interval abnormal", "VPB": "ventricular premature beats",
    "TWO": "t wave inversion", "STTU": "st elevation", "ALS": "left axis deviation",
    "APB": "premature atrial contraction", "2AVB1": "mobitz type i wenckebach atrioventricular block",
    "PRIE": "prolonged pr interval", "CCR": "countercolockwise rotation", "CR": "clockwise rotation",
    "AF": "atrial flutter", "AVB": "av block", "QTIE": "prolonged qt interval",
    "LBBB": "left bundle branch block", "VEB": "ventricular escape beat",
    "SVT": "supraventricular tachycardia", "RBBB": "right bundle branch block",
    "1AVB": "1st degree av block", "STDD": "st depression", "MI": "myocardial infarction",
    "AFIB": "atrial fibrillation", "TWC": "t wave abnormal", "PWC": "p wave change",
    "ERV": "early repolarization", "RVH": "right ventricular hypertrophy",
    "LVH": "left ventricular hypertrophy", "ST": "sinus tachycardia", "JEB": "junctional escape",
}


@pytest.mark.skipif(not os.path.isdir(SCORING), reason="Challenge scoring tables not available")
def test_csn_snomed_codes_match_the_challenge_scoring_tables():
    table = pd.concat([pd.read_csv(os.path.join(SCORING, f), dtype=str)
                       for f in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv")])
    name_of = dict(zip(table["SNOMEDCTCode"], table["Dx"].str.strip().str.lower()))
    csn = get_task("csn")
    assert set(csn.class_names) == set(CSN_NAMES)
    for cls in csn.classes:
        assert all(code in name_of for code in cls.labels), cls
        assert name_of[cls.labels[0]] == CSN_NAMES[cls.name], (cls.name, cls.labels[0])
    cpsc = {c.name: c for c in get_task("cpsc2018").classes}
    assert name_of[cpsc["STE"].labels[1]] == "st elevation" and name_of[cpsc["STD"].labels[1]] == "st depression"
