"""Procedural text-to-video clips: coloured shapes that move, grow, shrink or rotate.

Used by the tests (``tests/toy_files.py`` writes them as .mp4/.gif files for the trainer) and by the embedded
default model's training recipe. Every clip is a pure function of its :class:`ClipSpec`, size, frame count and seed.

Backgrounds are neutral greys (plain or a linear gradient) so that the shape's colour is the only
saturated colour in the frame, which keeps "the dominant colour matches the prompt" checkable.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

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


def all_specs() -> list[ClipSpec]:
    """Every combination, in a fixed order. A rotating circle looks still, so it is left out (120 specs)."""
    return [ClipSpec(s, c, m) for s in SHAPES for c in COLOURS for m in MOTIONS
            if not (s == "circle" and m == "rotating")]


def split_specs(n_held_out: int = 16, seed: int = 0) -> tuple[list[ClipSpec], list[ClipSpec]]:
    """Split :func:`all_specs` into (train, held_out) for evaluating compositional generalisation.

    Held-out specs are drawn (deterministically from ``seed``) among those moving in a direction such that every
    pair (shape, colour), (shape, motion) and (colour, motion) of a held-out spec still occurs in some
    training spec: the model has seen each part and each pair, never the triple.
    """
    specs = all_specs()
    rng = np.random.default_rng(seed)
    counts = Counter(pair for s in specs for pair in _pairs(s))
    held: list[ClipSpec] = []
    for spec in (specs[i] for i in rng.permutation(len(specs))):
        if len(held) == n_held_out:
            break
        if spec.motion in DIRECTIONS and all(counts[pair] > 1 for pair in _pairs(spec)):
            counts.subtract(_pairs(spec))
            held.append(spec)
    if len(held) < n_held_out:
        raise ValueError(f"n_held_out={n_held_out} is too many: only {len(held)} specs can be held out while "
                         "keeping every pair of attributes in the training set")
    return [s for s in specs if s not in held], held


def _pairs(spec: ClipSpec) -> tuple[tuple[str, str, str], ...]:
    """The spec's (shape, colour), (shape, motion) and (colour, motion) pairs, tagged by kind."""
    return ("sc", spec.shape, spec.colour), ("sm", spec.shape, spec.motion), ("cm", spec.colour, spec.motion)


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
        # start on the side opposite to the motion so the shape stays (mostly) inside the frame
        cx = cx if dx == 0 else width * 0.5 - dx * travel * width / 2 + dx * travel * width * t
        cy = cy if dy == 0 else height * 0.5 - dy * travel * height / 2 + dy * travel * height * t
        cx = cx + (rng.uniform(-0.1, 0.1) * width if dx == 0 else 0)
        cy = cy + (rng.uniform(-0.1, 0.1) * height if dy == 0 else 0)
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
    # outward normals of the three edges; the first points down: apex up
    normals = [math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    return functools.reduce(np.maximum, [qx * math.cos(n) + qy * math.sin(n) - radius * 0.5 for n in normals])
