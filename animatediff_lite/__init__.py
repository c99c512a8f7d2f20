"""animatediff-lite: a small, exact, pure-PyTorch AnimateDiff.

Public API (see README.md)::

    import animatediff_lite as ad
    pipe = ad.load_pipeline(base=..., motion_module=...)
    video = pipe("a corgi running", num_frames=16, seed=42)   # (B, F, 3, H, W) in [0, 1]
    ad.save_video(video, "out.gif", fps=8)
"""

from .config import SD15, TINY, CLIPConfig, ModelConfig, MotionConfig, UNetConfig, VAEConfig
from .errors import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "SD15",
    "TINY",
    "CLIPConfig",
    "CheckpointError",
    "ModelConfig",
    "MotionConfig",
    "UNetConfig",
    "VAEConfig",
    "__version__",
]
