"""Procedural clips as a training dataset: the data of the embedded default model (``data.synthetic``).

The pool is fixed: clip ``i`` has a spec and a render seed drawn from ``(seed, i)``, rendered on demand, so
every epoch sees the same clips (and a latent cache of them stays valid); augmentations and noise vary.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..toy import synthetic as S  # the one import of the procedural clip generator in train/
from .data import sample_seed


class SyntheticClips(Dataset):
    """``n_clips`` clips of coloured shapes; samples are dicts like :class:`~.data.VideoDataset`'s.

    ``which``: "train" (the training combinations of :func:`animatediff_lite.synthetic.split_specs`, its held-out
    ones never appear) or "all". ``direction_share`` > 0: the first ``round(direction_share * n_clips)`` clips
    move left/right/up/down and the rest grow, shrink or rotate; 0: every combination equally likely.
    """

    def __init__(self, which: str, n_clips: int, frames: int, size: int, direction_share: float = 0.0,
                 seed: int = 0):
        if which not in ("train", "all"):
            raise ValueError(f"data.synthetic must be 'train' or 'all', got {which!r}")
        specs = S.split_specs()[0] if which == "train" else S.all_specs()
        moving = [s for s in specs if s.motion in S.DIRECTIONS]
        other = [s for s in specs if s.motion not in S.DIRECTIONS]
        n_moving = round(direction_share * n_clips) if direction_share > 0 else 0
        self.specs, self.render_seeds = [], []
        for i in range(n_clips):
            group = specs if direction_share == 0 else moving if i < n_moving else other
            rng = np.random.default_rng([seed, i, 11])
            self.specs.append(group[int(rng.integers(len(group)))])
            self.render_seeds.append(int(rng.integers(2**31)))
        self.captions = [s.caption for s in self.specs]
        self.frames, self.size, self.seed, self.epoch = frames, size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> dict:
        clip = S.render_clip(self.specs[index], self.frames, self.size, seed=self.render_seeds[index])  # (F, 3, H, W)
        video = torch.from_numpy(clip).transpose(0, 1) * 2 - 1  # (3, F, H, W) in [-1, 1]
        return {"video": video.contiguous(), "caption": self.captions[index], "index": index,
                "sample_seed": sample_seed(self.seed, self.epoch, index), "skipped": 0}
