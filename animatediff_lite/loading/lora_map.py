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

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..config import UNetConfig
from ..errors import CheckpointError
from .io import few
from .unet_map import RESNET_LDM, ldm_block_table

_KOHYA_KEY = re.compile(r"^lora_(?P<part>unet|te)_(?P<name>.+)\.(?:lora_(?P<role>down|up)\.weight|alpha)$")
_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$")
_PROCESSOR_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}

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
    classified = {key: _classify(key) for key in state}
    unknown = [key for key, found in classified.items() if found is None]
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not in a supported LoRA layout (kohya lora_unet_/"
                              f"lora_te_ with lora_down/lora_up/alpha, or MotionLoRA ...processor.to_q_lora.down."
                              f"weight): {few(sorted(unknown), 5)}")
    groups: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, (part, style, name, role) in classified.items():
        groups.setdefault((part, style, name), {})[role] = (key, state[key])
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
    if m := _KOHYA_KEY.match(key):
        part = "unet" if m["part"] == "unet" else "text_encoder"
        return part, "kohya", m["name"], m["role"] or "alpha"
    if m := _PROCESSOR_KEY.match(key):
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


def ldm_to_diffusers_flat(name: str, config: UNetConfig) -> str | None:
    """Translate a flattened LDM UNet module name to the flattened diffusers one (None if not LDM).

    Derived from the LDM UNet key table (:func:`~animatediff_lite.loading.unet_map.ldm_block_table` and
    ``RESNET_LDM``) with ``.`` flattened to ``_``, so the two formats cannot drift apart.
    """
    blocks, resnet = _flat_ldm_tables(config)
    for ldm, (native, is_resnet) in blocks:
        if name != ldm and not name.startswith(ldm + "_"):
            continue
        rest = name[len(ldm) + 1:]
        if is_resnet:
            inner = next((k for k in resnet if rest == k or rest.startswith(k + "_")), None)
            if inner is not None:
                rest = resnet[inner] + rest[len(inner):]
        return f"{native}_{rest}" if rest else native
    return None


@functools.lru_cache(maxsize=8)
def _flat_ldm_tables(config: UNetConfig) -> tuple[list[tuple[str, tuple[str, bool]]], dict[str, str]]:
    flat = lambda name: name.replace(".", "_")  # noqa: E731
    blocks = sorted(((flat(ldm), (flat(native), is_resnet)) for native, ldm, is_resnet in ldm_block_table(config)),
                    key=lambda row: -len(row[0]))  # longest prefix first: input_blocks_1_0_op before input_blocks_1_0
    return blocks, {flat(ldm): flat(native) for native, ldm in RESNET_LDM.items()}


def resolve_target(pair: LoraPair, table: Mapping[str, str], config: UNetConfig | None) -> str | None:
    """The native dotted module name a pair updates, or None if the model has no such module.

    config: the UNet's config, needed to read kohya names written in the LDM layout.
    """
    if pair.style == "processor":
        return pair.name if pair.name in table.values() else None
    if pair.name in table:
        return table[pair.name]
    flat = ldm_to_diffusers_flat(pair.name, config) if pair.part == "unet" and config is not None else None
    return table.get(flat)  # None when the name is not an LDM one either


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

