"""ControlNet files: diffusers ``ControlNetModel`` folders/files and the original single files, to :class:`ControlNet`.

Native keys are diffusers'. The original ControlNet files (``control_v11p_sd15_openpose.pth``, ``.safetensors``)
use the LDM names, bare or under ``control_model.`` (older files also carry a whole SD model, ignored):

==========================================  ==========================================
native (diffusers)                          original (LDM)
==========================================  ==========================================
time_embedding / conv_in / down_blocks /    time_embed / input_blocks / middle_block, as in the UNet
mid_block                                   (``unet_map.ldm_block_table``)
controlnet_down_blocks.k                    zero_convs.k.0
controlnet_mid_block                        middle_block_out.0
controlnet_cond_embedding.conv_in           input_hint_block.0
controlnet_cond_embedding.blocks.j          input_hint_block.{2 + 2j}
controlnet_cond_embedding.conv_out          input_hint_block.{2 + 2 * len(blocks)}
==========================================  ==========================================

Sizes come from a config.json when there is one, else from the tensors, with the head count, GroupNorm groups
and time-embedding settings (invisible in tensors) taken from the base UNet the ControlNet is loaded for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from ..config import UNetConfig
from ..controlnet import ControlNet, ControlNetConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint, naming
from .io import StateDict, load_strict
from .unet_map import block_sizes, ldm_block_table, ldm_levels, map_keys, unet_config_from_diffusers

logger = logging.getLogger(__name__)

WHAT = "an SD1.5 ControlNet (diffusers ControlNetModel folder/file or an original control_*.pth/.safetensors)"
LDM_CONTROL_PREFIX = "control_model."
CONTROLNET_LAYOUTS = ("diffusers_controlnet", "ldm_controlnet")


def controlnet_config_from_diffusers(cfg: Mapping) -> ControlNetConfig:
    """A :class:`ControlNetConfig` from a diffusers ControlNetModel ``config.json`` dict."""
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ValueError("controlnet_conditioning_channel_order other than 'rgb' is not supported")
    if cfg.get("global_pool_conditions", False):
        raise ValueError("global_pool_conditions=True (shuffle ControlNets) is not supported")
    body = {k: v for k, v in cfg.items() if k not in ("up_block_types", "out_channels")}
    if cfg.get("down_block_types"):  # no up blocks in a ControlNet: mirrored ones make it a valid UNet config
        body["up_block_types"] = [t.replace("Down", "Up") for t in cfg["down_block_types"]][::-1]
    unet = unet_config_from_diffusers(body)
    return ControlNetConfig(unet=unet, conditioning_channels=int(cfg.get("conditioning_channels", 3)),
                            embedding_channels=tuple(int(c) for c in cfg.get(
                                "conditioning_embedding_out_channels", (16, 32, 96, 256))))


def controlnet_config_from_state(state: Mapping[str, torch.Tensor], like: UNetConfig) -> ControlNetConfig:
    """Sizes from native (diffusers-named) ControlNet tensors; heads, groups and the time-embedding settings
    from ``like`` (the base UNet's config). ValueError if the tensors are not a ControlNet."""
    emb = "controlnet_cond_embedding."
    try:
        unet = dataclasses.replace(like, in_channels=state["conv_in.weight"].shape[1], **block_sizes(state))
        if emb + "weight" in state:  # SparseCtrl RGB: one conv (its stack widths are then unused)
            hint_in, widths = state[emb + "weight"], list(ControlNetConfig().embedding_channels)
        else:
            hint_in = state[emb + "conv_in.weight"]
            blocks = sum(1 for k in state if k.startswith(emb + "blocks.") and k.endswith(".weight"))
            widths = [hint_in.shape[0]] + [state[f"{emb}blocks.{2 * j + 1}.weight"].shape[0]
                                           for j in range(blocks // 2)]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"tensors do not look like a ControlNet (missing {e})") from e
    return ControlNetConfig(unet=unet, conditioning_channels=hint_in.shape[1], embedding_channels=tuple(widths))


def controlnet_block_table(cfg: UNetConfig, hint_blocks: int) -> list[tuple[str, str, bool]]:
    """Every ControlNet layer as (native prefix, original prefix, is_resnet): the UNet's rows up to its middle
    block (:func:`~animatediff_lite.loading.unet_map.ldm_block_table`), one zero conv per input block, the hint
    embedder (``hint_blocks`` convs between its first and last; SiLUs take the odd indices) and the middle
    block's output conv."""
    rows = [row for row in ldm_block_table(cfg) if not row[1].startswith(("output_blocks.", "out."))]
    rows += [(f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0", False)
             for k in range(len(cfg.block_out_channels) * (cfg.layers_per_block + 1))]
    rows += [(f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 + 2 * j}", False)
             for j in range(hint_blocks)]
    return rows + [("controlnet_cond_embedding.conv_in", "input_hint_block.0", False),
                   ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 + 2 * hint_blocks}", False),
                   ("controlnet_mid_block", "middle_block_out.0", False)]


def controlnet_state_from_ldm(state: Mapping[str, torch.Tensor], like: UNetConfig,
                              source: str = "<memory>") -> StateDict:
    """Original ControlNet tensors (bare or ``control_model.``) -> native keys; other keys ignored with a note.

    CheckpointError naming ``source`` for a key that has no ControlNet place.
    """
    if any(k.startswith(LDM_CONTROL_PREFIX) for k in state):
        ldm = {k[len(LDM_CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_CONTROL_PREFIX)}
        if len(ldm) < len(state):
            logger.info("%s: ignoring %d keys outside control_model.*", source, len(state) - len(ldm))
    else:
        ldm = dict(state)
    try:
        cfg = dataclasses.replace(like, **ldm_levels(ldm))
        last_hint = max(int(k.split(".")[1]) for k in ldm if k.startswith("input_hint_block."))
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: tensors do not look like an original ControlNet ({type(e).__name__}: {e}); "
                              f"expected {WHAT}") from e
    out, unmapped = map_keys(ldm, controlnet_block_table(cfg, (last_hint - 2) // 2), to_ldm=False)
    if unmapped:
        raise CheckpointError(f"{source}: {len(unmapped)} keys have no place in a ControlNet "
                              f"(e.g. {', '.join(unmapped[:3])}); expected {WHAT}")
    return out


def check_base(mine: UNetConfig, like: UNetConfig, where: str, what: str) -> None:
    """CheckpointError naming the file when a control model was made for another base than ``like``."""
    if (mine.block_out_channels, mine.cross_attention_dim) != (like.block_out_channels, like.cross_attention_dim):
        raise CheckpointError(f"{where}: {what} for another base model (channels {list(mine.block_out_channels)}, "
                              f"text width {mine.cross_attention_dim}); the base UNet has channels "
                              f"{list(like.block_out_channels)}, text width {like.cross_attention_dim}")


def controlnet_config_and_state(checkpoint: Checkpoint, like: UNetConfig) -> tuple[ControlNetConfig, StateDict]:
    """(config, native tensors) of a ControlNet checkpoint; what a single file cannot show comes from ``like``.

    CheckpointError naming the file for another kind of file or tensors that fit no ControlNet.
    """
    where = checkpoint.where
    if checkpoint.layout not in CONTROLNET_LAYOUTS:
        hint = " (a SparseCtrl file: pass it as sparsectrl=)" if "sparsectrl" in checkpoint.layout else ""
        raise CheckpointError(f"{where}: {checkpoint.looks}{hint}; expected {WHAT}")
    state = checkpoint.state
    if checkpoint.layout == "ldm_controlnet":
        state = controlnet_state_from_ldm(state, like, where)
    elif checkpoint.config:
        with naming(checkpoint.path):
            return controlnet_config_from_diffusers(checkpoint.config), state
    with naming(where):
        return controlnet_config_from_state(state, like), state


def controlnet_from_checkpoint(checkpoint: Checkpoint, like: UNetConfig, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> ControlNet:
    """Build and strictly load a ControlNet for a base UNet of config ``like``.

    CheckpointError naming the file for another kind of file (a SparseCtrl file included) or a ControlNet made
    for another base (different cross-attention width or channels).
    """
    cfg, state = controlnet_config_and_state(checkpoint, like)
    check_base(cfg.unet, like, checkpoint.where, "a ControlNet")
    with torch.device("meta"):
        model = ControlNet(cfg)
    load_strict(model, state, checkpoint.where, "a ControlNet", device=device, dtype=dtype, file=checkpoint.file)
    return model.eval()


def read_controlnets(specs, read) -> list[tuple[Checkpoint, float]]:
    """``controlnets=[(path, scale), ...]`` of load_pipeline -> (checkpoint, scale) pairs, each file read once
    with ``read(path, what)``; ValueError naming the argument for a malformed entry."""
    pairs = []
    for i, spec in enumerate(specs):
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], (int, float))):
            raise ValueError(f"controlnets[{i}]: expected a (path, scale) pair, got {spec!r}")
        pairs.append((read(spec[0], WHAT), float(spec[1])))
    return pairs


def describe_controlnet(checkpoint: Checkpoint) -> dict:
    """What ``animatediff-lite info`` says of a ControlNet: its sizes (SD1.5 head/group conventions assumed
    where a single file cannot say) and the base it fits."""
    sd15 = UNetConfig()
    cfg = controlnet_config_and_state(checkpoint, sd15)[0]
    u = cfg.unet
    fits = "SD1.5" if (u.block_out_channels, u.cross_attention_dim) == (sd15.block_out_channels, 768) else "not SD1.5"
    return {"channels": list(u.block_out_channels), "text_width": u.cross_attention_dim,
            "condition_channels": cfg.conditioning_channels, "embedding_channels": list(cfg.embedding_channels),
            "base": fits}
