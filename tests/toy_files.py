"""Procedural clips (animatediff_lite.toy.synthetic) written as real video files, for the trainer's data tests."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

from animatediff_lite.toy.synthetic import ClipSpec, all_specs, render_clip

# The motion a clip shows when played backwards (a rotation's sense is not in its caption).
REVERSED_MOTION: dict[str, str] = {"moving left": "moving right", "moving right": "moving left",
                                   "moving up": "moving down", "moving down": "moving up",
                                   "growing": "shrinking", "shrinking": "growing", "rotating": "rotating"}


def time_reversed(spec: ClipSpec) -> ClipSpec:
    """The spec that describes ``spec``'s clip played backwards ("moving left" <-> "moving right", ...)."""
    return ClipSpec(spec.shape, spec.colour, REVERSED_MOTION[spec.motion])


def write_dataset(root: str | os.PathLike, specs: Sequence[ClipSpec] | None = None, n_clips: int | None = None,
                  frames: int = 16, size: int = 64, fmt: str = "mp4", layout: str = "csv", fps: int = 8,
                  seed: int = 0) -> Path:
    """Write clips as real video files with captions; returns the CSV path (csv) or the folder (folder).

    ``layout="csv"``: WebVid style, ``{root}/{page_dir}/{videoid}.{fmt}`` plus ``{root}/videos.csv`` with
    columns ``videoid,name,page_dir``. ``layout="folder"``: ``{root}/{name}.{fmt}`` next to ``{name}.txt``.
    Clip ``i`` uses spec ``specs[i % len(specs)]`` and seed ``seed + i``; ``n_clips`` defaults to len(specs).
    ``fmt`` is "mp4" (needs imageio-ffmpeg, the ``video`` extra) or "gif" (pillow).
    """
    if fmt not in ("mp4", "gif"):
        raise ValueError(f"fmt must be 'mp4' or 'gif', got {fmt!r}")
    if layout not in ("csv", "folder"):
        raise ValueError(f"layout must be 'csv' or 'folder', got {layout!r}")
    specs = list(all_specs() if specs is None else specs)
    n_clips = len(specs) if n_clips is None else n_clips
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_clips):
        spec = specs[i % len(specs)]
        video = render_clip(spec, frames, size, seed=seed + i)
        if layout == "csv":
            page_dir = f"{i // 100:03d}"
            path = root / page_dir / f"{i:06d}.{fmt}"
            rows.append((f"{i:06d}", spec.caption, page_dir))
        else:
            path = root / f"clip_{i:06d}.{fmt}"
            path.with_suffix(".txt").write_text(spec.caption + "\n")
        write_video_file(video, path, fps=fps)
    if layout == "folder":
        return root
    csv_path = root / "videos.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "name", "page_dir"])
        writer.writerows(rows)
    return csv_path


def write_video_file(video: np.ndarray, path: str | os.PathLike, fps: int = 8) -> None:
    """Write (F, 3, H, W) floats in [0, 1] as .gif (pillow) or .mp4 (imageio-ffmpeg, high quality H.264)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)  # (F, H, W, 3)
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(f).quantize(colors=255, method=Image.Quantize.MEDIANCUT) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=9, macro_block_size=1,
                         pixelformat="yuv444p", format="FFMPEG")
