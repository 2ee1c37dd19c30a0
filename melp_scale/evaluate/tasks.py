"""The downstream task registry: name -> shard source, label keys, class list, prompt file.

A task reads the ``labels`` of each sample's json (melp_scale/shard/format.py). A class is
positive for a sample when any of the class's ``labels`` values occurs among the sample's
values under the task's ``label_keys`` (a list is taken element by element, a scalar such as
a boolean as ``str(value)``). Class names are the columns of the results and of published
split CSVs; ``aliases`` are other column names a split CSV may use for the same class.

| task | source | label keys | classes |
|---|---|---|---|
| ptbxl-super / -sub / -form / -rhythm | ptbxl | ptbxl_super / _sub / _form / _rhythm | 5 / 23 / 19 / 12 |
| cpsc2018 | challenge | dx, dx_abbrev | the 9 CPSC2018 classes (CPSC abbreviations and SNOMED codes) |
| code15 | code15 | code15 | 1dAVb, RBBB, LBBB, SB, AF, ST (CODE's ST is sinus tachycardia) |
| csn | challenge | dx | the 38 classes of the published CSN split (Chapman acronyms -> SNOMED codes) |
| synthetic-rate | synthetic | rate | bradycardia / normal / tachycardia |
| synthetic-rhythm / -qrs / -voltage / -noise | synthetic | regular / wide_qrs / low_voltage / noisy | two classes each (rhythm: sinus rhythm / atrial fibrillation) |

CSN: the class list is fixed, not derived from the codes present, so that results are
comparable across data subsets and a published split CSV's 38 columns match by name. Each
acronym maps to the SNOMED CT code(s) of the CSN database's condition table
(ConditionNames_SNOMED-CT.csv) and the Challenge 2021 equivalents (e.g. ventricular premature
beats 17338001 and premature ventricular contractions 427172004).

Challenge shard sets may mix sub-databases (a Challenge 2021 tree holds CPSC ``A*``, Georgia
``E*``, PTB-XL ``HR*``, Chapman-Shaoxing-Ningbo ``JS*`` ...): ``record_pattern`` keeps the
CPSC2018 records (``A0001``...) for cpsc2018 and the CSN records (``JS00001``...) for csn.

PTB-XL classes are the benchmark's codes (diagnostic class / subclass, form and rhythm
statements of ``scp_statements.csv``). PTB-XL tasks, like the benchmark, leave out records
with no label of the task (``drop_unlabelled``): the form and rhythm sets are smaller than
the super-class set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")


@dataclasses.dataclass(frozen=True)
class TaskClass:
    """One class of a task."""

    name: str  # column name in results and split CSVs
    labels: tuple[str, ...]  # label values in the sample json that make a sample positive
    aliases: tuple[str, ...] = ()  # other split-CSV column names for this class


@dataclasses.dataclass(frozen=True)
class Task:
    """A downstream classification task over one kind of labelled shard set."""

    name: str  # registry name, e.g. "ptbxl-super"
    title: str  # column header in the paper-style tables
    source: str  # the shard source whose labels it reads ("ptbxl", "challenge", "synthetic")
    label_keys: tuple[str, ...]  # keys of the json "labels" object holding the values
    classes: tuple[TaskClass, ...]
    split_rule: str  # "ptbxl-folds" (strat_fold 1-8/9/10) or "seeded" (by subject, --seed)
    drop_unlabelled: bool  # leave out samples positive for no class
    record_pattern: str | None = None  # regex a record id must match (Challenge sub-databases)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompt_file(self) -> str:
        return os.path.join(PROMPT_DIR, f"{self.name}.json")

    def label_row(self, labels: dict[str, Any]) -> list[int]:
        """0/1 per class for one sample's json ``labels``."""
        values: set[str] = set()
        for key in self.label_keys:
            value = labels.get(key)
            if isinstance(value, (list, tuple)):
                values.update(str(v).strip() for v in value)
            elif value is not None:
                values.add(str(value).strip())
        return [int(any(v in values for v in c.labels)) for c in self.classes]

    def prompts(self) -> list[str]:
        """The class descriptions of ``prompts/<task>.json``, in class order."""
        with open(self.prompt_file, encoding="utf-8") as handle:
            table = json.load(handle)["classes"]
        missing = [name for name in self.class_names if not table.get(name, "").strip()]
        if missing:
            raise ValueError(f"{self.prompt_file}: no description for class(es) {', '.join(missing)}")
        return [table[name] for name in self.class_names]


def normalise_name(name: str) -> str:
    """A class or column name compared ignoring case, whitespace, underscores and hyphens
    (PTB-XL's ``NST_`` equals a split file's ``NST``, ``I-AVB`` equals ``IAVB``)."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def _codes(*names: str) -> tuple[TaskClass, ...]:
    """Classes whose json label value is their own name (PTB-XL codes)."""
    return tuple(TaskClass(name, (name,)) for name in names)


def _ptbxl(name: str, title: str, key: str, classes: tuple[TaskClass, ...]) -> Task:
    return Task(name, title, "ptbxl", (key,), classes, "ptbxl-folds", drop_unlabelled=True)


PTBXL_SUPER = _codes("NORM", "MI", "STTC", "CD", "HYP")
PTBXL_SUB = _codes("NORM", "IMI", "AMI", "LMI", "PMI", "STTC", "ISC_", "ISCA", "ISCI", "NST_",
                   "LVH", "RVH", "LAO/LAE", "RAO/RAE", "SEHYP", "_AVB", "CLBBB", "CRBBB",
                   "ILBBB", "IRBBB", "IVCD", "LAFB/LPFB", "WPW")
PTBXL_FORM = _codes("NDT", "NST_", "DIG", "LNGQT", "ABQRS", "PVC", "STD_", "VCLVH", "QWAVE",
                    "LOWT", "NT_", "PAC", "LPR", "INVT", "LVOLT", "HVOLT", "TAB_", "STE_", "PRC(S)")
PTBXL_RHYTHM = _codes("SR", "AFIB", "STACH", "SARRH", "SBRAD", "PACE", "SVARR", "BIGU", "AFLT",
                      "SVTAC", "PSVT", "TRIGU")

# CPSC2018: CPSC abbreviations (Challenge 2020 headers), SNOMED codes (Challenge 2021 headers,
# with the scoring's equivalent codes), and the column names of the published ICBEB split.
CPSC2018 = (
    TaskClass("NORM", ("Normal", "426783006"), ("Normal", "SNR", "NSR", "SR")),
    TaskClass("AF", ("AF", "164889003"), ("AFIB",)),
    TaskClass("I-AVB", ("I-AVB", "270492004"), ("1AVB", "1dAVb")),
    TaskClass("LBBB", ("LBBB", "164909002", "733534002"), ("CLBBB",)),
    TaskClass("RBBB", ("RBBB", "59118001", "713427006"), ("CRBBB",)),
    TaskClass("PAC", ("PAC", "284470004", "63593006"), ("SVPB", "APB", "APC")),
    TaskClass("PVC", ("PVC", "427172004", "17338001"), ("VPC", "VPB", "VEB")),
    TaskClass("STD", ("STD", "429622005"), ("ST depression",)),
    TaskClass("STE", ("STE", "164931005"), ("ST elevation",)),
)

# CSN: the 38 columns of the published split (chapman_<split>.csv, in its column order),
# Chapman acronyms -> SNOMED CT codes of the database's condition table, checked against the
# PhysioNet/CinC Challenge 2021 scoring tables (dx_mapping_scored/unscored.csv: same codes,
# other abbreviations, e.g. STE "ST extension" = 164930006 "st interval abnormal", STTU "ST
# tilt up" = 164931005 "st elevation", STTC = 428750005 "nonspecific st t abnormality").
# Second codes are the Challenge's equivalents (VPB 17338001 ~ PVC 427172004, APB 284470004
# ~ SVPB 63593006).
CSN = tuple(TaskClass(name, codes, aliases) for name, codes, aliases in (
    ("AQW", ("164917005",), ("QAb",)), ("UW", ("164937009",), ("UAb",)),
    ("SR", ("426783006",), ("NSR",)), ("WPW", ("74390002",), ()),
    ("2AVB", ("195042002",), ("IIAVB",)), ("AT", ("713422000",), ("ATach",)),
    ("VB", ("11157007",), ("VBig",)), ("ARS", ("47665007",), ("RAD",)),
    ("STTC", ("428750005",), ("NSSTTA",)), ("SA", ("427393009",), ()),
    ("STE", ("164930006",), ("STIAb",)), ("VPB", ("17338001", "427172004"), ()),
    ("TWO", ("59931005",), ("TInv",)), ("STTU", ("164931005",), ()),
    ("ALS", ("39732003",), ("LAD",)), ("APB", ("284470004", "63593006"), ()),
    ("2AVB1", ("54016002",), ("MoI",)), ("PRIE", ("164947007",), ("LPR",)),
    ("CCR", ("251199005",), ()), ("CR", ("251198002",), ()),
    ("AF", ("164890007",), ("AFL",)), ("AVB", ("233917008",), ()),
    ("QTIE", ("111975006",), ("LQT",)), ("LBBB", ("164909002",), ()),
    ("VEB", ("75532003",), ("VEsB",)), ("SVT", ("426761007",), ()),
    ("RBBB", ("59118001",), ()), ("1AVB", ("270492004",), ("IAVB",)),
    ("STDD", ("429622005",), ()), ("MI", ("164865005",), ()),
    ("AFIB", ("164889003",), ()), ("TWC", ("164934002",), ("TAb",)),
    ("PWC", ("164912004",), ()), ("ERV", ("428417006",), ("ERe",)),
    ("RVH", ("89792004",), ()), ("LVH", ("164873001",), ()),
    ("ST", ("427084000",), ("STach",)), ("JEB", ("426995002",), ("JE",)),
))


def _synthetic(name: str, title: str, key: str, classes: tuple[TaskClass, ...]) -> Task:
    return Task(name, title, "synthetic", (key,), classes, "seeded", drop_unlabelled=False)


TASKS: dict[str, Task] = {task.name: task for task in (
    _ptbxl("ptbxl-super", "PTBXL-Super", "ptbxl_super", PTBXL_SUPER),
    _ptbxl("ptbxl-sub", "PTBXL-Sub", "ptbxl_sub", PTBXL_SUB),
    _ptbxl("ptbxl-form", "PTBXL-Form", "ptbxl_form", PTBXL_FORM),
    _ptbxl("ptbxl-rhythm", "PTBXL-Rhythm", "ptbxl_rhythm", PTBXL_RHYTHM),
    Task("cpsc2018", "CPSC2018", "challenge", ("dx", "dx_abbrev"), CPSC2018, "seeded", True,
         record_pattern=r"A\d+"),
    Task("csn", "CSN", "challenge", ("dx",), CSN, "seeded", True, record_pattern=r"JS\d+"),
    Task("code15", "CODE-15", "code15", ("code15",), tuple(TaskClass(c, (c,)) for c in (
        "1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")), "seeded", drop_unlabelled=False),
    _synthetic("synthetic-rate", "Synth-Rate", "rate", (
        TaskClass("bradycardia", ("brady",)), TaskClass("normal", ("normal",)),
        TaskClass("tachycardia", ("tachy",)))),
    _synthetic("synthetic-rhythm", "Synth-Rhythm", "regular", (
        TaskClass("sinus rhythm", ("True",)), TaskClass("atrial fibrillation", ("False",)))),
    _synthetic("synthetic-qrs", "Synth-QRS", "wide_qrs", (
        TaskClass("wide qrs", ("True",)), TaskClass("narrow qrs", ("False",)))),
    _synthetic("synthetic-voltage", "Synth-Voltage", "low_voltage", (
        TaskClass("low voltage", ("True",)), TaskClass("normal voltage", ("False",)))),
    _synthetic("synthetic-noise", "Synth-Noise", "noisy", (
        TaskClass("noisy", ("True",)), TaskClass("clean", ("False",)))),
)}

PAPER_TASKS = ("ptbxl-super", "ptbxl-sub", "ptbxl-form", "ptbxl-rhythm", "cpsc2018", "csn")


def get_task(name: str) -> Task:
    """The registered task ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"--task {name!r} is unknown; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def tasks_for_source(source: str) -> list[Task]:
    """Every task a shard set built from ``source`` provides."""
    return [task for task in TASKS.values() if task.source == source]
