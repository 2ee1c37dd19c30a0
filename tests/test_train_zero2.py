"""ZeRO-2 on two gloo ranks, through the real Trainer with a toy task (one run, two tests).

1. The logit-scale clamp reaches ZeRO-2's fp32 master copy: the toy loss drives a log scale
up against ln 100, then down.

Reference: what the official recipe does, a plain ``torch.optim.AdamW`` step followed by a
clamp of the stored value, on one process in float64. The master copy (gathered from the ZeRO
partitions with DeepSpeed's ``safe_get_full_fp32_param``) must follow it step by step: never
above ln 100, and back down as soon as Adam's momentum turns. A control scale clamped only in
the model copy (the old behaviour) shows the master running away and the scale stuck at the
ceiling, so the test can tell the two apart. Both scales train side by side in one run (same
gradient), one of them clamped through the Trainer, the other in the model copy only.

2. Checkpoint selection across ranks: rank 0 scores (scripted scores; rank 1's scorer fails if
called), every rank follows the broadcast decision, export-best/ holds the best step's model,
``run.select_patience`` scores without improvement stop the run early, and an error while
scoring on rank 0 is raised on both ranks instead of leaving rank 1 waiting.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
from typing import Any

import pytest
import torch

from melp_scale.train.config import OptimConfig, RunConfig
from melp_scale.train.task import StepOutput, Task
from tests.test_train_nonfinite import ListLoader, ToyConfig

CEILING = math.log(100.0)
START = math.log(1 / 0.07)
UP, DOWN = 10, 14  # steps pushing the scale up, then down
LR = 0.5
EXTRA = 4  # more batches than the run trains: selection stops it early at step UP + DOWN
SELECT_EVERY, PATIENCE = 4, 4
SCORES = [1.0, 3.0, float("nan"), 2.5, 2.9, 2.8]  # steps 4, 8, ..., 24: best at 8, stop at 24
BEST_STEP = 8


class ScriptedSelection:
    """Returns SCORES in turn on rank 0; any other rank calling it is a bug."""

    def __init__(self):
        self.calls = 0

    def score(self, model):
        import torch.distributed as dist

        if dist.get_rank() != 0:
            raise AssertionError("selection must be scored on rank 0 only")
        self.calls += 1
        return SCORES[self.calls - 1], {"select_auc/toy": SCORES[self.calls - 1]}


class ScaleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.logit_scale = torch.nn.Parameter(torch.tensor([START]))
        self.control_scale = torch.nn.Parameter(torch.tensor([START]))  # the old clamp

    def forward(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        scales = self.logit_scale[0] + self.control_scale[0]
        return self.linear(x).pow(2).mean() - direction * scales


class ScaleTask(Task):
    """Loss ``|linear(x)|^2 - direction * (logit_scale + control_scale)``: d loss / d scale =
    -direction for both scales."""

    name = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.values: dict[str, list[float]] = {"master": [], "model": [], "control_master": [],
                                               "control_model": []}

    def model_config(self) -> dict[str, Any]:
        return {"toy": 1}

    def build_model(self, placement):
        return ScaleModel()

    def build_loaders(self, placement, micro_batch):
        def batch(direction: float) -> dict[str, Any]:
            return {"x": torch.randn(micro_batch, 4), "direction": torch.tensor(direction)}

        return ListLoader([batch(1.0)] * UP + [batch(-1.0)] * (DOWN + EXTRA)), None

    def forward(self, engine, batch):
        loss = engine(batch["x"], batch["direction"])
        return StepOutput(loss=loss, scalars={"loss": loss.detach()})

    def clamped_parameters(self, model):
        return [(model.logit_scale, 0.0, CEILING)]

    def after_step(self, model):
        from melp_scale.train.engine import master_copy

        with torch.no_grad():  # the old behaviour: the model copy only
            model.control_scale.clamp_(0.0, CEILING)
        for prefix, parameter in (("", model.logit_scale), ("control_", model.control_scale)):
            self.values[f"{prefix}master"].append(master_copy(parameter).item())  # collective
            self.values[f"{prefix}model"].append(parameter.item())

    def validate(self, engine, loader, placement):
        return {}

    def make_selection(self):
        return ScriptedSelection()

    def export(self, model, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.json"), "w") as handle:
            json.dump({"logit_scale": model.logit_scale.item()}, handle)


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from melp_scale.train.loop import Trainer

    ds_config = os.path.join(folder, "ds.json")
    from melp_scale.train.selection import broadcast_score

    config = ToyConfig(OptimConfig(warmup_steps=0, min_lr_ratio=1.0, epochs=1, seed=0),
                       RunConfig(out=os.path.join(folder, "run"), checkpoint_every=1000,
                                 log_every=1000, validate=False, telemetry=False,
                                 select_every=SELECT_EVERY, select_patience=PATIENCE))
    task = ScaleTask(config)
    trainer = Trainer(task, ds_config)
    try:
        summary = trainer.run()

        def failing():
            raise ValueError("no such shard set")

        try:
            broadcast_score(rank, failing)
            error = None
        except ValueError as raised:
            error = str(raised)
    finally:
        trainer.close()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(task.values | {"summary": summary, "error": error}, handle, default=str)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_ranks(folder: str) -> list[dict[str, list[float]]]:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ds.json"), "w") as handle:
        json.dump({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                   "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default
                   "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95],
                                                             "weight_decay": 0.2}}}, handle)
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, folder))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    assert [w.exitcode for w in workers] == [0, 0], [w.exitcode for w in workers]
    results = []
    for rank in range(2):
        with open(os.path.join(folder, f"rank{rank}.json")) as handle:
            results.append(json.load(handle))
    return results


def reference_trajectory() -> list[float]:
    """The official semantics: AdamW on the stored value, then clamp it, each step (float64)."""
    scale = torch.nn.Parameter(torch.tensor([START], dtype=torch.float64))
    optimizer = torch.optim.AdamW([scale], lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    values = []
    for direction in [1.0] * UP + [-1.0] * DOWN:
        optimizer.zero_grad()
        (-direction * scale[0]).backward()
        optimizer.step()
        with torch.no_grad():
            scale.clamp_(0.0, CEILING)
        values.append(scale.item())
    return values


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("zero2-toy"))
    return folder, run_two_ranks(folder)


def test_zero2_master_copy_stays_clamped_and_comes_back_down(two_ranks):
    reference = reference_trajectory()
    assert max(reference) == pytest.approx(CEILING)  # the push reaches the ceiling
    assert reference[-1] < CEILING - 1.0  # and the reversal brings it well below

    _, ranks = two_ranks
    for result in ranks:
        assert len(result["master"]) == UP + DOWN
        assert max(result["master"]) <= CEILING + 1e-6
        assert result["master"] == pytest.approx(reference, abs=1e-5)
        assert result["model"] == pytest.approx(reference, abs=1e-5)
        # control: clamping only the model copy lets the master run past ln 100 and the scale
        # stays at the ceiling after the reversal (what the assertions above rule out)
        assert max(result["control_master"]) > CEILING + 2.0
        assert result["control_model"][-1] == pytest.approx(CEILING)
    for key in ("master", "model", "control_master", "control_model"):
        assert ranks[0][key] == ranks[1][key]


def test_selection_decided_on_rank_zero_keeps_best_and_stops_early(two_ranks):
    folder, ranks = two_ranks
    stop_step = SELECT_EVERY * len(SCORES)
    for result in ranks:  # both ranks took the same decisions and stopped together
        summary = result["summary"]
        assert (summary["status"], summary["step"]) == ("early-stopped", stop_step)
        selection = summary["selection"]
        assert (selection["best_step"], selection["best_score"]) == (BEST_STEP, 3.0)
        assert [step for step, _ in selection["scores"]] == list(
            range(SELECT_EVERY, stop_step + 1, SELECT_EVERY))
        assert "rank 0: ValueError: no such shard set" in result["error"]
    best = os.path.join(folder, "run", "export-best")
    with open(os.path.join(best, "selection.json")) as handle:
        assert json.load(handle)["step"] == BEST_STEP
    with open(os.path.join(best, "model.json")) as handle:  # the model of step 8, not the last
        assert json.load(handle)["logit_scale"] == pytest.approx(ranks[0]["model"][BEST_STEP - 1])
    with open(os.path.join(folder, "run", "export", "model.json")) as handle:
        assert json.load(handle)["logit_scale"] == pytest.approx(ranks[0]["model"][-1])
    assert ranks[0]["model"][BEST_STEP - 1] != pytest.approx(ranks[0]["model"][-1])


def test_melp_task_clamps_its_logit_scale_through_the_trainer():
    """MELP's pretraining task hands its logit scale to the clamp exercised above, with the
    model config's bounds [0, ln 100]."""
    from melp_scale.model import MELP
    from melp_scale.train.config import load_train_config
    from melp_scale.train.melp_task import MELPTask

    task = MELPTask(load_train_config("demo"))
    model = MELP(task.melp_config)
    [(parameter, low, high)] = task.clamped_parameters(model)
    assert parameter is model.logit_scale
    assert (low, high) == (0.0, pytest.approx(CEILING))
