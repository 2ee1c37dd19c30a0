"""Benchmark the three kernel ops (InfoNCE, attention pooling, local loss) on the harness.

    python benchmarks/loss_kernels.py [--ops infonce,infonce_dist,attention_pool,local_loss]
                                      [--sizes quick|cpu|gpu] [--quick] [--infonce-n 64,4096]
                                      [--compile | --no-compile] [--threads 1]
                                      [--record | --out DIR]

Implementations, all on inputs of the benchmark dtype (bf16 on CUDA, fp32 on the CPU):
``eager`` — plain PyTorch in that dtype (open_clip's InfoNCE, the reference's local-loss
math without its fp32 upcast, SDPA's math backend for pooling); ``eager+compile`` — the same
under torch.compile (default on CUDA only: compiling on the CPU takes minutes); ``triton`` —
the kernel (CUDA only); plus SDPA's fused backends for attention pooling. Before any
implementation is timed, its output and the gradients of every input are compared with the
op's reference (``kernels/reference.py``, fp32 math) on the same inputs: the relative errors
are recorded with the timings, and an implementation beyond the dtype's tolerance is
reported as failed and not timed.

Sizes follow the paper's configuration: InfoNCE at D = 256 for per-GPU batches 64…4096 and
large N (16384, 32768); ``infonce_dist`` — the 2-rank distributed InfoNCE (2 processes: NCCL
on 2 GPUs, else gloo on the CPU), each rank N_l rows against the gathered 2·N_l, checked
against the single-process reference on the full batch, timed as the slower rank's step;
attention pooling at MELP's two pooler shapes (Q = 10 beat queries at D = 256, Q = 128
caption queries at D = 768; 8 heads, N = 312 ECG tokens, a quarter padded on average) for
B = 64…1024, also against SDPA (CUDA: flash, which takes no padding mask and so runs
unmasked, and memory-efficient) — the op reads K and V once at ≈ Q FLOP/byte, under the
H100's ridge, so its roofline column is the bandwidth-floor fraction; the local loss with
B = 64…1024, Qb = 10 beats, S = 18 sentences (counts drawn in 1…18, one text without
sentences), D = 256 — the eager B×B×S×D context tensor is 19 GB in fp32 at B = 1024, and an
out-of-memory failure is recorded as a row, not raised.

FLOPs are the useful multiply-adds ×2 of each op (forward; forward+backward), bytes the
inputs read and outputs written once — the roofline a perfect fused kernel reaches.
Results go to a folder outside the repository (the system temp dir) unless ``--record``
writes them to benchmarks/results/ (or ``--out`` names a folder).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels
from benchmarks.harness import (
    TABLE_HEADER,
    Result,
    Variant,
    Workload,
    environment,
    format_row,
    measure,
    plot_results,
    write_results,
)
from benchmarks.infonce_distributed import run_distributed_infonce
from kernels import reference

OPS = ("infonce", "infonce_dist", "attention_pool", "local_loss")
RECORD_DIR = Path(__file__).resolve().parent / "results"  # tracked: only with --record
SCRATCH_DIR = Path(tempfile.gettempdir()) / "melp-scale-benchmarks"
# relative error (||out − ref|| / ||ref||, output and every gradient) beyond which an
# implementation is reported as wrong instead of timed; bf16 eager carries ~1e-2 by itself
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
POOLER_SHAPES = [(10, 256), (128, 768)]  # (Q, D): the beat pooler, the caption pooler
SIZES: dict[str, dict[str, list]] = {
    "gpu": {
        "infonce": [64, 128, 256, 512, 1024, 2048, 4096, 16384, 32768],
        "infonce_dist": [64, 512, 2048],
        "attention_pool": [(batch, *pooler) for pooler in POOLER_SHAPES for batch in (64, 128, 256, 512, 1024)],
        "local_loss": [64, 128, 256, 512, 1024],
    },
    "cpu": {
        "infonce": [64, 256, 1024, 2048],
        "infonce_dist": [64, 256],
        "attention_pool": [(64, *pooler) for pooler in POOLER_SHAPES],
        "local_loss": [64, 128],
    },
    "quick": {"infonce": [64, 512], "infonce_dist": [64], "attention_pool": [(64, 10, 256)], "local_loss": [32]},
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


def eager_infonce(x: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's loss in the inputs' dtype: the logits are materialised in bf16 on a GPU."""
    logits = logit_scale.exp().to(x.dtype) * x @ t.T  # (N, N)
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def eager_local_loss(beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor) -> torch.Tensor:
    """The reference's math on the inputs' dtype (no fp32 upcast)."""
    similarity = reference.local_similarity(beats, sentences, sentence_counts, 4.0, 5.0)
    return reference.local_loss_from_similarity(similarity, sentence_counts > 0, 10.0)


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


REFERENCES = {
    "infonce": reference.infonce_loss,
    "attention_pool": reference.attention_pool,
    "local_loss": reference.local_contrastive_loss,
}
EAGER = {  # plain PyTorch in the inputs' dtype
    "infonce": eager_infonce,
    "attention_pool": _sdpa_pool([SDPBackend.MATH], use_mask=True),
    "local_loss": eager_local_loss,
}
PUBLIC_OPS = {
    "infonce": kernels.infonce_loss,
    "attention_pool": kernels.attention_pool,
    "local_loss": kernels.local_contrastive_loss,
}


def sdpa_variants(on_cuda: bool) -> list[Variant]:
    """SDPA's fused baselines of attention_pool; a backend that rejects the inputs is recorded as failed."""
    if not on_cuda:
        return []
    return [
        Variant("sdpa-flash-unmasked", _sdpa_pool([SDPBackend.FLASH_ATTENTION], use_mask=False)),
        Variant("sdpa-mem-efficient", _sdpa_pool([SDPBackend.EFFICIENT_ATTENTION], use_mask=True)),
    ]


def _triton_variant(op: str) -> Variant:
    public = PUBLIC_OPS[op]
    return Variant("triton", lambda *args: public(*args, impl="triton"))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def _run_with_grads(fn, args: list, leaves: list[torch.Tensor], grad_out: torch.Tensor | None):
    """fn on clones of the differentiable inputs: (output, grads of every input, grad_out used)."""
    clones = {id(leaf): leaf.detach().clone().requires_grad_() for leaf in leaves}
    out = fn(*[clones.get(id(arg), arg) if isinstance(arg, torch.Tensor) else arg for arg in args])
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad(out, [clones[id(leaf)] for leaf in leaves], grad_out.to(out.dtype), allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)], grad_out


def check_against_reference(workload: Workload, variants: list[Variant]) -> dict[str, tuple[dict, str | None]]:
    """Per variant: relative errors of its output and input gradients against the reference on
    one set of inputs, and the reason not to time it (None when within CHECK_TOLERANCE)."""
    args, leaves = workload.make_inputs()
    try:
        ref_out, ref_grads, grad_out = _run_with_grads(REFERENCES[workload.op], args, leaves, None)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # e.g. the reference out of memory
        note = None if "out of memory" in str(error) else f"reference failed: {error}"[:200]
        return {variant.name: ({}, note) for variant in variants}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    names = ["output"] + [f"grad{index}" for index in range(len(leaves))]
    tolerance = CHECK_TOLERANCE[workload.dtype]
    checks = {}
    for variant in variants:
        try:
            out, grads, _ = _run_with_grads(variant.fn, args, leaves, grad_out)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            checks[variant.name] = ({}, f"{type(error).__name__}: {error}"[:300])
            continue
        errors = {name: _relative_error(value, expected) for name, value, expected in
                  zip(names, [out, *grads], [ref_out, *ref_grads])}
        bad = {name: error for name, error in errors.items() if not error <= tolerance}
        checks[variant.name] = (errors, f"output check: relative errors {bad} exceed {tolerance:g}" if bad else None)
        del out, grads
    return checks


def time_variants(workloads: list[Workload], variants_for, device: torch.device, repeats: int) -> list[Result]:
    """Check each workload's variants against the reference, then time each forward and forward+backward."""
    results = []
    for workload in workloads:
        variants = variants_for(workload)
        checks = check_against_reference(workload, variants)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for variant in variants:
            errors, problem = checks[variant.name]
            for mode in ("forward", "forward+backward"):
                if problem is None:
                    result = measure(workload, variant, mode, device, repeats)
                else:
                    result = Result(workload.op, workload.label, workload.params, variant.name, mode,
                                    *(None,) * 7, error=problem)
                result.extra["relative_errors"] = errors or "unchecked (the reference ran out of memory)"
                results.append(result)
                print(format_row(result), flush=True)
    return results


def build_workloads(ops: list[str], preset: dict[str, list], device: torch.device, dtype: torch.dtype) -> list[Workload]:
    workloads: list[Workload] = []
    for op in ops:
        for size in preset[op]:
            if op == "infonce":
                workloads.append(infonce_workload(size, device, dtype))
            elif op == "attention_pool":
                workloads.append(attention_pool_workload(*size, device, dtype))
            elif op == "local_loss":
                workloads.append(local_loss_workload(size, device, dtype))
    return workloads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--sizes", choices=sorted(SIZES), help="size preset (default: gpu on CUDA, else cpu)")
    parser.add_argument("--quick", action="store_true", help="same as --sizes quick")
    parser.add_argument("--infonce-n", help="comma-separated InfoNCE batch sizes, overriding the preset")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the eager code under torch.compile (default: on CUDA only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on the CPU and per rank (CUDA: do_bench)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine 1 avoids OpenMP stalls)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--record", action="store_true", help=f"write the results to the tracked {RECORD_DIR}")
    parser.add_argument("--out", type=Path, help=f"folder for the JSON and PNG (default {SCRATCH_DIR}; "
                                                 "--record: benchmarks/results)")
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
    out_dir = args.out or (RECORD_DIR if args.record else SCRATCH_DIR)

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | python {env['python']} "
          f"| git {str(env['git_revision'])[:12]} | inputs {str(dtype).removeprefix('torch.')} "
          f"| cpu threads {env['num_cpu_threads']}")
    if not on_cuda:
        print("No GPU: timing eager PyTorch on the CPU only. Triton kernel timings need a GPU "
              "(the CPU interpreter is a correctness tool, not a benchmark); no kernel figures are reported.")
    if not use_compile:
        print("torch.compile variant off (enable with --compile).")

    compiled = {op: torch.compile(fn) for op, fn in EAGER.items()} if use_compile else {}

    def variants_for(workload: Workload) -> list[Variant]:
        variants = [Variant("eager", EAGER[workload.op])]
        if use_compile:
            variants.append(Variant("eager+compile", compiled[workload.op]))
        if workload.op == "attention_pool":
            variants += sdpa_variants(on_cuda)
        if on_cuda:
            variants.append(_triton_variant(workload.op))
        return variants

    print(TABLE_HEADER)
    results = time_variants(build_workloads(ops, preset, device, dtype), variants_for, device, args.repeats)
    if "infonce_dist" in ops:
        results += run_distributed_infonce(preset["infonce_dist"], INFONCE_DIM, dtype, on_cuda, args.repeats)
    stem = "loss_kernels-" + ("gpu" if on_cuda else "cpu")
    json_path = write_results(results, env, out_dir, stem)
    plot_path = plot_results(results, json_path.with_suffix(".png"), f"{env['device']} · {env['date']}")
    failed = [r for r in results if r.error]
    print(f"\n{len(results) - len(failed)}/{len(results)} rows timed; {len(failed)} failed or skipped "
          f"(wrong output, out of memory){'' if args.record else ' — not recorded (pass --record)'}")
    print(f"results: {json_path}\nplot:    {plot_path}")


if __name__ == "__main__":
    main()
