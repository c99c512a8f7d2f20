"""The app's engine, without Gradio: form values -> a checked job -> a result in the output folder.

Models stay loaded between requests and are loaded again only when the model selection changes. Form values
reach the library as typed (no clamping or rounding): the library's own checks produce the error messages.
"""

from __future__ import annotations

import importlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..batch import load_for, run_job
from ..jobs import OUTPUT_FORMATS, Job, parse_job, sampling_keys
from .models import EMBEDDED, NONE

# DESIGN.md's sampler names, shown when the library takes sampler= but does not list its names.
DESIGN_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
VIDEO_SUFFIXES = tuple(f".{f}" for f in OUTPUT_FORMATS)
# Form keys -> the labels the page shows (messages name what the user sees).
LABELS = {"steps": "Steps", "guidance_scale": "Guidance", "frames": "Frames", "height": "Height", "width": "Width",
          "context_frames": "Context frames", "context_overlap": "Context overlap", "lora_scale": "LoRA scale",
          "motion_lora_scale": "MotionLoRA scale", "control_images": "Key frames"}


def samplers() -> list[str]:
    """The samplers the library has: DDIM alone while ``Pipeline.__call__`` takes no ``sampler=``."""
    if "sampler" not in sampling_keys():
        return ["ddim"]
    try:
        module = importlib.import_module("animatediff_lite.samplers")  # present once samplers are in the library
    except ImportError:
        module = None
    for attr in ("SAMPLERS", "SAMPLER_NAMES", "NAMES"):
        names = getattr(module, attr, None)
        if names:
            return list(names)
    return list(DESIGN_SAMPLERS)


def _number(value, label: str):
    """A form number as typed: blank -> None (the model's default); text -> int or float; whole floats -> int.

    Nothing is clamped or rounded: 60.5 stays 60.5 and the library says what it expects.
    """
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        raise ValueError(f"{label} must be a number (or blank for the model's default), got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _key_frames(text: str) -> dict[str, str]:
    """The Key frames box: one ``FRAME:FILE`` per line (paths relative to the models folder) -> {frame: path}."""
    frames = {}
    for line in text.splitlines():
        frame, sep, path = line.strip().partition(":")
        if not line.strip():
            continue
        if not sep or not path.strip() or not frame.strip().isdigit():
            raise ValueError(f"{LABELS['control_images']}: expected one FRAME:FILE per line (e.g. 0:first.png), "
                             f"got {line.strip()!r}")
        frames[frame.strip()] = path.strip()
    return frames


def _seed(text) -> int | None:
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Seed must be a whole number (or blank for a random one), got {text!r}") from None


class Studio:
    """Makes results into ``output_dir`` from form values (see :meth:`generate`); one generation at a time."""

    def __init__(self, models_dir: str | os.PathLike | None, output_dir: str | os.PathLike, device: str = "cpu",
                 dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self.output_dir = Path(output_dir).resolve()
        self.device, self.dtype, self.backend = device, dtype, backend
        self._lock = threading.Lock()
        self._loaded: tuple[str, object] | None = None  # (model key, pipeline)
        self.loads = 0  # model loads so far (tested: a new prompt does not reload)
        self._counter = itertools.count()

    def job(self, form: dict, name: str) -> Job:
        """Form values (keys as :meth:`generate` documents) -> a checked Job named ``name``."""
        raw: dict = {"id": name, "prompt": form.get("prompt") or "", "seed": _seed(form.get("seed")),
                     "format": form.get("format") or "gif"}
        if form.get("negative_prompt"):
            raw["negative_prompt"] = form["negative_prompt"]
        for key in ("steps", "guidance_scale", "frames", "height", "width", "context_frames", "context_overlap"):
            value = _number(form.get(key), LABELS[key])
            if value is not None:
                raw[key] = value
        if "context_frames" not in raw:
            raw.pop("context_overlap", None)
        if form.get("sampler") and "sampler" in sampling_keys():
            raw["sampler"] = form["sampler"]
        elif form.get("sampler") not in (None, "", "ddim"):
            raise ValueError(f"Sampler {form['sampler']!r}: this version of the library has DDIM only")
        for key in ("base", "dreambooth", "motion_module"):
            value = form.get(key)
            if value and value not in (EMBEDDED, NONE):
                raw[key] = value
        for key in ("lora", "motion_lora"):
            value = form.get(key)
            if value and value != NONE:
                scale = _number(form.get(f"{key}_scale"), LABELS[f"{key}_scale"])
                raw[f"{key}s"] = [[value, 1.0 if scale is None else scale]]
        if form.get("sparsectrl") and form["sparsectrl"] != NONE:
            raw["sparsectrl"] = form["sparsectrl"]
        if (form.get("control_images") or "").strip():
            raw["control_images"] = _key_frames(form["control_images"])
        return parse_job(raw, "form", self.models_dir or Path.cwd(), name, name_id=False)

    def new_name(self) -> str:
        """A fresh result name: the time, then a counter (never an existing file)."""
        while True:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):03d}"
            if not any((self.output_dir / f"{name}{s}").exists() for s in (*VIDEO_SUFFIXES, ".json")):
                return name

    def generate(self, form: dict, progress: Callable[[float, str], None] | None = None) -> tuple[Path, dict]:
        """Make one result from form values; returns (video path, settings as in the sidecar).

        form keys: prompt, negative_prompt, sampler, steps, guidance_scale, seed (text), frames, height, width,
        context_frames, context_overlap, format (gif | mp4), base / dreambooth / motion_module / lora /
        motion_lora / sparsectrl (paths relative to the models folder, or the EMBEDDED / NONE entries), lora_scale,
        motion_lora_scale, control_images (SparseCtrl key frames: one FRAME:FILE per line).
        progress(fraction, text) is called after every denoising step.
        Raises ValueError / CheckpointError (or the library's error) with the message to show.
        """
        name = self.new_name()
        job = self.job(form, name)
        with self._lock:
            pipe = self._pipeline(job)
            total = [0]

            def on_step(i: int, t: int, latents: torch.Tensor) -> None:
                total[0] += 1
                if progress is not None:
                    steps = job.sample.get("steps") or pipe.sample_defaults.get("steps", 25)
                    progress(min(1.0, total[0] / max(1, int(steps))), f"step {total[0]}")

            return run_job(pipe, job, self.output_dir / job.filename, callback=on_step)

    def _pipeline(self, job: Job):
        if self._loaded is None or self._loaded[0] != job.model_key:
            self._loaded = None  # free the old models before loading the new ones
            self._loaded = (job.model_key, load_for(job, self.device, self.dtype, self.backend))
            self.loads += 1
        return self._loaded[1]

    def gallery(self, limit: int = 48) -> list[str]:
        """Past results in the output folder, newest first (video files that have a sidecar)."""
        if not self.output_dir.is_dir():
            return []
        found = [p for p in self.output_dir.iterdir()
                 if p.suffix in VIDEO_SUFFIXES and p.with_suffix(".json").exists() and not p.name.startswith(".")]
        found.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        return [str(p) for p in found[:limit]]
