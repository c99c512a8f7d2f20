"""Procedural text-to-video clips: coloured shapes that move, grow, shrink or rotate.

Used by the tests (real .mp4/.gif files for the trainer) and by the embedded default model's training
recipe. Every clip is a pure function of its :class:`ClipSpec`, size, frame count and seed.

Backgrounds are neutral greys (plain or a linear gradient) so that the shape's colour is the only
saturated colour in the frame, which keeps "the dominant colour matches the prompt" checkable.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.85),
    "orange": (1.00, 0.55, 0.05),
}
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "moving left": (-1.0, 0.0),
    "moving right": (1.0, 0.0),
    "moving up": (0.0, -1.0),
    "moving down": (0.0, 1.0),
}
MOTIONS: tuple[str, ...] = (*DIRECTIONS, "growing", "shrinking", "rotating")
# The motion a clip shows when played backwards (a rotation's sense is not in its caption).
REVERSED_MOTION: dict[str, str] = {"moving left": "moving right", "moving right": "moving left",
                                   "moving up": "moving down", "moving down": "moving up",
                                   "growing": "shrinking", "shrinking": "growing", "rotating": "rotating"}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient")


@dataclass(frozen=True)
class ClipSpec:
    """One (shape, colour, motion) combination; its caption is e.g. "a red circle moving left" ("an orange ...")."""

    shape: str
    colour: str
    motion: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                     ("motion", self.motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {self.motion}"

    def time_reversed(self) -> ClipSpec:
        """The spec that describes this clip played backwards ("moving left" <-> "moving right", ...)."""
        return ClipSpec(self.shape, self.colour, REVERSED_MOTION[self.motion])


def all_specs() -> list[ClipSpec]:
    """Every combination, in a fixed order. A rotating circle looks still, so it is left out (120 specs)."""
    return [ClipSpec(s, c, m) for s in SHAPES for c in COLOURS for m in MOTIONS
            if not (s == "circle" and m == "rotating")]


def split_specs(specs: Sequence[ClipSpec] | None = None, n_held_out: int = 16, seed: int = 0,
                held_out_motions: Iterable[str] = tuple(DIRECTIONS)) -> tuple[list[ClipSpec], list[ClipSpec]]:
    """Split combinations into (train, held_out) for evaluating compositional generalisation.

    Held-out specs are drawn (deterministically from ``seed``) among ``held_out_motions`` such that every
    pair (shape, colour), (shape, motion) and (colour, motion) of a held-out spec still occurs in some
    training spec: the model has seen each part and each pair, never the triple.
    """
    specs = list(all_specs() if specs is None else specs)
    motions = set(held_out_motions)
    rng = np.random.default_rng(seed)
    order = [specs[i] for i in rng.permutation(len(specs))]
    train = set(specs)

    def pair_count(spec_set: set[ClipSpec]) -> dict[tuple, int]:
        counts: dict[tuple, int] = {}
        for s in spec_set:
            for key in (("sc", s.shape, s.colour), ("sm", s.shape, s.motion), ("cm", s.colour, s.motion)):
                counts[key] = counts.get(key, 0) + 1
        return counts

    counts = pair_count(train)
    held: list[ClipSpec] = []
    for spec in order:
        if len(held) == n_held_out:
            break
        if spec.motion not in motions:
            continue
        keys = (("sc", spec.shape, spec.colour), ("sm", spec.shape, spec.motion), ("cm", spec.colour, spec.motion))
        if all(counts[k] > 1 for k in keys):
            for k in keys:
                counts[k] -= 1
            train.discard(spec)
            held.append(spec)
    if len(held) < n_held_out:
        raise ValueError(f"n_held_out={n_held_out} is too many: only {len(held)} specs can be held out while "
                         "keeping every pair of attributes in the training set")
    return [s for s in specs if s in train], held


def render_clip(spec: ClipSpec, frames: int = 16, height: int = 64, width: int | None = None, seed: int = 0,
                background: str | None = None) -> np.ndarray:
    """Render one clip: float32 array (frames, 3, height, width) in [0, 1].

    The seed picks the start position, size, speed, background (unless given) and rotation sense;
    the motion itself always follows ``spec``. Edges are anti-aliased over one pixel.
    """
    width = height if width is None else width
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need frames >= 1 and height, width >= 8, got frames={frames}, {height}x{width}")
    rng = np.random.default_rng(seed)
    side = min(height, width)
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)

    radius = np.full(frames, side * rng.uniform(0.13, 0.18))
    cx = np.full(frames, width * rng.uniform(0.4, 0.6))
    cy = np.full(frames, height * rng.uniform(0.4, 0.6))
    angle = np.full(frames, rng.uniform(0, 2 * math.pi))
    if spec.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[spec.motion]
        travel = rng.uniform(0.4, 0.55)  # fraction of the frame crossed during the clip
        r0 = radius[0]
        # start on the side opposite to the motion so the shape stays (mostly) inside the frame
        cx = cx if dx == 0 else width * 0.5 - dx * travel * width / 2 + dx * travel * width * t
        cy = cy if dy == 0 else height * 0.5 - dy * travel * height / 2 + dy * travel * height * t
        cx = cx + (rng.uniform(-0.1, 0.1) * width if dx == 0 else 0)
        cy = cy + (rng.uniform(-0.1, 0.1) * height if dy == 0 else 0)
        radius = np.full(frames, r0)
    elif spec.motion in ("growing", "shrinking"):
        small, large = side * rng.uniform(0.07, 0.10), side * rng.uniform(0.25, 0.32)
        grow = small + (large - small) * t
        radius = grow if spec.motion == "growing" else grow[::-1].copy()
    else:  # rotating: a third of a turn, either sense
        sense = 1.0 if rng.random() < 0.5 else -1.0
        angle = angle + sense * (2 * math.pi / 3) * t
        radius = np.full(frames, side * rng.uniform(0.2, 0.26))

    bg = _background(background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], height, width, rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    px = xs[None] - cx[:, None, None].astype(np.float32)  # (F, H, W) offsets from the centre
    py = ys[None] - cy[:, None, None].astype(np.float32)
    dist = _signed_distance(spec.shape, px, py, radius[:, None, None], angle[:, None, None])
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[:, None]  # (F, 1, H, W): 1-pixel anti-aliased edge
    colour = np.asarray(COLOURS[spec.colour], np.float32)[None, :, None, None]
    return (bg[None] * (1 - alpha) + colour * alpha).astype(np.float32)


def random_clip(seed: int, frames: int = 16, height: int = 64, width: int | None = None,
                specs: Sequence[ClipSpec] | None = None) -> tuple[np.ndarray, str]:
    """A clip of a spec drawn from ``specs`` (all by default): ((F, 3, H, W) in [0, 1], caption)."""
    specs = list(all_specs() if specs is None else specs)
    spec = specs[int(np.random.default_rng([seed, 1]).integers(len(specs)))]
    return render_clip(spec, frames, height, width, seed=seed), spec.caption


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
        from PIL import Image

        images = [Image.fromarray(f).quantize(colors=255, method=Image.Quantize.MEDIANCUT) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        import imageio.v2 as imageio

        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=9, macro_block_size=1,
                         pixelformat="yuv444p", format="FFMPEG")


def _background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A neutral grey background (3, H, W): plain, or a linear gradient in a random direction."""
    if kind not in BACKGROUNDS:
        raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {kind!r}")
    if kind == "plain":
        return np.full((3, height, width), rng.uniform(0.05, 0.35), np.float32)
    a, b = rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.5)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = (xs / max(width - 1, 1) - 0.5) * math.cos(theta) + (ys / max(height - 1, 1) - 0.5) * math.sin(theta)
    ramp = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    return np.broadcast_to(a + (b - a) * ramp, (3, height, width)).astype(np.float32)


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape of circumradius-like size ``radius``."""
    if shape == "circle":
        return np.sqrt(px * px + py * py) - radius
    cos, sin = np.cos(angle), np.sin(angle)
    qx, qy = cos * px + sin * py, -sin * px + cos * py  # rotate the point into the shape's frame
    if shape == "square":
        half = radius * 0.8
        dx, dy = np.abs(qx) - half, np.abs(qy) - half
        outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2)
        return outside + np.minimum(np.maximum(dx, dy), 0)
    # equilateral triangle with circumradius `radius`: max over the three edge half-planes (inradius r/2)
    radius = radius * 1.3  # same visual area as the other shapes
    d = None
    for k in range(3):
        normal = math.pi / 2 + k * 2 * math.pi / 3  # outward normals; the first points down: apex up
        edge = qx * math.cos(normal) + qy * math.sin(normal) - radius * 0.5
        d = edge if d is None else np.maximum(d, edge)
    return d
