"""Configuration dataclasses for every model part, with SD1.5 and tiny presets as data.

Sizes normally come from the weights (a diffusers ``config.json`` or the tensors themselves); the
presets exist for tests, meta-device key coverage and the embedded default model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP text transformer (ViT-L/14 text tower in SD1.5)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "quick_gelu" (SD1.5) or "gelu"


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (the SD1.5 "kl-f8" autoencoder)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class UNetConfig:
    """The SD1.5 UNet2DConditionModel, applied per frame inside the video UNet.

    ``down_cross_attention[i]`` says whether down level ``i`` has spatial transformers; the up path
    mirrors it (SD1.5: ``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``).
    ``attention_head_dim`` follows the diffusers quirk for SD1.5: it is the number of heads (8), and
    the head dimension is ``channels // heads`` (40/80/160).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


@dataclass(frozen=True)
class MotionConfig:
    """AnimateDiff motion module ("VanillaTemporalModule") settings.

    version: "v1" (mm_sd_v14/v15), "v2" (mm_sd_v15_v2) or "v3" (v3_sd15_mm).
    v1 normalises the base UNet's resnet GroupNorms jointly over all frames (``joint_groupnorm``);
    v2 adds a motion module in the mid block.
    """

    version: str = "v2"
    num_heads: int = 8
    max_position_len: int = 32
    mid_block: bool = True
    joint_groupnorm: bool = False
    num_attention_blocks: int = 2
    ff_mult: int = 4
    norm_num_groups: int = 32  # equals the base UNet's norm_num_groups

    @staticmethod
    def for_version(version: str, norm_num_groups: int = 32) -> MotionConfig:
        """The published settings of one motion-module generation."""
        if version not in MOTION_VERSIONS:
            raise ValueError(f"motion module version must be one of {sorted(MOTION_VERSIONS)}, got {version!r}")
        return MotionConfig(norm_num_groups=norm_num_groups, **MOTION_VERSIONS[version])


MOTION_VERSIONS: dict[str, dict[str, Any]] = {
    "v1": dict(version="v1", max_position_len=24, mid_block=False, joint_groupnorm=True),
    "v2": dict(version="v2", max_position_len=32, mid_block=True, joint_groupnorm=False),
    "v3": dict(version="v3", max_position_len=32, mid_block=False, joint_groupnorm=False),
}


@dataclass(frozen=True)
class ModelConfig:
    """All parts of a text-to-video model."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)


SD15 = ModelConfig()

# Small enough to run a forward pass in milliseconds on CPU; shapes keep every code path alive
# (two levels, cross-attention and plain blocks, GroupNorm groups that divide every width).
TINY = ModelConfig(
    clip=CLIPConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    unet=UNetConfig(
        block_out_channels=(32, 64),
        down_cross_attention=(True, False),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    ),
    motion=MotionConfig(num_heads=2, norm_num_groups=8),
)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict, ignoring unknown keys and restoring tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if key in names}
    if cls is ModelConfig:
        parts = {"clip": CLIPConfig, "vae": VAEConfig, "unet": UNetConfig, "motion": MotionConfig}
        for key, part_cls in parts.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = from_dict(part_cls, kwargs[key])
    return cls(**kwargs)
