"""SparseCtrl (AnimateDiff v3): a ControlNet encoder inflated to video, steered by a few key frames.

A :class:`~animatediff_lite.controlnet.ControlNet` whose down blocks carry their own motion modules (the
original layout, as in the UNet3D; the mid block has none), whose condition has one more channel (the mask:
1 on key frames, 0 elsewhere) and whose noisy-latent input is zeroed (the original's
``set_noisy_sample_input_to_zero``): only the key frames, the text and the timestep steer it.

Two published variants: RGB (``v3_sd15_sparsectrl_rgb.ckpt``) takes VAE latents of the key frames through one
zero-initialised conv3x3 (the simplified condition embedding); scribble (``..._scribble.ckpt``) takes the
images themselves through ControlNet's conv stack. State-dict keys are the original file's (diffusers names for
the 2D layers, original names for the motion modules), without the position tables.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import MotionConfig
from .controlnet import ControlNet, ControlNetConfig


class SparseControlNet(ControlNet):
    """SparseCtrl: ``config.conditioning_channels`` is the condition without the mask (4 latent channels for
    RGB, 3 image channels for scribble); ``simplified``: the RGB variant's single-conv condition embedding."""

    def __init__(self, config: ControlNetConfig, motion: MotionConfig, simplified: bool) -> None:
        with_mask = dataclasses.replace(config, conditioning_channels=config.conditioning_channels + 1)
        super().__init__(with_mask, motion)
        self.sparse_config, self.simplified = config, simplified
        if simplified:
            self.controlnet_cond_embedding = nn.Conv2d(with_mask.conditioning_channels,
                                                       config.unet.block_out_channels[0], 3, padding=1)

    def embed_condition(self, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """cond (F, C, h, w) with zeros off the key frames, mask (F, 1, h, w) -> embedding (F, C0, h', w')."""
        return self.controlnet_cond_embedding(torch.cat([cond, mask], dim=1))
