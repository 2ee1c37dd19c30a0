"""The official MELP training step beside ours: same batch, same CPU, interleaved processes.

The official code (HKU-MedAI/MELP, ``MELPModel``) runs in its own interpreter, the one its
requirements are installed in (``--ref-python``), from the user's checkout of it
(``--ref-dir``: the folder holding ``src/melp``). Nothing of it is copied here; this file only
calls it. One official step is what Lightning's automatic optimisation does for MELP:
``loss = model.shared_step(batch, batch_idx)["loss"]``, ``loss.backward()``, the AdamW step of
its ``configure_optimizers`` (all parameters, lr 2e-4, weight decay 0.2, betas 0.9/0.95),
``zero_grad``. The model is built with the README's pretraining hyper-parameters (ECG-FM
encoder, 10 beat queries, loss weights 1 / 2 / 0.2, max_seq_len 128, 6 frozen BERT layers).

Harness substitutions (no official file is edited):
- ``--text-model FOLDER``: the two hub names MELP accepts for its BERT (fuyingw/heart_bert,
  ncbi/MedCPT-Query-Encoder) load from this local folder instead (an offline machine; e.g. a
  random BERT-base saved with ``save_pretrained``). Without it the hub is used.
- ``text_decoder.text_projection`` is created with ``torch.empty`` and never initialised by
  MELP; it is drawn from N(0, width^-0.5) here (uninitialised memory can hold denormals or
  NaNs, which would distort the timing).
- a one-process gloo group, because ``shared_step`` asks for the rank and world size;
  ``batch_idx=1`` skips the beam-search generation it prints every 1000 steps.
- ``--ref-path``: extra import folders appended after site-packages (e.g. import-only
  stand-ins for packages the training step never uses).

Both sides run in fp32 on the CPU with torch's default threads and default float32 matmul
precision, on ``torch.rand`` ECGs (12 x 5000) and the same report strings; ours is the
``paper`` preset through ``benchmarks/train_step.py`` (its ``eager`` lever = the plain step,
and the lever combinations given with ``--levers``). Each run is a fresh process; the sides run
interleaved, round after round; each records wall and process CPU seconds per step, peak RSS
and the load average. Results go to a temporary folder unless ``--record`` (then
benchmarks/results/official_step-cpu-STAMP.json).

    python benchmarks/official_step.py --ref-python REF/venv/bin/python --ref-dir REF/melp \\
        [--text-model REF/text_model] [--ref-path REF/shims] --batch 8 --rounds 2 [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

OFFICIAL_HUB_NAMES = ("fuyingw/heart_bert", "ncbi/MedCPT-Query-Encoder")
# the README's pretraining command as scripts/pretrain/main_pretrain.py hands it to MELPModel
OFFICIAL_SETTINGS = {"ecg_encoder_name": "ecgfm", "ecg_encoder_weight": "",
                     "text_encoder_name": "fuyingw/heart_bert", "clip_loss_weight": 1.0,
                     "caption_loss_weight": 2.0, "local_loss_weight": 0.2,
                     "n_queries_contrast": 10, "lr": 2e-4, "weight_decay": 0.2, "max_seq_len": 128,
                     "num_freeze_layers": 6, "training_steps_per_epoch": 1000, "max_epochs": 100}


# ------------------------------------------------------------ the official side (ref python)
def official_worker(args: argparse.Namespace) -> None:
    """Build the official model, time ``--steps`` training steps; print one RESULT line. Runs in
    the reference interpreter: only the standard library, torch and the official code."""
    import contextlib
    import io
    import random

    sys.path.insert(0, os.path.join(os.path.abspath(args.ref_dir), "src"))
    for extra in args.ref_path:
        sys.path.append(os.path.abspath(extra))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    store = tempfile.mkdtemp(prefix="official_step_pg_")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(store, "store"),
                            rank=0, world_size=1)
    from melp.models import melp_model

    if args.text_model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

        class LocalName:  # hub name -> the local folder; MELP's own arguments otherwise
            def __init__(self, cls):
                self.cls = cls

            def from_pretrained(self, name, *rest, **kwargs):
                if name not in OFFICIAL_HUB_NAMES:
                    raise ValueError(f"--text-model: unexpected hub name {name!r}")
                return self.cls.from_pretrained(args.text_model, *rest, **kwargs)

        melp_model.AutoModelForCausalLM = LocalName(melp_model.AutoModelForCausalLM)
        melp_model.AutoTokenizer = LocalName(melp_model.AutoTokenizer)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its ECG config while building
        model = melp_model.MELPModel(**OFFICIAL_SETTINGS)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OFFICIAL_SETTINGS["lr"],
                                  weight_decay=OFFICIAL_SETTINGS["weight_decay"], betas=(0.9, 0.95))
    reports = json.loads(args.reports)
    batch = {"ecg": torch.rand(args.batch, 12, 5000),
             "report": [reports[i % len(reports)] for i in range(args.batch)]}

    def step() -> None:
        loss = model.shared_step(batch, 1)[0]["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    wall, cpu, load_before = [], [], os.getloadavg()[0]
    for index in range(args.steps + args.warmup):  # untimed warm-up steps first, as train_step.py
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if index >= args.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    dist.destroy_process_group()
    print("RESULT " + json.dumps({
        "side": "official", "batch": args.batch, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "wall_s": wall, "cpu_s": cpu, "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}), flush=True)


def run_official(args: argparse.Namespace, reports: list[str]) -> dict:
    command = [args.ref_python, os.path.abspath(__file__), "--official-worker", "--ref-dir",
               args.ref_dir, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--reports", json.dumps(reports)]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--text-model", args.text_model] if args.text_model else []
    for extra in args.ref_path:
        command += ["--ref-path", extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"side": "official", "batch": args.batch, "returncode": done.returncode,
                "error": f"exit status {done.returncode}\n" + (done.stderr or done.stdout)[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------- the orchestrator
def summarise(runs: list[dict], sides: list[str]) -> list[dict]:
    from benchmarks.train_step import busy

    rows = []
    for side in sides:
        mine = [r for r in runs if r["side"] == side and "error" not in r]
        if not mine:
            errors = [r["error"] for r in runs if r["side"] == side]
            rows.append({"side": side, "error": errors[-1] if errors else "not run"})
            continue
        rows.append({"side": side, "median_s": statistics.median(t for r in mine for t in r["wall_s"]),
                     "cpu_s": statistics.median(t for r in mine for t in r["cpu_s"]),
                     "peak_memory_gb": max(r["peak_memory_gb"] for r in mine),
                     "load_1min": [[r["load_before"], r["load_after"]] for r in mine],
                     "busy_runs": sum(busy(r) for r in mine), "runs": len(mine)})
    good = {r["side"]: r for r in rows if "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        for base in ("official", "ours:eager"):
            if base in good:
                key = base.replace("ours:", "")
                row[f"time_vs_{key}"] = row["median_s"] / good[base]["median_s"]
                row[f"cpu_vs_{key}"] = row["cpu_s"] / good[base]["cpu_s"]
                row[f"memory_vs_{key}"] = row["peak_memory_gb"] / good[base]["peak_memory_gb"]
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'side':<40}{'s/step':>8}{'cpu s':>8}{'peak GB':>8}  {'vs official: time cpu mem':<27}"
          f"{'vs our eager: time cpu mem':<27}busy")
    for row in rows:
        if "error" in row:
            last = (row["error"].strip().splitlines() or ["(no output: killed? e.g. out of memory)"])[-1]
            print(f"{row['side']:<40} failed: {last[:80]}")
            continue
        ratios = [" ".join(f"{row.get(f'{kind}_vs_{base}', float('nan')):>5.2f}"
                           for kind in ("time", "cpu", "memory")) for base in ("official", "eager")]
        print(f"{row['side']:<40}{row['median_s']:>8.2f}{row['cpu_s']:>8.2f}{row['peak_memory_gb']:>8.2f}"
              f"  {ratios[0]:<27}{ratios[1]:<27}{row['busy_runs']}/{row['runs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-python", help="interpreter with the official code's requirements")
    parser.add_argument("--ref-dir", help="the official MELP checkout (holds src/melp)")
    parser.add_argument("--text-model", default=None,
                        help="local folder standing in for the official BERT hub names (offline)")
    parser.add_argument("--ref-path", action="append", default=[],
                        help="extra import folder for the official side (repeatable)")
    parser.add_argument("--levers", nargs="+", default=["eager", "all"],
                        help="our train_step.py levers run beside the official step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after 2 warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's; 1 on a shared machine keeps "
                             "OpenMP spin-waits out of the CPU time)")
    parser.add_argument("--record", action="store_true", help="write into benchmarks/results/")
    parser.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    parser.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.ref_dir or not os.path.isfile(os.path.join(args.ref_dir, "src", "melp", "models",
                                                           "melp_model.py")):
        parser.error(f"--ref-dir {args.ref_dir!r}: not an official MELP checkout "
                     "(src/melp/models/melp_model.py missing)")
    if args.text_model and not os.path.isfile(os.path.join(args.text_model, "config.json")):
        parser.error(f"--text-model {args.text_model!r}: no config.json there")
    if args.official_worker:
        return official_worker(args)
    if not args.ref_python or not os.access(args.ref_python, os.X_OK):
        parser.error(f"--ref-python {args.ref_python!r}: not an executable interpreter")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from benchmarks.harness import environment
    from benchmarks.train_step import REPORTS, run_worker, settings

    for lever in args.levers:
        try:
            settings(lever)
        except ValueError as error:
            parser.error(f"--levers: {error}")
    sides = ["official", *[f"ours:{lever}" for lever in args.levers]]
    runs = []
    for round_index in range(args.rounds):
        for side in sides:
            print(f"round {round_index + 1}/{args.rounds}: {side}", flush=True)
            if side == "official":
                runs.append(run_official(args, REPORTS))
            else:
                run = run_worker("paper", side.removeprefix("ours:"), args.batch, args.steps,
                                 threads=args.threads, warmup=args.warmup)
                runs.append({**run, "side": side})
    rows = summarise(runs, sides)
    print(f"\nCPU fp32, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, interleaved, "
          f"{args.threads or torch.get_num_threads()} thread(s)")
    print_rows(rows)
    if any(r.get("busy_runs") for r in rows):
        print("\nWARNING: the machine was busy during some runs: absolute times are inflated; "
              "the CPU-time ratios are the steadier figure.")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") if args.record else (
        args.out or tempfile.mkdtemp(prefix="official_step-"))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"official_step-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json")
    official_torch = next((r.get("torch") for r in runs if r["side"] == "official" and "torch" in r), None)
    with open(path, "w") as handle:
        json.dump({"benchmark": "official_step", "environment": environment(torch.device("cpu")),
                   "official": {"settings": OFFICIAL_SETTINGS, "torch": official_torch,
                                "text_model": "local stand-in" if args.text_model else "hub"},
                   "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                   "rounds": args.rounds, "threads": args.threads or torch.get_num_threads(),
                   "cores": os.cpu_count(), "rows": rows, "runs": runs}, handle, indent=1)
    print(f"wrote {path}" + ("" if args.record else "  (temporary; --record keeps it)"))


if __name__ == "__main__":
    main()
