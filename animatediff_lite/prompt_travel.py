"""Prompt travel: a prompt map {frame: text} becomes one text embedding per frame.

Before the first key every frame gets the first prompt's embedding, between keys ``k0 < k1`` the linear
interpolation ``(1 - a) * E(k0) + a * E(k1)`` with ``a = (f - k0) / (k1 - k0)`` of the full (77, D) text
encoder outputs, after the last key the last prompt's. The UNet folds frames into its batch, so per-frame
embeddings reach cross-attention as (B*F, 77, D), frame-major within each video.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

PromptMap = Mapping[int, str]
Encode = Callable[[Sequence[str]], torch.Tensor]  # n texts -> (n, 77, D)


def is_prompt_map(value: object) -> bool:
    """True for a {frame: text} mapping (prompt travel), False for a string or a list."""
    return isinstance(value, Mapping)


def check_prompt_map(value: Mapping, name: str, num_frames: int) -> list[tuple[int, str]]:
    """Validate a {frame: text} map for ``num_frames`` frames -> its (frame, text) pairs sorted by frame.

    Keys must be ints in [0, num_frames) (strings of digits, as TOML/JSON keys are, are accepted), values
    strings; at least one entry. ValueError naming ``name`` otherwise.
    """
    if not value:
        raise ValueError(f"{name}: the prompt map is empty; pass at least one {{frame: prompt}} entry")
    pairs: dict[int, str] = {}
    for key, text in value.items():
        # ints, or strings of digits as TOML/JSON keys are (bool is an int subclass, not a frame index)
        if not ((isinstance(key, int) and not isinstance(key, bool))
                or (isinstance(key, str) and key.strip().lstrip("-").isdigit())):
            raise ValueError(f"{name}: prompt map keys must be frame indices (int), got {key!r}")
        frame = int(key)
        if not 0 <= frame < num_frames:
            raise ValueError(f"{name}: frame {frame} is outside the video's frames 0..{num_frames - 1} "
                             f"(num_frames={num_frames})")
        if not isinstance(text, str):
            raise ValueError(f"{name}: the prompt of frame {frame} must be a str, got {type(text).__name__}")
        if frame in pairs:
            raise ValueError(f"{name}: frame {frame} is given twice")
        pairs[frame] = text
    return sorted(pairs.items())


def interpolate_frames(frames: Sequence[int], embeds: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Key embeddings (K, L, D) at the sorted key ``frames`` -> per-frame embeddings (num_frames, L, D).

    Constant before the first and after the last key, linear between neighbouring keys.
    """
    if len(frames) != embeds.shape[0]:
        raise ValueError(f"got {len(frames)} key frames for {embeds.shape[0]} embeddings")
    out = embeds.new_empty((num_frames, *embeds.shape[1:]))
    out[: frames[0] + 1] = embeds[0]
    out[frames[-1]:] = embeds[-1]
    for j, (k0, k1) in enumerate(zip(frames[:-1], frames[1:], strict=True)):  # neighbouring keys
        for f in range(k0, k1 + 1):
            a = (f - k0) / (k1 - k0)
            out[f] = (1 - a) * embeds[j] + a * embeds[j + 1]
    return out


def frame_embeddings(encode: Encode, prompt: str | PromptMap, num_frames: int, name: str = "prompt") -> torch.Tensor:
    """One video's text conditioning -> (num_frames, L, D): a string gives the same embedding for every frame.

    Each distinct text is encoded once.
    """
    if not is_prompt_map(prompt):
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must be a str or a {{frame: str}} map for prompt travel, "
                             f"got {type(prompt).__name__}")
        return encode([prompt]).expand(num_frames, -1, -1)
    pairs = check_prompt_map(prompt, name, num_frames)
    texts = sorted({text for _, text in pairs})
    encoded = encode(texts)
    keys = encoded[[texts.index(text) for _, text in pairs]]  # (K, L, D) in key order
    return interpolate_frames([f for f, _ in pairs], keys, num_frames)


def travel_embeddings(encode: Encode, prompt: str | PromptMap, negative_prompt: str | PromptMap | None,
                      num_frames: int, num_videos: int, guided: bool) -> torch.Tensor:
    """Per-frame text embeddings for prompt travel: (B, F, L, D), or (2B, F, L, D) as [uncond; cond] if guided.

    B = ``num_videos`` (one prompt or prompt map per call). ``negative_prompt`` None means "".
    """
    if isinstance(prompt, (list, tuple)):
        raise ValueError("prompt: prompt travel takes one prompt map per call, not a list; "
                         "pass {frame: text} or call once per map")
    parts = [frame_embeddings(encode, prompt, num_frames, "prompt")]
    if guided:
        negative = "" if negative_prompt is None else negative_prompt
        if isinstance(negative, (list, tuple)):
            raise ValueError("negative_prompt: with prompt travel pass one str or one {frame: text} map, not a list")
        parts.insert(0, frame_embeddings(encode, negative, num_frames, "negative_prompt"))
    return torch.cat([p[None].expand(num_videos, -1, -1, -1) for p in parts])


def window_embeddings(embeds: torch.Tensor, frames: slice) -> torch.Tensor:
    """Per-frame embeddings (N, F, L, D) -> the UNet's context for a frame window, (N * f, L, D) frame-major."""
    return embeds[:, frames].reshape(-1, *embeds.shape[2:])


__all__ = ["check_prompt_map", "frame_embeddings", "interpolate_frames", "is_prompt_map", "travel_embeddings",
           "window_embeddings"]
