"""LoRA file layouts: parse kohya / attention-processor LoRA tensors and map them onto native module names.

Two on-disk layouts are understood:

* **kohya** (sd-scripts, civitai): ``lora_unet_<module path with "_">.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` and ``lora_te_text_model_<...>`` for the CLIP text encoder. The UNet
  path is either the diffusers one (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
  or the LDM one some tools write (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
  ``lora_unet_input_blocks_1_0_in_layers_2``...). Linear targets have 2-D up/down; conv targets
  (LoCon) have a down kernel of the target's size (1x1 or 3x3) and a 1x1 up kernel.
* **processor** (original AnimateDiff MotionLoRA ``v2_lora_*.ckpt`` and the v3 domain adapter
  ``v3_sd15_adapter.ckpt``): ``<module path>.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``
  where ``<module path>`` is the attention module in diffusers / original motion-module naming
  (``...attention_blocks.0`` or ``...transformer_blocks.0.attn1``); ``to_out`` means ``to_out.0``.

The kohya flattening (``.`` -> ``_``) is ambiguous to undo by splitting, so names are resolved by
flattening every weight-carrying module name of the target model and looking the key up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$")
_PROCESSOR_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}

# LDM (original Stable Diffusion) names inside a ResBlock / the outer layers -> diffusers names.
_LDM_RESNET = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj",
               "out_layers_0": "norm2", "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_OUTER = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
              "input_blocks_0_0": "conv_in", "out_0": "conv_norm_out", "out_2": "conv_out"}
_LDM_BLOCK = re.compile(r"^(?P<kind>input_blocks|output_blocks)_(?P<i>\d+)_(?P<m>\d+)(?:_(?P<rest>.+))?$")
_LDM_MID = re.compile(r"^middle_block_(?P<m>\d+)_(?P<rest>.+)$")


@dataclass
class LoraPair:
    """One low-rank update ``delta = ratio * up @ down`` for one target module.

    part: "unet" or "text_encoder". name: the module name as written in the file (kohya: flattened
    with ``_`` and without the prefix; processor: the dotted native module path). down: (r, in[, kh, kw]),
    up: (out, r[, 1, 1]). alpha: kohya's ``alpha`` (None when absent or for processor files).
    """

    part: str
    style: str  # "kohya" or "processor"
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: tuple[str, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def ratio(self) -> float:
        """The factor in front of ``up @ down``: alpha / rank for kohya (alpha defaults to rank), else 1."""
        if self.style != "kohya" or not self.alpha:  # kohya: alpha 0 or missing means "no scaling"
            return 1.0
        return self.alpha / self.rank


def parse_lora(state: Mapping[str, torch.Tensor], source: str = "<memory>") -> list[LoraPair]:
    """Group the tensors of a LoRA file into :class:`LoraPair` s.

    Raises CheckpointError naming ``source`` for keys of an unknown layout (LyCORIS LoHa/LoKr, DoRA,
    SDXL ``lora_te1_``...), a down without its up (or the reverse) and ranks that do not agree.
    """
    groups: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        found = _classify(key)
        if found is None:
            unknown.append(key)
            continue
        part, style, name, role = found
        groups.setdefault((part, style, name), {})[role] = (key, value)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not in a supported LoRA layout (kohya lora_unet_/"
                              f"lora_te_ with lora_down/lora_up/alpha, or MotionLoRA ...processor.to_q_lora.down."
                              f"weight): {_few(sorted(unknown))}")
    pairs = []
    for (part, style, name), roles in groups.items():
        keys = tuple(k for k, _ in roles.values())
        if "down" not in roles or "up" not in roles:
            raise CheckpointError(f"{source}: LoRA for {name!r} needs both down and up weights, found {list(keys)}")
        down, up = roles["down"][1], roles["up"][1]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or \
                (up.dim() == 4 and up.shape[2:] != (1, 1)):
            raise CheckpointError(f"{source}: LoRA for {name!r} has incompatible shapes down {tuple(down.shape)} "
                                  f"and up {tuple(up.shape)} (expected down (r, in[, kh, kw]), up (out, r[, 1, 1]))")
        alpha = float(roles["alpha"][1].float()) if "alpha" in roles else None
        pairs.append(LoraPair(part, style, name, down, up, alpha, keys))
    return pairs


def _classify(key: str) -> tuple[str, str, str, str] | None:
    """(part, style, name, role) of one LoRA key, or None when it is not a known LoRA key."""
    for prefix, part in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, role in _KOHYA_SUFFIXES.items():
                if key.endswith(suffix):
                    return part, "kohya", key[len(prefix):-len(suffix)], role
            return None
    m = _PROCESSOR_KEY.match(key)
    if m:
        return "unet", "processor", f"{m['module']}.{_PROCESSOR_PROJ[m['proj']]}", m["dir"]
    return None


def flat_module_table(module_names: Iterable[str], part: str) -> dict[str, str]:
    """Map kohya-flattened names to native dotted module names.

    module_names: names of the weight-carrying modules of the native model (``unet`` keys are diffusers
    paths; ``text_encoder`` keys are transformers paths without ``text_model.``, so the kohya name
    ``text_model_encoder_layers_0_self_attn_q_proj`` is listed with that prefix).
    """
    prefix = "text_model_" if part == "text_encoder" else ""
    return {prefix + name.replace(".", "_"): name for name in module_names}


def ldm_to_diffusers_flat(name: str, layers_per_block: int) -> str | None:
    """Translate a flattened LDM UNet module name to the flattened diffusers one (None if not LDM).

    ``input_blocks_{k}_{m}``: level ``(k-1) // (L+1)``, resnet/attention ``(k-1) % (L+1)``, and the
    last slot of a level holds the downsampler (``op``); ``output_blocks_{k}_{m}``: level ``k // (L+1)``
    with ``L+1`` layers, the upsampler sits after the resnet (and attention) as ``..._conv``.
    """
    if name in _LDM_OUTER:
        return _LDM_OUTER[name]
    per_level = layers_per_block + 1
    m = _LDM_MID.match(name)
    if m:
        slot, rest = int(m["m"]), m["rest"]
        if slot == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{slot // 2}_{_LDM_RESNET.get(rest, rest)}"
    m = _LDM_BLOCK.match(name)
    if not m or not m["rest"]:
        return None
    index, slot, rest = int(m["i"]), int(m["m"]), m["rest"]
    if m["kind"] == "input_blocks":
        if index == 0:
            return None
        level, layer = divmod(index - 1, per_level)
        if layer == layers_per_block:  # the downsampler's conv is called "op" in LDM
            return f"down_blocks_{level}_downsamplers_0_conv" if rest == "op" else None
        if slot == 0:
            return f"down_blocks_{level}_resnets_{layer}_{_LDM_RESNET.get(rest, rest)}"
        return f"down_blocks_{level}_attentions_{layer}_{rest}"
    level, layer = divmod(index, per_level)
    if slot == 0:
        return f"up_blocks_{level}_resnets_{layer}_{_LDM_RESNET.get(rest, rest)}"
    if rest == "conv":
        return f"up_blocks_{level}_upsamplers_0_conv"
    return f"up_blocks_{level}_attentions_{layer}_{rest}"


def resolve_target(pair: LoraPair, table: Mapping[str, str], layers_per_block: int | None) -> str | None:
    """The native dotted module name a pair updates, or None if the model has no such module."""
    if pair.style == "processor":
        return pair.name if pair.name in table.values() else None
    if pair.name in table:
        return table[pair.name]
    if pair.part == "unet" and layers_per_block is not None:
        flat = ldm_to_diffusers_flat(pair.name, layers_per_block)
        if flat is not None:
            return table.get(flat)
    return None


def lora_delta(pair: LoraPair, weight_shape: torch.Size, source: str = "<memory>") -> torch.Tensor:
    """``ratio * up @ down`` in float32, shaped like the target weight (linear or conv).

    A conv LoRA (down (r, in, kh, kw), up (out, r, 1, 1)) gives (out, in, kh, kw); a 2-D LoRA on a
    1x1 conv and a 1x1 conv LoRA on a linear layer are reshaped, as kohya does.
    """
    down = pair.down.float().flatten(1)  # (r, in * kh * kw)
    up = pair.up.float().flatten(1)  # (out, r)
    delta = (up @ down) * pair.ratio
    kernel = tuple(pair.down.shape[2:]) if pair.down.dim() == 4 else (1, 1)
    target_kernel = tuple(weight_shape[2:]) if len(weight_shape) == 4 else (1, 1)
    if delta.numel() != weight_shape.numel() or kernel != target_kernel or delta.shape[0] != weight_shape[0]:
        raise CheckpointError(f"{source}: LoRA {pair.keys[0]} gives an update of shape {tuple(delta.shape)} "
                              f"(kernel {kernel}) that does not fit the weight {tuple(weight_shape)}")
    return delta.reshape(weight_shape)


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
