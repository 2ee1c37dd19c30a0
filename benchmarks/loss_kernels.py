"""Benchmark the three kernel ops (InfoNCE, attention pooling, local loss) on the harness.

    python benchmarks/loss_kernels.py [--ops infonce,attention_pool,local_loss]
                                      [--sizes quick|cpu|gpu] [--quick] [--infonce-n 64,4096]
                                      [--compile | --no-compile] [--threads 1]
                                      [--out benchmarks/results]

Implementations: the PyTorch reference (eager), the reference under torch.compile (default
on CUDA only: compiling on the CPU takes minutes), and the Triton kernel (CUDA only; an op
without a kernel yet shows the reference only). Sizes follow the paper's configuration:
InfoNCE at D = 256 for per-GPU batches 64…4096 and large N (16384, 32768); attention pooling
at MELP's two pooler shapes (Q = 10 beat queries at D = 256, Q = 128 caption queries at
D = 768; 8 heads, N = 312 ECG tokens, a quarter padded on average) for B = 64…1024, also
against SDPA (CUDA: flash, which takes no padding mask and so runs unmasked, and
memory-efficient; CPU: the default backend) — the op reads K and V once at ≈ Q FLOP/byte,
under the H100's ridge, so its roofline column is the bandwidth-floor fraction; the local loss with
B = 64…1024, Qb = 10 beats, S = 18 sentences (MIMIC reports have at most 18 statements;
counts drawn in 1…18, one text without sentences), D = 256 — the reference's B×B×S×D context
tensor is 19 GB in fp32 at B = 1024, and an out-of-memory failure is recorded as a row, not
raised. CUDA runs use bf16 inputs (training precision), CPU runs fp32 and fewer sizes.

FLOPs are the useful multiply-adds ×2 of each op (forward; forward+backward), bytes the
inputs read and outputs written once — the roofline a perfect fused kernel reaches.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels
from benchmarks.harness import (
    TABLE_HEADER,
    Variant,
    Workload,
    environment,
    plot_results,
    run_benchmarks,
    write_results,
)
from kernels import reference

OPS = ("infonce", "attention_pool", "local_loss")
POOLER_SHAPES = [(10, 256), (128, 768)]  # (Q, D): the beat pooler, the caption pooler
SIZES: dict[str, dict[str, list]] = {
    "gpu": {
        "infonce": [64, 128, 256, 512, 1024, 2048, 4096, 16384, 32768],
        "attention_pool": [(batch, *pooler) for pooler in POOLER_SHAPES for batch in (64, 128, 256, 512, 1024)],
        "local_loss": [64, 128, 256, 512, 1024],
    },
    "cpu": {
        "infonce": [64, 256, 1024, 2048],
        "attention_pool": [(64, *pooler) for pooler in POOLER_SHAPES],
        "local_loss": [64, 128],
    },
    "quick": {"infonce": [64, 512], "attention_pool": [(64, 10, 256)], "local_loss": [32]},
}
INFONCE_DIM = 256
POOL_KEYS, POOL_HEADS = 312, 8
LOCAL_BEATS, LOCAL_SENTENCES, LOCAL_DIM = 10, 18, 256


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_()


def infonce_workload(num_rows: int, device: torch.device, dtype: torch.dtype) -> Workload:
    dim = INFONCE_DIM

    def make_inputs():
        x = _leaf(torch.nn.functional.normalize(torch.randn(num_rows, dim, device=device), dim=-1).to(dtype))
        t = _leaf(torch.nn.functional.normalize(torch.randn(num_rows, dim, device=device), dim=-1).to(dtype))
        logit_scale = _leaf(torch.tensor(math.log(1 / 0.07), device=device))
        return [x, t, logit_scale], [x, t, logit_scale]

    element = torch.finfo(dtype).bits // 8
    forward_flops = 2.0 * num_rows**2 * dim
    forward_bytes = 2.0 * num_rows * dim * element
    return Workload(
        "infonce", f"N={num_rows} D={dim}", {"N": num_rows, "D": dim}, make_inputs,
        flops={"forward": forward_flops, "forward+backward": 3 * forward_flops},  # bwd: G·T and Gᵀ·X
        min_bytes={"forward": forward_bytes, "forward+backward": 3 * forward_bytes},  # + read x, t; write dx, dt
        dtype=dtype,
    )


def attention_pool_workload(
    batch: int, num_queries: int, dim: int, device: torch.device, dtype: torch.dtype
) -> Workload:
    num_keys = POOL_KEYS

    def make_inputs():
        queries = _leaf(torch.randn(num_queries, dim, device=device, dtype=dtype))
        keys = _leaf(torch.randn(batch, num_keys, dim, device=device, dtype=dtype))
        values = _leaf(torch.randn(batch, num_keys, dim, device=device, dtype=dtype))
        lengths = torch.randint(num_keys // 2, num_keys + 1, (batch, 1), device=device)
        mask = torch.arange(num_keys, device=device)[None, :] >= lengths  # True = padded
        return [queries, keys, values, POOL_HEADS, mask], [queries, keys, values]

    element = torch.finfo(dtype).bits // 8
    forward_flops = 4.0 * batch * num_queries * num_keys * dim  # q·Kᵀ and P·V
    kv_bytes = 2.0 * batch * num_keys * dim * element
    io_bytes = (num_queries * dim + batch * num_queries * dim) * element
    mask_bytes = batch * num_keys
    return Workload(
        "attention_pool", f"B={batch} Q={num_queries} D={dim}",
        {"B": batch, "Q": num_queries, "N": num_keys, "D": dim, "heads": POOL_HEADS}, make_inputs,
        flops={"forward": forward_flops, "forward+backward": 3 * forward_flops},  # bwd: dP, dV, dK, dq
        min_bytes={
            "forward": kv_bytes + io_bytes + mask_bytes,
            # backward reads K, V, q, O, dO, mask and writes dK, dV, dq
            "forward+backward": 3 * kv_bytes + 3 * io_bytes + 2 * mask_bytes,
        },
        dtype=dtype,
    )


def local_loss_workload(batch: int, device: torch.device, dtype: torch.dtype) -> Workload:
    num_beats, num_sentences, dim = LOCAL_BEATS, LOCAL_SENTENCES, LOCAL_DIM

    def make_inputs():
        beats = _leaf(torch.randn(batch, num_beats, dim, device=device, dtype=dtype))
        counts = torch.randint(1, num_sentences + 1, (batch,), device=device)
        counts[0] = 0  # one text without sentences, as in real batches
        valid = torch.arange(num_sentences, device=device)[None, :, None] < counts[:, None, None]
        sentences = _leaf(torch.randn(batch, num_sentences, dim, device=device, dtype=dtype) * valid)
        return [beats, sentences, counts], [beats, sentences]

    element = torch.finfo(dtype).bits // 8
    per_pair = 4.0 * num_beats * num_sentences * dim + 6.0 * num_sentences * dim  # A = b·sᵀ, c = α·b, cosines
    forward_flops = batch**2 * per_pair
    input_bytes = batch * (num_beats + num_sentences) * dim * element
    return Workload(
        "local_loss", f"B={batch}", {"B": batch, "Qb": num_beats, "S": num_sentences, "D": dim}, make_inputs,
        flops={"forward": forward_flops, "forward+backward": 3 * forward_flops},
        min_bytes={"forward": input_bytes, "forward+backward": 3 * input_bytes},
        dtype=dtype,
    )


REFERENCES = {
    "infonce": reference.infonce_loss,
    "attention_pool": reference.attention_pool,
    "local_loss": reference.local_contrastive_loss,
}
PUBLIC_OPS = {
    "infonce": kernels.infonce_loss,
    "attention_pool": kernels.attention_pool,
    "local_loss": kernels.local_contrastive_loss,
}


def _sdpa_pool(backends: list[SDPBackend], use_mask: bool):
    """attention_pool through F.scaled_dot_product_attention on (B, H, L, d) head views."""

    def pool(queries, keys, values, num_heads, key_padding_mask=None):
        batch, _, dim = keys.shape
        if queries.ndim == 2:
            queries = queries.expand(batch, -1, -1)  # shared queries: autograd sums dq over the batch

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, d)
            return x.view(batch, x.shape[1], num_heads, dim // num_heads).transpose(1, 2)

        mask = ~key_padding_mask[:, None, None, :] if use_mask and key_padding_mask is not None else None
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(heads(queries), heads(keys), heads(values), attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, queries.shape[1], dim)  # (B, Q, D)

    return pool


def sdpa_variants(on_cuda: bool) -> list[Variant]:
    """SDPA baselines of attention_pool; a backend that rejects the inputs is recorded as failed."""
    if not on_cuda:
        return [Variant("sdpa", _sdpa_pool([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], use_mask=True))]
    return [
        Variant("sdpa-flash-unmasked", _sdpa_pool([SDPBackend.FLASH_ATTENTION], use_mask=False)),
        Variant("sdpa-mem-efficient", _sdpa_pool([SDPBackend.EFFICIENT_ATTENTION], use_mask=True)),
    ]


def _triton_variant(op: str, workload: Workload) -> Variant | None:
    """The Triton kernel when the op has one (probed on the workload's inputs), else None."""
    public = PUBLIC_OPS[op]

    def kernel(*args):
        return public(*args, impl="triton")

    try:
        kernel(*workload.make_inputs()[0])
    except ValueError as error:
        if "no Triton kernel" in str(error):
            return None
        raise
    return Variant("triton", kernel)


def build_workloads(ops: list[str], preset: dict[str, list], device: torch.device, dtype: torch.dtype) -> list[Workload]:
    workloads: list[Workload] = []
    for op in ops:
        for size in preset[op]:
            if op == "infonce":
                workloads.append(infonce_workload(size, device, dtype))
            elif op == "attention_pool":
                workloads.append(attention_pool_workload(*size, device, dtype))
            else:
                workloads.append(local_loss_workload(size, device, dtype))
    return workloads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--sizes", choices=sorted(SIZES), help="size preset (default: gpu on CUDA, else cpu)")
    parser.add_argument("--quick", action="store_true", help="same as --sizes quick")
    parser.add_argument("--infonce-n", help="comma-separated InfoNCE batch sizes, overriding the preset")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the reference under torch.compile (default: on CUDA only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on the CPU (CUDA: do_bench)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 avoids OpenMP stalls)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON results and the PNG plot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; choose from {OPS}")
    preset = dict(SIZES["quick" if args.quick else args.sizes or ("gpu" if on_cuda else "cpu")])
    if args.infonce_n:
        preset["infonce"] = [int(n) for n in args.infonce_n.split(",")]
    use_compile = on_cuda if args.compile is None else args.compile
    dtype = torch.bfloat16 if on_cuda else torch.float32

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | python {env['python']} "
          f"| git {str(env['git_revision'])[:12]} | inputs {str(dtype).removeprefix('torch.')} "
          f"| cpu threads {env['num_cpu_threads']}")
    if not on_cuda:
        print("No GPU: timing the PyTorch reference on the CPU only. Triton kernel timings need a GPU "
              "(the CPU interpreter is a correctness tool, not a benchmark); no kernel figures are reported.")
    if not use_compile:
        print("torch.compile variant off (enable with --compile).")

    compiled = {op: torch.compile(fn) for op, fn in REFERENCES.items()} if use_compile else {}
    triton_variants: dict[str, Variant | None] = {}

    def variants_for(workload: Workload) -> list[Variant]:
        variants = [Variant("reference", REFERENCES[workload.op])]
        if use_compile:
            variants.append(Variant("reference+compile", compiled[workload.op]))
        if workload.op == "attention_pool":
            variants += sdpa_variants(on_cuda)
        if on_cuda:
            if workload.op not in triton_variants:
                triton_variants[workload.op] = _triton_variant(workload.op, workload)
                if triton_variants[workload.op] is None:
                    print(f"{workload.op}: no Triton kernel yet, reference only")
            if triton_variants[workload.op] is not None:
                variants.append(triton_variants[workload.op])
        return variants

    print(TABLE_HEADER)
    results = run_benchmarks(build_workloads(ops, preset, device, dtype), variants_for, device, args.repeats)
    stem = "loss_kernels-" + ("gpu" if on_cuda else "cpu")
    json_path = write_results(results, env, args.out, stem)
    plot_path = plot_results(results, json_path.with_suffix(".png"), f"{env['device']} · {env['date']}")
    print(f"results: {json_path}\nplot:    {plot_path}")


if __name__ == "__main__":
    main()
