"""Small shared builders for the evaluation tests: synthetic shard sets and demo checkpoints."""
from __future__ import annotations

import os

import torch

from melp_scale.shard.build import BuildConfig, run_build
from melp_scale.shard.sources import SourceOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_shards(out: str, seed: int, count: int, records_per_subject: int = 2,
                     val_fraction: float = 0.25) -> str:
    """A synthetic shard set at ``out`` (subjects split train/val by the builder)."""
    run_build(BuildConfig(source="synthetic", out=out, seed=seed, val_fraction=val_fraction, workers=1,
                          options=SourceOptions(count=count, seed=seed,
                                                records_per_subject=records_per_subject)))
    return out


def demo_checkpoint(out: str, seed: int = 0) -> str:
    """An untrained demo-size MELP saved with save_pretrained (no training_data.json)."""
    from melp_scale.model import MELP, MELPConfig

    torch.manual_seed(seed)
    MELP(MELPConfig.preset("demo")).save_pretrained(out)
    return out
