"""The base (spatial) UNet: diffusers config/keys, LDM single-file keys, and strict loading into UNet3D.

Native keys of :class:`~animatediff_lite.unet.UNet3D` are exactly diffusers ``UNet2DConditionModel``'s keys
plus ``*.motion_modules.*`` in the original AnimateDiff layout. The LDM layout (``model.diffusion_model.*``,
the CompVis/``openaimodel`` naming used by single-file SD1.5 checkpoints) is mapped with a table of
block prefixes computed from the config, so tiny models and SD1.5 go through the same code:

======================================  ==========================================
native (diffusers)                      LDM
======================================  ==========================================
time_embedding.linear_1 / linear_2      time_embed.0 / time_embed.2
conv_in                                 input_blocks.0.0
down_blocks.i.resnets.j                 input_blocks.k.0          (k = 1 + i*(L+1) + j)
down_blocks.i.attentions.j              input_blocks.k.1
down_blocks.i.downsamplers.0.conv       input_blocks.k.0.op       (k = 1 + i*(L+1) + L)
mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
up_blocks.i.resnets.j                   output_blocks.k.0         (k = i*(L+1) + j, j <= L)
up_blocks.i.attentions.j                output_blocks.k.1
up_blocks.i.upsamplers.0.conv           output_blocks.k.{1 or 2}.conv   (2 when the level has attention)
conv_norm_out / conv_out                out.0 / out.2
======================================  ==========================================

Inside a resnet: norm1 = in_layers.0, conv1 = in_layers.2, time_emb_proj = emb_layers.1, norm2 =
out_layers.0, conv2 = out_layers.3, conv_shortcut = skip_connection. Spatial transformers keep their
inner names (norm, proj_in, transformer_blocks.t.attn1/attn2/norm1-3/ff.net.0.proj/ff.net.2, proj_out).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from ..config import UNetConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint, naming, read_checkpoint
from .io import StateDict, WeightsFile, load_strict

logger = logging.getLogger(__name__)

LDM_PREFIX = "model.diffusion_model."
MOTION_TAG = ".motion_modules."

# Resnet sub-layers: native name -> LDM name (a ResBlock's Sequential indices).
RESNET_LDM: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
RESNET_NATIVE = {v: k for k, v in RESNET_LDM.items()}

# diffusers block type names (2D, 3D and the UNetMotionModel spelling) -> "has spatial transformers".
_DOWN_TYPES = {f"{a}DownBlock{s}": a == "CrossAttn" for a in ("CrossAttn", "") for s in ("2D", "3D", "Motion")}
_UP_TYPES = {f"{a}UpBlock{s}": a == "CrossAttn" for a in ("CrossAttn", "") for s in ("2D", "3D", "Motion")}
_MID_TYPES = {None, "UNetMidBlock2DCrossAttn", "UNetMidBlock3DCrossAttn", "UNetMidBlockCrossAttnMotion"}
# config.json fields whose non-default values change the architecture in ways UNet3D does not model.
_UNSUPPORTED_DEFAULTS: dict[str, object] = {
    "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "encoder_hid_dim": None, "num_class_embeds": None, "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default", "act_fn": "silu", "only_cross_attention": False,
    "dual_cross_attention": False, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "time_embedding_dim": None, "timestep_post_act": None, "time_embedding_act_fn": None,
    "attention_type": "default", "cross_attention_norm": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1, "downsample_padding": 1,
}

# UNetConfig fields that a diffusers config.json spells the same way.
_SAME_FIELDS = ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups",
                "norm_eps", "transformer_layers_per_block", "use_linear_projection", "flip_sin_to_cos", "freq_shift")

# SD1.5-shaped models: 8 heads per spatial transformer. The head count is not visible in the tensors
# (q/k/v are plain (C, C) matrices), so unet_config_from_state assumes it; a diffusers config.json
# states it (as "attention_head_dim", a diffusers naming quirk).
DEFAULT_HEADS = 8
# Nor is the GroupNorm group count; every SD1.x/2.x UNet uses 32.
DEFAULT_GROUPS = 32


# ----------------------------------------------------------------------------------------------- configs

def _uniform(name: str, value: object) -> object:
    """A config value that diffusers allows per level; UNet3D needs it equal on every level."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"unet config {name}={list(value)}: per-level values are not supported, "
                             f"UNet3D needs one value for every level")
        value = value[0]
    return value


def unet_config_from_diffusers(cfg: Mapping) -> UNetConfig:
    """Build a :class:`UNetConfig` from a diffusers ``unet/config.json`` dict (UNet2DConditionModel).

    Raises ValueError naming the field for architectures UNet3D does not model (class/addition
    embeddings, LCM's time_cond_proj_dim, per-level head counts, non-mirrored up blocks, ...).
    """
    for name, default in _UNSUPPORTED_DEFAULTS.items():
        if name in cfg and cfg[name] != default:
            raise ValueError(f"unet config {name}={cfg[name]!r} is not supported (only {default!r})")
    down_types = list(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up_types = list(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    unknown = [t for t in down_types if t not in _DOWN_TYPES] + [t for t in up_types if t not in _UP_TYPES]
    if unknown:
        raise ValueError(f"unet config block types {unknown} are not supported "
                         f"(down: {sorted(_DOWN_TYPES)}, up: {sorted(_UP_TYPES)})")
    down = tuple(_DOWN_TYPES[t] for t in down_types)
    up = tuple(_UP_TYPES[t] for t in up_types)
    if up != down[::-1]:
        raise ValueError(f"unet config up_block_types {up_types} do not mirror down_block_types {down_types}")
    if cfg.get("mid_block_type", None) not in _MID_TYPES:
        raise ValueError(f"unet config mid_block_type={cfg['mid_block_type']!r} is not supported")
    d = UNetConfig(cross_attention_dim=1280)  # diffusers' defaults, for the fields a config.json leaves out
    channels = tuple(int(c) for c in cfg.get("block_out_channels", d.block_out_channels))
    if len(channels) != len(down):
        raise ValueError(f"unet config has {len(channels)} block_out_channels but {len(down)} down_block_types")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", DEFAULT_HEADS)  # a diffusers quirk
    # Each value converted to the type of its default (int, float or bool).
    return UNetConfig(block_out_channels=channels, down_cross_attention=down,
                      attention_head_dim=int(_uniform("attention_head_dim", heads)),
                      **{f: type(getattr(d, f))(_uniform(f, cfg.get(f, getattr(d, f)))) for f in _SAME_FIELDS})


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers ``unet/config.json`` dict of a :class:`UNetConfig` (inverse of the above)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.down_cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.down_cross_attention[::-1]]
    same = {f: getattr(cfg, f) for f in (*_SAME_FIELDS, "attention_head_dim")}
    return {"_class_name": "UNet2DConditionModel", **same,
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": down, "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "center_input_sample": False}


def unet_config_from_state(state: Mapping[str, torch.Tensor]) -> UNetConfig:
    """Infer a :class:`UNetConfig` from UNet tensors in diffusers/native or LDM layout.

    Widths, levels, layers per block, which levels have spatial transformers, transformer depth,
    cross-attention width and linear-vs-conv projections come from tensor shapes. Not visible in
    tensors and assumed: ``attention_head_dim`` = 8 heads and ``norm_num_groups`` = 32 (the SD1.x
    values); pass a diffusers config.json for other models.
    """
    ldm = any(k.startswith((LDM_PREFIX, "input_blocks.")) for k in state)  # model.diffusion_model.* or bare
    body = _strip_ldm(state)[0]
    conv_in, conv_out = ("input_blocks.0.0.weight", "out.2.weight") if ldm else ("conv_in.weight", "conv_out.weight")
    try:
        sizes = block_sizes(body)
        in_out = dict(in_channels=body[conv_in].shape[1], out_channels=body[conv_out].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        kind = "an LDM UNet" if ldm else "a diffusers-layout UNet"
        raise ValueError(f"tensors do not look like {kind} ({type(e).__name__}: {e})") from e
    return UNetConfig(**sizes, **in_out, attention_head_dim=DEFAULT_HEADS, norm_num_groups=DEFAULT_GROUPS)


def block_sizes(state: Mapping[str, torch.Tensor]) -> dict:
    """The :class:`UNetConfig` fields of the down and mid blocks, from bare UNet (or ControlNet) tensors in LDM
    (``input_blocks.*``) or diffusers names: widths, layers per level, the levels with spatial transformers and
    the transformers' depth, text width and projection kind. KeyError/ValueError/IndexError when they do not fit.
    """
    if any(k.startswith("input_blocks.") for k in state):
        sizes, attn = ldm_levels(state), "middle_block.1."
    else:
        levels = range(1 + max(int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")))
        widths = tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels)
        cross = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in levels)
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down_blocks.0.resnets."))
        sizes = dict(block_out_channels=widths, down_cross_attention=cross, layers_per_block=layers)
        attn = "mid_block.attentions.0."
    depth = 1 + max(int(k[len(attn):].split(".")[1]) for k in state if k.startswith(attn + "transformer_blocks."))
    return dict(sizes, cross_attention_dim=state[attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
                transformer_layers_per_block=depth, use_linear_projection=state[attn + "proj_in.weight"].ndim == 2)


def ldm_levels(ldm: Mapping[str, torch.Tensor]) -> dict:
    """``block_out_channels``, ``down_cross_attention`` and ``layers_per_block`` of bare LDM ``input_blocks.*``."""
    blocks = 1 + max(int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks."))
    downs = sorted(int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks.") and ".0.op.weight" in k)
    # Level i holds L resnets then a downsampler: the first downsampler sits at 1 + L.
    layers = downs[0] - 1 if downs else blocks - 1
    levels = len(downs) + 1
    if blocks != 1 + levels * layers + len(downs):
        raise ValueError(f"{blocks} input blocks do not fit {levels} levels of {layers} layers")
    first = [1 + i * (layers + 1) for i in range(levels)]
    return dict(block_out_channels=tuple(ldm[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] for k in first),
                down_cross_attention=tuple(f"input_blocks.{k}.1.proj_in.weight" in ldm for k in first),
                layers_per_block=layers)


# ---------------------------------------------------------------------------------------------- LDM map

def ldm_block_table(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """Every block of the UNet as (native prefix, LDM prefix without ``model.diffusion_model.``, is_resnet)."""
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    rows = [("time_embedding.linear_1", "time_embed.0", False), ("time_embedding.linear_2", "time_embed.2", False),
            ("conv_in", "input_blocks.0.0", False)]
    for i in range(n):
        first = 1 + i * (layers + 1)  # level i: L blocks of a resnet (+ attention), then the downsampler's block
        for j in range(layers):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{first + j}.0", True))
            if cfg.down_cross_attention[i]:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{first + j}.1", False))
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{first + layers}.0.op", False))
    rows += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
             ("mid_block.resnets.1", "middle_block.2", True)]
    for i, cross in enumerate(cfg.down_cross_attention[::-1]):
        for j in range(layers + 1):  # one more resnet per up level: it also takes the skip of the downsampler
            k = i * (layers + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", True))
            if cross:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", False))
            if i < n - 1 and j == layers:
                rows.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if cross else 1}.conv", False))
    rows += [("conv_norm_out", "out.0", False), ("conv_out", "out.2", False)]
    return rows


def _strip_ldm(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """UNet tensors without the LDM prefix, and the keys that are not UNet tensors (VAE, CLIP, EMA...)."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        unet = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
        return unet, [k for k in state if not k.startswith(LDM_PREFIX)]
    return dict(state), []


def map_keys(state: Mapping[str, torch.Tensor], rows: list[tuple[str, str, bool]], to_ldm: bool,
             prefix: str = "") -> tuple[StateDict, list[str]]:
    """(``state`` renamed block by block through ``rows`` of :func:`ldm_block_table`, native -> LDM with
    ``to_ldm`` else LDM -> native, each name behind ``prefix``; the keys that fit no row, motion keys always)."""
    table = {(nat if to_ldm else ldm): (ldm if to_ldm else nat, res) for nat, ldm, res in rows}
    names = RESNET_LDM if to_ldm else RESNET_NATIVE
    renamed = {key: None if MOTION_TAG in key else _rename(key, table, names) for key in state}
    out = {prefix + name: state[key] for key, name in renamed.items() if name is not None}
    return out, [key for key, name in renamed.items() if name is None]


def _rename(key: str, table: Mapping[str, tuple[str, bool]], names: Mapping[str, str]) -> str | None:
    """``key`` with its longest block prefix in ``table`` renamed, and a resnet's inner layer by ``names``."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        block = table.get(".".join(parts[:n]))
        if block is None:
            continue
        target, is_resnet = block
        rest = ".".join(parts[n:])
        if not is_resnet:
            return f"{target}.{rest}"
        inner = next((src for src in names if rest.startswith(src + ".")), None)
        return None if inner is None else f"{target}.{names[inner]}{rest[len(inner):]}"
    return None


def unet_state_from_ldm(state: Mapping[str, torch.Tensor], cfg: UNetConfig, source: str = "<memory>") -> StateDict:
    """Map an LDM state (``model.diffusion_model.*`` or bare) to native/diffusers UNet keys, for a UNet of config
    ``cfg`` (see :func:`unet_config_from_state`).

    Keys outside ``model.diffusion_model.`` (VAE, text encoder, ``model_ema.*``) are ignored with a log
    note. A UNet key that the table does not cover raises CheckpointError naming ``source``.
    """
    ldm, ignored = _strip_ldm(state)
    if ignored:
        logger.info("%s: ignoring %d keys outside model.diffusion_model. (VAE, text encoder, EMA...: %s)", source,
                    len(ignored), sorted({k.split(".")[0] for k in ignored}))
    out, unmapped = map_keys(ldm, ldm_block_table(cfg), to_ldm=False)
    if unmapped:
        raise CheckpointError(f"{source}: {len(unmapped)} LDM UNet keys do not fit the UNet config "
                              f"(e.g. {', '.join(unmapped[:3])})")
    return out


def unet_state_to_ldm(native: Mapping[str, torch.Tensor], cfg: UNetConfig) -> StateDict:
    """Map native/diffusers UNet keys to the LDM layout (with ``model.diffusion_model.``).

    Motion-module keys have no LDM place: pass only the spatial part (see :func:`split_motion`).
    Raises ValueError naming keys that do not fit ``cfg``.
    """
    out, unmapped = map_keys(native, ldm_block_table(cfg), to_ldm=True, prefix=LDM_PREFIX)
    if unmapped:
        raise ValueError(f"{len(unmapped)} UNet keys have no LDM name (e.g. {', '.join(unmapped[:3])}); "
                         "motion-module keys must be split off first")
    return out


def split_motion(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """(spatial, motion) parts of a native UNet3D state: motion keys contain ``.motion_modules.``."""
    spatial = {k: v for k, v in state.items() if MOTION_TAG not in k}
    return spatial, {k: v for k, v in state.items() if k not in spatial}


# ---------------------------------------------------------------------------------------------- loading

def read_unet_source(source: str | os.PathLike | Checkpoint) -> tuple[StateDict, UNetConfig, str]:
    """The base UNet of ``source``, read once: (native spatial state, config, file to name in messages).

    A diffusers model folder or its ``unet/`` (config from its config.json), an LDM single file (config from
    the tensors), a diffusers-layout single file, or a :class:`Checkpoint` already read. Motion-module keys
    are left out (with a log note).
    """
    what = "a Stable Diffusion UNet (LDM single file or diffusers layout)"
    part = read_checkpoint(source, what).part("unet", what)
    where = part.where
    cfg = None  # from config.json when there is one, else from the tensors
    if part.config:
        with naming(part.path / "config.json"):
            cfg = unet_config_from_diffusers(part.config)
        part.require_weights("diffusers UNet weights")
    elif part.layout not in ("ldm_single_file", "diffusers_unet", "native", "diffusers_motion_unet"):
        raise CheckpointError(f"{where}: {part.looks}, not a base UNet (expected Stable "
                              "Diffusion weights: LDM model.diffusion_model.* or diffusers UNet keys)")
    with naming(where):
        cfg = cfg or unet_config_from_state(part.state)
    state = unet_state_from_ldm(part.state, cfg, where) if part.layout == "ldm_single_file" else part.state
    spatial, motion = split_motion(state)
    if motion:
        logger.info("%s: ignoring %d motion-module keys (load them with load_motion_module)", where, len(motion))
    return spatial, cfg, where


def load_spatial(unet: torch.nn.Module, spatial: Mapping[str, torch.Tensor], where: str, device: torch.device | str,
                 dtype: torch.dtype, file: WeightsFile | None = None) -> None:
    """Fill the spatial (Stable Diffusion) layers of a UNet3D strictly; its motion modules are left as they are."""
    keys = [k for k in unet.state_dict() if MOTION_TAG not in k]
    load_strict(unet, spatial, where, "the base UNet (spatial layers)", keys, device, dtype, file)
