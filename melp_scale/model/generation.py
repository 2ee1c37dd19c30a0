"""Beam search over a next-token log-probability function (greedy decoding is ``beams=1``).

Kept apart from the model: it only needs ``step(prefix, rows) -> log-probs``, where
``prefix`` (N, t) are the token ids so far and ``rows`` (N,) the batch item of each
hypothesis (so the model can pick the matching ECG context).
"""
from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def beam_search(step: StepFn, batch_size: int, beams: int, max_len: int, bos_token_id: int,
                eos_token_id: int, pad_token_id: int, device: torch.device,
                length_penalty: float = 0.0) -> torch.Tensor:
    """Best sequence per batch item, (B, T <= max_len) starting with BOS, PAD after EOS.

    Scores are summed log-probabilities; the final choice divides them by
    ``length ** length_penalty`` (0 = no normalisation). With ``beams=1`` this is greedy.
    """
    if beams < 1:
        raise ValueError(f"beams must be >= 1; got {beams}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (BOS and one token); got {max_len}")
    rows = torch.arange(batch_size, device=device).repeat_interleave(beams)  # (B*K,)
    sequences = torch.full((batch_size * beams, 1), bos_token_id, dtype=torch.long, device=device)
    scores = torch.full((batch_size, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand from one so the first step is not K-fold
    finished = torch.zeros(batch_size, beams, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        log_probs = step(sequences, rows).float()  # (B*K, V)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(batch_size, beams, vocab)
        # a finished hypothesis may only emit PAD, at no cost: its score is frozen
        done_row = torch.full((vocab,), float("-inf"), device=device)
        done_row[pad_token_id] = 0.0
        log_probs = torch.where(finished[..., None], done_row, log_probs)
        candidates = (scores[..., None] + log_probs).view(batch_size, beams * vocab)
        scores, flat = candidates.topk(beams, dim=-1)  # (B, K)
        parent = torch.div(flat, vocab, rounding_mode="floor")  # (B, K)
        token = flat % vocab  # (B, K)
        length = sequences.shape[1]
        history = sequences.view(batch_size, beams, length)
        history = history.gather(1, parent[..., None].expand(-1, -1, length))  # (B, K, t)
        sequences = torch.cat([history, token[..., None]], dim=-1).view(batch_size * beams, -1)
        finished = finished.gather(1, parent) | (token == eos_token_id)
        if bool(finished.all()):
            break
    sequences = sequences.view(batch_size, beams, -1)
    lengths = ((sequences != pad_token_id).sum(-1) - 1).clamp(min=1).float()  # tokens after BOS
    best = (scores / lengths ** length_penalty).argmax(dim=-1)  # (B,)
    return sequences[torch.arange(batch_size, device=device), best]  # (B, T)
