"""Text tower: a Hugging Face BERT-family encoder plus the MELP heads (METHOD.md §2).

Token layout comes from ``melp_scale.text.ReportTokenizer``: ``[BOS] sentence tokens [CLS] pad``,
with a per-token ``sentence_index`` (-1 for special and pad tokens).

- global embedding: last hidden state at the final ``[CLS]`` (position
  ``attention_mask.sum(-1) - 1``) -> Linear -> GELU -> Linear -> L2 norm;
- sentence embeddings: mean of the last-layer states of each sentence's tokens -> Linear,
  zero-padded to the batch's largest sentence count;
- causal attention (the reference) is a 4-D mask handed to the HF model, which transformers
  5.x passes through unchanged to the attention implementation (boolean for SDPA, additive
  for eager attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import TextEncoderConfig


def build_text_model(config: TextEncoderConfig) -> nn.Module:
    """The HF base model (no pooler head) named by ``config``; offline when possible."""
    from transformers import AutoConfig, AutoModel  # heavy import, kept off the package import

    from melp_scale.text import resolve_text_model

    if config.architecture is not None:
        fields = dict(config.architecture)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = AutoModel.from_config(hf_config)
    elif config.load_weights:
        model = AutoModel.from_pretrained(resolve_text_model(config.name_or_path))
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(resolve_text_model(config.name_or_path)))
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's [CLS]-at-the-start pooler is unused: keep no dead weights
    return model


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("text.name_or_path: the model has no encoder.layer list; "
                         "choose a BERT-family model (BERT, RoBERTa, ELECTRA, MiniLM, MedCPT)")
    return layers


def causal_attention_mask(attention_mask: torch.Tensor, additive: bool) -> torch.Tensor:
    """(B, L) padding mask (1 = token) -> (B, 1, L, L) causal + padding mask.

    Boolean (True = attend) for SDPA-style attention, where a float mask would have to match
    the query dtype under autocast; additive (0 / -inf-like, float32) for eager attention,
    which adds the mask to its scores.
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
    if not additive:
        return allowed
    mask = torch.zeros(allowed.shape, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


@dataclass
class TextStates:
    """Per-token outputs of the text encoder."""

    hidden: torch.Tensor
    """(B, L, H) last-layer states."""
    embeddings: torch.Tensor
    """(B, L, H) embedding-layer output (context-free: no token sees another)."""


class TextEncoder(nn.Module):
    """BERT-family encoder with the global head and the sentence projection."""

    def __init__(self, config: TextEncoderConfig, embed_dim: int):
        super().__init__()
        self.config = config
        self.bert = build_text_model(config)
        self.hidden_size: int = self.bert.config.hidden_size
        self.vocab_size: int = self.bert.config.vocab_size
        self.global_head = nn.Sequential(
            nn.Linear(self.hidden_size, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.sentence_proj = nn.Linear(self.hidden_size, embed_dim)
        self._freeze(config.num_frozen_layers)

    def _freeze(self, num_layers: int) -> None:
        layers = _transformer_layers(self.bert)
        if num_layers > len(layers):
            raise ValueError(f"text.num_frozen_layers: {num_layers} > the model's {len(layers)} layers")
        if num_layers == 0:
            return
        # the embeddings sit below the first layer: freezing layers above them but not them
        # would still back-propagate through every frozen layer for nothing
        embeddings = getattr(self.bert, "embeddings", None)
        if embeddings is None:
            embeddings = self.bert.get_input_embeddings()
        for module in (embeddings, *layers[:num_layers]):
            module.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextStates:
        """input_ids, attention_mask (B, L) -> :class:`TextStates`."""
        mask = attention_mask
        if self.config.causal:
            implementation = getattr(self.bert.config, "_attn_implementation", "eager")
            mask = causal_attention_mask(attention_mask, additive=implementation == "eager")
        out = self.bert(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                        use_cache=False)
        return TextStates(hidden=out.last_hidden_state, embeddings=out.hidden_states[0])

    def global_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, E) L2-normalised, read at the final [CLS]."""
        last = attention_mask.sum(dim=-1).long() - 1  # (B,)
        cls_state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return nn.functional.normalize(self.global_head(cls_state), dim=-1)

    def sentence_embeddings(self, hidden: torch.Tensor, sentence_index: torch.Tensor,
                            sentence_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of each sentence's token states -> Linear, zero-padded.

        hidden (B, L, H), sentence_index (B, L) with -1 for non-sentence tokens,
        sentence_counts (B,) -> sentences (B, S_max, E), counts (B,) int64. A sentence the
        loader counted but truncation removed has no token: counts are capped by the index.
        """
        counts = torch.minimum(sentence_counts.long(), sentence_index.max(dim=-1).values.clamp(min=-1) + 1)
        max_sentences = max(int(counts.max()), 1) if counts.numel() else 1
        slots = torch.arange(max_sentences, device=hidden.device)
        one_hot = (sentence_index.unsqueeze(-1) == slots).to(hidden.dtype)  # (B, L, S)
        sums = one_hot.transpose(1, 2) @ hidden  # (B, S, H)
        num_tokens = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, S, 1)
        sentences = self.sentence_proj(sums / num_tokens)  # (B, S, E)
        valid = (slots[None, :] < counts[:, None]).unsqueeze(-1)  # (B, S, 1)
        return sentences * valid.to(sentences.dtype), counts
