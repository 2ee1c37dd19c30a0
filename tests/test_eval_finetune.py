"""Fine-tuning (whole ECG encoder + linear head, layer-wise lr decay, early stopping) and
patient identification, end to end on small synthetic shards: results.json, results.md, PNGs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from melp_scale.evaluate.__main__ import main as evaluate_main
from melp_scale.evaluate.data import DataConfig, SampleRef, index_shards
from melp_scale.evaluate.finetune import FinetuneConfig, FinetuneModel, fit, parameter_groups
from melp_scale.evaluate.patient_id import gallery_and_probes, match_ranks
from tests.eval_helpers import demo_checkpoint, synthetic_shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = synthetic_shards(str(root / "synth"), seed=4, count=16)  # 8 subjects x 2 records
    return root, data, demo_checkpoint(str(root / "ckpt"))


def test_layer_wise_lr_decay_groups(setup):
    from melp_scale.model import MELP

    melp = MELP.from_pretrained(setup[2])
    model = FinetuneModel(melp, 3, 8)
    config = FinetuneConfig(lr=1e-3, layer_decay=0.5)
    groups = parameter_groups(model, config)
    num_layers = len(melp.ecg_encoder.layers)
    assert [g["depth"] for g in groups] == list(range(num_layers + 2))
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (num_layers + 1 - group["depth"]))
    by_id = {id(p): g["depth"] for g in groups for p in g["params"]}
    assert by_id[id(model.head.weight)] == num_layers + 1
    assert by_id[id(next(melp.ecg_encoder.layers[0].parameters()))] == 1
    assert by_id[id(next(melp.ecg_encoder.feature_extractor.parameters()))] == 0
    assert not any(id(p) in by_id for p in melp.text.parameters())  # the text tower is not tuned
    ecg_params = {id(p) for p in [*melp.ecg_encoder.parameters(), *melp.beat_pooler.parameters()]}
    assert ecg_params <= set(by_id)


def test_fit_trains_the_encoder_and_keeps_the_text_tower(setup):
    from melp_scale.model import MELP

    _, data, checkpoint = setup
    refs, _ = index_shards(data)
    labels = np.array([[int(r.meta["labels"]["rate"] == "normal")] for r in refs], dtype=np.uint8)
    before = MELP.from_pretrained(checkpoint)
    model, log = fit(lambda: MELP.from_pretrained(checkpoint), {"train": refs[:8], "val": refs[8:12]},
                     {"train": labels[:8], "val": labels[8:12]}, DataConfig(data),
                     FinetuneConfig(epochs=1, patience=1, batch_size=4))
    assert (log["steps"], log["best_epoch"], log["epochs_run"]) == (2, 1, 1)
    changed = [not torch.equal(a, b) for a, b in zip(before.ecg_encoder.parameters(),
                                                      model.melp.ecg_encoder.parameters())]
    assert any(changed)
    assert all(torch.equal(a, b) for a, b in zip(before.text.parameters(), model.melp.text.parameters()))


def test_cli_finetune_writes_results_tables_and_roc(setup):
    root, data, checkpoint = setup
    out = str(root / "eval-ft")
    assert evaluate_main(["finetune", "--checkpoint", checkpoint, "--data", data, "--out", out,
                          "--task", "synthetic-rate", "--fractions", "0.5", "1.0", "--ft-epochs", "1",
                          "--ft-batch-size", "8", "--bootstrap", "20"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    result = results["finetune"]["synthetic-rate"]
    assert set(result["fractions"]) == {"0.5", "1"}
    # shard split kept: 2 val subjects -> test (4 records); train subjects split into train/val
    assert result["split_counts"] == {"train": 10, "val": 2, "test": 4}
    assert result["fractions"]["1"]["num_train"] == 10 and result["fractions"]["0.5"]["num_train"] == 5
    assert result["settings"]["layer_decay"] == 0.75 and result["fractions"]["1"]["num_rows"] == 4
    markdown = open(os.path.join(out, "results.md")).read()
    assert "| this checkpoint, fine-tuning 100 % |" in markdown and "fine-tuning 100 %" in markdown
    assert os.path.getsize(os.path.join(out, "roc", "finetune-synthetic-rate.png")) > 1000


def test_patient_ranks_by_hand():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # patients 0, 1, 2
    probes = np.array([[0.9, 0.1],   # closest to patient 0: rank 1
                       [1.0, 0.0],   # patient 1's probe, but patients 0 and 2 are closer: rank 3
                       [0.0, 2.0]])  # patient 2's probe: patient 1 (cos 1) beats 2 (0.707): rank 2
    ranks = match_ranks(gallery, np.array([0, 1, 2]), probes, np.array([0, 1, 2]))
    assert ranks.tolist() == [1, 3, 2]
    tie = match_ranks(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([0, 1]), np.array([[1.0, 0.0]]),
                      np.array([1]))
    assert tie.tolist() == [2]  # a tie with another patient counts against the probe


def test_gallery_is_each_patients_first_record_once():
    def ref(record, subject, window=0):
        return SampleRef("s", 1, 0, "val", f"{record}_w{window}", {"source": "ptbxl", "record_id": record,
                                                                 "subject": subject}, "")
    refs = [ref("10", "a"), ref("9", "a"), ref("9", "a", 1), ref("3", "b"), ref("4", "c"), ref("12", "c")]
    gallery, gallery_id, probes, probe_id = gallery_and_probes(refs, np.arange(len(refs)))
    assert gallery.tolist() == [1, 3, 4]  # records 9 (before 10), 3, 4
    assert probes.tolist() == [0, 5] and probe_id.tolist() == [0, 2]  # window 1 of record 9: not a probe


def test_cli_patient_id_writes_results_and_cmc(setup):
    root, data, checkpoint = setup
    out = str(root / "eval-pid")
    assert evaluate_main(["patient-id", "--checkpoint", checkpoint, "--data", data, "--out", out,
                          "--patient-split", "all"]) == 0
    result = json.load(open(os.path.join(out, "results.json")))["patient_id"]
    assert (result["num_gallery"], result["num_probes"]) == (8, 8)
    assert result["chance"]["top1"] == pytest.approx(12.5)
    for kind in ("features", "global"):
        assert 0 <= result[kind]["top1"] <= result[kind]["top5"] <= result[kind]["top10"] == 100.0
    assert result["subjects"]["num_subjects"] == 8
    assert "Patient identification (8 gallery patients, 8 probes" in open(os.path.join(out, "results.md")).read()
    assert os.path.getsize(os.path.join(out, "patient_id_cmc.png")) > 1000


def test_ptbxl_reports_caption_and_patients_use_the_test_fold(setup, tmp_path):
    import pandas as pd

    from melp_scale.shard.build import BuildConfig, run_build
    from tests.shard_trees import ptbxl_tree

    root = str(tmp_path / "ptbxl")
    ptbxl_tree(root)
    database = os.path.join(root, "ptbxl_database.csv")
    frame = pd.read_csv(database)
    frame["strat_fold"] = [10, 10, 1, 9]  # patient 101's two records in the test fold
    frame.to_csv(database, index=False)
    shards = str(tmp_path / "shards")
    run_build(BuildConfig(source="ptbxl", root=root, out=shards, val_fraction=0.0, min_words=0))
    results = {}
    for command in (["caption", "--max-samples", "8", "--max-len", "6"], ["patient-id"]):
        out = str(tmp_path / command[0])
        assert evaluate_main([*command, "--checkpoint", setup[2], "--data", shards, "--out", out,
                              "--bootstrap", "0"]) == 0
        results.update(json.load(open(os.path.join(out, "results.json"))))
    caption = results["caption"]
    assert caption["split"] == "test" and caption["num_reports"] == 2  # fold 10 only
    assert {e["reference"] for e in caption["examples"]} == {
        "sinus rhythm. normal ecg, nothing else.", "atrial fibrillation with low voltage in limb leads."}
    assert caption["subjects"]["num_subjects"] == 1
    patients = results["patient_id"]
    assert patients["split_rule"].startswith("PTB-XL strat_fold 10")
    assert (patients["num_gallery"], patients["num_probes"]) == (1, 1)
