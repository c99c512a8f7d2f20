"""animatediff-lite: a small, exact, pure-PyTorch AnimateDiff.

Public API (see README.md)::

    import animatediff_lite as ad
    pipe = ad.load_pipeline(base=..., motion_module=...)
    video = pipe("a corgi running", num_frames=16, seed=42)   # (B, F, 3, H, W) in [0, 1]
    ad.save_video(video, "out.gif", fps=8)
    ad.generate("a red circle moving up", out="out.gif")     # the embedded default model
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

__version__ = "0.1.0"

# The public names are resolved on first use (PEP 562) instead of at import: importing them all pulls in torch,
# about 1 s on a small CPU, which `animatediff-lite --help`, `presets` and argument errors never need.
_LAZY = {
    "SD15": "config", "TINY": "config", "CLIPConfig": "config", "ModelConfig": "config", "MotionConfig": "config",
    "UNetConfig": "config", "VAEConfig": "config",
    "load_pipeline": "loading.pipeline_load",
    "apply_loras": "lora", "merge_lora": "lora", "unmerge": "lora",
    "Pipeline": "pipeline", "generate": "api", "FreeInit": "free_init",
    "DDIM": "scheduler", "DDIMConfig": "scheduler",
    "save_video": "video",
}

if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from .api import generate
    from .config import SD15, TINY, CLIPConfig, ModelConfig, MotionConfig, UNetConfig, VAEConfig
    from .free_init import FreeInit
    from .loading.pipeline_load import load_pipeline
    from .lora import apply_loras, merge_lora, unmerge
    from .pipeline import Pipeline
    from .scheduler import DDIM, DDIMConfig
    from .video import save_video


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'animatediff_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DDIM",
    "SD15",
    "TINY",
    "CLIPConfig",
    "CheckpointError",
    "DDIMConfig",
    "FreeInit",
    "ModelConfig",
    "MotionConfig",
    "Pipeline",
    "UNetConfig",
    "VAEConfig",
    "__version__",
    "apply_loras",
    "generate",
    "load_pipeline",
    "merge_lora",
    "save_video",
    "unmerge",
]
