"""Training configuration: a YAML preset (``demo``, ``paper``) or file, plus ``key=value`` overrides.

The YAML tree has the sections below; every key is checked, an unknown one is a
``ValueError`` naming it. The model section names a model preset and optional overrides of its
fields (``model.ecg.num_layers=4``); optimiser hyper-parameters (lr, betas, weight decay), the
batch size and precision live in the DeepSpeed JSON (``ds.json``), which a preset's
``deepspeed:`` section (or ``deepspeed.KEY=value``) overrides without editing the file
(:func:`read_deepspeed_overrides`; the launcher applies it). ``select`` names the downstream
sets that score checkpoints every ``run.select_every`` steps (``melp_scale.train.selection``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Callable

import yaml

from melp_scale.model import MELPConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "configs")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (int, float, bool, str, list, dict,
    Literal, optional of those; anything else is not checked here)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # a finite number (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, list, dict) or origin in (list, dict):
        return isinstance(value, origin or hint)
    return True


def at_least(low: float, note: str = "") -> tuple[Callable[[Any], bool], str]:
    """A ``check_section`` range: None (where the type allows it) or a number >= ``low``."""
    return (lambda value: value is None or value >= low), f">= {low}{note}"


def one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in choices), "one of " + ", ".join(map(str, choices))


def check_section(instance: Any, section: str,
                  ranges: dict[str, tuple[Callable[[Any], bool], str]] | None = None) -> None:
    """ValueError naming ``section.field`` for a value of the wrong type (from the dataclass's
    annotations), then for a value outside its ``ranges`` entry ``name: (predicate, what it
    must be)``."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not _type_ok(value, hints[field.name]):
            hint = hints[field.name]
            name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ValueError(f"{section}.{field.name} must be of type {name} (finite where a "
                             f"number), got {value!r}")
    for name, (ok, must) in (ranges or {}).items():
        if not ok(getattr(instance, name)):
            raise ValueError(f"{section}.{name} must be {must}, got {getattr(instance, name)!r}")


@dataclasses.dataclass
class DataConfig:
    """Where the shards are and how the loader reads them (see ``melp_scale.stream``)."""

    shards: str | list[str] = "shards/demo"  # shard folder (manifest.json + tars), or URL(s) (melp_scale.remote)
    sources: list[dict] | None = None  # instead of shards: [{shards: ..., weight: 0.7}, ...] (melp_scale.mixing)
    exclude: str | None = None  # exclusion list of `python -m melp_scale.shard dedupe`
    build_demo_if_missing: bool = True  # build the synthetic demo shards when ``shards`` is absent
    num_workers: int = 2  # DataLoader workers per rank
    lead_mask_p: float = 0.5  # random lead masking in training: each lead zeroed with this probability
    normalize: str = "minmax"  # per-record min-max (the reference), "zscore" or "none"
    sentence_dropout: float = 0.0  # leave each report sentence out with this probability (one always kept); 0: reports as written
    sentence_shuffle: bool = False  # report sentences in a random order
    shuffle_window: int = 1024  # samples permuted together on a rank
    on_error: str = "raise"  # bad sample: "raise" or "skip" (counted and logged)
    verify: bool = False  # check the shards' sha256 at start
    worker_timeout: float = 600.0  # seconds a loader worker may take for a batch before the run raises (0: forever)

    def __post_init__(self) -> None:
        check_section(self, "data", {
            "num_workers": at_least(0), "lead_mask_p": ((lambda p: 0.0 <= p <= 1.0), "in [0, 1]"),
            "sentence_dropout": ((lambda p: 0.0 <= p < 1.0), "in [0, 1)"),
            "normalize": one_of("minmax", "zscore", "none"), "shuffle_window": at_least(1),
            "on_error": one_of("raise", "skip"), "worker_timeout": at_least(0)})


@dataclasses.dataclass
class OptimConfig:
    """The schedule (the optimiser itself is ds.json's ``optimizer`` section; ``lr`` may override
    its learning rate per preset, e.g. for the small demo model)."""

    lr: float | None = None  # peak learning rate; None: ds.json's optimizer lr
    warmup_steps: int = 100  # linear warm-up from 0 (without it both towers collapse to loss ln(batch))
    min_lr_ratio: float = 0.01  # the decay ends at lr * min_lr_ratio
    decay: str = "cosine"  # after the warm-up: "cosine" or "linear" decay
    epochs: int = 100  # epochs (the run stops at whichever of epochs / max_steps comes first)
    max_steps: int | None = None  # optimiser steps in all; None: epochs * steps per epoch
    seed: int = 0  # model initialisation, dropout and data order
    fused: bool | str = "auto"  # AdamW's fused kernel (one op per step, same update to fp32 rounding): "auto" where the device has it

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"optim.decay {self.decay!r}: choose 'cosine' or 'linear'")
        check_section(self, "optim", {
            "fused": one_of("auto", True, False),
            "lr": ((lambda lr: lr is None or lr > 0), "> 0, or null for ds.json's lr"),
            "warmup_steps": at_least(0), "min_lr_ratio": ((lambda r: 0.0 <= r <= 1.0), "in [0, 1]"),
            "epochs": at_least(1), "max_steps": at_least(1, " (--max-steps), or null"),
            "seed": at_least(0)})


@dataclasses.dataclass
class RunConfig:
    """Outputs, checkpoints and logging."""

    out: str = "runs/demo"  # run folder: checkpoints/, metrics.jsonl, tensorboard/, export/
    checkpoint_every: int = 500  # steps between checkpoints (and at the end, and on SIGTERM)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # steps between metric lines
    validate: bool = True  # validation losses + retrieval each epoch and at the end
    validate_at_start: bool = False  # also validate before the first step (a "before" baseline)
    max_nonfinite: int = 5  # consecutive non-finite losses (skipped steps) before stopping
    telemetry: bool = True  # GPU telemetry through pynvml when GPUs exist
    select_every: int = 0  # steps between checkpoint-selection scores (0: no selection); best -> export-best/
    select_patience: int = 0  # stop after this many scores without improvement (0: never stop early)
    compile: bool = False  # MELP: torch.compile the ECG encoder, text encoder and decoder (melp.compile_parts)

    def __post_init__(self) -> None:
        check_section(self, "run", {name: at_least(1) for name in (
            "checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite")})
        for name in ("select_every", "select_patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"run.{name} must be an integer >= 0, got {value!r}")
        if self.select_patience and not self.select_every:
            raise ValueError("run.select_patience needs run.select_every > 0 (early stopping "
                             "counts checkpoint-selection scores)")


@dataclasses.dataclass
class SelectConfig:
    """Checkpoint selection (every ``run.select_every`` steps): zero-shot macro AUC x 100 on
    downstream labelled shard sets, averaged over ``sets``; the best step's model is kept."""

    sets: list[dict[str, str]] = dataclasses.field(default_factory=list)  # [{shards: DIR, task: NAME}, ...] (task: melp_scale.evaluate.tasks)
    split: str = "val"  # the task split scored: "val" (PTB-XL fold 9, seeded split otherwise) or "all"
    batch_size: int = 32  # ECGs per forward pass while scoring
    seed: int = 0  # seeds the subject split of tasks without fixed folds (as the evaluation's --seed)

    def __post_init__(self) -> None:
        if not isinstance(self.sets, list):
            raise ValueError(f"select.sets must be a list of {{shards: DIR, task: NAME}}, got {self.sets!r}")
        for index, item in enumerate(self.sets):
            if not isinstance(item, dict) or set(item) != {"shards", "task"}:
                raise ValueError(f"select.sets[{index}] must be {{shards: DIR, task: NAME}}, got {item!r}")
        if self.split not in ("train", "val", "test", "all"):
            raise ValueError(f"select.split must be val, train, test or all, got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"select.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class TrainConfig:
    """A whole pretraining run."""

    model: str = "demo"  # model preset
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"ecg": {"num_layers": 4}}
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)

    def model_config(self) -> MELPConfig:
        """The model preset with the overrides applied (validated by the model's configs)."""
        merged = _merge(MELPConfig.preset(self.model).to_dict(), self.model_overrides, "model")
        return MELPConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig, "select": SelectConfig}
DEEPSPEED_KEY = "deepspeed"  # the top-level key of a preset's ds.json overrides (any task)


def _merge(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"unknown config key {where}.{key}; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key]:
            merged[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text != "" else ""
    # YAML 1.1 reads 1e-5 (no dot) as a string: take it as the number it means
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)
    return value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _deep_update(tree: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def read_config_tree(config: str, overrides: list[str] | tuple[str, ...] = (),
                     rename: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The YAML tree of a preset name (``launch/configs/NAME.yaml``) or a YAML path, with the
    ``key=value`` overrides applied; returns (tree, path).

    ``rename`` maps a dotted key prefix to another one before nesting (the MELP config writes
    ``model.ecg.num_layers=4`` for ``model_overrides.ecg.num_layers``).
    """
    path = config if config.endswith((".yaml", ".yml")) else os.path.join(CONFIG_DIR, f"{config}.yaml")
    if not os.path.isfile(path):
        names = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))
        raise ValueError(f"--config {config!r}: no such preset or file (presets: {', '.join(names)})")
    with open(path, encoding="utf-8") as handle:
        tree = yaml.safe_load(handle) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        for old, new in (rename or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
        _deep_update(tree, _nest(key, _parse_value(value)))
    return tree, path


def _origin(keys: list[str], where: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Where unknown ``keys`` (dotted) came from: the command line's overrides, or the file."""
    given = [item for item in overrides
             if any(item.partition("=")[0] == k or item.partition("=")[0].startswith(k + ".")
                    for k in keys)]
    return f"command-line override(s) {given}" if given else where


def build_sections(tree: dict[str, Any], sections: dict[str, type], where: str,
                   extra_keys: tuple[str, ...] = (),
                   overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Each of ``sections`` (name -> dataclass) built from ``tree[name]``; unknown keys, at the
    top (other than ``extra_keys``) or inside a section, are ``ValueError``s naming them and
    where they came from (``overrides`` on the command line, else the file ``where``)."""
    known = {*extra_keys, *sections, DEEPSPEED_KEY}
    unknown = sorted(set(tree) - known)
    if unknown:
        raise ValueError(f"{_origin(unknown, where, overrides)}: unknown config key(s) {unknown}; "
                         f"known: {sorted(known)}")
    built = {}
    for name, cls in sections.items():
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{where}: config section {name!r} must be a mapping, got {values!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = [f"{name}.{b}" for b in sorted(set(values) - fields)]
        if bad:
            raise ValueError(f"{_origin(bad, where, overrides)}: unknown config key(s) {bad}; "
                             f"known in {name}: {sorted(fields)}")
        built[name] = cls(**values)
    return built


def read_deepspeed_overrides(config: str, overrides: list[str] | tuple[str, ...] = ()
                             ) -> dict[str, Any]:
    """The ``deepspeed:`` section of a preset or YAML file with the ``deepspeed.KEY=value``
    overrides applied ({} when there is none), its keys checked against the ds.json keys a
    preset may set (``melp_scale.train.engine.DS_OVERRIDE_KEYS``)."""
    from melp_scale.train.engine import check_ds_overrides

    mine = [item for item in overrides if item.partition("=")[0].split(".")[0] == DEEPSPEED_KEY]
    tree, path = read_config_tree(config, mine)
    section = tree.get(DEEPSPEED_KEY) or {}
    check_ds_overrides(section, DEEPSPEED_KEY)
    return section


def load_train_config(config: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a preset name (``launch/configs/NAME.yaml``) or a YAML path, then ``key=value`` overrides.

    ``model.X.Y=v`` overrides a model field; ``model=paper`` picks another model preset.
    """
    tree, path = read_config_tree(config, overrides, rename={"model.": "model_overrides."})
    return build_train_config(tree, path, overrides)


def build_train_config(tree: dict[str, Any], where: str = "config",
                       overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    sections = build_sections(tree, _SECTIONS, where, extra_keys=("model", "model_overrides"),
                              overrides=overrides)
    train = TrainConfig(model=tree.get("model", "demo"),
                        model_overrides=tree.get("model_overrides") or {}, **sections)
    train.model_config()  # validates the preset name and the overrides now
    return train
