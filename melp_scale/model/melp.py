"""The MELP model: ECG tower, text tower, caption decoder, the three losses and the
inference API (README, "Model" and "Evaluation").

    ecg (B, 12, T) -> ECGEncoder -> tokens (B, N, D_ecg)
        -> BeatPooler -> beats (B, Q_b, E) -> mean, L2 norm -> ECG global (B, E)
        -> CaptionPooler -> ECG tokens (B, M, W) for the decoder (W = text width)
    input_ids (B, L) -> TextEncoder -> states (B, L, H) -> text global (B, E), sentences (B, S, E)
        -> CaptionDecoder(states, ECG tokens) -> next-token logits
    loss = w_g·InfoNCE(ECG global, text global) + w_c·caption CE + w_l·local(beats, sentences)

Distributed concerns stay outside: ``forward`` takes an optional process group that only
``kernels.infonce_loss`` uses. Nothing here needs torch.distributed to be initialised, and
checkpoints (``save_pretrained``) are plain safetensors + a JSON config, independent of
DeepSpeed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import infonce_loss, local_contrastive_loss

from .config import MELPConfig
from .decoder import CaptionDecoder
from .ecg_encoder import ECGEncoder
from .fused_ce import chunked_linear_cross_entropy
from .generation import beam_search
from .poolers import BeatPooler, CaptionPooler
from .text_encoder import TextEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "melp-scale/1"


@dataclass
class MELPOutput:
    """Losses (0-d tensors) and extras of one training forward."""

    loss: torch.Tensor
    """Weighted total."""
    loss_global: torch.Tensor
    """Rhythm-level InfoNCE."""
    loss_caption: torch.Tensor
    """Caption next-token cross entropy (padding ignored)."""
    loss_local: torch.Tensor
    """Beat-sentence loss."""
    logit_scale: torch.Tensor
    """exp(logit_scale), detached (for logging)."""
    ecg_global: torch.Tensor
    """(B, E) L2-normalised ECG embeddings."""
    text_global: torch.Tensor
    """(B, E) L2-normalised text embeddings."""


class MELP(nn.Module):
    """Multi-scale ECG-language model. Build with ``MELP(MELPConfig.preset("demo"))``."""

    def __init__(self, config: MELPConfig):
        super().__init__()
        self.config = config
        ecg_width = config.ecg.width
        embed_dim = config.pooler.embed_dim
        self.ecg_encoder = ECGEncoder(config.ecg)
        self.beat_pooler = BeatPooler(embed_dim, ecg_width, config.pooler.num_beat_queries,
                                      config.pooler.beat_heads)
        self.text = TextEncoder(config.text, embed_dim)
        # the decoder's width is the text hidden size; the caption pooler produces its memory at
        # that width from the ECG tokens (the reference: embed_dim_caption 768, kdim = ECG width)
        self.caption_pooler = CaptionPooler(self.text.hidden_size, ecg_width,
                                            config.pooler.num_caption_queries,
                                            config.pooler.caption_heads)
        self.decoder = CaptionDecoder(self.text.hidden_size, self.text.vocab_size, config.decoder)
        # shape (1,), not 0-d: DeepSpeed's parameter broadcast views every parameter as bytes,
        # which fails for 0-d tensors; the loss takes the 0-d view ``self.logit_scale[0]``
        self.logit_scale = nn.Parameter(torch.tensor([float(config.loss.logit_scale_init)]))
        self._tokenizer = None
        self.tokenizer_source = config.text.name_or_path  # from_pretrained: the export's copy

    # ------------------------------------------------------------------ ECG side
    def encode_ecg(self, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ecg (B, 12, T) -> (global (B, E) L2-normalised, beats (B, Q_b, E) unnormalised)."""
        beats = self.beat_pooler(self.ecg_encoder(ecg))  # (B, Q_b, E)
        return F.normalize(beats.mean(dim=1), dim=-1), beats

    def ecg_features(self, ecg: torch.Tensor) -> torch.Tensor:
        """The MELP paper's linear-probe feature: mean of the pooled beats before
        ``proj_contrast``; (B, E)."""
        return self.beat_pooler.pooled(self.ecg_encoder(ecg)).mean(dim=1)

    # ----------------------------------------------------------------- text side
    @property
    def tokenizer(self):
        """The ``ReportTokenizer`` of the configured text model (built on first use)."""
        if self._tokenizer is None:
            from melp_scale.text import ReportTokenizer

            self._tokenizer = ReportTokenizer(self.tokenizer_source, self.config.text.max_length)
        return self._tokenizer

    def encode_text(self, texts: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Reports (strings, or a tokenized batch with input_ids / attention_mask) -> (B, E)
        L2-normalised global text embeddings."""
        if isinstance(texts, Mapping):
            batch = texts
        else:
            batch = self.tokenizer.batch(list(texts))
        device = self.logit_scale.device
        input_ids, attention_mask = _trim_padding(batch["input_ids"].to(device),
                                                  batch["attention_mask"].to(device))
        states = self.text(input_ids, attention_mask)
        return self.text.global_embedding(states.hidden, attention_mask)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Mapping[str, torch.Tensor], group=None) -> MELPOutput:
        """The loader's batch (ecg, input_ids, attention_mask, sentence_index,
        sentence_counts; optional report_hash (B,) int64, the multi-positive key) ->
        :class:`MELPOutput`. ``group``: process group for the InfoNCE gather (None = this
        process's batch only)."""
        loss_config = self.config.loss
        ecg_tokens = self.ecg_encoder(batch["ecg"])  # (B, N, D_ecg)
        beats = self.beat_pooler(ecg_tokens)  # (B, Q_b, E)
        ecg_global = F.normalize(beats.mean(dim=1), dim=-1)  # (B, E)
        caption_context = self.caption_pooler(ecg_tokens)  # (B, M, W)

        input_ids, attention_mask, sentence_index = _trim_padding(
            batch["input_ids"], batch["attention_mask"], batch["sentence_index"])
        states = self.text(input_ids, attention_mask)
        text_global = self.text.global_embedding(states.hidden, attention_mask)  # (B, E)
        sentences, counts = self.text.sentence_embeddings(
            states.hidden, sentence_index, batch["sentence_counts"])  # (B, S, E), (B,)

        # identical reports are each other's positives (LossConfig.multi_positive)
        positive_ids = batch.get("report_hash") if loss_config.multi_positive else None
        loss_global = infonce_loss(ecg_global, text_global, self.logit_scale[0], group=group,
                                   positive_ids=positive_ids)
        loss_local = local_contrastive_loss(beats, sentences, counts, t1=loss_config.t1,
                                            t2=loss_config.t2, t3=loss_config.t3,
                                            positive_ids=positive_ids)
        loss_caption = self.caption_loss(self._decoder_input(states), caption_context,
                                         input_ids, attention_mask)
        loss = (loss_config.global_weight * loss_global + loss_config.caption_weight * loss_caption
                + loss_config.local_weight * loss_local)
        return MELPOutput(loss=loss, loss_global=loss_global, loss_caption=loss_caption,
                          loss_local=loss_local, logit_scale=self.logit_scale[0].detach().exp(),
                          ecg_global=ecg_global, text_global=text_global)

    def _decoder_input(self, states) -> torch.Tensor:
        # A bidirectional encoder's last states at position t have seen token t+1: feeding
        # them to the decoder would leak the caption targets. Without causal attention the
        # decoder reads the context-free embedding-layer output instead.
        return states.hidden if self.config.text.causal else states.embeddings

    def caption_loss(self, decoder_input: torch.Tensor, caption_context: torch.Tensor,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy: states (B, L, W) predict input_ids[:, 1:]; padding and the
        final [CLS] are not targets (the reference: [BOS] ... predict w1 ... [SEP])."""
        hidden = self.decoder(decoder_input[:, :-1], caption_context)  # (B, L-1, W)
        targets = input_ids[:, 1:]  # (B, L-1)
        cls_target = attention_mask.sum(dim=-1, keepdim=True).long() - 2  # [CLS] among targets
        positions = torch.arange(targets.shape[1], device=targets.device)
        valid = attention_mask[:, 1:].bool() & (positions[None] != cls_target)
        # project only the real positions: the vocabulary projection is the costly part
        if self.config.decoder.vocab_chunk:  # fused with the CE: no (T, V) logits
            return chunked_linear_cross_entropy(hidden[valid], self.decoder.text_projection.weight,
                                                targets[valid], self.config.decoder.vocab_chunk)
        logits = self.decoder.logits(hidden[valid])  # (T, V)
        return F.cross_entropy(logits.float(), targets[valid])

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log scale to [0, logit_scale_max]; call after each optimiser step."""
        self.logit_scale.clamp_(0.0, self.config.loss.logit_scale_max)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, ecg: torch.Tensor, max_len: int | None = None, beams: int = 1,
                 tokenizer=None, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, length_penalty: float = 0.0):
        """Report generation: greedy (``beams=1``) or beam search, in eval mode.

        Token ids come from ``tokenizer`` (a ``ReportTokenizer``) or the explicit arguments
        (EOS is the tokenizer's [SEP], which ends every training report). Returns ids
        (B, T) starting with BOS, PAD after EOS; with a tokenizer, ``(ids, texts)``.
        """
        if tokenizer is not None:
            bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
            eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if None in (bos_token_id, eos_token_id, pad_token_id):
            raise ValueError("generate: give a tokenizer or bos_token_id, eos_token_id and pad_token_id")
        was_training = self.training
        self.eval()
        try:
            context = self.caption_pooler(self.ecg_encoder(ecg))  # (B, M, W)

            def step(prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                states = self.text(prefix, torch.ones_like(prefix), cls_at_end=False)
                hidden = self.decoder(self._decoder_input(states), context[rows])  # (N, t, W)
                return F.log_softmax(self.decoder.logits(hidden[:, -1]).float(), dim=-1)

            ids = beam_search(step, ecg.shape[0], beams, max_len or self.config.text.max_length,
                              bos_token_id, eos_token_id, pad_token_id, ecg.device, length_penalty)
        finally:
            self.train(was_training)
        if tokenizer is None:
            return ids
        texts = [tokenizer.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]
        return ids, texts

    # ------------------------------------------------------------ checkpointing
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` (every weight, the text model's
        included) and the text model's ``tokenizer/`` into ``directory``: enough to rebuild and
        use the model with no network (e.g. a MedCPT-based model on an offline machine)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        config = self.config.to_dict()
        # the text model's own architecture, so from_pretrained needs no hub access
        config["text"]["architecture"] = self.text.bert.config.to_diff_dict() | {
            "model_type": self.text.bert.config.model_type}
        config["text"]["load_weights"] = False
        with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
            json.dump({"format": CHECKPOINT_FORMAT, "config": config}, handle, indent=2)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": CHECKPOINT_FORMAT})
        self.tokenizer.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))

    @classmethod
    def from_official(cls, path: str | os.PathLike, text_model: str | None = None) -> "MELP":
        """A model holding official MELP weights (HKU-MedAI/MELP checkpoint or the ECG-only
        MELP_Encoder release); see ``melp_scale.convert`` (which also returns a report)."""
        from melp_scale.convert import from_official

        return from_official(path, text_model=text_model)[0]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "MELP":
        """Rebuild a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_NAME)) as handle:
            saved = json.load(handle)
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: not a {CHECKPOINT_FORMAT} checkpoint")
        model = cls(MELPConfig.from_dict(saved["config"]))
        tokenizer = os.path.join(os.path.abspath(directory), TOKENIZER_DIR)
        if os.path.isdir(tokenizer):  # config.text.name_or_path stays the provenance
            model.tokenizer_source = tokenizer
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=map_location))
        return model.to(map_location)


def compile_parts(model: MELP, backend: str = "inductor") -> None:
    """``run.compile``: the ECG encoder, the text encoder and the decoder through
    ``torch.compile``, in place (``nn.Module.compile``: parameter names, state dicts and
    checkpoints stay as they are, so DeepSpeed's ZeRO partitions see the same parameters).
    The losses and poolers call the kernel ops, left to their own dispatch."""
    for part in (model.ecg_encoder, model.text, model.decoder):
        part.compile(backend=backend)


def _trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns that are padding in every row (right padding): same outputs, less work."""
    length = max(int(attention_mask.sum(dim=-1).max()), 1)
    return tuple(t[:, :length] for t in (input_ids, attention_mask, *others))
