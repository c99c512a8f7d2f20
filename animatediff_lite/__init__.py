"""animatediff-lite: a small, exact, pure-PyTorch AnimateDiff.

Public API (see README.md)::

    import animatediff_lite as ad
    pipe = ad.load_pipeline(base=..., motion_module=...)
    video = pipe("a corgi running", num_frames=16, seed=42)   # (B, F, 3, H, W) in [0, 1]
    ad.save_video(video, "out.gif", fps=8)
    ad.generate("a red circle moving up", out="out.gif")     # the embedded default model
"""

from .api import generate
from .config import SD15, TINY, CLIPConfig, ModelConfig, MotionConfig, UNetConfig, VAEConfig
from .errors import CheckpointError
from .free_init import FreeInit
from .loading.pipeline_load import load_pipeline
from .lora import apply_loras, merge_lora, unmerge
from .pipeline import Pipeline
from .scheduler import DDIM, DDIMConfig
from .video import save_video

__version__ = "0.1.0"

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
