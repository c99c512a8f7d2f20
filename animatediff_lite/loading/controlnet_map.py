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
import re
from collections.abc import Mapping

import torch

from ..config import UNetConfig
from ..control import ControlUnit
from ..controlnet import ControlNet, ControlNetConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .io import StateDict, load_strict
from .unet_map import RESNET_NATIVE, _lookup, _rename_inner, ldm_block_table, unet_config_from_diffusers

logger = logging.getLogger(__name__)

WHAT = "an SD1.5 ControlNet (diffusers ControlNetModel folder/file or an original control_*.pth/.safetensors)"
LDM_CONTROL_PREFIX = "control_model."
CONTROLNET_LAYOUTS = ("diffusers_controlnet", "ldm_controlnet")
_HINT = re.compile(r"^input_hint_block\.(\d+)\.(.*)$")
_ZERO = re.compile(r"^zero_convs\.(\d+)\.0\.(.*)$")


def controlnet_config_from_diffusers(cfg: Mapping) -> ControlNetConfig:
    """A :class:`ControlNetConfig` from a diffusers ControlNetModel ``config.json`` dict."""
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ValueError("controlnet_conditioning_channel_order other than 'rgb' is not supported")
    if cfg.get("global_pool_conditions", False):
        raise ValueError("global_pool_conditions=True (shuffle ControlNets) is not supported")
    body = {k: v for k, v in cfg.items() if k not in ("up_block_types", "out_channels")}
    body["up_block_types"] = [t.replace("Down", "Up") for t in cfg.get("down_block_types", ())][::-1] or None
    if body["up_block_types"] is None:
        del body["up_block_types"]
    unet = unet_config_from_diffusers(body)
    return ControlNetConfig(unet=unet, conditioning_channels=int(cfg.get("conditioning_channels", 3)),
                            embedding_channels=tuple(int(c) for c in cfg.get(
                                "conditioning_embedding_out_channels", (16, 32, 96, 256))))


def controlnet_config_from_state(state: Mapping[str, torch.Tensor], like: UNetConfig) -> ControlNetConfig:
    """Sizes from native (diffusers-named) ControlNet tensors; heads, groups and the time-embedding settings
    from ``like`` (the base UNet's config). ValueError if the tensors are not a ControlNet."""
    try:
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down_blocks."))
        channels = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down_blocks.0.resnets."))
        cross = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels))
        attn = "mid_block.attentions.0."
        depth = 1 + max(int(k.split(".")[4]) for k in state if k.startswith(attn + "transformer_blocks."))
        context = state[attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = state[attn + "proj_in.weight"].ndim == 2
        emb = "controlnet_cond_embedding."
        if emb + "weight" in state:  # SparseCtrl RGB: one conv (its stack widths are then unused)
            hint_in, widths = state[emb + "weight"], list(ControlNetConfig().embedding_channels)
        else:
            hint_in = state[emb + "conv_in.weight"]
            blocks = sum(1 for k in state if k.startswith(emb + "blocks.") and k.endswith(".weight"))
            widths = [hint_in.shape[0]] + [state[f"{emb}blocks.{2 * j + 1}.weight"].shape[0]
                                           for j in range(blocks // 2)]
        in_channels = state["conv_in.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"tensors do not look like a ControlNet (missing {e})") from e
    unet = dataclasses.replace(like, in_channels=in_channels, block_out_channels=channels, down_cross_attention=cross,
                               layers_per_block=layers, cross_attention_dim=context,
                               transformer_layers_per_block=depth, use_linear_projection=linear)
    return ControlNetConfig(unet=unet, conditioning_channels=hint_in.shape[1], embedding_channels=tuple(widths))


def _ldm_levels(ldm: Mapping[str, torch.Tensor], like: UNetConfig) -> UNetConfig:
    """The level count, layers per level and attention levels of LDM ``input_blocks`` (enough to rename keys)."""
    blocks = 1 + max(int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks."))
    downs = sorted({int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks.") and ".0.op." in k})
    layers = downs[0] - 1 if downs else blocks - 1
    levels = len(downs) + 1
    first = [1 + i * (layers + 1) for i in range(levels)]
    cross = tuple(f"input_blocks.{k}.1.proj_in.weight" in ldm for k in first)
    channels = tuple(ldm[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] for k in first)
    return dataclasses.replace(like, block_out_channels=channels, down_cross_attention=cross, layers_per_block=layers)


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
        cfg = _ldm_levels(ldm, like)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: tensors do not look like an original ControlNet ({type(e).__name__}: {e}); "
                              f"expected {WHAT}") from e
    table = {ldm_p: (nat, res) for nat, ldm_p, res in ldm_block_table(cfg)
             if not ldm_p.startswith(("output_blocks.", "out."))}
    hints = sorted({int(m.group(1)) for k in ldm if (m := _HINT.match(k))})
    out: StateDict = {}
    unmapped = []
    for key, value in ldm.items():
        if m := _HINT.match(key):
            n = int(m.group(1))
            name = "conv_in" if n == 0 else "conv_out" if n == hints[-1] else f"blocks.{(n - 2) // 2}"
            out[f"controlnet_cond_embedding.{name}.{m.group(2)}"] = value
        elif m := _ZERO.match(key):
            out[f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith("middle_block_out.0."):
            out["controlnet_mid_block." + key[len("middle_block_out.0."):]] = value
        else:
            hit = _lookup(table, key, 4)
            inner = _rename_inner(hit[1], hit[2], RESNET_NATIVE) if hit else None
            if inner is None:
                unmapped.append(key)
                continue
            out[f"{hit[0]}.{inner}"] = value
    if unmapped:
        raise CheckpointError(f"{source}: {len(unmapped)} keys have no place in a ControlNet "
                              f"(e.g. {', '.join(unmapped[:3])}); expected {WHAT}")
    return out


def controlnet_state_to_ldm(native: Mapping[str, torch.Tensor], cfg: ControlNetConfig) -> StateDict:
    """Native ControlNet tensors -> the bare original layout (the inverse of :func:`controlnet_state_from_ldm`)."""
    table = {nat: ldm_p for nat, ldm_p, _ in ldm_block_table(cfg.unet)}
    resnets = {nat for nat, _, res in ldm_block_table(cfg.unet) if res}
    last_hint = 2 + 2 * (2 * (len(cfg.embedding_channels) - 1))  # after conv_in and two convs per step
    out: StateDict = {}
    for key, value in native.items():
        emb = "controlnet_cond_embedding."
        if key.startswith(emb):
            name, leaf = key[len(emb):].rsplit(".", 1)
            n = 0 if name == "conv_in" else last_hint if name == "conv_out" else 2 + 2 * int(name.split(".")[1])
            out[f"input_hint_block.{n}.{leaf}"] = value
        elif key.startswith("controlnet_down_blocks."):
            _, k, leaf = key.split(".")
            out[f"zero_convs.{k}.0.{leaf}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + key.split(".")[-1]] = value
        else:
            hit = _lookup({k: (v, k in resnets) for k, v in table.items()}, key, 5)
            if hit is None:
                raise ValueError(f"{key}: no original ControlNet name")
            inner = _rename_inner(hit[1], hit[2], {v: k for k, v in RESNET_NATIVE.items()})
            out[f"{hit[0]}.{inner}"] = value
    return out


def check_base(mine: UNetConfig, like: UNetConfig, where: str, what: str) -> None:
    """CheckpointError naming the file when a control model was made for another base than ``like``."""
    if (mine.block_out_channels, mine.cross_attention_dim) != (like.block_out_channels, like.cross_attention_dim):
        raise CheckpointError(f"{where}: {what} for another base model (channels {list(mine.block_out_channels)}, "
                              f"text width {mine.cross_attention_dim}); the base UNet has channels "
                              f"{list(like.block_out_channels)}, text width {like.cross_attention_dim}")


def controlnet_from_checkpoint(checkpoint: Checkpoint, like: UNetConfig, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> ControlNet:
    """Build and strictly load a ControlNet for a base UNet of config ``like``.

    CheckpointError naming the file for another kind of file (a SparseCtrl file included) or a ControlNet made
    for another base (different cross-attention width or channels).
    """
    where = checkpoint.where
    if checkpoint.layout == "diffusers_controlnet" and checkpoint.config:
        try:
            cfg = controlnet_config_from_diffusers(checkpoint.config)
        except ValueError as e:
            raise CheckpointError(f"{checkpoint.path}: {e}") from e
        state = checkpoint.state
    elif checkpoint.layout in CONTROLNET_LAYOUTS:
        state = (controlnet_state_from_ldm(checkpoint.state, like, where) if checkpoint.layout == "ldm_controlnet"
                 else checkpoint.state)
        try:
            cfg = controlnet_config_from_state(state, like)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
    else:
        hint = " (a SparseCtrl file: pass it as sparsectrl=)" if checkpoint.layout.startswith("sparsectrl") else ""
        raise CheckpointError(f"{where}: {checkpoint.looks}{hint}; expected {WHAT}")
    check_base(cfg.unet, like, where, "a ControlNet")
    with torch.device("meta"):
        model = ControlNet(cfg)
    load_strict(model, state, where, "a ControlNet", device=device, dtype=dtype, file=checkpoint.file)
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


def controlnet_units(pairs: list[tuple[Checkpoint, float]], like: UNetConfig, device: str | torch.device,
                     dtype: torch.dtype) -> list[ControlUnit]:
    """Loaded :class:`~animatediff_lite.control.ControlUnit` s for the pipeline, in the given order."""
    return [ControlUnit(controlnet_from_checkpoint(c, like, device, dtype), scale, c.where) for c, scale in pairs]


def describe_controlnet(checkpoint: Checkpoint) -> dict:
    """What ``animatediff-lite info`` says of a ControlNet: its sizes (SD1.5 head/group conventions assumed
    where a single file cannot say) and the base it fits."""
    sd15 = UNetConfig()
    if checkpoint.layout == "diffusers_controlnet" and checkpoint.config:
        cfg = controlnet_config_from_diffusers(checkpoint.config)
    else:
        state = (controlnet_state_from_ldm(checkpoint.state, sd15, checkpoint.where)
                 if checkpoint.layout == "ldm_controlnet" else checkpoint.state)
        cfg = controlnet_config_from_state(state, sd15)
    u = cfg.unet
    fits = "SD1.5" if (u.block_out_channels, u.cross_attention_dim) == (sd15.block_out_channels, 768) else "not SD1.5"
    return {"channels": list(u.block_out_channels), "text_width": u.cross_attention_dim,
            "condition_channels": cfg.conditioning_channels, "embedding_channels": list(cfg.embedding_channels),
            "base": fits}
