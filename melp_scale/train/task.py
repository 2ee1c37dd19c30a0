"""What a training run is about, as the generic :class:`~melp_scale.train.loop.Trainer` sees it.

The Trainer owns everything that does not depend on the model or the data: DeepSpeed, the
optimiser and schedule, the step loop with gradient accumulation, non-finite skipping, stop
signals, checkpoints and resume, metrics and telemetry, the summary. A :class:`Task` supplies
the rest:

====================  ==========================================  =================================
hook                  MELP (stage 2, ``MELPTask``)                 MLM (stage 1, ``MLMTask``)
====================  ==========================================  =================================
``model_config``      the MELP config dict                         text model + masking settings
``prepare_data``      rank 0 builds the demo shards if absent      rank 0 builds + packs the corpus
``build_model``       ``MELP``                                     ``AutoModelForMaskedLM``
``build_loaders``     ``StreamLoader`` train / val                 ``PackedLoader`` train / val
``forward``           the three losses and the logit scale        MLM loss, masked-token accuracy
``validate``          losses + ECG<->report recall                 loss, perplexity, accuracy
``clamped_parameters`` the logit scale in [0, ln 100]              none
``after_step``        nothing                                      nothing
``make_selection``    zero-shot AUC on ``select.sets``             none (``run.select_every`` refused)
``export``            ``MELP.save_pretrained``                     HF ``save_pretrained`` + tokenizer
====================  ==========================================  =================================

Loaders follow :class:`TrainLoader`: every rank yields the same number of batches per epoch
(ZeRO's collectives must stay matched) and the position is exactly restorable.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from melp_scale.train.config import OptimConfig, RunConfig


class RunSections(Protocol):
    """The part of a task's config the Trainer reads."""

    optim: OptimConfig
    run: RunConfig

    def to_dict(self) -> dict[str, Any]: ...


class TrainLoader(Protocol):
    """The loader interface the Trainer uses (``melp_scale.stream.StreamLoader`` is one)."""

    epoch: int  # the epoch being read (incremented when an iteration ends)
    batches_consumed: int  # batches of ``epoch`` already yielded
    num_bad_samples: int  # samples skipped as unreadable so far

    def __len__(self) -> int: ...  # batches per epoch, equal on every rank

    def __iter__(self) -> Iterator[dict[str, Any]]: ...  # from ``batches_consumed`` to the end

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process trains."""

    rank: int
    world_size: int
    device: torch.device


@dataclasses.dataclass
class StepOutput:
    """One micro-batch's forward: the loss to back-propagate and the scalars to log."""

    loss: torch.Tensor  # () the loss (finite on every rank, or the micro-batch is skipped)
    scalars: dict[str, torch.Tensor | float]  # every name of ``Task.scalar_names``


class Task(abc.ABC):
    """The model- and data-specific half of a run (see the module docstring)."""

    name: str = "pretraining"  # what the progress bar and the summary call the run
    scalar_names: tuple[str, ...] = ("loss",)  # train scalars, averaged over micro-batches and ranks
    export_format: str = ""  # how to load the export, for the summary

    def __init__(self, config: RunSections):
        self.config = config

    @abc.abstractmethod
    def model_config(self) -> dict[str, Any]:
        """A JSON-able description of the model; resuming with a different one is refused."""

    def prepare_data(self, placement: Placement) -> None:
        """Work done once before the loaders exist (the Trainer then waits on a barrier)."""

    @abc.abstractmethod
    def build_model(self, placement: Placement) -> nn.Module:
        """The model (on the CPU; the Trainer moves it), built after seeding torch."""

    @abc.abstractmethod
    def build_loaders(self, placement: Placement, micro_batch: int
                      ) -> tuple[TrainLoader, TrainLoader | None]:
        """(train, validation or None) loaders yielding micro-batches of ``micro_batch``."""

    @abc.abstractmethod
    def forward(self, engine: Any, batch: dict[str, Any]) -> StepOutput:
        """The forward of one micro-batch (already on the device) through the DeepSpeed engine."""

    @abc.abstractmethod
    def validate(self, engine: Any, loader: TrainLoader, placement: Placement) -> dict[str, float]:
        """Validation metrics over one pass of ``loader`` on every rank, reduced over ranks,
        named ``val_*`` (the engine is in eval mode and gradients are off)."""

    def clamped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, float, float]]:
        """(parameter, low, high) the Trainer clamps after every optimiser step, in the model
        and in the optimiser's fp32 master copy (``engine.clamp_parameter_``)."""
        return []

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (after the clamps)."""

    def make_selection(self) -> Any:
        """The checkpoint-selection scorer ``run.select_every`` uses: an object whose
        ``score(model)`` returns (score, {name: value}), higher is better. Built on every rank
        at the start (so bad settings fail early), called on rank 0 only."""
        raise ValueError(f"run.select_every: the {self.name} task has no checkpoint-selection "
                         "score; set run.select_every=0")

    @abc.abstractmethod
    def export(self, model: nn.Module, path: str) -> None:
        """Write the trained model to ``path`` (called on rank 0 only)."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
