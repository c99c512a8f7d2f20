"""SparseCtrl files: the original ``v3_sd15_sparsectrl_{rgb,scribble}.ckpt`` and diffusers ``SparseControlNetModel``
folders/files, to :class:`~animatediff_lite.sparsectrl.SparseControlNet`; converters between the two.

Native keys are the original file's (a ``{"controlnet": state}`` pickle): diffusers names for the 2D layers
(``conv_in``, ``controlnet_cond_embedding``, ``down_blocks``, ``mid_block``, ``controlnet_down_blocks``,
``controlnet_mid_block``) and original AnimateDiff names for the motion modules, whose ``pos_encoder.pe`` tables
are checked (one length, the standard sinusoid, as a motion module's) and recomputed. diffusers' files rename
only the motion modules (``motion_map``). RGB files have the one-conv condition embedding
(``controlnet_cond_embedding.weight``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..config import MotionConfig, UNetConfig
from ..controlnet import ControlNetConfig
from ..errors import CheckpointError
from ..sparsectrl import SparseControlNet
from .checkpoint import Checkpoint, naming
from .controlnet_map import CONTROLNET_LAYOUTS, check_base, controlnet_config_from_state
from .io import SAFETENSORS_SUFFIXES, StateDict, load_strict, save_state_dict
from .motion_load import check_pe, split_pe
from .motion_map import motion_state_from_diffusers, motion_state_to_diffusers

WHAT = "an AnimateDiff SparseCtrl model (v3_sd15_sparsectrl_rgb/scribble.ckpt or a diffusers SparseControlNetModel)"
SPARSE_LAYOUTS = ("sparsectrl", "diffusers_sparsectrl")
_ATTN_BLOCK = re.compile(r"\.motion_modules\.\d+\.temporal_transformer\.transformer_blocks\.\d+"
                         r"\.attention_blocks\.(\d+)\.")


def sparsectrl_parts(checkpoint: Checkpoint,
                     like: UNetConfig) -> tuple[StateDict, ControlNetConfig, MotionConfig, bool]:
    """(native tensors without position tables, encoder config with the condition's channels without the mask,
    motion settings, simplified embedding) of a SparseCtrl checkpoint for a base UNet of config ``like``.

    CheckpointError naming the file for another kind of file (a ControlNet included) or tensors that fit no
    SparseCtrl model; stored position tables must be the standard sinusoid (the model recomputes it).
    """
    where = checkpoint.where
    if checkpoint.layout not in SPARSE_LAYOUTS:
        hint = " (a ControlNet: pass it in controlnets=)" if checkpoint.layout in CONTROLNET_LAYOUTS else ""
        raise CheckpointError(f"{where}: {checkpoint.looks}{hint}; expected {WHAT}")
    rest, tables = split_pe(checkpoint.state)
    native = motion_state_from_diffusers(rest) if checkpoint.layout == "diffusers_sparsectrl" else rest
    pe_len = check_pe(tables, where)
    cfg = checkpoint.config if checkpoint.layout == "diffusers_sparsectrl" else {}
    if not cfg.get("concat_conditioning_mask", True):
        raise CheckpointError(f"{where}: concat_conditioning_mask=False is not supported (SparseCtrl's mask channel)")
    with naming(where, f"expected {WHAT}"):
        base = controlnet_config_from_state(native, like)
    if cfg:  # heads / groups are stated in a diffusers config; the tensors cannot show them
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", like.attention_head_dim)
        unet = dataclasses.replace(base.unet, attention_head_dim=_first(heads),
                                   norm_num_groups=int(cfg.get("norm_num_groups", 32)))
        base = ControlNetConfig(unet, base.conditioning_channels, tuple(
            cfg.get("conditioning_embedding_out_channels", base.embedding_channels)))
    config = ControlNetConfig(base.unet, base.conditioning_channels - 1, base.embedding_channels)
    # The published files have one temporal self-attention per motion module ("Temporal_Self" once).
    blocks = 1 + max((int(m.group(1)) for k in native if (m := _ATTN_BLOCK.search(k))), default=0)
    motion = MotionConfig(version="v3", num_heads=_first(cfg.get("motion_num_attention_heads", 8)),
                          max_position_len=int(cfg.get("motion_max_seq_length", pe_len or 32)), mid_block=False,
                          joint_groupnorm=False, num_attention_blocks=blocks, norm_num_groups=base.unet.norm_num_groups)
    return native, config, motion, "controlnet_cond_embedding.weight" in native


def _first(heads: int | list[int]) -> int:
    """A head count of a diffusers config, which may give one per block."""
    return int(heads if isinstance(heads, int) else heads[0])


def sparsectrl_from_checkpoint(checkpoint: Checkpoint, like: UNetConfig, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> SparseControlNet:
    """Build and strictly load SparseCtrl for a base UNet of config ``like``; CheckpointError naming the file for
    another kind of file (a ControlNet included) or a model made for another base."""
    native, config, motion, simplified = sparsectrl_parts(checkpoint, like)
    check_base(config.unet, like, checkpoint.where, "a SparseCtrl model")
    with torch.device("meta"):
        model = SparseControlNet(config, motion, simplified)
    load_strict(model, native, checkpoint.where, "a SparseCtrl model", device=device, dtype=dtype,
                file=checkpoint.file)
    model.reset_buffers()
    return model.eval()


def describe_sparsectrl(checkpoint: Checkpoint) -> dict:
    """What ``animatediff-lite info`` says of a SparseCtrl file (CheckpointError naming it for another kind)."""
    _, config, motion, simplified = sparsectrl_parts(checkpoint, UNetConfig())
    return {"variant": "rgb (VAE latents of the key frames)" if simplified else "image condition (e.g. scribble)",
            "channels": list(config.unet.block_out_channels), "text_width": config.unet.cross_attention_dim,
            "condition_channels": config.conditioning_channels, "max_position_len": motion.max_position_len}


def save_sparsectrl(checkpoint: Checkpoint, path: str | os.PathLike, to: str) -> None:
    """Convert a SparseCtrl file: ``to`` = "original" (a ``{"controlnet": state}`` pickle as upstream loads, or
    .safetensors) or "diffusers" (SparseControlNetModel names). Atomic writes."""
    native, _, motion, _ = sparsectrl_parts(checkpoint, UNetConfig())
    if to == "diffusers":
        out = motion_state_to_diffusers(native, motion.max_position_len)  # PE tables generated
    elif to == "original":
        if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
            tensors = {k: v.detach().contiguous().cpu() for k, v in native.items()}
            atomic_write(Path(path), lambda tmp: torch.save({"controlnet": tensors}, tmp))
            return
        out = native
    else:
        raise ValueError(f"to must be 'original' or 'diffusers', got {to!r}")
    save_state_dict(out, path)
