"""VAE weights: diffusers and LDM key layouts, config inference and ``load_vae``.

Native keys are diffusers' ``AutoencoderKL`` keys. The LDM layout (``first_stage_model.*`` in SD single
files, bare in standalone VAE files such as ``vae-ft-mse-840000-ema-pruned``) differs in module paths,
stores the mid-block attention projections as 1x1 convolutions and numbers the decoder's up levels
from the highest resolution (LDM ``up.0``) where diffusers starts at the lowest (``up_blocks.0``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from ..config import VAEConfig
from ..errors import CheckpointError
from ..vae import AutoencoderKL
from .checkpoint import Checkpoint, naming, read_checkpoint
from .io import StateDict, load_strict

# (native module path, LDM module path) for both encoder and decoder; the rest of a key (".weight",
# ".norm1.bias", ...) follows the path unchanged except for RESNET_LEAVES.
_SIDE_MODULES: tuple[tuple[str, str], ...] = (
    ("conv_in", "conv_in"),
    ("mid_block.resnets.0", "mid.block_1"),
    ("mid_block.resnets.1", "mid.block_2"),
    ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
    ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
    ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
    ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
    ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
    ("conv_norm_out", "norm_out"),
    ("conv_out", "conv_out"),
)
RESNET_LEAVES: dict[str, str] = {"conv_shortcut": "nin_shortcut"}  # native -> LDM
# Native nn.Linear weights that LDM stores as (C, C, 1, 1) convolutions.
CONV_AS_LINEAR = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# diffusers < 0.14 attention names -> current ones.
OLD_DIFFUSERS_ATTENTION: dict[str, str] = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Where a VAE lives inside a bigger file ("" = a standalone VAE file).
VAE_PREFIXES: tuple[str, ...] = ("first_stage_model.", "vae.", "")
# Training leftovers in standalone LDM VAE files (LPIPS/discriminator, EMA bookkeeping): dropped.
DROP_PREFIXES: tuple[str, ...] = ("loss.", "model_ema.")
DEFAULT_GROUPS = 32

_LDM_LAYOUT = re.compile(r"^encoder\.down\.\d+\.")
_DIFFUSERS_LAYOUT = re.compile(r"^encoder\.down_blocks\.\d+\.")


def vae_block_table(levels: int) -> dict[str, str]:
    """Native module path -> LDM module path of every block of a VAE with ``levels`` levels (the LDM decoder
    numbers its levels from the highest resolution, diffusers from the lowest)."""
    table = {f"{side}.{native}": f"{side}.{ldm}" for side in ("encoder", "decoder") for native, ldm in _SIDE_MODULES}
    table |= {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for i in range(levels):
        r = levels - 1 - i
        table |= {f"encoder.down_blocks.{i}.resnets": f"encoder.down.{i}.block",
                  f"encoder.down_blocks.{i}.downsamplers.0.conv": f"encoder.down.{i}.downsample.conv",
                  f"decoder.up_blocks.{i}.resnets": f"decoder.up.{r}.block",
                  f"decoder.up_blocks.{i}.upsamplers.0.conv": f"decoder.up.{r}.upsample.conv"}
    return table


def _rename(key: str, table: Mapping[str, str], leaves: Mapping[str, str]) -> str:
    """``key`` with its longest module path in ``table`` renamed, the parts after it by ``leaves``; unchanged
    when no path fits."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        module = table.get(".".join(parts[:n]))
        if module is not None:
            return ".".join([module, *(leaves.get(p, p) for p in parts[n:])])
    return key


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` over the keys (0 when none match)."""
    regex = re.compile(pattern)
    found = [int(m[1]) for k in state if (m := regex.match(k))]
    return max(found) + 1 if found else 0


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    # (C, C, 1, 1) or (C, C, 1) -> (C, C); other shapes are left for the strict load to report.
    return w.reshape(w.shape[:2]) if w.ndim > 2 and all(s == 1 for s in w.shape[2:]) else w


def _split_vae(state: Mapping[str, torch.Tensor]) -> StateDict | None:
    """The VAE tensors of a file with their prefix removed; None if there are none."""
    for prefix in VAE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(DROP_PREFIXES)}
        if any(_LDM_LAYOUT.match(k) or _DIFFUSERS_LAYOUT.match(k) for k in sub):
            return sub
    return None


def vae_state_from_ldm(state: Mapping[str, torch.Tensor]) -> StateDict | None:
    """Native (diffusers-named) VAE tensors from an LDM-layout state dict; None when it has no LDM VAE.

    Accepts a whole SD single file (``first_stage_model.*``, or ``vae.*``) or a standalone VAE file
    (bare ``encoder.down.0.block.0...``); other parts of a single file are ignored.
    """
    ldm = any(_LDM_LAYOUT.match(k) for k in _split_vae(state) or ())
    return vae_state_to_native(state) if ldm else None


def vae_state_to_ldm(native: Mapping[str, torch.Tensor], prefix: str = "first_stage_model.") -> StateDict:
    """LDM-layout tensors (keys prefixed by ``prefix``) from native ones, attention weights as 1x1 convs."""
    levels = _count(native, r"^decoder\.up_blocks\.(\d+)\.") or _count(native, r"^encoder\.down_blocks\.(\d+)\.")
    table = vae_block_table(levels)
    out = {}
    for key, value in native.items():
        if CONV_AS_LINEAR.search(key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[prefix + _rename(key, table, RESNET_LEAVES)] = value
    return out


def vae_state_to_native(state: Mapping[str, torch.Tensor]) -> StateDict | None:
    """Native VAE tensors from any supported layout (LDM or diffusers, prefixed or bare); None if absent.

    Old diffusers attention names (query/key/value/proj_attn) are renamed; attention weights stored as 1x1
    convolutions (LDM, old diffusers) are squeezed.
    """
    sub = _split_vae(state)
    if sub is None:
        return None
    if any(_LDM_LAYOUT.match(k) for k in sub):
        levels = _count(sub, r"^decoder\.up\.(\d+)\.") or _count(sub, r"^encoder\.down\.(\d+)\.")
        table = {ldm: native for native, ldm in vae_block_table(levels).items()}
        leaves = {ldm: native for native, ldm in RESNET_LEAVES.items()}
    else:
        table = {f"{side}.mid_block.attentions.0": f"{side}.mid_block.attentions.0" for side in ("encoder", "decoder")}
        leaves = OLD_DIFFUSERS_ATTENTION
    native = {_rename(key, table, leaves): value for key, value in sub.items()}
    return {k: _conv_to_linear(v) if CONV_AS_LINEAR.search(k) else v for k, v in native.items()}


def vae_config_from_diffusers(cfg: Mapping) -> VAEConfig:
    """VAEConfig from a diffusers ``vae/config.json`` dict. ValueError for options this VAE lacks."""
    unsupported = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                   "act_fn": "silu", "shift_factor": None}
    for name, supported in unsupported.items():
        if cfg.get(name, supported) != supported:
            raise ValueError(f"VAE config {name}={cfg[name]!r} is not supported (only {supported!r})")
    for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != kind for t in cfg.get(name, ())):
            raise ValueError(f"VAE config {name}={cfg[name]!r} is not supported (only {kind})")
    d = VAEConfig()
    names = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "scaling_factor")
    return VAEConfig(block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", d.block_out_channels)),
                     **{f: type(getattr(d, f))(cfg.get(f, getattr(d, f))) for f in names})  # int or float, as d


def vae_config_from_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> VAEConfig:
    """VAEConfig inferred from native tensors' shapes.

    Shapes cannot tell the GroupNorm group count: it is 32 (SD's value) when 32 divides every width,
    else the largest number below 32 that does. The scaling factor is not stored in weights either:
    the SD1.5 default (0.18215) is used. Pass an explicit config to ``load_vae`` when these differ.
    """
    try:
        levels = _count(state, r"^encoder\.down_blocks\.(\d+)\.")
        widths = tuple(int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels))
        layers = _count(state, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        in_ch = int(state["encoder.conv_in.weight"].shape[1])
        out_ch = int(state["decoder.conv_out.weight"].shape[0])
        latent = int(state["post_quant_conv.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete VAE weights, missing {e.args[0]}") from e
    if not widths or not layers:
        raise CheckpointError(f"{path}: no VAE encoder blocks (encoder.down_blocks.*) found")
    g = math.gcd(*widths)
    groups = DEFAULT_GROUPS if g % DEFAULT_GROUPS == 0 else max(d for d in range(1, DEFAULT_GROUPS + 1) if g % d == 0)
    return VAEConfig(in_channels=in_ch, out_channels=out_ch, latent_channels=latent, block_out_channels=widths,
                     layers_per_block=layers, norm_num_groups=groups)


def load_vae(source: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, config: VAEConfig | None = None) -> AutoencoderKL:
    """Build an AutoencoderKL on the meta device and load it strictly, reading ``source`` once.

    ``source``: a diffusers model folder or its ``vae/`` (sizes from its config.json), an SD single file or a
    standalone VAE file (layout, diffusers or LDM, from the keys; sizes from the tensors, see
    :func:`vae_config_from_state`), or a :class:`Checkpoint` already read; ``config`` overrides the sizes.
    Returns the model in eval mode on ``device`` in ``dtype``. CheckpointError names the file and the
    missing/unexpected keys.
    """
    what = "VAE weights"
    part = read_checkpoint(source, what).part("vae", what)
    file_config = None
    if part.config:
        with naming(part.path / "config.json", "not a usable AutoencoderKL config"):
            file_config = vae_config_from_diffusers(part.config)
        part.require_weights(what)
    native = vae_state_to_native(part.state)
    if native is None:
        raise CheckpointError(f"{part.where}: contains no VAE weights, it {part.looks} (expected "
                              "encoder.down*/decoder.up* keys, optionally under first_stage_model.)")
    cfg = config or file_config or vae_config_from_state(native, part.where)
    with torch.device("meta"):
        model = AutoencoderKL(cfg).to(dtype)
    load_strict(model, native, part.where, f"an AutoencoderKL VAE with {cfg}", device=device, file=part.file)
    return model.to(device).eval()
