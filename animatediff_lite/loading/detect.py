"""What a weights path holds, from folder contents and key patterns (never from file names).

``detect_layout(path)`` returns one of :data:`LAYOUTS`; ``layout_of_keys(keys)`` is the same decision
on a list of state-dict keys. Unknown content raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError
from .io import SAFETENSORS_SUFFIXES, _looks_like_safetensors, read_safetensors_metadata, read_state_dict
from .motion_load import NATIVE_FORMAT as NATIVE_MOTION_FORMAT

LAYOUTS: dict[str, str] = {
    "diffusers_folder": "a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/)",
    "diffusers_motion_adapter": "a diffusers MotionAdapter (keys ...motion_modules.N.transformer_blocks...)",
    "ldm_single_file": "an LDM / civitai single-file model (model.diffusion_model.*, first_stage_model.*, ...)",
    "original_motion_module": "an original AnimateDiff motion module (...motion_modules.N.temporal_transformer...)",
    "native": "an animatediff-lite video UNet (UNet keys plus original-layout motion modules)",
    "native_motion_module": "an animatediff-lite motion module (original keys, MotionConfig in the metadata)",
    "diffusers_motion_unet": "a diffusers UNetMotionModel (UNet keys plus diffusers motion modules)",
    "kohya_lora": "a kohya LoRA (lora_unet_* / lora_te_* with lora_down/lora_up/alpha)",
    "motion_lora": "an AnimateDiff MotionLoRA (...motion_modules...processor.to_q_lora.down/up)",
    "adapter_lora": "an AnimateDiff v3 domain adapter LoRA (...processor.to_q_lora.down/up on spatial layers)",
    "diffusers_lora": "a diffusers/PEFT LoRA (...lora_A/lora_B or ...lora.down/up)",
    "diffusers_unet": "a diffusers UNet2DConditionModel state dict",
    "diffusers_vae": "a diffusers AutoencoderKL state dict",
    "clip_text_encoder": "a CLIP text encoder state dict",
}

LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of a weights folder or file: a key of :data:`LAYOUTS`.

    Folders are judged by their config files (``model_index.json``, ``unet/config.json``, a
    ``config.json`` naming ``MotionAdapter``); files by their tensor names (a safetensors header is read
    without loading tensors; pickles are read with ``weights_only``). Raises CheckpointError if missing
    or unrecognised.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected model weights)")
    if path.is_dir():
        return _folder_layout(path)
    layout = layout_of_keys(read_keys(path), path)
    if layout == "original_motion_module" and _is_safetensors(path):
        if read_safetensors_metadata(path).get("format") == NATIVE_MOTION_FORMAT:
            return "native_motion_module"
    return layout


def read_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a weights file (wrappers and a ``module.`` prefix removed)."""
    path = Path(path)
    if _is_safetensors(path):
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a readable safetensors file (bad header)")
        keys = [k for k in header if k != "__metadata__"]
        if keys and all(k.startswith("module.") for k in keys):
            keys = [k[len("module."):] for k in keys]
        return keys
    return list(read_state_dict(path, "model weights"))


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES or (path.is_file() and path.stat().st_size >= 9
                                                           and _looks_like_safetensors(path))


def layout_of_keys(keys: Iterable[str], path: str | os.PathLike = "<memory>") -> str:
    """The layout of a state dict from its key names; CheckpointError if none fits."""
    keys = list(keys)
    if not keys:
        raise CheckpointError(f"{path}: contains no tensors; expected model weights")
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya_lora"
    if has("_lora.down.") or has("_lora.up."):
        return "motion_lora" if has("motion_modules.") else "adapter_lora"
    if has(".lora_A.") or has(".lora_B.") or has(".lora.down.") or has(".lora.up."):
        return "diffusers_lora"
    if any(k.startswith(LDM_PREFIXES) for k in keys):
        return "ldm_single_file"
    unet_body = "conv_in.weight" in keys and has("time_embedding.")
    if has("motion_modules."):
        if has(".temporal_transformer."):
            return "native" if unet_body else "original_motion_module"
        return "diffusers_motion_unet" if unet_body else "diffusers_motion_adapter"
    if unet_body:
        return "diffusers_unet"
    if has("encoder.conv_in.") and has("decoder.conv_in."):
        return "diffusers_vae"
    if has("embeddings.token_embedding.weight"):
        return "clip_text_encoder"
    raise CheckpointError(f"{path}: unrecognised weights ({len(keys)} tensors, e.g. {', '.join(keys[:3])}); "
                          f"expected one of: {'; '.join(LAYOUTS.values())}")


def _folder_layout(path: Path) -> str:
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return "diffusers_folder"
    config = path / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{config}: unreadable config.json ({e})") from e
        kinds = {"MotionAdapter": "diffusers_motion_adapter", "UNetMotionModel": "diffusers_motion_unet",
                 "UNet2DConditionModel": "diffusers_unet", "AutoencoderKL": "diffusers_vae",
                 "CLIPTextModel": "clip_text_encoder"}
        if name in kinds:
            return kinds[name]
    raise CheckpointError(f"{path}: a folder that is neither a diffusers model folder (model_index.json or "
                          "unet/config.json) nor a diffusers MotionAdapter (config.json); pass a model folder or file")
