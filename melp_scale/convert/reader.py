"""Read a checkpoint's tensors without unpickling arbitrary objects.

Formats: ``*.safetensors``; ``torch.save`` files (``*.ckpt`` Lightning checkpoints, ``*.bin``,
``*.pt``, ``*.pth``) read with ``torch.load(weights_only=True)``; a folder holding
``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face release).

A Lightning ``.ckpt`` holds more than tensors: ``hyper_parameters`` (MELP's default
``init_logit_scale`` is a numpy float64), callback and loop states, sometimes Lightning /
omegaconf classes. ``weights_only=True`` refuses those. Then the globals the file names are listed
(``torch.serialization.get_unsafe_globals_in_checkpoint``, which reads without executing) and
the load is retried with a restricted allowlist: numpy scalars and dtypes (plain data), and, for
names under a few known configuration modules (Lightning, omegaconf, pathlib, argparse), an inert
stand-in class that only stores what it is given: no code of those packages runs, and they need
not be installed. Any other global is refused with its name.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

INERT_MODULE_PREFIXES = ("lightning", "pytorch_lightning", "lightning_fabric", "omegaconf",
                         "pathlib", "argparse")
"""Globals under these modules are replaced by :class:`Inert` stand-ins."""

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Inert:
    """Stand-in for a non-tensor object of a checkpoint: constructing it (however the pickle asks)
    yields a plain empty dict, which the pickle may fill with its items (e.g. Lightning's
    AttributeDict); nothing of the original class runs."""

    def __new__(cls, *args, **kwargs):
        return {}


def _numpy_allowlist() -> list:
    """numpy scalars, dtypes and dtype classes: plain data (a float64 hyper-parameter)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list = [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                     (core.multiarray.scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def _restricted_allowlist(path: str) -> list:
    allowed, refused = _numpy_allowlist(), []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        if name.startswith("numpy."):
            continue  # covered above, or refused by torch.load itself
        if name.split(".")[0] in INERT_MODULE_PREFIXES:
            allowed.append((type(name.rpartition(".")[2], (Inert,), {}), name))
        else:
            refused.append(name)
    if refused:
        raise ValueError(f"{path}: holds objects of {refused}, which are neither tensors nor "
                         "known plain data; refusing to unpickle them. Save its state_dict "
                         "(a dict of tensors) with torch.save or safetensors and convert that")
    return allowed


def load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True)``, retried with the restricted allowlist above."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # UnpicklingError, or RuntimeError wrapping it
        if "weights_only" not in str(first) and "Unsupported global" not in str(first):
            raise ValueError(f"{path}: cannot be read as a torch checkpoint: {first}") from first
    with torch.serialization.safe_globals(_restricted_allowlist(path)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: cannot be read safely (weights_only): {error}") from error


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def find_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: itself, or its ``state_dict`` / ``model`` /
    ``module`` entry (nested at most twice)."""
    for _ in range(3):
        if _is_state_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "module") if k in obj), None)
        if inner is None:
            break
        obj = inner
    raise ValueError(f"{path}: no state_dict (a mapping of names to tensors) found in it")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of a checkpoint file or release folder, plus string/number hyper-parameters
    when a Lightning checkpoint carries them (e.g. ``text_encoder_name``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise ValueError(f"{path}: a folder without {' or '.join(WEIGHT_FILES)}")
        path = found[0]
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), {}
    loaded = load_torch_file(path)
    hparams = {}
    if isinstance(loaded, Mapping) and isinstance(loaded.get("hyper_parameters"), Mapping):
        hparams = {str(k): v for k, v in loaded["hyper_parameters"].items()
                   if isinstance(v, (str, int, float, bool))}
    return find_state_dict(loaded, path), hparams
