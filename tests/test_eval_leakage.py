"""No leakage: the export records its training data, and evaluation refuses (unless
--allow-pretraining-rows) a shard set or subjects the checkpoint was pretrained on; every
result states the split rule, the counts and what was seen in pretraining."""
from __future__ import annotations

import json
import os
import shutil
import types

import pytest

from melp_scale.evaluate.__main__ import main as evaluate_main
from melp_scale.evaluate.provenance import FILE_NAME, PretrainingCheck, sha256_file, write_training_data
from tests.eval_helpers import demo_checkpoint, synthetic_shards

ZEROSHOT = ["zeroshot", "--task", "synthetic-rate", "--bootstrap", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak")
    pretrain = synthetic_shards(str(root / "pretrain"), seed=3, count=16)  # 8 subjects, 2 in val
    # the same simulated people, built again without a val split: other shard files, same subjects
    rebuilt = synthetic_shards(str(root / "rebuilt"), seed=3, count=16, val_fraction=0.0)
    held_out = synthetic_shards(str(root / "heldout"), seed=11, count=8)
    bare = demo_checkpoint(str(root / "bare"))
    checkpoint = str(root / "ckpt")
    shutil.copytree(bare, checkpoint)
    from melp_scale.model import MELP
    from melp_scale.train.config import DataConfig as TrainData
    from melp_scale.train.melp_task import MELPTask

    # the trainer's export, as launch/pretrain.py calls it (model.save_pretrained + the record)
    task = MELPTask.__new__(MELPTask)
    task.config = types.SimpleNamespace(data=TrainData(shards=pretrain))
    task.export(MELP.from_pretrained(bare), checkpoint)
    return types.SimpleNamespace(root=root, pretrain=pretrain, rebuilt=rebuilt, held_out=held_out,
                                 bare=bare, checkpoint=checkpoint)


def test_export_records_shard_set_hashes_and_salted_subjects(setup):
    record = json.load(open(os.path.join(setup.checkpoint, FILE_NAME)))
    manifest = json.load(open(os.path.join(setup.pretrain, "manifest.json")))
    (entry,) = record["shard_sets"]
    assert entry["name"] == "pretrain" and record["trained_splits"] == ["train"]
    assert entry["manifest_sha256"] == sha256_file(os.path.join(setup.pretrain, "manifest.json"))
    assert sorted(d for ds in entry["shard_sha256"].values() for d in ds) == sorted(
        s["sha256"] for s in manifest["shards"])
    assert {k: len(v) for k, v in entry["subjects"].items()} == manifest["split"]["num_subjects"]
    keys = {k for v in entry["subjects"].values() for k in v}
    assert len(keys) == 8 and not keys & {f"{i:05d}" for i in range(8)}  # no raw subject id
    assert all(len(k) == 16 for k in keys)
    again = write_training_data(str(setup.root / "again"), [setup.pretrain])
    other = json.load(open(again))  # a new salt: keys of two exports cannot be joined
    assert not keys & {k for v in other["shard_sets"][0]["subjects"].values() for k in v}


def test_pretrained_shard_set_is_refused_by_default(setup, capsys):
    out = str(setup.root / "eval-refused")
    code = evaluate_main([*ZEROSHOT, "--checkpoint", setup.checkpoint, "--data", setup.pretrain, "--out", out])
    error = capsys.readouterr().err
    assert code == 2 and "pretrain" in error and "was pretrained on" in error
    assert "--allow-pretraining-rows" in error and not os.path.exists(os.path.join(out, "results.json"))


def test_allowed_pretrained_set_uses_its_own_subject_split(setup):
    out = str(setup.root / "eval-allowed")
    assert evaluate_main([*ZEROSHOT, "--checkpoint", setup.checkpoint, "--data", setup.pretrain,
                          "--out", out, "--allow-pretraining-rows"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["pretraining"]["evaluated_shard_set_was_pretrained_on"] is True
    assert results["pretraining"]["allow_pretraining_rows"] is True
    zeroshot = results["zeroshot"]["synthetic-rate"]
    assert "the shard set's own subject split" in zeroshot["split_rule"]
    # test = the shard set's val subjects (2 subjects, 4 records): validated on, never trained on
    assert zeroshot["split_counts"]["test"] == 4 and zeroshot["num_rows"] == 4
    assert zeroshot["subjects"]["test"] == {"num_subjects": 2, "seen_in_pretraining": False,
                                            "subjects_trained_on": 0, "subjects_validated_on": 2}
    assert zeroshot["subjects"]["train"]["subjects_trained_on"] == zeroshot["subjects"]["train"]["num_subjects"]
    markdown = open(os.path.join(out, "results.md")).read()
    assert "Data, splits and pretraining overlap" in markdown and "2 subjects, 0 trained on" in markdown


def test_subjects_seen_in_pretraining_are_refused_in_another_shard_set(setup, capsys):
    assert not PretrainingCheck.of(setup.checkpoint, setup.rebuilt).same_shard_set  # other files
    code = evaluate_main([*ZEROSHOT, "--checkpoint", setup.checkpoint, "--data", setup.rebuilt,
                          "--out", str(setup.root / "eval-rebuilt"), "--zeroshot-split", "all"])
    error = capsys.readouterr().err
    assert code == 2 and "6 of 8 scored subjects were in the pretraining data" in error


def test_held_out_set_is_scored_and_reported_clean(setup):
    out = str(setup.root / "eval-heldout")
    assert evaluate_main([*ZEROSHOT, "--checkpoint", setup.checkpoint, "--data", setup.held_out,
                          "--out", out, "--zeroshot-split", "all"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["pretraining"]["evaluated_shard_set_was_pretrained_on"] is False
    seen = results["zeroshot"]["synthetic-rate"]["subjects"]
    assert all(s["seen_in_pretraining"] is False for s in seen.values())


def test_checkpoint_without_record_is_reported_unknown(setup):
    out = str(setup.root / "eval-bare")
    assert evaluate_main([*ZEROSHOT, "--checkpoint", setup.bare, "--data", setup.pretrain, "--out", out]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["pretraining"]["record"].startswith("unknown")
    assert results["zeroshot"]["synthetic-rate"]["subjects"]["test"]["seen_in_pretraining"] == "unknown"


def test_streamed_shard_sets_make_the_record_partial(setup, tmp_path):
    checkpoint = str(tmp_path / "ckpt")
    shutil.copytree(setup.bare, checkpoint)
    write_training_data(checkpoint, [setup.pretrain], streamed=["https://example.org/shards/mimic/"])
    check = PretrainingCheck.of(checkpoint, setup.held_out)
    assert check.summary()["unrecorded_shard_sets"] == ["mimic"]
    seen = check.seen([{"subject": "00000"}])
    assert seen["seen_in_pretraining"] is False and "mimic" in seen["record_partial"]
