"""Learning-rate schedules and the EMA of the trained weights: the two pieces of state a step updates besides AdamW.

The LR factor is a pure function of the number of finished optimiser steps, so ``LambdaLR`` resumes it from
its step count alone; the EMA is a dict of tensors that goes into ``training_state.pt`` as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch


def lr_factor(schedule: str, warmup_steps: int, decay_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The multiplier of the base LR before optimiser step ``s`` (0-based), for ``LambdaLR``.

    Warm-up: linear, ``(s + 1) / warmup_steps`` up to 1. ``"constant"``: 1 afterwards. ``"cosine"``: a half
    cosine over ``decay_steps`` (>= 1) from 1 down to ``min_ratio``, multiplied with the warm-up (the two
    overlap, as in the default-model recipe), and held at ``min_ratio`` past ``decay_steps``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if schedule == "constant":
            return warm
        progress = min(s, decay_steps) / decay_steps
        return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


class EMA:
    """Exponential moving average of named tensors, with a warm-up of the decay.

    After optimiser step ``n`` (1-based) each average moves toward the current value with decay
    ``min(decay, (1 + n) / (10 + n))``: early steps follow the weights closely, so the EMA does not stay
    anchored at the random init.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        """Fold in the weights after optimiser step ``step`` (1-based)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Restore the averages; ``where`` names the checkpoint in the error for a missing tensor."""
        copy_named(self.shadow, state, f"{where}: the checkpoint's EMA",
                   "; was it made without train.ema_decay or with another train.modules?")

    @contextmanager
    def applied(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Swap the averages into ``params`` for the duration (export, validation), then put the weights back."""
        saved = {k: p.detach().clone() for k, p in params.items()}
        copy_named(params, self.shadow, "the EMA")
        try:
            yield
        finally:
            copy_named(params, saved, "the saved weights")


@torch.no_grad()
def copy_named(dst: Mapping[str, torch.Tensor], src: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Copy ``src[name]`` into each tensor ``dst[name]`` in place; a ValueError says how many ``what`` lacks."""
    missing = sorted(set(dst) - set(src))
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensors (e.g. {missing[0]}){hint}")
    for name, tensor in dst.items():
        tensor.copy_(src[name])
