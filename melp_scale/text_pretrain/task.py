"""Stage 1 as a Trainer task: masked-language modelling of a BERT-family model on a corpus.

Rank 0 builds the corpus once per start (``prepare_data``): documents, the tokenizer (the
model's own, plus the domain tokens), packed train/validation rows, written under
``RUN/corpus/`` (``tokenizer/``, ``packed.pt``, ``stats.json``); every rank then loads them, so
all ranks see the same rows. The build is deterministic, so a resumed run packs the same rows
(the loader refuses to resume if the fingerprint differs).

New domain tokens start from the mean of the input embeddings of the pieces the original
tokenizer splits them into (the output layer is tied to them in BERT).

Validation (each epoch, and at step 0 with ``run.validate_at_start``, i.e. before any training):
the MLM loss over the masked tokens of the held-out rows, its exponential (perplexity) and the
masked-token accuracy; masks are the same at every validation, so the numbers are comparable.
The export is a Hugging Face folder (``save_pretrained`` of the masked-LM model and of the
tokenizer): ``AutoModel.from_pretrained`` reads the encoder from it, ``AutoModelForMaskedLM``
the encoder and its MLM head, and stage 2 takes it as ``model.text.name_or_path``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from melp_scale.text import resolve_text_model
from melp_scale.text_pretrain import corpus
from melp_scale.text_pretrain.config import CorpusConfig, TextModelConfig, TextPretrainConfig
from melp_scale.text_pretrain.loader import PackedLoader
from melp_scale.text_pretrain.masking import IGNORE_INDEX, WholeWordMasker
from melp_scale.train.task import Placement, StepOutput, Task, to_device

log = logging.getLogger("melp_scale.text_pretrain")


class MLMTask(Task):
    """Masked-language modelling with whole-word masking (see the module docstring)."""

    name = "text pretraining"
    scalar_names = ("loss", "masked_accuracy")
    export_format = "transformers AutoModel / AutoModelForMaskedLM .from_pretrained"

    def __init__(self, config: TextPretrainConfig):
        super().__init__(config)
        self.corpus_dir = os.path.join(config.run.out, "corpus")
        self.tokenizer: Any = None

    def model_config(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.config.model)}

    # ------------------------------------------------------------------ data
    def prepare_data(self, placement: Placement) -> None:
        if placement.rank == 0:
            build_corpus(self.config.corpus, self.config.model, self.config.optim.seed,
                         self.corpus_dir)

    def _packed(self) -> dict[str, Any]:
        return torch.load(os.path.join(self.corpus_dir, "packed.pt"), weights_only=True)

    def build_loaders(self, placement: Placement, micro_batch: int
                      ) -> tuple[PackedLoader, PackedLoader | None]:
        packed, tokenizer = self._packed(), self._load_tokenizer()
        masker = WholeWordMasker(tokenizer, self.config.mlm)
        settings = dict(batch_size=micro_batch, seed=self.config.optim.seed, rank=placement.rank,
                        world_size=placement.world_size, pad_id=tokenizer.pad_token_id)
        train = PackedLoader(packed["train"], masker, shuffle=True,
                             dynamic_masks=self.config.mlm.dynamic,
                             fingerprint=packed["fingerprint"], **settings)
        val = None
        if len(packed["val"]) > 0:
            val = PackedLoader(packed["val"], masker, shuffle=False, dynamic_masks=False,
                               fingerprint=packed["fingerprint"], **settings)
        return train, val

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(self.corpus_dir, "tokenizer"))
        return self.tokenizer

    # ------------------------------------------------------------------ model
    def build_model(self, placement: Placement) -> nn.Module:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        source = resolve_text_model(self.config.model.name_or_path)
        model = AutoModelForMaskedLM.from_pretrained(source)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and self.config.model.max_length > max_positions:
            raise ValueError(f"model.max_length {self.config.model.max_length} > the model's "
                             f"{max_positions} positions")
        tokenizer, new_tokens = self._load_tokenizer(), self._packed()["domain_tokens"]
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if new_tokens:
            original = AutoTokenizer.from_pretrained(source)
            embeddings = model.get_input_embeddings().weight
            with torch.no_grad():
                for token in new_tokens:
                    pieces = original(token, add_special_tokens=False)["input_ids"]
                    embeddings[tokenizer.convert_tokens_to_ids(token)] = embeddings[pieces].mean(0)
        return model

    # ------------------------------------------------------------------ steps
    def forward(self, engine: Any, batch: dict[str, Any]) -> StepOutput:
        output = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"])
        selected = batch["labels"] != IGNORE_INDEX
        correct = output.logits.detach()[selected].argmax(-1) == batch["labels"][selected]
        return StepOutput(output.loss, {"loss": output.loss.detach(),
                                        "masked_accuracy": correct.float().mean()})

    def validate(self, engine: Any, loader: PackedLoader, placement: Placement) -> dict[str, float]:
        # summed over tokens then divided once: every masked token weighs the same on all ranks
        totals = torch.zeros(3, dtype=torch.float64, device=placement.device)  # nll, correct, count
        for batch in loader:
            batch = to_device(batch, placement.device)
            logits = engine(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits  # (B, L, V)
            selected = (batch["labels"] != IGNORE_INDEX) & ~batch["is_repeat"][:, None]
            scores, targets = logits[selected].float(), batch["labels"][selected]
            totals += torch.stack([
                nn.functional.cross_entropy(scores, targets, reduction="sum").double(),
                (scores.argmax(-1) == targets).sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=placement.device)])
        dist.all_reduce(totals)
        nll, correct, count = totals.tolist()
        loss = nll / max(count, 1.0)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
                "val_masked_accuracy": correct / max(count, 1.0), "val_masked_tokens": int(count)}

    def export(self, model: nn.Module, path: str) -> None:
        model.save_pretrained(path)
        self._load_tokenizer().save_pretrained(path)


def build_corpus(corpus_config: CorpusConfig, model: TextModelConfig, seed: int, folder: str
                 ) -> dict[str, Any]:
    """Documents -> tokenizer -> packed rows, written to ``folder`` (see the module docstring);
    returns the stats written to ``folder/stats.json``."""
    from transformers import AutoTokenizer

    documents, stats = corpus.collect_documents(corpus_config)
    train_docs, val_docs = corpus.split_documents(documents, corpus_config.val_fraction, seed)
    stats.train_documents, stats.val_documents = len(train_docs), len(val_docs)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(model.name_or_path))
    mined = corpus.mine_domain_tokens(tokenizer, train_docs, model.num_domain_tokens,
                                      model.min_domain_token_count, model.min_domain_token_pieces)
    new_tokens = corpus.add_domain_tokens(tokenizer, [*model.domain_tokens, *mined])
    train = corpus.pack_documents(tokenizer, train_docs, model.max_length)
    val = corpus.pack_documents(tokenizer, val_docs, model.max_length)
    digest = hashlib.sha256(train.numpy().tobytes())
    digest.update(val.numpy().tobytes())
    digest.update(json.dumps(new_tokens).encode())
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    packed = {"train": train, "val": val, "domain_tokens": new_tokens,
              "fingerprint": digest.hexdigest()[:16]}
    torch.save(packed, os.path.join(folder, "packed.pt.tmp"))
    os.replace(os.path.join(folder, "packed.pt.tmp"), os.path.join(folder, "packed.pt"))
    summary = dataclasses.asdict(stats) | {
        "train_rows": len(train), "val_rows": len(val), "max_length": model.max_length,
        "train_tokens": int((train != tokenizer.pad_token_id).sum()),
        "domain_tokens": new_tokens, "fingerprint": packed["fingerprint"]}
    with open(os.path.join(folder, "stats.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    log.info("corpus: %d train / %d val documents -> %d / %d rows of %d tokens; %d duplicates, "
             "%d excluded, %d too short; %d domain tokens added", len(train_docs), len(val_docs),
             len(train), len(val), model.max_length, stats.duplicates, stats.excluded,
             stats.too_short, len(new_tokens))
    return summary
