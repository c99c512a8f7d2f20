"""The top level: one call that composes loading, sampling and video writing."""

from __future__ import annotations

import os

import torch

from .checks import finite_number
from .loading.pipeline_load import load_pipeline
from .video import save_video


def generate(prompt: str | list[str] | dict[int, str], out: str | os.PathLike | None = None, fps: float = 8,
             threads: int | None = None, **kwargs) -> torch.Tensor:
    """One call on the embedded default model: ``load_pipeline()(prompt, **kwargs)``, saved to ``out`` if given.

    kwargs are :meth:`~animatediff_lite.pipeline.Pipeline.__call__` arguments (``sampler="dpmpp_2m"``,
    ``free_init=``, ``video=``, ``strength=``; a {frame: prompt} map travels between prompts). Returns the video
    (B, F, 3, H, W) float32 in [0, 1]. threads: as in :func:`~animatediff_lite.load_pipeline`.
    """
    finite_number("fps", fps, minimum=0, exclusive=True)  # before sampling, not after it
    video = load_pipeline(threads=threads)(prompt, **kwargs)
    if out is not None:
        save_video(video, out, fps=fps)
    return video
