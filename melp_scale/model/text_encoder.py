"""Text tower: a Hugging Face BERT-family encoder plus the MELP heads (README, "Model").

Token layout comes from ``melp_scale.text.ReportTokenizer``: ``[BOS] tokens [SEP] [CLS] pad``,
with a per-token ``sentence_index`` (-1 for special and pad tokens).

- vocabulary: the tokenizer's plus the added ``[BOS]`` (the embedding matrix is resized to
  ``len(tokenizer)`` when a pretrained model is loaded, as the reference does; an ``architecture``
  is taken as the final model and not resized);
- ``[CLS]`` gets position id ``max_length - 1`` (the reference appends it after the padding);
- global embedding (``proj_t``): last hidden state at ``[CLS]`` (position
  ``attention_mask.sum(-1) - 1``) -> Linear -> GELU -> Linear -> L2 norm;
- sentence embeddings (``sent_proj``): mean of the last-layer states of each sentence's tokens
  -> Linear, zero-padded to the batch's largest sentence count;
- freezing (the reference): the first ``num_frozen_layers`` layers only; the embeddings stay
  trainable unless ``freeze_embeddings``;
- causal attention (the reference runs BERT with ``is_decoder=True``) is a 4-D mask handed to
  the HF model, which transformers 5.x passes through unchanged to the attention implementation
  (boolean for SDPA, additive for eager attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import TextEncoderConfig


def build_text_model(config: TextEncoderConfig) -> nn.Module:
    """The HF base model (no pooler head) named by ``config``; offline when possible."""
    from transformers import AutoConfig, AutoModel  # heavy import, kept off the package import

    from melp_scale.text import load_tokenizer, resolve_text_model

    if config.architecture is not None:
        fields = dict(config.architecture)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = AutoModel.from_config(hf_config)
    else:
        if config.load_weights:
            model = AutoModel.from_pretrained(resolve_text_model(config.name_or_path))
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(resolve_text_model(config.name_or_path)))
        vocab_size = len(load_tokenizer(config.name_or_path))  # [BOS] added
        if vocab_size != model.config.vocab_size:
            model.resize_token_embeddings(vocab_size)
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
        positions = getattr(self.bert.config, "max_position_embeddings", None)
        if positions is not None and config.max_length > positions:
            raise ValueError(f"text.max_length: {config.max_length} > the text model's "
                             f"{positions} positions ([CLS] sits at position max_length - 1)")
        self._freeze(config.num_frozen_layers)
        if config.checkpoint_layers:  # per layer, in training mode only (the HF implementation)
            if hasattr(self.bert, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.bert.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _freeze(self, num_layers: int) -> None:
        layers = _transformer_layers(self.bert)
        if num_layers > len(layers):
            raise ValueError(f"text.num_frozen_layers: {num_layers} > the model's {len(layers)} layers")
        for module in layers[:num_layers]:
            module.requires_grad_(False)
        if self.config.freeze_embeddings:
            embeddings = getattr(self.bert, "embeddings", None)
            if embeddings is None:
                embeddings = self.bert.get_input_embeddings()
            embeddings.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cls_at_end: bool = True) -> TextStates:
        """input_ids, attention_mask (B, L) -> :class:`TextStates`. ``cls_at_end``: the last
        real token of each row is the appended [CLS], given position id ``max_length - 1``
        (False for a bare prefix, as in generation)."""
        mask = attention_mask
        if self.config.causal:
            implementation = getattr(self.bert.config, "_attn_implementation", "eager")
            mask = causal_attention_mask(attention_mask, additive=implementation == "eager")
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        if cls_at_end:
            last = attention_mask.sum(dim=-1, keepdim=True).long() - 1  # (B, 1)
            positions = positions.scatter(1, last, self.config.max_length - 1)
        out = self.bert(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        output_hidden_states=True, use_cache=False)
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
