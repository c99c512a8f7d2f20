"""What a weights file or folder holds, as a JSON-ready dict (the CLI ``info`` command).

Every kind of file the library loads is described from one read: base models (diffusers folders, LDM single
files, part folders), motion modules of every layout, LoRA kinds and the embedded default model.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from .checkpoint import naming, read_checkpoint
from .controlnet_map import CONTROLNET_LAYOUTS, describe_controlnet
from .default_model import read_default_model
from .detect import LORA_LAYOUTS, MOTION_LAYOUTS, unknown_error
from .lora_map import parse_lora
from .motion_load import read_motion_module
from .sparsectrl_map import SPARSE_LAYOUTS, describe_sparsectrl


def describe(path: str | os.PathLike) -> dict:
    """A JSON-ready description of a weights file or folder: layout, kind, the reason for the layout,
    tensor/parameter counts and dtypes, plus per-kind details (motion generation, LoRA ranks, the default
    model's sizes and sampling defaults, a model folder's parts). Raises CheckpointError naming the file."""
    checkpoint = read_checkpoint(path, "weights the library loads (a model, motion module or LoRA)")
    if checkpoint.layout == "unknown":
        raise unknown_error(checkpoint.where, checkpoint.reason)
    info: dict = {"path": str(path), "layout": checkpoint.layout, "kind": checkpoint.kind,
                  "reason": checkpoint.reason}
    files = list(checkpoint.parts.values()) if checkpoint.parts else [checkpoint]
    if checkpoint.parts:
        info["parts"] = {name: (part.where if part.weights is not None else "no weights file")
                         for name, part in checkpoint.parts.items()}
    if checkpoint.layout in MOTION_LAYOUTS:
        _, mi = read_motion_module(checkpoint)
        info.update(generation=mi.version, reason=mi.reason, max_position_len=mi.max_position_len,
                    mid_block=mi.mid_block, channels=list(mi.channels))
    elif checkpoint.layout in LORA_LAYOUTS:
        pairs = parse_lora(checkpoint.state, checkpoint.where)
        alphas = sorted({p.alpha for p in pairs if p.alpha is not None})
        info.update(lora_modules=len(pairs), ranks=sorted({p.rank for p in pairs}),
                    parts=sorted({p.part for p in pairs}), alphas=alphas)
    elif checkpoint.layout in CONTROLNET_LAYOUTS:
        info.update(describe_controlnet(checkpoint))
    elif checkpoint.layout in SPARSE_LAYOUTS:
        info.update(describe_sparsectrl(checkpoint))
    elif checkpoint.layout == "default_model":
        _, config, metadata = read_default_model(checkpoint)
        info.update(generation=config.motion.version if config.motion else None,
                    unet_channels=list(config.unet.block_out_channels), text_width=config.clip.hidden_size,
                    vae_channels=list(config.vae.block_out_channels))
        with naming(checkpoint.where, "the 'sample' metadata is not JSON"):
            info["sample_defaults"] = json.loads(metadata.get("sample", "{}"))
    tensors = [v for part in files for v in part.state.values()]
    info.update(tensors=len(tensors), parameters=sum(v.numel() for v in tensors),  # shapes only: no data is read
                dtypes=dict(Counter(str(v.dtype).replace("torch.", "") for v in tensors)))
    return info
