"""Stage 2: MELP pretraining on ECG/report shards (README, "Pretraining"), as a Trainer task."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from melp_scale.model import MELP
from melp_scale.remote import is_url, read_manifest
from melp_scale.stream import StreamConfig, StreamLoader
from melp_scale.train.config import TrainConfig
from melp_scale.train.metrics import retrieval_recall
from melp_scale.train.selection import ZeroShotSelection
from melp_scale.train.task import Placement, StepOutput, Task, to_device

log = logging.getLogger("melp_scale.train")
LOSS_NAMES = ("loss", "loss_global", "loss_caption", "loss_local")


class MELPTask(Task):
    """The three MELP losses on shards; validation adds ECG<->report retrieval recall."""

    name = "pretraining"
    scalar_names = (*LOSS_NAMES, "logit_scale")
    export_format = "MELP.from_pretrained"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.melp_config = config.model_config()

    def model_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.melp_config.to_dict()))

    def prepare_data(self, placement: Placement) -> None:
        data = self.config.data
        if placement.rank != 0 or data.sources or is_url(data.shards):
            return
        if not data.build_demo_if_missing and not os.path.isfile(os.path.join(data.shards, "manifest.json")):
            raise ValueError(f"--shards {data.shards!r} has no manifest.json; build it with "
                             f"`python -m melp_scale.shard build ... --out {data.shards}`")
        # the synthetic demo set at data.shards (when asked to) and, for selection sets of
        # synthetic tasks, separately simulated held-out sets (even with --shards given: they are
        # simulated, never a user's data; melp_scale/shard/sources/synthetic.py)
        from melp_scale.shard.sources.synthetic import build_demo_sets

        build_demo_sets(data.shards if data.build_demo_if_missing else None,
                        self.config.select.sets, workers=os.cpu_count() or 1)

    def build_model(self, placement: Placement) -> nn.Module:
        model = MELP(self.melp_config)
        if self.config.run.compile:  # in place: parameter names and checkpoints unchanged
            from melp_scale.model.melp import compile_parts

            compile_parts(model)
        return model

    def build_loaders(self, placement: Placement, micro_batch: int
                      ) -> tuple[StreamLoader, StreamLoader | None]:
        data, text = self.config.data, self.melp_config.text
        sets = [s["shards"] for s in data.sources] if data.sources else [data.shards]
        for spec in sets:
            local = isinstance(spec, str) and not is_url(spec)
            if local and not os.path.isfile(os.path.join(spec, "manifest.json")):
                raise ValueError(f"--shards {spec!r} has no manifest.json")
        stream = StreamConfig(
            shard_dir=data.shards, sources=data.sources, exclude=data.exclude, split="train",
            batch_size=micro_batch,
            num_workers=data.num_workers, seed=self.config.optim.seed,
            shuffle_window=data.shuffle_window, normalize=data.normalize,
            lead_mask_p=data.lead_mask_p, sentence_dropout=data.sentence_dropout,
            sentence_shuffle=data.sentence_shuffle, text_model=text.name_or_path,
            max_text_length=text.max_length, on_error=data.on_error, verify=data.verify,
            worker_timeout=data.worker_timeout,
            pin_memory=placement.device.type == "cuda")
        train = StreamLoader(stream, placement.rank, placement.world_size)
        val = None
        if all(_has_split(spec, "val") for spec in sets):
            val = StreamLoader(stream.for_validation(), placement.rank, placement.world_size,
                               tokenizer=train.tokenizer)
        return train, val

    def forward(self, engine: Any, batch: dict[str, Any]) -> StepOutput:
        output = engine(batch, group=_group())
        scalars = {name: getattr(output, name).detach() for name in LOSS_NAMES}
        return StepOutput(output.loss, scalars | {"logit_scale": output.logit_scale})

    def validate(self, engine: Any, loader: StreamLoader, placement: Placement) -> dict[str, float]:
        sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=placement.device)
        batches, ecg, text = 0, [], []
        for batch in loader:
            keep = ~batch["is_repeat"]
            output = engine(to_device(batch, placement.device), group=_group())
            sums += torch.stack([getattr(output, n).detach().double() for n in LOSS_NAMES])
            batches += 1
            ecg.append(output.ecg_global[keep.to(placement.device)].float().cpu())
            text.append(output.text_global[keep.to(placement.device)].float().cpu())
        dist.all_reduce(sums)
        record = {f"val_{n}": (sums[i] / max(batches * placement.world_size, 1)).item()
                  for i, n in enumerate(LOSS_NAMES)}
        gathered = [None] * placement.world_size
        dist.all_gather_object(gathered, (torch.cat(ecg), torch.cat(text)))
        all_ecg = torch.cat([g[0] for g in gathered])
        all_text = torch.cat([g[1] for g in gathered])
        record |= {f"val_{k}": v for k, v in retrieval_recall(all_ecg, all_text).items()}
        return record | {"val_samples": int(all_ecg.shape[0])}

    def step_flops(self, model: nn.Module, batch: dict[str, Any], world_size: int) -> float:
        """Model FLOPs (forward + backward) of one micro-batch on this rank (``flops.py``)."""
        from melp_scale.train.flops import step_flops, step_shape, text_sizes_of

        shape = step_shape(batch, world_size)
        return step_flops(self.melp_config, text_sizes_of(model), shape)["total"]["total"]

    def clamped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, float, float]]:
        # MELP clamps the log scale to [0, ln 100]; here in the optimiser's master copy too
        return [(model.logit_scale, 0.0, float(self.melp_config.loss.logit_scale_max))]

    def make_selection(self) -> ZeroShotSelection:
        return ZeroShotSelection(self.config.select)

    def export(self, model: nn.Module, path: str) -> None:
        from melp_scale.evaluate.provenance import write_training_data

        model.save_pretrained(path)
        # what the model saw (shard sets, manifest hashes, subjects): evaluation refuses those rows
        data = self.config.data
        sets = [s["shards"] for s in data.sources] if data.sources else [data.shards]
        local = [s for s in sets if isinstance(s, str) and not is_url(s)]
        if len(local) < len(sets):
            log.warning("training_data.json records local shard sets only; not the streamed %s",
                        [s for s in sets if s not in local])
        write_training_data(path, local, streamed=[s for s in sets if s not in local])


def _group() -> Any:
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def _has_split(shards: str | list[str], split: str) -> bool:
    manifest, _ = read_manifest(shards if isinstance(shards, str) else shards[0])
    return any(e["split"] == split and e["num_samples"] > 0 for e in manifest["shards"])

