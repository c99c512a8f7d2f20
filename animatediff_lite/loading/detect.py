"""What a weights file holds: the one layout decision, from tensor names, metadata and config class names.

Pure functions of data (never paths); :func:`animatediff_lite.loading.checkpoint.read_checkpoint` reads a
file or folder once and calls :func:`decide_layout`. Unknown content raises :class:`CheckpointError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from ..errors import CheckpointError

LAYOUTS: dict[str, str] = {
    "diffusers_folder": "a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/)",
    "diffusers_motion_adapter": "a diffusers MotionAdapter (keys ...motion_modules.N.transformer_blocks...)",
    "ldm_single_file": "an LDM / civitai single-file model (model.diffusion_model.*, first_stage_model.*, ...)",
    "original_motion_module": "an original AnimateDiff motion module (...motion_modules.N.temporal_transformer...)",
    "native": "an animatediff-lite video UNet (UNet keys plus original-layout motion modules)",
    "native_motion_module": "an animatediff-lite motion module (original keys, MotionConfig in the metadata)",
    "default_model": "an animatediff-lite embedded default model (text_encoder./vae./unet. tensors + config metadata)",
    "diffusers_motion_unet": "a diffusers UNetMotionModel (UNet keys plus diffusers motion modules)",
    "kohya_lora": "a kohya LoRA (lora_unet_* / lora_te_* with lora_down/lora_up/alpha)",
    "motion_lora": "an AnimateDiff MotionLoRA (...motion_modules...processor.to_q_lora.down/up)",
    "adapter_lora": "an AnimateDiff v3 domain adapter LoRA (...processor.to_q_lora.down/up on spatial layers)",
    "diffusers_lora": "a diffusers/PEFT LoRA (...lora_A/lora_B or ...lora.down/up)",
    "diffusers_unet": "a diffusers UNet2DConditionModel state dict",
    "diffusers_vae": "a diffusers AutoencoderKL state dict",
    "clip_text_encoder": "a CLIP text encoder state dict",
    "diffusers_controlnet": "a diffusers ControlNetModel (controlnet_cond_embedding.*, controlnet_down_blocks.*)",
    "ldm_controlnet": "an original ControlNet (input_hint_block.*, zero_convs.*, bare or under control_model.)",
    "sparsectrl": "an original SparseCtrl (controlnet_cond_embedding + motion_modules.N.temporal_transformer)",
    "diffusers_sparsectrl": "a diffusers SparseControlNetModel (controlnet_cond_embedding + diffusers motion modules)",
    "unknown": "weights of no known layout",
}
BASE_LAYOUTS = ("diffusers_folder", "ldm_single_file")
MOTION_LAYOUTS = ("original_motion_module", "diffusers_motion_adapter", "native_motion_module", "native",
                  "diffusers_motion_unet")
LORA_LAYOUTS = ("kohya_lora", "motion_lora", "adapter_lora")

LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# safetensors metadata "format" values of this library's own files.
NATIVE_MOTION_FORMAT = "animatediff-lite/motion-module"
DEFAULT_MODEL_FORMAT = "animatediff-lite-default-model/1"
# diffusers / transformers config.json "_class_name" (or "architectures") -> layout of the folder's weights.
CONFIG_CLASSES: dict[str, str] = {
    "MotionAdapter": "diffusers_motion_adapter", "UNetMotionModel": "diffusers_motion_unet",
    "UNet2DConditionModel": "diffusers_unet", "AutoencoderKL": "diffusers_vae", "CLIPTextModel": "clip_text_encoder",
    "ControlNetModel": "diffusers_controlnet", "SparseControlNetModel": "diffusers_sparsectrl",
}


def decide_layout(keys: Iterable[str], metadata: Mapping[str, str] | None = None,
                  class_name: str | None = None) -> tuple[str, str]:
    """(layout, reason) of a state dict: a key of :data:`LAYOUTS` and a sentence saying why.

    metadata: the safetensors header metadata (this library's formats are recognised by it); class_name:
    the ``_class_name`` of a config.json beside the weights. Keys of no known layout give ``"unknown"`` (each
    loader then says what it expected). The reader never passes an empty state (it refuses files without tensors).
    """
    keys = list(keys)
    fmt = (metadata or {}).get("format")
    if fmt == DEFAULT_MODEL_FORMAT:
        return "default_model", f"the metadata format is {fmt!r}"
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya_lora", f"keys start with {'/'.join(KOHYA_PREFIXES[:2])}"
    if has("_lora.down.") or has("_lora.up."):
        if has("motion_modules."):
            return "motion_lora", "processor-style LoRA keys (..._lora.down/up) on motion modules"
        return "adapter_lora", "processor-style LoRA keys (..._lora.down/up) on spatial layers"
    if has(".lora_A.") or has(".lora_B.") or has(".lora.down.") or has(".lora.up."):
        return "diffusers_lora", "keys with .lora_A/.lora_B or .lora.down/.lora.up"
    if has("input_hint_block.") and has("zero_convs."):  # before LDM: old files also hold a whole SD model
        return "ldm_controlnet", "input_hint_block.* and zero_convs.* keys"
    if found := sorted({p for p in LDM_PREFIXES for k in keys if k.startswith(p)}):
        return "ldm_single_file", f"keys start with {', '.join(found)}"
    if class_name in CONFIG_CLASSES:
        return CONFIG_CLASSES[class_name], f"its config.json names {class_name}"
    if has("controlnet_cond_embedding.") and has("motion_modules."):
        if has(".temporal_transformer."):
            return "sparsectrl", "controlnet_cond_embedding.* and original-layout motion_modules.* keys"
        return "diffusers_sparsectrl", "controlnet_cond_embedding.* and diffusers-layout motion_modules.* keys"
    if has("controlnet_cond_embedding.") and has("controlnet_down_blocks."):
        return "diffusers_controlnet", "controlnet_cond_embedding.* and controlnet_down_blocks.* keys"
    unet_body = "conv_in.weight" in keys and has("time_embedding.")
    if has("motion_modules."):
        if has(".temporal_transformer."):
            if unet_body:
                return "native", "UNet keys plus motion_modules.*.temporal_transformer keys"
            if fmt == NATIVE_MOTION_FORMAT:
                return "native_motion_module", f"the metadata format is {fmt!r}"
            return "original_motion_module", "only motion_modules.*.temporal_transformer keys"
        if unet_body:
            return "diffusers_motion_unet", "UNet keys plus motion_modules.*.transformer_blocks keys"
        return "diffusers_motion_adapter", "only motion_modules.*.transformer_blocks keys (diffusers names)"
    if unet_body:
        return "diffusers_unet", "conv_in.weight and time_embedding.* keys"
    if has("encoder.conv_in.") and has("decoder.conv_in."):
        return "diffusers_vae", "encoder.conv_in and decoder.conv_in keys"
    if has("embeddings.token_embedding.weight"):
        return "clip_text_encoder", "an embeddings.token_embedding.weight key"
    return "unknown", f"no known layout fits its {len(keys)} tensors (e.g. {', '.join(keys[:3])})"


def unknown_error(path: str | os.PathLike, reason: str) -> CheckpointError:
    """The error for weights of no known layout, listing the layouts that are known."""
    known = "; ".join(v for k, v in LAYOUTS.items() if k != "unknown")
    return CheckpointError(f"{path}: unrecognised weights, {reason}; expected one of: {known}")

