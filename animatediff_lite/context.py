"""Sliding context windows over the frame axis, for videos longer than the motion module's PE.

Each denoising step runs the model on overlapping windows of ``context_frames`` frames and averages
the predictions of every frame over the windows that contain it (uniform weights). All windows have
the same length, so the model always sees one shape; the last window is aligned to the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def context_windows(num_frames: int, context_frames: int, overlap: int) -> list[list[int]]:
    """Frame indices of each window, covering every frame of ``range(num_frames)`` at least once.

    Windows are contiguous, ``min(context_frames, num_frames)`` long, start every
    ``context_frames - overlap`` frames, and the last one ends at the last frame.
    Example: (10, 4, 1) -> [0..3], [3..6], [6..9].
    """
    for name, value in (("num_frames", num_frames), ("context_frames", context_frames)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < context_frames:
        raise ValueError(f"context_overlap (overlap) must be an integer in [0, context_frames={context_frames}), "
                         f"got {overlap!r}")
    size = min(context_frames, num_frames)
    stride = context_frames - overlap
    starts = list(range(0, num_frames - size, stride)) + [num_frames - size]
    return [list(range(s, s + size)) for s in starts]


def windowed(fn: Callable[..., torch.Tensor], x: torch.Tensor, windows: list[list[int]],
             pass_frames: bool = False) -> torch.Tensor:
    """Apply ``fn`` to each frame window of x (B, C, F, h, w) and average overlaps -> (B, C', F, h, w).

    ``fn`` maps (B, C, f, h, w) to (B, C', f, h, w). A single window over all frames gives exactly
    ``fn(x)`` (adding to zero and dividing by one are exact). ``pass_frames``: call ``fn(window, frames=...)``
    with the window's frame slice (per-frame conditioning such as prompt travel picks its frames by it).
    """
    total: torch.Tensor | None = None
    count = torch.zeros(x.shape[2])  # on the CPU: the coverage check below must not sync a GPU
    for idx in windows:
        sl = slice(idx[0], idx[-1] + 1)  # windows are contiguous: slice rather than gather
        out = fn(x[:, :, sl], frames=sl) if pass_frames else fn(x[:, :, sl])
        if total is None:
            total = torch.zeros(out.shape[:2] + x.shape[2:], dtype=out.dtype, device=out.device)
        total[:, :, sl] += out
        count[sl] += 1
    if total is None or bool((count == 0).any()):
        raise ValueError("context windows must cover every frame")
    return total / count.to(total.device, total.dtype)[:, None, None]
