"""Atomic, resumable checkpoints: DeepSpeed state + per-rank loader position and RNG states.

Layout under ``RUN/checkpoints/``::

    step-00000120/                     DeepSpeed's files (model, ZeRO-partitioned optimiser)
    step-00000120/rank-0.json          this rank's loader state, counters, Python/NumPy RNG
    step-00000120/rank-0.safetensors   this rank's torch (and CUDA) RNG state
    latest.json                        {"tag": "step-00000120", "step": 120, "files": {name: sha256}}

Writing: every rank writes into ``step-N.tmp/``; once all have finished, rank 0 hashes the
files, renames the folder to ``step-N`` and only then replaces ``latest.json`` (temporary file,
fsync, rename). A crash at any point leaves ``latest.json`` naming the previous complete
checkpoint, whose folder is never written again: a save at the step ``latest.json`` already
names (a resume that stops before its first step) is skipped. Older checkpoints beyond ``keep``
are removed after that.

Reading never runs code from the files: our own state is JSON + safetensors; DeepSpeed's files
(pickles) are loaded only when every file of the folder has the sha256 recorded in
``latest.json`` at write time, and then through ``torch.load(weights_only=True)`` (tensors and
plain containers, plus DeepSpeed's loss-scaler records), never the full unpickler. A file that
differs, is missing, was added, or holds anything else is refused with its name.
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

from melp_scale.shard.format import sha256_file

LATEST = "latest.json"
STAGING_SUFFIX = ".tmp"


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _files(folder: str) -> list[str]:
    """Every file under ``folder``, as sorted '/'-separated relative paths."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, n), folder).replace(os.sep, "/") for n in names]
    return sorted(found)


# ----------------------------------------------------------------------------- RNG and rank state


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part: Python and NumPy generators, tensor part: torch and CUDA generators)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def write_rank_state(folder: str, rank: int, state: dict[str, Any]) -> None:
    """``state`` (JSON-serialisable) plus this process's RNG states, as rank-R.json/.safetensors."""
    from safetensors.torch import save

    plain, tensors = rng_state()
    payload = json.dumps(dict(state, rng=plain)).encode()
    _atomic_write(os.path.join(folder, f"rank-{rank}.json"), lambda h: h.write(payload))
    _atomic_write(os.path.join(folder, f"rank-{rank}.safetensors"), lambda h: h.write(save(tensors)))


def read_rank_state(folder: str, rank: int) -> dict[str, Any]:
    """The state ``write_rank_state`` wrote; restores the RNG states. ValueError naming a bad file."""
    from safetensors.torch import load

    path = os.path.join(folder, f"rank-{rank}.json")
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        with open(os.path.join(folder, f"rank-{rank}.safetensors"), "rb") as handle:
            tensors = load(handle.read())
        set_rng_state(state.pop("rng"), tensors)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume: {path} (or its .safetensors) is unreadable: {error}") from error
    return state


# ----------------------------------------------------------------------------- save


def read_latest(folder: str) -> dict[str, Any] | None:
    """The newest complete checkpoint's record, or None when there is none."""
    path = os.path.join(folder, LATEST)
    try:
        with open(path, encoding="utf-8") as handle:
            latest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: {path} is unreadable or corrupt: {error}") from error
    if not isinstance(latest, dict) or not {"tag", "step", "world_size", "model_config"} <= set(latest):
        raise ValueError(f"--resume: {path} is not a checkpoint record (tag, step, world_size, "
                         "model_config)")
    return latest


def _saved_already(folder: str, step: int) -> bool:
    """Whether ``latest.json`` already names ``step`` (rank 0's view, shared with every rank)."""
    flag = torch.zeros(1)
    if dist.get_rank() == 0:
        latest = read_latest(folder)
        flag[0] = float(latest is not None and latest["step"] == step
                        and os.path.isdir(os.path.join(folder, latest["tag"])))
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def save(engine, folder: str, step: int, rank_state: dict[str, Any], meta: dict[str, Any],
         keep: int) -> str:
    """Save a checkpoint of ``step`` on every rank; return its tag (call on all ranks).

    ``rank_state`` must be JSON-serialisable. A no-op when ``latest.json`` names ``step`` already.
    """
    tag = f"step-{step:08d}"
    if _saved_already(folder, step):
        return tag
    staging = tag + STAGING_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(os.path.join(folder, staging), ignore_errors=True)  # a crashed attempt
    dist.barrier()
    engine.save_checkpoint(folder, tag=staging, client_state={"meta": meta}, save_latest=False)
    write_rank_state(os.path.join(folder, staging), rank, rank_state)
    dist.barrier()
    if rank == 0:
        _publish(folder, staging, tag, step, meta)
        _prune(folder, keep, tag)
    dist.barrier()
    return tag


def _publish(folder: str, staging: str, tag: str, step: int, meta: dict[str, Any]) -> None:
    """Hash the staged files, rename the folder to ``tag``, then point ``latest.json`` at it."""
    source = os.path.join(folder, staging)
    files = {name: sha256_file(os.path.join(source, name)) for name in _files(source)}
    final = os.path.join(folder, tag)
    if os.path.exists(final):  # written by a run that crashed before naming it in latest.json
        shutil.rmtree(final)
    os.replace(source, final)
    record = {"tag": tag, "step": step, "world_size": dist.get_world_size(),
              "model_config": meta["model_config"], "files": files}
    _atomic_write(os.path.join(folder, LATEST),
                  lambda h: h.write(json.dumps(record, indent=1).encode()))


def _prune(folder: str, keep: int, newest: str) -> None:
    names = [n for n in os.listdir(folder) if n.startswith("step-")
             and os.path.isdir(os.path.join(folder, n))]
    for name in names:  # staging folders of crashed saves
        if name.endswith(STAGING_SUFFIX):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    tags = sorted(n for n in names if not n.endswith(STAGING_SUFFIX))
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != newest:
            shutil.rmtree(os.path.join(folder, tag), ignore_errors=True)


# ----------------------------------------------------------------------------- load


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


def verify_files(folder: str, latest: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """ValueError naming the first file of ``latest``'s checkpoint that is missing, added or
    whose sha256 differs from ``latest.json``. Rank r hashes files r, r+W, ... (call on all ranks
    when distributed: a fault found by any rank is raised on every rank)."""
    path = os.path.join(folder, latest["tag"])
    expected = latest.get("files")
    if not isinstance(expected, dict) or not expected:
        raise ValueError(f"--resume: {os.path.join(folder, LATEST)} records no file checksums "
                         "(written by an older melp-scale?): refusing to load its pickled files")
    present = _files(path) if os.path.isdir(path) else []
    fault = next((f"{os.path.join(path, n)} is not listed in {LATEST}" for n in present
                  if n not in expected), None)
    for index, name in enumerate(sorted(expected)):
        if fault is not None:
            break
        file = os.path.join(path, name)
        if name not in present:
            fault = f"{file} is missing"
        elif index % world_size == rank and sha256_file(file) != expected[name]:
            fault = f"{file} is corrupt or was replaced: its sha256 differs from {LATEST}"
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([0.0 if fault is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and fault is None:
            fault = f"another rank found a faulty file in {path} (see its error)"
    if fault is not None:
        raise ValueError(f"--resume refused: {fault}")


def _deepspeed_safe_globals() -> list[type]:
    """The few DeepSpeed types its ZeRO optimiser states pickle: plain records (loss-scaler
    settings, the ZeRO stage enum, a fragment's (start, numel)), none with code that runs on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no code runs while reading);
    ValueError naming ``path`` for anything else."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError for a truncated zip, ...
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line),
                      lines[0] if lines else type(error).__name__)[:300]
        raise ValueError(f"--resume refused: {path} is not a plain weights file ({reason})") from error


def load(engine, folder: str, tag: str) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` after checking its files; return this rank's saved state
    (RNG states restored)."""
    latest = read_latest(folder)
    if latest is None or latest["tag"] != tag:
        raise ValueError(f"--resume: {tag} is not the checkpoint {os.path.join(folder, LATEST)} names")
    rank = dist.get_rank()
    verify_files(folder, latest, rank, dist.get_world_size())
    loader = engine.checkpoint_engine
    loader.load = weights_only_load  # DeepSpeed's own torch.load would unpickle anything
    try:
        path, _ = engine.load_checkpoint(folder, tag=tag)
    finally:
        del loader.load  # the class's method again
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load {os.path.join(folder, tag)}")
    return read_rank_state(os.path.join(folder, tag), rank)
