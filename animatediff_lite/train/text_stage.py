"""Text stage: pretrain a from-scratch text encoder so its end-of-text tokens tell caption words apart, then freeze it.

A stand-in for CLIP's pretraining when the whole model starts from random init (the embedded default model).
SD1.5's UNet cross-attends to all 77 output tokens, and for a short caption most are end-of-text/padding
tokens that see the whole caption through the causal mask. One linear probe per word group (e.g. shapes,
colours, motions) is trained on every such token with cross-entropy, so those tokens carry every attribute;
trained jointly with the UNet from scratch instead, the encoder carried the colour and little else
(docs/default_model.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def word_labels(captions: Sequence[str], groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """(N, G) long: index of the first word of group g found in caption n (whole words), -1 when none is."""
    # One alternation per group, a capture group per word: the leftmost match wins, ties go to the earlier word.
    patterns = [re.compile("|".join(rf"(\b{re.escape(w)}\b)" for w in group)) for group in groups]
    labels = torch.full((len(captions), len(groups)), -1, dtype=torch.long)
    for n, caption in enumerate(captions):
        for g, pattern in enumerate(patterns):
            if m := pattern.search(caption):
                labels[n, g] = m.lastindex - 1
    return labels


def pretrain_text_encoder(text_encoder: nn.Module, tokenizer, captions: Sequence[str],
                          groups: Sequence[Sequence[str]], steps: int, lr: float, batch_size: int, seed: int,
                          device: torch.device | str = "cpu", log_every: int = 50) -> list[dict]:
    """Train ``text_encoder`` in place for ``steps`` Adam steps, leave it frozen in eval mode; returns log records.

    Batches of ``batch_size`` captions are drawn uniformly from the distinct ``captions``. Everything is seeded
    from ``seed`` and independent of the global RNG, so every rank of a DDP run gets the same encoder.
    Records (every ``log_every`` steps and the last): step, loss, ``captions_right`` (share of the batch whose
    every group is right at every end-of-text token).
    """
    unique = sorted(set(captions))
    labels_all = word_labels(unique, groups)
    if (labels_all < 0).all():
        raise ValueError(f"text_stage.groups: no caption contains any of the words {list(groups)}")
    ids_all = tokenizer(unique)  # (N, 77)
    eot = (ids_all == tokenizer.eos_id).cumsum(1) > 0  # end-of-text and the padding after it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleList(nn.Linear(text_encoder.config.hidden_size, len(g)) for g in groups).to(device)
    text_encoder.train().requires_grad_(True)
    opt = torch.optim.Adam([*text_encoder.parameters(), *heads.parameters()], lr=lr)
    rng = np.random.default_rng([seed, 4])
    records = []
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(len(unique), size=batch_size))
        ids, pad, labels = ids_all[idx].to(device), eot[idx].to(device), labels_all[idx].to(device)
        hidden = text_encoder(ids)  # (B, 77, D)
        loss, right = hidden.new_zeros(()), torch.ones_like(pad)
        for g, head in enumerate(heads):
            logits = head(hidden)  # (B, 77, K)
            target = labels[:, g, None].expand_as(pad)
            mask = pad & (target >= 0)
            ce = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, 77)
            loss = loss + (ce * mask).sum() / mask.sum().clamp(min=1)
            right &= (logits.argmax(-1) == target) | ~mask
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            records.append({"stage": "text", "step": step, "loss": round(loss.item(), 5),
                            "captions_right": round(right.all(1).float().mean().item(), 3)})
    text_encoder.eval().requires_grad_(False)
    return records
