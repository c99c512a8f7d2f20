"""What the app's model pickers offer: the files of an upstream-style models folder, and presets as form values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..presets import Preset

EMBEDDED = "embedded default model"
NONE = "(none)"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelChoices:
    """Picker entries: paths relative to the models folder (``StableDiffusion/stable-diffusion-v1-5``, ...)."""

    base: list[str]
    motion_module: list[str]
    dreambooth: list[str]
    motion_lora: list[str]
    sparsectrl: list[str] = field(default_factory=list)


def scan(models_dir: str | os.PathLike | None) -> ModelChoices:
    """List the models folder: StableDiffusion/ (diffusers folders and single files), Motion_Module/,
    DreamBooth_LoRA/ (personalised models and LoRAs alike), MotionLoRA/, SparseCtrl/ (files and diffusers
    folders). Without a folder: the embedded model."""
    if models_dir is None:
        return ModelChoices([EMBEDDED], [], [], [])
    root = Path(models_dir)
    if not root.is_dir():
        raise ValueError(f"--models-dir {root}: not a folder (expected StableDiffusion/, Motion_Module/, "
                         "DreamBooth_LoRA/, MotionLoRA/ inside)")

    def entries(sub: str, folders: bool = False) -> list[str]:
        where = root / sub
        if not where.is_dir():
            return []
        return sorted(f"{sub}/{p.name}" for p in where.iterdir()
                      if (p.is_dir() and folders) or (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES))

    return ModelChoices([EMBEDDED, *entries("StableDiffusion", folders=True)], entries("Motion_Module"),
                        entries("DreamBooth_LoRA"), entries("MotionLoRA"), entries("SparseCtrl", folders=True))


def key_frames_text(control_images) -> str:
    """SparseCtrl key frames ((frame, path) pairs) as the form's text: one ``FRAME:FILE`` per line."""
    return "\n".join(f"{frame}:{path}" for frame, path in control_images)


def preset_form(preset: Preset) -> dict:
    """A preset's first sample as form values (model paths relative to the models folder, as upstream; a v3
    SparseCtrl preset's file and key frames included)."""
    prompt, negative, seed = preset.runs()[0]
    lora = preset.motion_loras[0] if preset.motion_loras else (NONE, 1.0)
    return {"base": preset.base, "dreambooth": preset.dreambooth or NONE,
            "motion_module": preset.motion_modules[0] if preset.motion_modules else NONE,
            "lora": preset.lora or NONE, "lora_scale": preset.lora_scale,
            "motion_lora": lora[0], "motion_lora_scale": lora[1], "prompt": prompt, "negative_prompt": negative,
            "seed": "" if seed is None else str(seed), "steps": preset.steps, "guidance_scale": preset.guidance_scale,
            "frames": preset.frames, "height": preset.height, "width": preset.width, "sampler": preset.sampler,
            "sparsectrl": preset.sparsectrl or NONE, "control_images": key_frames_text(preset.control_images)}
