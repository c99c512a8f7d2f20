"""Merge LoRA, MotionLoRA and the v3 domain adapter into model weights, and unmerge them exactly.

Convention (the one kohya / A1111 / ComfyUI users know)::

    kohya LoRA (lora_unet_* / lora_te_*):   W += scale * (alpha / rank) * up @ down
        alpha is the file's ``.alpha`` tensor; missing (or 0) means alpha = rank, i.e. no extra factor.
    MotionLoRA and the v3 adapter (...processor.to_q_lora.down/up.weight):   W += scale * up @ down

Note that the original AnimateDiff ``convert_lora`` ignores ``.alpha`` (it applies ``scale * up @ down``);
for a kohya file whose alpha differs from its rank, pass ``scale * rank / alpha`` to get upstream's result.
The update is computed in float32 and then cast to the parameter's dtype (LoRA files are often fp16).
Unmerging restores a copy of the original weights kept on the CPU, so it is bit-exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checks import finite_number
from .config import UNetConfig
from .errors import CheckpointError
from .loading.checkpoint import Checkpoint, read_checkpoint
from .loading.lora_map import LoraPair, flat_module_table, lora_delta, parse_lora, resolve_target
from .loading.unet_map import unet_config_from_state

KINDS = ("unet", "text_encoder", "motion")


@dataclass
class MergeHandle:
    """What :func:`merge_lora` changed: the module and the original weights (CPU copies) by parameter name."""

    module: nn.Module
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "<memory>"
    kind: str = "unet"

    @property
    def merged(self) -> bool:
        return bool(self.originals)


def merge_lora(module: nn.Module, lora_state: Mapping[str, torch.Tensor] | Sequence[LoraPair], scale: float = 1.0,
               kind: str = "unet", source: str = "<memory>") -> MergeHandle:
    """Add the LoRA updates of ``lora_state`` for one model part into ``module``'s weights in place.

    kind: "unet" (kohya ``lora_unet_*`` keys, diffusers or LDM names, and processor-style keys such as
    the v3 domain adapter), "text_encoder" (kohya ``lora_te_*`` keys) or "motion" (MotionLoRA: processor
    keys that must all target ``motion_modules``). Keys meant for another part are skipped, so one kohya
    file is merged with one call per part. Raises CheckpointError naming ``source`` for keys of an
    unknown layout or targeting modules ``module`` does not have.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    scale = finite_number(f"LoRA scale for {source}", scale)
    pairs = list(lora_state) if _is_pairs(lora_state) else parse_lora(lora_state, source)
    part = "text_encoder" if kind == "text_encoder" else "unet"
    pairs = [p for p in pairs if p.part == part]
    if kind == "motion":
        spatial = [p.keys[0] for p in pairs if p.style != "processor" or ".motion_modules." not in f".{p.name}"]
        if spatial:
            raise CheckpointError(f"{source}: not a MotionLoRA: {len(spatial)} keys do not target motion modules "
                                  f"(e.g. {spatial[0]}); pass spatial LoRAs such as the v3 adapter as a LoRA")
    handle = MergeHandle(module, source=source, kind=kind)
    if not pairs:
        return handle
    weights = {name: mod.weight for name, mod in module.named_modules()
               if isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() in (2, 4)}
    table = flat_module_table(weights, part)
    config = _unet_config(module, pairs, table) if part == "unet" else None
    targets, missing = [], []
    for pair in pairs:
        name = resolve_target(pair, table, config)
        (missing.append(pair.keys[0]) if name is None else targets.append((name, pair)))
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} LoRA entries target modules this {part} does not have: "
                              f"{_few(missing)}")
    deltas = {}  # check every shape before touching any weight
    for name, pair in targets:
        delta = lora_delta(pair, weights[name].shape, source)
        deltas[name] = deltas[name] + delta if name in deltas else delta
    with torch.no_grad():
        for name, delta in deltas.items():
            w = weights[name]
            handle.originals[f"{name}.weight"] = w.detach().to("cpu", copy=True)
            w.copy_((w.float() + scale * delta.to(w.device)).to(w.dtype))
    return handle


def unmerge(handle: MergeHandle | Sequence[MergeHandle]) -> None:
    """Restore the weights a merge changed, bit for bit. A list of handles is undone in reverse order."""
    if not isinstance(handle, MergeHandle):
        for h in reversed(list(handle)):
            unmerge(h)
        return
    params = dict(handle.module.named_parameters())
    with torch.no_grad():
        for name, original in handle.originals.items():
            params[name].copy_(original)
    handle.originals = {}


def apply_loras(pipe: Any, loras: Sequence[tuple[str | os.PathLike | Checkpoint, float]] = (),
                motion_loras: Sequence[tuple[str | os.PathLike | Checkpoint, float]] = ()) -> list[MergeHandle]:
    """Merge LoRA files into a pipeline (``pipe.unet``, ``pipe.text_encoder``); returns the handles.

    loras: kohya LoRAs (UNet and/or text encoder) and the v3 domain adapter, each ``(path, scale)``.
    motion_loras: MotionLoRAs ``(path, scale)``. A path may also be a checkpoint already read with
    :func:`~animatediff_lite.loading.checkpoint.read_checkpoint`. ``unmerge(handles)`` undoes all of them exactly.
    """
    handles: list[MergeHandle] = []
    for path, scale in (*loras, *motion_loras):  # all scales before the first merge
        finite_number(f"LoRA scale for {path}", scale)
    try:
        for path, scale in loras:
            checkpoint = _read(path, "a LoRA")
            pairs = parse_lora(checkpoint.state, checkpoint.where)
            handles.append(merge_lora(pipe.unet, pairs, scale, "unet", checkpoint.where))
            if any(p.part == "text_encoder" for p in pairs):
                handles.append(merge_lora(pipe.text_encoder, pairs, scale, "text_encoder", checkpoint.where))
        for path, scale in motion_loras:
            checkpoint = _read(path, "a MotionLoRA")
            handles.append(merge_lora(pipe.unet, checkpoint.state, scale, "motion", checkpoint.where))
    except BaseException:
        unmerge(handles)  # leave the pipeline as it was
        raise
    return handles


def _read(source: str | os.PathLike | Checkpoint, what: str) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else read_checkpoint(source, what)


def _is_pairs(obj: Any) -> bool:
    return isinstance(obj, Sequence) and all(isinstance(p, LoraPair) for p in obj)


def _unet_config(module: nn.Module, pairs: Sequence[LoraPair], table: Mapping[str, str]) -> UNetConfig | None:
    """The UNet's config, needed only when some kohya names are in the LDM layout (read off the weights if the
    module carries none)."""
    if all(p.style == "processor" or p.name in table for p in pairs):
        return None
    config = getattr(module, "config", None)
    if isinstance(config, UNetConfig):
        return config
    try:
        return unet_config_from_state({k: v for k, v in module.state_dict().items()})
    except ValueError:
        return None


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
