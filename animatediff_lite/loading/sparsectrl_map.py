"""SparseCtrl files: the original ``v3_sd15_sparsectrl_{rgb,scribble}.ckpt`` and diffusers ``SparseControlNetModel``
folders/files, to :class:`~animatediff_lite.sparsectrl.SparseControlNet`; converters between the two.

Native keys are the original file's (a ``{"controlnet": state}`` pickle): diffusers names for the 2D layers
(``conv_in``, ``controlnet_cond_embedding``, ``down_blocks``, ``mid_block``, ``controlnet_down_blocks``,
``controlnet_mid_block``) and original AnimateDiff names for the motion modules, whose ``pos_encoder.pe`` tables
are checked for their length and recomputed. diffusers' files rename only the motion modules
(``motion_map``). RGB files have the one-conv condition embedding (``controlnet_cond_embedding.weight``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..config import MotionConfig, UNetConfig
from ..control import ControlUnit
from ..controlnet import ControlNetConfig
from ..errors import CheckpointError
from ..sparsectrl import SparseControlNet
from .checkpoint import Checkpoint
from .controlnet_map import CONTROLNET_LAYOUTS, check_base, controlnet_config_from_state
from .io import SAFETENSORS_SUFFIXES, StateDict, load_strict, save_state_dict
from .motion_map import motion_state_from_diffusers, motion_state_to_diffusers

WHAT = "an AnimateDiff SparseCtrl model (v3_sd15_sparsectrl_rgb/scribble.ckpt or a diffusers SparseControlNetModel)"
SPARSE_LAYOUTS = ("sparsectrl", "diffusers_sparsectrl")
_PE = re.compile(r"\.pos_(encoder|embed)\.pe$")
_ATTN_BLOCK = re.compile(r"\.motion_modules\.\d+\.temporal_transformer\.transformer_blocks\.\d+"
                         r"\.attention_blocks\.(\d+)\.")


def sparsectrl_state(checkpoint: Checkpoint) -> tuple[StateDict, int | None]:
    """(native state without position tables, stored PE length or None) of a SparseCtrl checkpoint."""
    state = checkpoint.state
    tables = {k: v for k, v in state.items() if _PE.search(k)}
    lengths = {int(t.shape[-2]) for t in tables.values() if t.dim() >= 2}
    if len(lengths) > 1:
        raise CheckpointError(f"{checkpoint.where}: position tables of mixed lengths {sorted(lengths)}")
    rest = {k: v for k, v in state.items() if k not in tables}
    native = motion_state_from_diffusers(rest) if checkpoint.layout == "diffusers_sparsectrl" else rest
    return native, next(iter(lengths), None)


def sparsectrl_config(checkpoint: Checkpoint, native: Mapping[str, torch.Tensor], pe_len: int | None,
                      like: UNetConfig) -> tuple[ControlNetConfig, MotionConfig, bool]:
    """(encoder config with the condition's channels without the mask, motion settings, simplified embedding)."""
    where = checkpoint.where
    cfg = checkpoint.config if checkpoint.layout == "diffusers_sparsectrl" else {}
    if cfg and not cfg.get("concat_conditioning_mask", True):
        raise CheckpointError(f"{where}: concat_conditioning_mask=False is not supported (SparseCtrl's mask channel)")
    try:
        base = controlnet_config_from_state(native, like)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}; expected {WHAT}") from e
    if cfg:  # heads / groups are stated in a diffusers config; the tensors cannot show them
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", like.attention_head_dim)
        unet = dataclasses.replace(base.unet, attention_head_dim=int(heads if isinstance(heads, int) else heads[0]),
                                   norm_num_groups=int(cfg.get("norm_num_groups", 32)))
        base = ControlNetConfig(unet, base.conditioning_channels, tuple(
            cfg.get("conditioning_embedding_out_channels", base.embedding_channels)))
    simplified = "controlnet_cond_embedding.weight" in native
    config = ControlNetConfig(base.unet, base.conditioning_channels - 1, base.embedding_channels)
    heads = cfg.get("motion_num_attention_heads", 8) if cfg else 8
    length = int(cfg.get("motion_max_seq_length", 32)) if cfg else (pe_len or 32)
    # The published files have one temporal self-attention per motion module ("Temporal_Self" once).
    blocks = 1 + max((int(m.group(1)) for k in native if (m := _ATTN_BLOCK.search(k))), default=0)
    motion = MotionConfig(version="v3", num_heads=int(heads if isinstance(heads, int) else heads[0]),
                          max_position_len=length, mid_block=False, joint_groupnorm=False,
                          num_attention_blocks=blocks, norm_num_groups=base.unet.norm_num_groups)
    return config, motion, simplified


def sparsectrl_from_checkpoint(checkpoint: Checkpoint, like: UNetConfig, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> SparseControlNet:
    """Build and strictly load SparseCtrl for a base UNet of config ``like``; CheckpointError naming the file for
    another kind of file (a ControlNet included) or a model made for another base."""
    where = checkpoint.where
    if checkpoint.layout not in SPARSE_LAYOUTS:
        hint = " (a ControlNet: pass it in controlnets=)" if checkpoint.layout in CONTROLNET_LAYOUTS else ""
        raise CheckpointError(f"{where}: {checkpoint.looks}{hint}; expected {WHAT}")
    native, pe_len = sparsectrl_state(checkpoint)
    config, motion, simplified = sparsectrl_config(checkpoint, native, pe_len, like)
    check_base(config.unet, like, where, "a SparseCtrl model")
    with torch.device("meta"):
        model = SparseControlNet(config, motion, simplified)
    load_strict(model, native, where, "a SparseCtrl model", device=device, dtype=dtype, file=checkpoint.file)
    model.reset_buffers()
    return model.eval()


def sparsectrl_unit(checkpoint: Checkpoint | None, like: UNetConfig, device: str | torch.device,
                    dtype: torch.dtype) -> ControlUnit | None:
    """The pipeline's SparseCtrl (scale set per call), or None without a file."""
    if checkpoint is None:
        return None
    return ControlUnit(sparsectrl_from_checkpoint(checkpoint, like, device, dtype), 1.0, checkpoint.where)


def describe_sparsectrl(checkpoint: Checkpoint) -> dict:
    """What ``animatediff-lite info`` says of a SparseCtrl file (CheckpointError naming it for another kind)."""
    if checkpoint.layout not in SPARSE_LAYOUTS:
        raise CheckpointError(f"{checkpoint.where}: {checkpoint.looks}; expected {WHAT}")
    native, pe_len = sparsectrl_state(checkpoint)
    config, motion, simplified = sparsectrl_config(checkpoint, native, pe_len, UNetConfig())
    return {"variant": "rgb (VAE latents of the key frames)" if simplified else "image condition (e.g. scribble)",
            "channels": list(config.unet.block_out_channels), "text_width": config.unet.cross_attention_dim,
            "condition_channels": config.conditioning_channels, "max_position_len": motion.max_position_len}


def sparsectrl_to_diffusers(native: Mapping[str, torch.Tensor], max_seq_length: int = 32) -> StateDict:
    """Native (original) SparseCtrl tensors -> diffusers SparseControlNetModel names, PE tables generated."""
    return motion_state_to_diffusers(native, max_seq_length)


def save_sparsectrl(checkpoint: Checkpoint, path: str | os.PathLike, to: str) -> None:
    """Convert a SparseCtrl file: ``to`` = "original" (a ``{"controlnet": state}`` pickle as upstream loads, or
    .safetensors) or "diffusers" (SparseControlNetModel names). Atomic writes."""
    native, pe_len = sparsectrl_state(checkpoint)
    if to == "diffusers":
        out = sparsectrl_to_diffusers(native, pe_len or 32)
    elif to == "original":
        if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
            tensors = {k: v.detach().contiguous().cpu() for k, v in native.items()}
            atomic_write(Path(path), lambda tmp: torch.save({"controlnet": tensors}, tmp))
            return
        out = native
    else:
        raise ValueError(f"to must be 'original' or 'diffusers', got {to!r}")
    save_state_dict(out, path)
