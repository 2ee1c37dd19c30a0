"""The Trainer skips non-finite micro-batches on every rank, counts them, and stops after K in a
row — checked in-process (a world of one) with a toy task whose loss turns NaN on cue."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from melp_scale.train.config import OptimConfig, RunConfig
from melp_scale.train.task import StepOutput, Task


class ListLoader:
    """A fixed list of batches with the TrainLoader interface."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches, self.epoch, self.batches_consumed, self.num_bad_samples = batches, 0, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches[self.batches_consumed:]:
            self.batches_consumed += 1
            yield batch
        self.epoch, self.batches_consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches_consumed = state["epoch"], state["batches_consumed"]


@dataclasses.dataclass
class ToyConfig:
    optim: OptimConfig
    run: RunConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NaNTask(Task):
    """Linear regression whose loss is NaN on the batches flagged ``poison``."""

    name = "toy"

    def model_config(self) -> dict[str, Any]:
        return {"toy": 1}

    def build_model(self, placement):
        return torch.nn.Linear(4, 1)

    def build_loaders(self, placement, micro_batch):
        def batch(poison: bool) -> dict[str, Any]:
            return {"x": torch.randn(micro_batch, 4), "poison": torch.tensor(poison)}

        return ListLoader([batch(i in self.poisoned) for i in range(self.num_batches)]), None

    def forward(self, engine, batch):
        loss = engine(batch["x"]).pow(2).mean()
        if bool(batch["poison"]):
            loss = loss * float("nan")
        return StepOutput(loss=loss, scalars={"loss": loss.detach()})

    def validate(self, engine, loader, placement):
        return {}

    def export(self, model, path):
        torch.save(model.state_dict(), path + ".pt")


@pytest.fixture()
def ds_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    return str(path)


def make_task(tmp_path, poisoned: set[int], num_batches: int, max_nonfinite: int) -> NaNTask:
    task = NaNTask(ToyConfig(OptimConfig(warmup_steps=1, epochs=1),
                             RunConfig(out=str(tmp_path / "run"), checkpoint_every=1000,
                                       log_every=1, validate=False, max_nonfinite=max_nonfinite,
                                       telemetry=False)))
    task.poisoned, task.num_batches = poisoned, num_batches
    return task


def test_nonfinite_batches_are_skipped_counted_then_stop(tmp_path, ds_config):
    """One run (DeepSpeed's communication state allows one Trainer per process): batch 2 is
    skipped alone, then batches 5, 6, 7 in a row reach max_nonfinite=3 and stop the run."""
    from melp_scale.train.loop import Trainer

    trainer = Trainer(make_task(tmp_path, {2, 5, 6, 7}, num_batches=9, max_nonfinite=3), ds_config)
    try:
        with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 4"):
            trainer.run()
        assert trainer.state.skipped_steps == 4 and trainer.state.step == 4
    finally:
        trainer.close()
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle if '"train"' in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
