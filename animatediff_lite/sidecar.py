"""A result on disk: ``NAME.gif`` (or .mp4/.webp) with ``NAME.json`` beside it holding every setting.

The JSON uses the job keys of :mod:`animatediff_lite.jobs`, so ``generate --from NAME.json`` reads it back as a
job and remakes the video. Batch generation and the web app both write results through :func:`write_result`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import atomic_write
from .video import save_video


def sidecar_path(video_path: str | os.PathLike) -> Path:
    """The settings file of a result: the video's path with the suffix ``.json``."""
    return Path(video_path).with_suffix(".json")


def write_result(video: torch.Tensor, path: str | os.PathLike, settings: dict) -> Path:
    """Write ``settings`` (JSON-able, with ``fps``) to the sidecar, then the video to ``path``; returns ``path``.

    Both writes are atomic and the video comes last, so an existing video file means a complete result
    (batch resume relies on it).
    """
    path = Path(path)
    text = json.dumps(settings, indent=1, ensure_ascii=False) + "\n"
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return save_video(video, path, fps=settings.get("fps", 8))


def read_settings(path: str | os.PathLike) -> dict:
    """Read a sidecar JSON file; ValueError naming the file when it is unreadable or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the settings file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    return data
