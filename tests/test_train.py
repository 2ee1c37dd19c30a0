"""Trainer: configs and bad input (fast), then real 2-rank DeepSpeed ZeRO-2 runs on the CPU:
to completion with a checkpoint and checkpoint selection (zero-shot AUC on a separately
simulated set, checked against the evaluation CLI on export-best/), and SIGTERM -> resume
reproducing the uninterrupted losses (selection included)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.sources import SourceOptions
from melp_scale.train.checkpoint import check_resumable
from melp_scale.train.config import load_train_config
from melp_scale.train.engine import load_ds_config, warmup_cosine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
STEPS = 8


def test_config_overrides_and_unknown_keys():
    config = load_train_config("demo", ["optim.warmup_steps=3", "model.ecg.num_layers=1",
                                        "run.out=/tmp/x"])
    assert config.optim.warmup_steps == 3 and config.run.out == "/tmp/x"
    assert config.model_config().ecg.num_layers == 1
    with pytest.raises(ValueError, match="optim.warmup"):
        load_train_config("demo", ["optim.warmup=3"])
    with pytest.raises(ValueError, match="model.ecg.layers"):
        load_train_config("demo", ["model.ecg.layers=3"])
    with pytest.raises(ValueError, match="no such preset"):
        load_train_config("nope")
    assert load_train_config("paper").model_config().ecg.num_layers == 8


def test_ds_config_checks(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16,
                                "bf16": {"enabled": "auto"}}))
    config, precision = load_ds_config(str(path), world_size=2, use_cuda=False)
    assert precision == "fp32" and config["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="train_batch_size 16 != .* world size 4"):
        load_ds_config(str(path), world_size=4, use_cuda=False)
    with pytest.raises(ValueError, match="does not exist"):
        load_ds_config(str(tmp_path / "absent.json"), 1, False)


def test_preset_deepspeed_overrides_set_the_global_batch(tmp_path):
    """paper.yaml's deepspeed section is merged over ds.json (the file stays as it is):
    64 per GPU on 4 GPUs is the paper's global batch 256; the command line overrides further."""
    from melp_scale.train.config import read_deepspeed_overrides
    from melp_scale.train.engine import batch_sizes
    from melp_scale.text_pretrain.config import load_text_pretrain_config

    with open(os.path.join(REPO, "ds.json")) as handle:
        on_disk = json.load(handle)
    overrides = read_deepspeed_overrides("paper")
    config, _ = load_ds_config(os.path.join(REPO, "ds.json"), 4, False, overrides)
    assert batch_sizes(config, 4) == {"micro": 64, "accumulation": 1, "world_size": 4, "global": 256}
    assert config["optimizer"] == on_disk["optimizer"] and config["zero_optimization"]["stage"] == 2
    overrides = read_deepspeed_overrides("paper", ["deepspeed.gradient_accumulation_steps=2",
                                                   "model.ecg.num_layers=2"])
    config, _ = load_ds_config(os.path.join(REPO, "ds.json"), 2, False, overrides)
    assert batch_sizes(config, 2)["global"] == 64 * 2 * 2
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: demo\n")
    assert read_deepspeed_overrides(str(plain)) == {}
    text = read_deepspeed_overrides("text_paper", ["deepspeed.optimizer.params.lr=1e-5"])
    config, _ = load_ds_config(os.path.join(REPO, "ds.json"), 1, False, text)
    assert config["optimizer"]["params"] == dict(on_disk["optimizer"]["params"], lr=1e-5,
                                                 weight_decay=0.01)
    load_text_pretrain_config("text_paper")  # its deepspeed section is not a config error
    with pytest.raises(ValueError, match=r"deepspeed\.micro_batch"):
        read_deepspeed_overrides("demo", ["deepspeed.micro_batch=3"])
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}))
    with pytest.raises(ValueError, match="deepspeed overrides: train_batch_size 16 != .* 64"):
        load_ds_config(str(path), 2, False, {"train_micro_batch_size_per_gpu": 64})
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be a positive"):
        load_ds_config(str(path), 2, False, {"gradient_accumulation_steps": 0})
    with open(os.path.join(REPO, "ds.json")) as handle:
        assert json.load(handle) == on_disk


def test_selection_settings_are_checked(tmp_path):
    from melp_scale.train.selection import ZeroShotSelection

    with pytest.raises(ValueError, match="run.select_patience needs run.select_every"):
        load_train_config("demo", ["run.select_every=0", "run.select_patience=3"])
    with pytest.raises(ValueError, match=r"select.sets\[0\] must be"):
        load_train_config("demo", ["select.sets=[{shards: x}]"])
    with pytest.raises(ValueError, match="select.split"):
        load_train_config("demo", ["select.split=dev"])
    config = load_train_config("paper", [f"select.sets=[{{shards: {tmp_path}, task: ptbxl-super}}]"])
    with pytest.raises(ValueError, match=r"select.sets\[0\].shards .* has no manifest.json"):
        ZeroShotSelection(config.select)
    (tmp_path / "manifest.json").write_text("{}")
    config = load_train_config("paper", [f"select.sets=[{{shards: {tmp_path}, task: ptbxl-hyper}}]"])
    with pytest.raises(ValueError, match=r"select.sets\[0\].task: .*ptbxl-hyper"):
        ZeroShotSelection(config.select)
    with pytest.raises(ValueError, match="select.sets is empty"):
        ZeroShotSelection(load_train_config("demo", ["run.select_every=5", "select.sets=[]"]).select)


def test_warmup_cosine_schedule():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)


def test_resume_refuses_another_model_config(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saved = load_train_config("demo").model_config().to_dict()
    (folder / "latest.json").write_text(json.dumps(
        {"tag": "step-00000004", "step": 4, "world_size": 2, "model_config": saved}))
    other = load_train_config("demo", ["model.ecg.num_layers=1"]).model_config().to_dict()
    with pytest.raises(ValueError, match="another model config .*ecg"):
        check_resumable(str(folder), json.loads(json.dumps(other)), 2)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        check_resumable(str(folder), json.loads(json.dumps(saved)), 4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "synthetic")
    run_build(BuildConfig(source="synthetic", out=out, val_fraction=0.34, shard_size=12,
                          options=SourceOptions(count=36)))
    # the checkpoint-selection set: simulated under another seed
    run_build(BuildConfig(source="synthetic", out=out + "-select", val_fraction=0.0, shard_size=24,
                          seed=1, options=SourceOptions(count=24, records_per_subject=1, seed=1)))
    return out


def launch(shards: str, out: str, *extra: str) -> subprocess.Popen:
    select = f"select.sets=[{{shards: {shards}-select, task: synthetic-rate}}]"
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
               "--ds_config", "ds.json", "--shards", shards, "--out", out, "--max-steps", str(STEPS),
               "run.log_every=1", "run.checkpoint_every=4", "optim.warmup_steps=2",
               "data.num_workers=1", "deepspeed.train_micro_batch_size_per_gpu=8",
               "run.select_every=3", select, "select.split=all", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_losses(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return {r["step"]: r for r in map(json.loads, handle) if r["kind"] == "train"}


def finish(process: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "full")
    output = finish(launch(shards, out))
    return out, output


def test_two_ranks_zero2_run_to_completion(uninterrupted):
    out, output = uninterrupted
    assert "pretraining finished: step 8/8" in output and "fp32" in output
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for record in losses.values():
        for name in ("loss", "loss_global", "loss_caption", "loss_local", "grad_norm"):
            assert math.isfinite(record[name]), (name, record)
        # model FLOPs (melp_scale/train/flops.py): achieved TFLOP/s logged, MFU n/a on a CPU
        assert record["tflops_per_s"] > 0 and record["mfu"] is None, record
    with open(os.path.join(out, "checkpoints", "latest.json")) as handle:
        assert json.load(handle)["step"] == STEPS
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        val = [r for r in map(json.loads, handle) if r["kind"] == "val"]
    assert val and "val_ecg2text_r@1" in val[-1]
    from melp_scale.model import MELP

    model = MELP.from_pretrained(os.path.join(out, "export"))
    assert 0.0 <= model.logit_scale.item() <= math.log(100)
    assert "global batch 16 = 8 per rank x 1 accumulation step(s) x 2 rank(s)" in output
    assert "TFLOP/s per rank, MFU n/a (CPU or unlisted GPU)" in output


def test_checkpoint_selection_keeps_the_best_scoring_model(shards, uninterrupted, tmp_path):
    """Scores at steps 3, 6 and the last step 8; export-best/ holds the best one, and the
    evaluation CLI scores that export exactly as the selection did."""
    out, output = uninterrupted
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["batch"] == {"micro": 8, "accumulation": 1, "world_size": 2, "global": 16}
    chosen = summary["selection"]
    assert [step for step, _ in chosen["scores"]] == [3, 6, STEPS]
    best_step, best = max(chosen["scores"], key=lambda item: item[1])
    assert (chosen["best_step"], chosen["best_score"]) == (best_step, best)
    assert 0.0 <= best <= 100.0
    assert f"best {best:.2f} at step {best_step}" in output
    export_best = os.path.join(out, "export-best")
    with open(os.path.join(export_best, "selection.json")) as handle:
        record = json.load(handle)
    assert (record["step"], record["score"]) == (best_step, best)
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        scored = [r for r in map(json.loads, handle) if r["kind"] == "select"]
    assert [r["step"] for r in scored] == [3, 6, STEPS]
    result = subprocess.run(
        [sys.executable, "-m", "melp_scale.evaluate", "zeroshot", "--checkpoint", export_best,
         "--data", shards + "-select", "--task", "synthetic-rate", "--zeroshot-split", "all",
         "--bootstrap", "0", "--allow-pretraining-rows", "--out", str(tmp_path / "eval")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "eval" / "results.json") as handle:
        evaluated = json.load(handle)["zeroshot"]["synthetic-rate"]["macro_auc"]
    assert evaluated == pytest.approx(best, abs=1e-3)


def test_sigterm_then_resume_reproduces_losses(shards, uninterrupted, tmp_path):
    reference = train_losses(uninterrupted[0])
    out = str(tmp_path / "preempted")
    process = launch(shards, out)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and max(train_losses(out), default=0) >= 3:
            break
        time.sleep(0.2)
    # what SLURM preemption does: SIGTERM to every process of the job but the launcher
    for child in psutil.Process(process.pid).children(recursive=True):
        if "deepspeed.launcher" not in " ".join(child.cmdline()):
            child.send_signal(signal.SIGTERM)
    output = finish(process)
    assert "pretraining stopped" in output
    with open(os.path.join(out, "checkpoints", "latest.json")) as handle:
        stopped_at = json.load(handle)["step"]
    assert 3 <= stopped_at < STEPS, stopped_at
    finish(launch(shards, out, "--resume"))
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for name in ("loss", "loss_global", "loss_caption", "loss_local"):
            assert resumed[step][name] == pytest.approx(reference[step][name], rel=1e-4, abs=1e-5), \
                (step, name, stopped_at)
    summaries = []
    for folder in (uninterrupted[0], out):
        with open(os.path.join(folder, "summary.json")) as handle:
            summaries.append(json.load(handle)["selection"])
    assert [s for s, _ in summaries[1]["scores"]] == [s for s, _ in summaries[0]["scores"]]
    assert [v for _, v in summaries[1]["scores"]] == pytest.approx(
        [v for _, v in summaries[0]["scores"]], abs=1e-3)
    assert summaries[1]["best_step"] == summaries[0]["best_step"]


def test_bad_shard_folder_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--ds_config", "ds.json",
                             "--shards", str(empty), "--out", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has no manifest.json" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))


@pytest.mark.slow
def test_two_nodes_on_loopback_train_like_one_node(shards, uninterrupted, tmp_path):
    """Two torchrun launchers acting as two nodes (one rank each) on 127.0.0.1."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = str(tmp_path / "two-nodes")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    processes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/pretrain.py",
         "--ds_config", "ds.json", "--shards", shards, "--out", out, "--max-steps", str(STEPS),
         "run.log_every=1", "run.checkpoint_every=4", "optim.warmup_steps=2", "data.num_workers=1",
         "deepspeed.train_micro_batch_size_per_gpu=8", "run.select_every=0"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    for process in processes:
        finish(process)
    reference, two_nodes = train_losses(uninterrupted[0]), train_losses(out)
    for step in range(1, STEPS + 1):
        assert two_nodes[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4)
