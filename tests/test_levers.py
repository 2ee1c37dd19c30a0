"""Speed and memory levers leave the training loss and gradients unchanged (issue 19).

Each lever is a config switch; a small model with the lever on, holding the same weights and
seeded the same (dropout on: training mode), must give the loss and the gradients of the
plain model to fp32 tolerance. The fused vocabulary cross entropy is also checked against the
plain projection + ``F.cross_entropy`` in float64, gradients included. The fused AdamW
(``optim.fused``) must step the parameters as the per-parameter loop does, also under ZeRO-2.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import os

import pytest
import torch
import torch.nn.functional as F

from melp_scale.model import MELP, MELPConfig
from melp_scale.model.config import (
    DecoderConfig,
    ECGEncoderConfig,
    PoolerConfig,
    TextEncoderConfig,
)
from melp_scale.model.fused_ce import chunked_linear_cross_entropy
from melp_scale.train.loop import shm_buffer_path
from tests.kernel_utils import free_port

REPORTS = ["sinus rhythm. normal ecg.",
           "atrial fibrillation with rapid ventricular response. left axis deviation.",
           "low qrs voltages. sinus bradycardia."]
LEVERS = {"fused_ce": {"decoder": {"vocab_chunk": 7}},
          "attention_recompute": {"ecg": {"attention_recompute": True}},
          "pos_conv_fft": {"ecg": {"pos_conv_fft": True}},
          "checkpoint": {"ecg": {"checkpoint_layers": True}, "text": {"checkpoint_layers": True},
                         "decoder": {"checkpoint_layers": True}}}


def small_config(freeze_embeddings: bool = False, **overrides) -> MELPConfig:
    config = MELPConfig(
        ecg=ECGEncoderConfig(conv_channels=16, width=32, num_layers=2, num_heads=4, ffn_dim=64,
                             pos_conv_kernel=8, pos_conv_groups=4),
        pooler=PoolerConfig(embed_dim=16, num_beat_queries=3, beat_heads=2, num_caption_queries=5,
                            caption_heads=2),
        text=TextEncoderConfig(
            architecture={"model_type": "bert", "vocab_size": 30523, "hidden_size": 24,
                          "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 40,
                          "max_position_embeddings": 64, "hidden_dropout_prob": 0.1},
            load_weights=False, num_frozen_layers=1, freeze_embeddings=freeze_embeddings, max_length=32),
        decoder=DecoderConfig(num_layers=2, num_heads=2, mlp_ratio=2.0, dropout=0.1))
    tree = config.to_dict()
    for section, fields in overrides.items():
        tree[section].update(fields)
    return MELPConfig.from_dict(tree)


def loss_and_grads(model: MELP, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks for both models
    loss = model(batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    model = MELP(small_config())
    batch = model.tokenizer.batch(REPORTS)
    batch["ecg"] = torch.rand(len(REPORTS), 12, 400)
    return model, batch, loss_and_grads(model, batch)


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_lever_leaves_loss_and_gradients_unchanged(plain, lever):
    model, batch, (loss, grads) = plain
    levered = MELP(small_config(**LEVERS[lever]))
    levered.load_state_dict(model.state_dict())
    lever_loss, lever_grads = loss_and_grads(levered, batch)
    torch.testing.assert_close(lever_loss, loss, rtol=1e-5, atol=1e-6)
    assert lever_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(lever_grads[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rows,chunk", [(13, 4), (13, 13), (13, 100), (1, 1)])
def test_chunked_cross_entropy_matches_plain_float64(rows, chunk):
    torch.manual_seed(rows + chunk)
    hidden = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (rows,))
    scale = 0.7  # an incoming gradient that is not 1
    plain = F.cross_entropy(hidden @ weight.T, targets)
    fused = chunked_linear_cross_entropy(hidden, weight, targets, chunk)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, plain)
    expected = torch.autograd.grad(plain * scale, (hidden, weight))
    got = torch.autograd.grad(fused * scale, (hidden, weight))
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_chunked_cross_entropy_without_grad_and_bad_chunk():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([0, 8, 3, 3, 1])
    with torch.no_grad():
        fused = chunked_linear_cross_entropy(hidden, weight, targets, 2)
    torch.testing.assert_close(fused, F.cross_entropy(hidden @ weight.T, targets))
    with pytest.raises(ValueError, match="decoder.vocab_chunk"):
        chunked_linear_cross_entropy(hidden, weight, targets, 0)
    with pytest.raises(ValueError, match="decoder.vocab_chunk"):
        small_config(decoder={"vocab_chunk": -1})


@pytest.mark.parametrize("freeze_embeddings", [True, False])
def test_frozen_layers_keep_activations_only_when_a_gradient_needs_them(freeze_embeddings):
    """Autograd saves nothing for ops whose inputs and weights all lack requires_grad, so the
    frozen prefix (embeddings + frozen layers) keeps no activations: the no_grad lever holds by
    construction. With trainable embeddings below them (the paper), the frozen layers must keep
    what the input gradient needs."""
    torch.manual_seed(0)
    model = MELP(small_config(freeze_embeddings=freeze_embeddings))
    batch = model.tokenizer.batch(REPORTS)
    batch["ecg"] = torch.rand(len(REPORTS), 12, 400)
    inside, saved = [False], {"frozen": 0, "other": 0}
    frozen_layer = model.text.bert.encoder.layer[0]
    frozen_layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    frozen_layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor):
        saved["frozen" if inside[0] else "other"] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch).loss.backward()
    assert saved["other"] > 0
    assert (saved["frozen"] == 0) == freeze_embeddings, saved


def test_checkpointing_keeps_fewer_activations(plain):
    model, batch, _ = plain
    counts = []
    fused = LEVERS["fused_ce"]  # else the (tokens x 30k) logits dwarf the layers' activations
    both = {**LEVERS["checkpoint"], "decoder": {**LEVERS["checkpoint"]["decoder"], **fused["decoder"]}}
    for config in (small_config(**fused), small_config(**both)):
        levered = MELP(config)
        levered.load_state_dict(model.state_dict())
        levered.train()
        total, weights = [0], {p.untyped_storage().data_ptr() for p in levered.parameters()}

        def pack(tensor, total=total, weights=weights):  # activations only, not saved weights
            if tensor.untyped_storage().data_ptr() not in weights:
                total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = levered(batch).loss
        counts.append(total[0])
        del loss
    assert counts[1] < 0.8 * counts[0], counts


def test_compile_parts_match_eager(plain):
    """run.compile: ECG encoder, text encoder and decoder through torch.compile (the aot_eager
    backend here: graph capture and AOT autograd without the C++ toolchain's compile time)."""
    from melp_scale.model.melp import compile_parts

    model, batch, (loss, grads) = plain
    compiled = copy.deepcopy(model)
    compile_parts(compiled, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert compiled.state_dict().keys() == model.state_dict().keys()  # checkpoints unchanged


def test_cpu_bf16_autocast_gives_the_fp32_loss_to_bf16_tolerance(plain):
    """benchmarks/train_step.py's ``bf16_autocast`` reference point (not an fp32 lever): the same
    model and dropout masks under CPU bf16 autocast give the fp32 loss to bf16 rounding."""
    model, batch, (loss, _) = plain
    model.train()
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = model(batch).loss.float()
    assert autocast_loss.isfinite() and abs(autocast_loss - loss) / loss.abs() < 3e-2
    assert autocast_loss != loss  # the products really ran in bf16


_FRAGMENT = """
import torch
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
torch.empty(4 << 20).fill_(1)  # glibc's default: freeing a 16 MiB block raises its mmap threshold
base = rss()
blocks, pins = [], []
for _ in range(64):  # 2 MiB tensors, each followed by a small live one: freed, they leave holes
    blocks.append(torch.ones(512 * 1024)); pins.append(torch.ones(256))
peak = rss()
del blocks
after = rss()
torch.manual_seed(0)
print(base, peak, after, float(torch.nn.functional.gelu(torch.randn(512, 512) @ torch.randn(512, 512)).sum()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or os.uname().sysname != "Linux"
                    or __import__("platform").libc_ver()[0] != "glibc", reason="glibc on Linux only")
def test_release_memory_returns_freed_blocks_and_leaves_results_unchanged():
    """train_step.py's ``release_memory`` (MALLOC_MMAP_THRESHOLD_=1 MiB): 128 MiB of freed 2 MiB
    tensors, with live small tensors between them, go back to the system at once, where glibc's
    default (a threshold that has risen to 16 MiB) keeps them as holes in the heap; the numbers
    computed are the same. In the paper step the default kept up to 1.1 GB (README, Performance)."""
    import subprocess
    import sys

    def run(extra: dict) -> tuple[int, int, int, float]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run([sys.executable, "-c", _FRAGMENT], env={**env, **extra, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, check=True, timeout=120)
        base, peak, after, value = done.stdout.split()
        return int(base), int(peak), int(after), float(value)

    base, _, kept, value = run({})
    if kept - base < 96:  # glibc's heuristics returned the holes by themselves
        pytest.skip(f"this glibc kept no holes by default ({base} -> {kept} MiB): nothing to compare")
    base, peak, released, released_value = run({"MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert peak - base > 120, (base, peak)  # the blocks were really there
    assert released - base < 16, (base, released)
    assert released_value == value


def test_ds_torch_autocast_replaces_bf16_weights_on_gpus_only(tmp_path, monkeypatch):
    """Precision levers of the ds.json: ``torch_autocast`` (fp32 weights, bf16 autocast) turns
    DeepSpeed's bf16 weight mode off on a GPU, and is off on the CPU (fp32)."""
    import json

    from melp_scale.train.engine import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 2, "overlap_comm": True}}))
    overrides = {"torch_autocast": {"enabled": True}}
    config, precision = load_ds_config(str(path), 1, use_cuda=False, overrides=overrides)
    assert precision == "fp32" and not config["torch_autocast"]["enabled"] and not config["bf16"]["enabled"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config, precision = load_ds_config(str(path), 1, use_cuda=True, overrides=overrides)
    assert precision == "bfloat16 autocast, fp32 weights"
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert config["bf16"]["enabled"] is False and config["zero_optimization"]["overlap_comm"] is True
    _, precision = load_ds_config(str(path), 1, use_cuda=True)
    assert precision == "bf16"  # without the override: DeepSpeed's bf16 weights, fp32 master


# ------------------------------------------------------------------------ fused AdamW
def test_fused_adamw_steps_like_the_loop():
    """optim.fused: fed the same MELP gradients for a few steps, the fused kernel ends at the
    parameters of torch's default per-parameter AdamW (fp32 tolerance), and the steps did move
    them. (The gradients come from the loop's model: recomputing them on each model's own,
    rounding-different weights lets Adam's g / sqrt(v) amplify ulps on near-zero gradients.)"""
    from melp_scale.train.engine import build_optimizer

    torch.manual_seed(0)
    loop_model = MELP(small_config())
    fused_model = copy.deepcopy(loop_model)
    start = [p.detach().clone() for p in loop_model.parameters()]
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.2}}}
    loop = build_optimizer(loop_model, copy.deepcopy(ds), fused=False)
    fused = build_optimizer(fused_model, copy.deepcopy(ds))  # "auto": on for CPU tensors
    assert (loop.defaults["fused"], fused.defaults["fused"]) == (False, True)
    batch = loop_model.tokenizer.batch(REPORTS)
    batch["ecg"] = torch.rand(len(REPORTS), 12, 400)
    for step in range(4):
        torch.manual_seed(step)
        loop_model(batch).loss.backward()
        for a, b in zip(loop_model.parameters(), fused_model.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        loop.step()
        fused.step()
        loop.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
    moved = [not torch.equal(a, b) for a, b in zip(start, loop_model.parameters())]
    assert sum(moved) > 0.5 * len(moved)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_setting():
    from melp_scale.train.config import OptimConfig
    from melp_scale.train.engine import resolve_fused

    cpu = [torch.zeros(2)]
    assert resolve_fused("auto", cpu) is True and resolve_fused(False, cpu) is False
    assert resolve_fused("auto", [torch.zeros(2, dtype=torch.int64)]) is False
    with pytest.raises(ValueError, match="optim.fused=true"):
        resolve_fused(True, [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="optim.fused"):
        OptimConfig(fused="yes")
    assert OptimConfig().fused == "auto"


def _zero2_worker(rank: int, port: int, folder: str) -> None:
    """Two ZeRO-2 engines in turn (loop, then fused AdamW) on the same model, data and seed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed

    from melp_scale.train.engine import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for fused in (False, True):
        torch.manual_seed(0)  # 7 x 5 + 7 + 7 + 7 + 3 x 7 + 3 = 80 values: partitions split tensors
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
        ds = {"optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.2}}}
        optimizer = build_optimizer(model, ds, fused=fused)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 2}})
        assert engine.optimizer.optimizer.defaults["fused"] is fused
        assert engine.zero_optimization_stage() == 2
        generator = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            loss = engine(torch.randn(4, 5, generator=generator)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        result[str(fused)] = [p.detach().flatten().tolist() for p in model.parameters()]
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads stopped before the process exits


def _zero2_melp_steps(rank: int, port: int, folder: str, variants: dict) -> None:
    """ZeRO-2 engines in turn on the same small MELP, data, seeds and dropout masks, one per
    variant (name -> (compile the parts?, zero_optimization)): two clipped AdamW steps each,
    losses and updated parameters into ``folder``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed

    from melp_scale.model.melp import compile_parts
    from melp_scale.train.engine import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for name, (compiled, zero) in variants.items():
        torch.manual_seed(0)
        model = MELP(small_config())
        if compiled:
            compile_parts(model, backend="aot_eager")  # graph capture + AOT autograd, no C++ build
        ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.2}}}
        optimizer = build_optimizer(model, ds, fused=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 3, "gradient_clipping": 1.0,
            "zero_optimization": zero})
        assert engine.zero_optimization_stage() == 2
        for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"):
            if key in zero:  # the setting reached the ZeRO optimiser
                assert getattr(engine.optimizer, key) == zero[key], (key, getattr(engine.optimizer, key))
        batch = model.tokenizer.batch(REPORTS[rank:] + REPORTS[:rank])
        batch["ecg"] = torch.rand(3, 12, 400, generator=torch.Generator().manual_seed(100 + rank))
        losses = []
        for step in range(2):
            torch.manual_seed(1000 * step + rank)  # the same dropout masks in every engine
            loss = engine(batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result[name] = {"losses": losses, "params": {
            key: p.detach().flatten()[:64].tolist() for key, p in model.named_parameters()
            if p.requires_grad}}
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads stopped before the process exits


def _zero2_compile_worker(rank: int, port: int, folder: str) -> None:
    """Eager, then ``run.compile``'s compile_parts."""
    _zero2_melp_steps(rank, port, folder, {"False": (False, {"stage": 2}), "True": (True, {"stage": 2})})


def _zero2_comm_worker(rank: int, port: int, folder: str) -> None:
    """ZeRO-2's communication settings: none, then the paper preset's overlap_comm and
    contiguous_gradients with buckets small enough that the gradients go in many of them."""
    plain = {"stage": 2, "overlap_comm": False, "contiguous_gradients": False,
             "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    tuned = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
             "reduce_bucket_size": 5000, "allgather_bucket_size": 5000}
    _zero2_melp_steps(rank, port, folder, {"False": (False, plain), "True": (False, tuned)})


def _two_ranks(target, folder: str) -> None:
    """Run ``target(rank, port, folder)`` on 2 spawned ranks; remove their shared-memory buffers."""
    port = free_port()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=(rank, port, folder)) for rank in range(2)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
            if worker.is_alive():
                worker.kill()
    finally:  # DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory buffer per rank behind
        for rank in range(2):
            leftover = shm_buffer_path("127.0.0.1", port, rank)
            if os.path.exists(leftover):
                os.remove(leftover)
    assert [w.exitcode for w in workers] == [0, 0]


def _assert_same_steps(folder) -> None:
    """Each rank's "True" engine gave the "False" engine's losses and updated parameters."""
    for rank in range(2):
        result = json.loads((folder / f"rank{rank}.json").read_text())
        base, lever = result["False"], result["True"]
        torch.testing.assert_close(torch.tensor(lever["losses"]), torch.tensor(base["losses"]),
                                   rtol=1e-5, atol=1e-6)
        assert base["losses"][1] != base["losses"][0]  # the first step changed the model
        assert lever["params"].keys() == base["params"].keys()
        for name, values in base["params"].items():
            torch.testing.assert_close(torch.tensor(lever["params"][name]), torch.tensor(values), rtol=1e-4,
                                       atol=1e-6, msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")


def test_run_compile_under_zero2_matches_eager(tmp_path):
    """run.compile with DeepSpeed ZeRO-2 on 2 gloo ranks: the compiled parts give the eager
    engine's losses and, after two clipped AdamW steps on partitioned gradients, its parameters."""
    pytest.importorskip("deepspeed")
    _two_ranks(_zero2_compile_worker, str(tmp_path))
    _assert_same_steps(tmp_path)


def test_zero2_communication_settings_leave_the_steps_unchanged(tmp_path):
    """The ``deepspeed.zero_optimization`` levers the presets expose (overlap_comm,
    contiguous_gradients, bucket sizes) change how gradients travel, not the step: on 2 gloo
    ranks, with the gradients reduced in many small buckets, the losses and the parameters after
    two clipped AdamW steps are those of ZeRO-2 without them."""
    pytest.importorskip("deepspeed")
    _two_ranks(_zero2_comm_worker, str(tmp_path))
    _assert_same_steps(tmp_path)


def test_fused_adamw_under_zero2_matches_the_loop(tmp_path):
    """DeepSpeed ZeRO-2 (2 gloo ranks) steps its flat fp32 partitions with the fused kernel to
    the parameters the per-parameter AdamW reaches."""
    pytest.importorskip("deepspeed")
    _two_ranks(_zero2_worker, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        for loop, fused in zip(result["False"], result["True"]):
            torch.testing.assert_close(torch.tensor(fused), torch.tensor(loop), rtol=1e-5, atol=1e-6)
    assert ranks[0] == ranks[1]  # both ranks hold the same, all-gathered parameters
