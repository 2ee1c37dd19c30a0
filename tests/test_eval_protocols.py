"""Comparability switches: --prompts (several prompts per class averaged in embedding space),
--protocol melp (CPSC2018's first 5 s zero-padded to 10 s), the official linear-probe preset,
and softmax-scored AUC as a labelled compatibility option."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from melp_scale.evaluate.__main__ import main as evaluate_main
from melp_scale.evaluate.data import DataConfig, TaskData, make_transform
from melp_scale.evaluate.linear_probe import ProbeConfig, run_linear_probe
from melp_scale.evaluate.runner import Evaluation, RunConfig
from melp_scale.evaluate.tasks import get_task
from melp_scale.evaluate.zeroshot import class_embeddings, load_prompts, softmax_scores
from tests.eval_helpers import demo_checkpoint, synthetic_shards

PROMPTS = {"Bradycardia": ["sinus bradycardia", "slow heart rate below 60 beats per minute"],
           "NORMAL": "normal sinus rhythm",
           "tachy_cardia": ["sinus tachycardia", "fast heart rate", "heart rate above 100"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "demo"))


@pytest.fixture(scope="module")
def model(checkpoint):
    from melp_scale.model import MELP

    return MELP.from_pretrained(checkpoint).eval()


def test_prompt_file_matched_by_normalised_name(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({**PROMPTS, "unrelated class": "ignored"}))
    source, prompts = load_prompts(get_task("synthetic-rate"), str(path))
    assert source == "user file prompts.json"
    assert prompts == [PROMPTS["Bradycardia"], [PROMPTS["NORMAL"]], PROMPTS["tachy_cardia"]]
    default_source, default = load_prompts(get_task("synthetic-rate"))
    assert default_source.startswith("melp-scale") and all(len(p) == 1 for p in default)
    path.write_text(json.dumps({"bradycardia": "x", "normal": "y"}))
    with pytest.raises(ValueError, match="no prompt for class\\(es\\) tachycardia"):
        load_prompts(get_task("synthetic-rate"), str(path))
    path.write_text(json.dumps({"bradycardia": [], "normal": "y", "tachycardia": "z"}))
    with pytest.raises(ValueError, match="'bradycardia' must be a non-empty string"):
        load_prompts(get_task("synthetic-rate"), str(path))


def test_several_prompts_are_averaged_in_embedding_space(model):
    groups = [PROMPTS["Bradycardia"], [PROMPTS["NORMAL"]], PROMPTS["tachy_cardia"]]
    got = class_embeddings(model, groups)
    with torch.no_grad():  # independently: each prompt alone, float64, mean, renormalise
        expected = []
        for group in groups:
            single = [model.encode_text([p]).double()[0] for p in group]
            single = [v / v.norm() for v in single]
            mean = torch.stack(single).mean(dim=0)
            expected.append((mean / mean.norm()).numpy())
        first_only = model.encode_text([groups[0][0]]).double()[0]
    np.testing.assert_allclose(got, np.stack(expected), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-9)
    assert np.abs(got[0] - (first_only / first_only.norm()).numpy()).max() > 1e-3  # really averaged


def test_cli_zeroshot_names_the_user_prompts_and_softmax_option(checkpoint, tmp_path):
    data = synthetic_shards(str(tmp_path / "synth"), seed=5, count=8)
    prompts = tmp_path / "my_prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = str(tmp_path / "eval")
    assert evaluate_main(["zeroshot", "--checkpoint", checkpoint, "--data", data, "--out", out,
                          "--task", "synthetic-rate", "--bootstrap", "0", "--zeroshot-split", "all",
                          "--prompts", str(prompts), "--auc-scores", "softmax"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    zeroshot = results["zeroshot"]["synthetic-rate"]
    assert zeroshot["prompt_set"] == "user file my_prompts.json"
    assert zeroshot["prompts"]["tachycardia"] == PROMPTS["tachy_cardia"]
    assert zeroshot["auc_scores"].startswith("softmax") and results["protocol"]["prompts"] == "my_prompts.json"
    markdown = open(os.path.join(out, "results.md")).read()
    assert "zero-shot prompts: my_prompts.json" in markdown and "compatibility option" in markdown


def test_softmax_scores_and_probe_presets():
    scores = np.array([[0.2, 0.1, -0.3], [1.0, 1.0, 1.0]])
    soft = softmax_scores(scores)
    expected = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, expected, rtol=1e-12)
    official = ProbeConfig.from_preset("official")
    assert (official.batch_size, official.patience, official.preset) == (128, 5, "official")
    assert ProbeConfig.from_preset("ours").batch_size == 16
    assert ProbeConfig.from_preset("official", patience=7).preset == "official (modified)"
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 2)) < 0.5).astype(np.uint8)
    features = rng.normal(size=(60, 4)) + labels @ rng.normal(size=(2, 4))
    data = TaskData(get_task("synthetic-rhythm"), np.arange(60), labels,
                    np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10), "test", {})
    config = ProbeConfig.from_preset("official", fractions=(1.0,), epochs=3)
    result, curves = run_linear_probe(data, features, config, 0, auc_scores="softmax")
    np.testing.assert_allclose(curves["scores"].sum(axis=1), 1.0, atol=1e-6)
    assert result["auc_scores"].startswith("softmax") and result["settings"]["preset"] == "official"
    _, sigmoid = run_linear_probe(data, features, config, 0)
    assert np.abs(sigmoid["scores"].sum(axis=1) - 1.0).max() > 1e-3


def test_melp_protocol_keeps_the_first_half_and_zero_pads_before_normalising():
    rng = np.random.default_rng(1)
    ecg = rng.integers(-500, 500, size=(12, 5000)).astype(np.int16)
    got = make_transform(DataConfig("unused", head_samples=2500))(ecg, 200.0, rng)
    raw = np.concatenate([ecg[:, :2500], np.zeros((12, 2500))], axis=1) / 200.0  # mV, 0 padded
    expected = (raw - raw.min()) / (raw.max() - raw.min())  # min-max over the padded record
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(got[:, 2500:], -raw.min() / (raw.max() - raw.min()))


def test_melp_protocol_applies_to_cpsc2018_only(checkpoint, tmp_path):
    data = synthetic_shards(str(tmp_path / "synth"), seed=6, count=4)
    run = RunConfig(checkpoint, str(tmp_path / "out"), protocol="melp")
    evaluation = Evaluation(run, DataConfig(data))
    fs = evaluation.settings["signal"]["fs"]
    assert evaluation.data_config_for(get_task("cpsc2018")).head_samples == 5 * fs
    assert evaluation.data_config_for(get_task("synthetic-rate")).head_samples is None
    with pytest.raises(ValueError, match="--protocol"):
        RunConfig(checkpoint, "x", protocol="merl")
