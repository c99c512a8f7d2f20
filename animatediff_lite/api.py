"""The top level: one call that composes loading, sampling and video writing."""

from __future__ import annotations

import os

import torch

from .loading.pipeline_load import load_pipeline
from .video import save_video


def generate(prompt: str | list[str] | dict[int, str], out: str | os.PathLike | None = None, fps: float = 8,
             **kwargs) -> torch.Tensor:
    """One call on the embedded default model: ``load_pipeline()(prompt, **kwargs)``, saved to ``out`` if given.

    kwargs are :meth:`~animatediff_lite.pipeline.Pipeline.__call__` arguments (``sampler="dpmpp_2m"``,
    ``free_init=``, ``video=``, ``strength=``; a {frame: prompt} map travels between prompts). Returns the video
    (B, F, 3, H, W) float32 in [0, 1].
    """
    video = load_pipeline()(prompt, **kwargs)
    if out is not None:
        save_video(video, out, fps=fps)
    return video
