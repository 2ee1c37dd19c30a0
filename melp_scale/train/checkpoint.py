"""Atomic, resumable checkpoints: DeepSpeed state + per-rank loader position and RNG states.

Layout under ``RUN/checkpoints/``::

    step-00000120/            DeepSpeed's files (model, ZeRO-partitioned optimiser, scheduler)
    step-00000120/rank-0.pt   this rank's loader state, RNG states, counters
    latest.json               {"tag": "step-00000120", "step": 120, ...}

``latest.json`` is replaced (write to a temporary file, fsync, rename) only after every rank
has finished writing the step's files, so a crash mid-save leaves it pointing at the previous
complete checkpoint. Older checkpoints beyond ``keep`` are removed after that.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest.json"


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_latest(folder: str) -> dict[str, Any] | None:
    """The newest complete checkpoint's record, or None when there is none."""
    try:
        with open(os.path.join(folder, LATEST), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def save(engine, folder: str, step: int, rank_state: dict[str, Any], meta: dict[str, Any],
         keep: int) -> str:
    """Save a checkpoint of ``step`` on every rank; return its tag (call on all ranks)."""
    tag = f"step-{step:08d}"
    engine.save_checkpoint(folder, tag=tag, client_state={"meta": meta}, save_latest=False)
    rank = dist.get_rank()
    state = dict(rank_state, rng=rng_state())
    _atomic_write(os.path.join(folder, tag, f"rank-{rank}.pt"), lambda h: torch.save(state, h))
    dist.barrier()
    if rank == 0:
        record = {"tag": tag, "step": step, "world_size": dist.get_world_size(),
                  "model_config": meta["model_config"]}
        _atomic_write(os.path.join(folder, LATEST),
                      lambda h: h.write(json.dumps(record, indent=1).encode()))
        _prune(folder, keep, tag)
    dist.barrier()
    return tag


def _prune(folder: str, keep: int, newest: str) -> None:
    tags = sorted(n for n in os.listdir(folder) if n.startswith("step-")
                  and os.path.isdir(os.path.join(folder, n)))
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != newest:
            shutil.rmtree(os.path.join(folder, tag), ignore_errors=True)


def check_resumable(folder: str, model_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The latest checkpoint's record, after checking it fits this run (ValueError otherwise)."""
    latest = read_latest(folder)
    if latest is None:
        raise ValueError(f"--resume: no checkpoint in {folder!r} (no {LATEST})")
    if latest["model_config"] != model_config:
        changed = sorted(k for k in set(model_config) | set(latest["model_config"])
                         if model_config.get(k) != latest["model_config"].get(k))
        raise ValueError(f"--resume: the checkpoint in {folder!r} was trained with another model "
                         f"config (sections differ: {', '.join(changed)}); use the same --config "
                         f"and overrides, or another --out")
    if latest["world_size"] != world_size:
        raise ValueError(f"--resume: the checkpoint was written by {latest['world_size']} ranks, "
                         f"this run has {world_size}; exact data resume needs the same world size")
    return latest


def load(engine, folder: str, tag: str) -> dict[str, Any]:
    """Load ``tag`` into ``engine``; return this rank's saved state (RNG states restored)."""
    path, _ = engine.load_checkpoint(folder, tag=tag)
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load {os.path.join(folder, tag)}")
    state = torch.load(os.path.join(folder, tag, f"rank-{dist.get_rank()}.pt"), weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
