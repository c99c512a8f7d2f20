"""Semantic checks of generated clips against the synthetic captions (colour, direction of motion).

Used by the tests and ``examples/eval_default_model.py``: the synthetic clips have one saturated shape on
a grey background, so saturation separates the shape from the background.
"""

from __future__ import annotations

import numpy as np
import torch

from .synthetic import COLOURS, DIRECTIONS


def shape_mask(video: np.ndarray | torch.Tensor, threshold: float = 0.25) -> np.ndarray:
    """Per-pixel weight of "shape" (F, H, W): saturation (max - min over RGB) above ``threshold``, else 0.

    video: (F, 3, H, W) in [0, 1].
    """
    v = np.asarray(video, dtype=np.float32)
    sat = v.max(axis=1) - v.min(axis=1)
    return np.where(sat > threshold, sat, 0.0)


def dominant_colour(video: np.ndarray | torch.Tensor) -> str | None:
    """Name of the synthetic colour (:data:`.synthetic.COLOURS`) nearest to the saturated pixels' mean, or None.

    video: (F, 3, H, W) in [0, 1]. None when no pixel is saturated.
    """
    v = np.asarray(video, dtype=np.float32)
    w = shape_mask(v)
    if w.sum() <= 0:
        return None
    mean = (v * w[:, None]).sum(axis=(0, 2, 3)) / w.sum()  # (3,)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - mean) ** 2)))


def motion_direction(video: np.ndarray | torch.Tensor, min_fraction: float = 0.15) -> str | None:
    """The synthetic direction ("moving left", ...) the shape's centroid moves in, or None (also when some frame
    has no saturated pixel). video: (F, 3, H, W) in [0, 1]; y grows downwards.

    The centroid's shift from the first to the last frames must be along that direction's axis more than along
    the other one and at least ``min_fraction`` of the frame size (the synthetic clips travel 40-55% of it).
    """
    w = shape_mask(video)  # (F, H, W)
    mass = w.sum(axis=(1, 2))  # (F,)
    if np.any(mass <= 0):
        return None
    ys, xs = np.mgrid[0:w.shape[1], 0:w.shape[2]]
    c = np.stack([(w * xs).sum(axis=(1, 2)), (w * ys).sum(axis=(1, 2))], axis=1) / mass[:, None]  # (F, 2): x, y
    k = min(2, len(mass) // 2) or 1  # average the first and the last two frames (one each for short clips)
    shift = c[-k:].mean(axis=0) - c[:k].mean(axis=0)
    size = min(w.shape[1:])
    best = max(DIRECTIONS, key=lambda name: float(np.dot(DIRECTIONS[name], shift)))
    along = float(np.dot(DIRECTIONS[best], shift))
    return best if along >= min_fraction * size else None
