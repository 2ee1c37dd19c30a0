"""The training loop: DeepSpeed ZeRO-2, equal batches per rank, resumable, observable.

Generic over a :class:`~melp_scale.train.task.Task` (model, loaders, forward, validation,
export): ``MELPTask`` (stage 2, ``launch/pretrain.py``) and ``MLMTask`` (stage 1, the text
encoder, ``launch/pretrain_text.py``) share this one loop.

One optimiser step per ``gradient_accumulation_steps`` micro-batches (DeepSpeed counts them;
the global batch, micro x accumulation x ranks, is printed at the start and in the summary).
After each step: the task's clamps apply to the model and the optimiser's fp32 master copy
(MELP's logit scale, kept in [0, ln 100]), its hook runs, a stop request (SIGTERM/SIGINT on any rank)
is agreed on by all ranks, every ``select_every`` steps the task's selection score may keep the
model as ``export-best/`` and stop a stalled run (``selection.py``), checkpoints are written
every ``checkpoint_every`` steps, at the end and on a stop. A non-finite loss on any rank skips that
micro-batch on all ranks (so ZeRO's collectives stay matched); ``max_nonfinite`` in a row stops
the run. Validation runs each epoch, at the end, and before the first step with
``run.validate_at_start``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from melp_scale.train import checkpoint, selection
from melp_scale.train.engine import (batch_sizes, build_optimizer, clamp_parameter_,
                                     describe_batch, load_ds_config, warmup_cosine)
from melp_scale.train.flops import peak_bf16_flops, throughput
from melp_scale.train.metrics import GpuTelemetry, MetricsLog
from melp_scale.train.task import Placement, Task, to_device

log = logging.getLogger("melp_scale.train")


@dataclasses.dataclass
class RunState:
    """What the loop carries from step to step (and into checkpoints)."""

    step: int = 0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    last_val: dict[str, float] = dataclasses.field(default_factory=dict)
    first_val: dict[str, float] = dataclasses.field(default_factory=dict)  # before training
    best_score: float | None = None  # the best checkpoint-selection score so far
    best_step: int | None = None  # ... and its step (the model in export-best/)
    since_best: int = 0  # selection scores since the best one
    select_scores: list = dataclasses.field(default_factory=list)  # [step, score] pairs


class Trainer:
    """Builds everything for one run; ``run()`` trains and returns the end summary."""

    def __init__(self, task: Task, ds_config_path: str, resume: str | None = None,
                 ds_overrides: dict[str, Any] | None = None):
        """``resume``: None (fresh run), "latest" (must resume) or "auto" (resume if possible);
        ``ds_overrides``: the preset's ``deepspeed:`` section, merged over ``ds_config_path``."""
        import deepspeed

        self.task, self.config, self.resume = task, task.config, resume
        config = self.config
        self.use_cuda = torch.cuda.is_available()
        _single_process_env()
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                   if self.use_cuda else "cpu")
        if self.use_cuda:
            torch.cuda.set_device(self.device)
        self.placement = Placement(self.rank, self.world_size, self.device)
        self.ds_config, self.precision = load_ds_config(ds_config_path, self.world_size,
                                                        self.use_cuda, ds_overrides)
        self.batch = batch_sizes(self.ds_config, self.world_size)
        if self.rank == 0:
            print(f"{task.name}: {describe_batch(self.batch)}, {self.precision}", flush=True)
        self.model_config_dict = task.model_config()
        self.checkpoints = os.path.join(config.run.out, "checkpoints")
        self._check_out_folder()
        task.prepare_data(self.placement)
        dist.barrier()
        # after prepare_data: the demo builds its held-out selection set there
        self.selection = task.make_selection() if config.run.select_every else None
        torch.manual_seed(config.optim.seed)
        self.model = task.build_model(self.placement).to(self.device)
        self.train_loader, self.val_loader = task.build_loaders(
            self.placement, self.ds_config["train_micro_batch_size_per_gpu"])
        if not config.run.validate:
            self.val_loader = None
        accumulation = self.ds_config.get("gradient_accumulation_steps", 1)
        self.steps_per_epoch = max(1, len(self.train_loader) // accumulation)
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        if config.optim.max_steps is not None:
            self.total_steps = min(self.total_steps, config.optim.max_steps)
        optimizer = build_optimizer(self.model, self.ds_config, config.optim.lr, config.optim.fused)
        self.base_lr = optimizer.param_groups[0]["lr"]
        scheduler = warmup_cosine(optimizer, config.optim.warmup_steps, self.total_steps,
                                  config.optim.min_lr_ratio, config.optim.decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        # train mode from the first step: HF from_pretrained returns a model in eval mode
        # (dropout off), which a resumed run would otherwise not reproduce
        self.engine.train()
        self.state = RunState()
        self.stop_requested = False
        self.metrics = MetricsLog(config.run.out, enabled=self.rank == 0)
        self.telemetry = GpuTelemetry(config.run.telemetry and self.rank == 0)
        # model FLOPs of each trained micro-batch (a task without ``step_flops`` reports none)
        self.peak_name, self.peak_flops = peak_bf16_flops(self.device)
        self.window_flops, self.run_flops, self.train_seconds = 0.0, 0.0, 0.0

    # ------------------------------------------------------------------ set-up
    def _check_out_folder(self) -> None:
        existing = checkpoint.read_latest(self.checkpoints)
        if self.resume == "auto":
            self.resume = "latest" if existing is not None else None
        if self.resume:
            checkpoint.check_resumable(self.checkpoints, self.model_config_dict, self.world_size)
        elif existing is not None:
            raise ValueError(f"--out {self.config.run.out!r} already holds checkpoints (latest "
                             f"{existing['tag']}); pass --resume to continue it or choose another --out")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        if self.resume:
            self._load()
            if self._select_due():  # stopped right at a selection step, before it scored
                self._select()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        # a run that early-stopped stays stopped when resumed (e.g. a SLURM requeue)
        start, status = time.time(), "early-stopped" if self._patience_spent() else "running"
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.task.name,
                   unit="step", disable=self.rank != 0, dynamic_ncols=True)
        try:
            if self.state.step == 0 and self.config.run.validate_at_start:
                self._validate()
                self.state.first_val = self.state.last_val
            while status == "running" and self.state.step < self.total_steps:
                status = self._epoch(bar)
                if status == "epoch_end":
                    self._validate()
                    status = "running"
            status = status if status in ("stopped", "early-stopped") else "finished"
            if status != "stopped" and self.state.last_val.get("step") != self.state.step:
                self._validate()
            if status == "finished" and self._select_due(final=True):
                self._select()
            self._save()
            export = self._export() if status != "stopped" else None
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._summary(status, time.time() - start, export)

    def _epoch(self, bar: tqdm) -> str:
        """Train to the end of the loader's epoch ("epoch_end"), the last step ("done") or a
        stop request ("stopped")."""
        accumulation = self.engine.gradient_accumulation_steps()
        wait, window_start, window_steps, sums = 0.0, time.time(), 0, {}
        fetch_start = time.time()
        for batch in self.train_loader:
            wait += time.time() - fetch_start
            losses = self._micro_step(batch)
            for name, value in (losses or {}).items():
                sums[name] = sums.get(name, 0.0) + value
            if self.engine.global_steps > self.state.step:  # an optimiser step happened
                self.state.step = self.engine.global_steps
                for parameter, low, high in self.task.clamped_parameters(self.model):
                    clamp_parameter_(parameter, low, high)
                self.task.after_step(self.model)
                window_steps += 1
                bar.update(1)
                if self.state.step % self.config.run.log_every == 0 or self.state.step == self.total_steps:
                    self._log_train(sums, window_steps * accumulation, wait,
                                    time.time() - window_start)
                    wait, window_start, window_steps, sums = 0.0, time.time(), 0, {}
                if self._agree_to_stop():
                    return "stopped"
                if self.state.step >= self.total_steps:
                    return "done"
                if self._select_due() and self._select():
                    return "early-stopped"
                if self.state.step % self.config.run.checkpoint_every == 0:
                    self._save()
            fetch_start = time.time()
        return "epoch_end"

    def _micro_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Forward + backward of one micro-batch; None when it was skipped as non-finite."""
        output = self.task.forward(self.engine, to_device(batch, self.device))
        finite = torch.isfinite(output.loss.detach()).float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self.state.nonfinite_in_row += 1
            self.state.skipped_steps += 1
            log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)",
                        self.state.step, self.state.nonfinite_in_row)
            if self.state.nonfinite_in_row >= self.config.run.max_nonfinite:
                raise RuntimeError(f"{self.state.nonfinite_in_row} non-finite losses in a row at "
                                   f"step {self.state.step}: stopping (lower the lr in ds.json, "
                                   f"check the data, or raise run.max_nonfinite)")
            return None
        self.state.nonfinite_in_row = 0
        self.engine.backward(output.loss)
        self.engine.step()
        step_flops = getattr(self.task, "step_flops", None)
        if step_flops is not None:
            self.window_flops += step_flops(self.model, batch, self.world_size)
        return {name: float(output.scalars[name]) for name in self.task.scalar_names}

    def _log_train(self, sums: dict[str, float], micro_batches: int, wait: float,
                   elapsed: float) -> None:
        names = self.task.scalar_names
        values = torch.tensor([sums.get(n, 0.0) for n in names] + [self.window_flops]
                              + [float(micro_batches)], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        count = max(values[-1].item(), 1.0)
        flops_per_rank = values[-2].item() / self.world_size
        self.window_flops, self.run_flops = 0.0, self.run_flops + flops_per_rank
        self.train_seconds += elapsed
        record = {"kind": "train", "step": self.state.step, "epoch": self.train_loader.epoch,
                  "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": _float(self.engine.get_global_grad_norm()),
                  "samples_per_s": micro_batches * self.engine.train_micro_batch_size_per_gpu()
                  * self.world_size / max(elapsed, 1e-9),
                  "data_wait_fraction": wait / max(elapsed, 1e-9),
                  "skipped_steps": self.state.skipped_steps}
        for index, name in enumerate(names):
            record[name] = values[index].item() / count
        if flops_per_rank > 0:  # achieved model TFLOP/s per rank and MFU (None on a CPU)
            record.update(throughput(flops_per_rank, elapsed, self.peak_flops))
        sources = getattr(self.train_loader, "take_source_counts", dict)()  # melp_scale.mixing
        if len(sources) > 1:  # samples per source in this window, all ranks
            counts = torch.tensor(list(sources.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            record.update(zip(sources, (int(c) for c in counts.tolist())))
        record.update(self.telemetry.read())
        self.metrics.write(record)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> None:
        if self.val_loader is None:
            return
        self.engine.eval()
        record = self.task.validate(self.engine, self.val_loader, self.placement)
        self.engine.train()
        record |= {"kind": "val", "step": self.state.step, "epoch": self.train_loader.epoch}
        self.state.last_val = record
        self.metrics.write(record)

    # ------------------------------------------------------------------ selection
    def _select_due(self, final: bool = False) -> bool:
        """Whether this step (a multiple of select_every, or the last) still needs a score."""
        every, step = self.config.run.select_every, self.state.step
        if not every or step == 0 or any(s == step for s, _ in self.state.select_scores):
            return False
        return final or step % every == 0

    def _select(self) -> bool:
        """Score this step (rank 0, broadcast), keep the model if best; True when
        ``select_patience`` scores in a row brought no improvement."""
        self.engine.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.use_cuda else []):
            score, details = selection.broadcast_score(
                self.rank, lambda: self.selection.score(self.model))
        self.engine.train()
        step, run = self.state.step, self.config.run
        improved = selection.update_best(self.state, step, score)
        if improved:
            if self.rank == 0:
                selection.write_best(self.task.export, self.model, run.out, {
                    "step": step, "score": score, "metric": selection.METRIC, **details})
            dist.barrier()
        self.metrics.write({"kind": "select", "step": step, "select_score": score, **details,
                            "best_score": self.state.best_score, "best_step": self.state.best_step})
        log.info("step %d: selection score %.3f (best %s at step %s)", step, score,
                 self.state.best_score, self.state.best_step)
        return self._patience_spent()

    def _patience_spent(self) -> bool:
        patience = self.config.run.select_patience
        return bool(patience) and self.state.since_best >= patience

    # ------------------------------------------------------------------ stop / save
    def _request_stop(self, signum: int, frame: Any) -> None:
        log.warning("rank %d: %s received, stopping after this step", self.rank,
                    signal.Signals(signum).name)
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save(self) -> None:
        rank_state = {"loader": self.train_loader.state_dict(),
                      "run": dataclasses.asdict(self.state)}
        meta = {"model_config": self.model_config_dict, "train_config": self.config.to_dict(),
                "step": self.state.step}
        checkpoint.save(self.engine, self.checkpoints, self.state.step, rank_state, meta,
                        self.config.run.keep_checkpoints)

    def _load(self) -> None:
        latest = checkpoint.read_latest(self.checkpoints)
        state = checkpoint.load(self.engine, self.checkpoints, latest["tag"])
        self.train_loader.load_state_dict(state["loader"])
        self.state = RunState(**state["run"])
        log.info("resumed from %s (step %d)", latest["tag"], self.state.step)

    def _export(self) -> str | None:
        path = os.path.join(self.config.run.out, "export")
        if self.rank == 0:
            self.task.export(self.model, path)
        dist.barrier()
        return path

    def _summary(self, status: str, seconds: float, export: str | None) -> dict[str, Any]:
        latest = checkpoint.read_latest(self.checkpoints)
        return {"task": self.task.name, "status": status, "step": self.state.step, "total_steps": self.total_steps,
                "epoch": self.train_loader.epoch, "seconds": seconds, "world_size": self.world_size,
                "precision": self.precision, "skipped_steps": self.state.skipped_steps,
                "bad_samples": self.train_loader.num_bad_samples,
                "checkpoint": os.path.join(self.checkpoints, latest["tag"]) if latest else None,
                "export": export, "export_format": self.task.export_format,
                "validation": self.state.last_val, "validation_before": self.state.first_val,
                "batch": self.batch, "throughput": self._throughput(),
                "selection": selection.selection_summary(
                    self.state, self.config.run.out, self.config.run.select_every)}

    def _throughput(self) -> dict[str, Any] | None:
        """Model FLOPs per rank over the logged training windows: TFLOP/s and MFU against the
        device's dense bf16 peak (``melp_scale.train.flops``); None without FLOP counts."""
        if self.run_flops <= 0:
            return None
        return {**throughput(self.run_flops, self.train_seconds, self.peak_flops),
                "device_peak": self.peak_name, "peak_tflops": (self.peak_flops or 0) / 1e12 or None}

    def close(self) -> None:
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        _remove_shm_buffer()


# DeepSpeed's CPU all-reduce op (its shm.cpp) maps one ~66 MB buffer per rank and run, named
# PREFIX + "{uid}_{master address}_{master port}_{rank}", and never removes it.
SHM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def shm_buffer_path(addr: str, port: str | int, rank: str | int) -> str | None:
    """This user's all-reduce buffer of the run at ``addr:port``, ``rank``; None when the
    parts would name a path outside /dev/shm."""
    name = f"{os.getuid()}_{addr}_{port}_{rank}"
    return None if "/" in name else SHM_BUFFER_PREFIX + name


def _remove_shm_buffer() -> None:
    """Unlink this rank's all-reduce buffer: the name is this run's own (user id, master
    address and port, rank); ranks that mapped it keep their mapping."""
    env = os.environ
    if not all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")):
        return
    path = shm_buffer_path(env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"])
    if path is not None and os.path.isfile(path):
        try:
            os.unlink(path)
        except OSError as error:  # not ours to fight over: say so and go on
            log.warning("could not remove %s: %s", path, error)


def _single_process_env() -> None:
    """Let ``python launch/pretrain.py`` run as a world of one, without a launcher."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)
