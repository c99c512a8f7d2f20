"""The original AnimateDiff sample configs (ToonYou, Lyriel, ..., MotionLoRA) as data: ``assets/presets.toml``.

A preset names its model files relative to a models folder laid out like upstream's ``models/``::

    DIR/StableDiffusion/stable-diffusion-v1-5/      the SD1.5 base (diffusers folder)
    DIR/Motion_Module/mm_sd_v14.ckpt, mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt
    DIR/DreamBooth_LoRA/toonyou_beta3.safetensors, ...  (personalised models and kohya LoRAs)
    DIR/MotionLoRA/v2_lora_ZoomIn.ckpt, ...

:meth:`Preset.runs` pairs prompts, negative prompts and seeds as upstream's ``scripts/animate.py`` does.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import sampler_name
from .errors import CheckpointError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the tomli backport (same API)
    import tomli as tomllib

PRESETS_FILE = Path(__file__).parent / "assets" / "presets.toml"


@dataclass(frozen=True)
class Preset:
    """One reference config. Paths are relative to a models folder; seeds may exceed 2**63 (uint64)."""

    name: str
    source: str
    base: str
    motion_modules: tuple[str, ...]
    dreambooth: str | None
    lora: str | None
    lora_scale: float
    motion_loras: tuple[tuple[str, float], ...]
    seeds: tuple[int, ...]
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int
    guidance_scale: float
    width: int
    height: int
    frames: int
    fps: float
    sampler: str = "ddim"  # a name of animatediff_lite.samplers.SAMPLERS (AnimateLCM: "lcm")
    sparsectrl: str | None = None  # v3 SparseCtrl presets: the SparseCtrl file and its key frames
    control_images: tuple[tuple[int, str], ...] = ()

    def runs(self) -> list[tuple[str, str, int | None]]:
        """(prompt, negative prompt, seed) per sample, like upstream: a single negative prompt or seed is
        repeated for every prompt, then the lists are zipped (so extra entries are ignored). Seed -1 -> None
        (a random seed, as upstream's ``torch.seed()``)."""
        n = len(self.prompts)
        negatives = list(self.negative_prompts) * n if len(self.negative_prompts) == 1 else list(self.negative_prompts)
        seeds = list(self.seeds) * n if len(self.seeds) == 1 else list(self.seeds)
        return [(p, neg, None if s == -1 else s) for p, neg, s in zip(self.prompts, negatives, seeds, strict=False)]

    def files(self, models_dir: str | os.PathLike) -> dict[str, Any]:
        """Absolute model paths inside ``models_dir``; CheckpointError listing every missing one and where.

        Returns {"base": Path, "motion_modules": [Path], "dreambooth": Path | None, "loras": [(Path, scale)],
        "motion_loras": [(Path, scale)], "sparsectrl": Path | None, "control_images": {frame: Path}}.
        """
        root = Path(models_dir)
        found = {
            "base": root / self.base,
            "motion_modules": [root / m for m in self.motion_modules],
            "dreambooth": root / self.dreambooth if self.dreambooth else None,
            "loras": [(root / self.lora, self.lora_scale)] if self.lora else [],
            "motion_loras": [(root / p, s) for p, s in self.motion_loras],
            "sparsectrl": root / self.sparsectrl if self.sparsectrl else None,
            "control_images": {frame: root / p for frame, p in self.control_images},
        }
        wanted = [found["base"], *found["motion_modules"], *(p for p, _ in found["loras"] + found["motion_loras"])]
        wanted += [p for p in (found["dreambooth"], found["sparsectrl"]) if p is not None]
        wanted += list(found["control_images"].values())
        missing = [p for p in wanted if not p.exists()]
        if missing:
            raise CheckpointError(f"preset {self.name}: {len(missing)} model files missing under {root}: "
                                  f"{', '.join(str(p.relative_to(root)) for p in missing)} (expected layout: "
                                  "StableDiffusion/stable-diffusion-v1-5/ diffusers folder, Motion_Module/*.ckpt, "
                                  "DreamBooth_LoRA/*.safetensors, MotionLoRA/*.ckpt, SparseCtrl/*.ckpt, and "
                                  "upstream's __assets__/demos/ key-frame images)")
        return found


def load_presets(path: str | os.PathLike | None = None) -> dict[str, Preset]:
    """All presets of a presets TOML file (default: the one shipped in the package), by name."""
    path = Path(path) if path is not None else PRESETS_FILE
    with open(path, "rb") as f:
        data = tomllib.load(f)
    defaults = data.pop("defaults", {})
    presets = {}
    for name, table in data.items():
        entry = {**defaults, **table}
        try:
            presets[name] = _preset(name, entry)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: preset {name!r} is malformed ({type(e).__name__}: {e})") from e
    return presets


def get_preset(name: str) -> Preset:
    """A shipped preset by name (case-insensitive); ValueError listing the names when unknown."""
    presets = load_presets()
    by_lower = {k.lower(): v for k, v in presets.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets)}")
    return by_lower[name.lower()]


def _preset(name: str, e: dict[str, Any]) -> Preset:
    seeds = e["seeds"] if isinstance(e["seeds"], list) else [e["seeds"]]
    prompts = tuple(e["prompts"])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return Preset(
        name=name, source=e.get("source", ""), base=e["base"], motion_modules=tuple(e["motion_modules"]),
        dreambooth=e.get("dreambooth") or None, lora=e.get("lora") or None, lora_scale=float(e["lora_scale"]),
        motion_loras=tuple((m["path"], float(m["scale"])) for m in e.get("motion_loras", [])),
        seeds=tuple(int(s) for s in seeds), prompts=prompts,
        negative_prompts=tuple(e.get("negative_prompts") or [""]), steps=int(e["steps"]),
        guidance_scale=float(e["guidance_scale"]), width=int(e["width"]), height=int(e["height"]),
        frames=int(e["frames"]), fps=float(e["fps"]), sampler=sampler_name(e.get("sampler", "ddim")),
        sparsectrl=e.get("sparsectrl") or None,
        control_images=tuple((int(c["frame"]), str(c["path"])) for c in e.get("control_images", [])),
    )


