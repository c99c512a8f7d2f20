"""ControlNets during sampling: condition frames, per-step scales and the residuals fed to the UNet3D.

A :class:`ControlUnit` is a loaded ControlNet with its scale (``load_pipeline(controlnets=[(file, scale)])``).
For one generation :func:`prepare_control` checks the condition videos (one per ControlNet, ``control_frames``)
and embeds them once (the condition embedding does not depend on the step); at every step
:meth:`Control.residuals` runs each active ControlNet on the model input, both CFG halves and every video of the
batch with the same condition frames, and sums their outputs as diffusers' ``MultiControlNetModel`` does.
A ControlNet acts at step i of N unless i/N < start or (i+1)/N > end (diffusers' control_guidance_start/end).

SparseCtrl (``load_pipeline(sparsectrl=file)``) joins the same sum: :func:`prepare_sparse` places the key frames
of ``control_images={frame: image}`` (VAE posterior means for the RGB variant, the images for scribble) with a
mask of ones on those frames and zeros elsewhere, embeds them once, and the encoder then runs on zeroed latents
at every step, as diffusers' ``AnimateDiffSparseControlNetPipeline`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .controlnet import ControlNet
from .video_input import VideoInput, read_video


@dataclass
class ControlUnit:
    """A loaded ControlNet, its residual scale and the file it came from (for messages)."""

    model: ControlNet
    scale: float = 1.0
    source: str = "<memory>"


@dataclass
class _Active:
    unit: ControlUnit
    start: float
    end: float
    embedded: torch.Tensor  # (F, C0, h, w): the condition frames through the condition embedding
    zero_input: bool = False  # SparseCtrl: the encoder sees zeros instead of the noisy latents


class Control:
    """The ControlNets of one generation with their embedded condition frames (see :func:`prepare_control`)."""

    def __init__(self, active: list[_Active]) -> None:
        self.active = active

    def residuals(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, step: int, num_steps: int,
                  frames: slice | None = None) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """Summed (down residuals, mid residual) for model input x (B, C, f, h, w) at step ``step`` of
        ``num_steps``; context (B, L, D) or (B*f, L, D); ``frames``: the window of the condition frames x covers.
        (None, None) when no ControlNet acts at this step."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        b, c, f, hgt, wid = x.shape
        folded = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, hgt, wid)
        ctx = context if context.shape[0] == b * f else context.repeat_interleave(f, dim=0)
        for a in self.active:
            if step / num_steps < a.start or (step + 1) / num_steps > a.end:
                continue  # diffusers multiplies this ControlNet's output by 0: adding nothing is the same
            model = a.unit.model
            cond = a.embedded[frames if frames is not None else slice(None)].repeat(b, 1, 1, 1)
            temb = model.embed_time(timestep, b)
            d, m = model.encode(torch.zeros_like(folded) if a.zero_input else folded, cond, temb, ctx, f,
                                a.unit.scale)
            down = d if down is None else [p + q for p, q in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return down, mid


def _as_list(value, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} entries for {n} ControlNets; pass one per ControlNet "
                         "(load_pipeline(controlnets=...) order)")
    return list(value)


def prepare_control(units: Sequence[ControlUnit], control_frames: Sequence[VideoInput] | None,
                    control_start: float | Sequence[float] | None, control_end: float | Sequence[float] | None,
                    num_frames: int, height: int, width: int, device: torch.device,
                    dtype: torch.dtype) -> list[_Active]:
    """Check and embed the condition frames of every ControlNet; [] when the pipeline has none.

    control_frames: one entry per ControlNet, each a (F, 3, H, W) float tensor in [0, 1], a list of PIL images
    or a video path, with exactly ``num_frames`` frames of ``height`` x ``width`` (no resizing: condition images
    come pre-made). control_start / control_end: a number or one per ControlNet, fractions of the schedule in
    [0, 1] with start < end (defaults 0 and 1). ValueError naming the argument otherwise.
    """
    if not units:
        if control_frames is not None or control_start is not None or control_end is not None:
            raise ValueError("control_frames/control_start/control_end given but the pipeline has no ControlNet; "
                             "load one with load_pipeline(..., controlnets=[(file, scale)])")
        return []
    n = len(units)
    if control_frames is None:
        raise ValueError(f"control_frames: the pipeline has {n} ControlNet(s) ({', '.join(u.source for u in units)}); "
                         "pass one condition video per ControlNet, e.g. control_frames=[frames]")
    frames_list = _as_list(control_frames, n, "control_frames")  # one video (tensor, path) stands for a list of one
    starts = [0.0 if s is None else s for s in _as_list(control_start, n, "control_start")]
    ends = [1.0 if e is None else e for e in _as_list(control_end, n, "control_end")]
    active = []
    for i, (unit, frames, start, end) in enumerate(zip(units, frames_list, starts, ends, strict=True)):
        name = f"control_frames[{i}]"
        video = read_video(frames, name)
        if video.shape[0] != num_frames:
            raise ValueError(f"{name}: {video.shape[0]} condition frames for num_frames={num_frames}; "
                             "pass one condition image per frame")
        if tuple(video.shape[-2:]) != (height, width):
            raise ValueError(f"{name}: condition frames are {video.shape[-1]}x{video.shape[-2]}, the video is "
                             f"{width}x{height}; resize the condition images to the video size")
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
            raise ValueError(f"control_start[{i}]={start!r}, control_end[{i}]={end!r}: need 0 <= start < end <= 1")
        model = unit.model
        w = model.controlnet_cond_embedding.conv_in.weight
        embedded = model.controlnet_cond_embedding(video.to(w.device, w.dtype))
        active.append(_Active(unit, float(start), float(end), embedded.to(device, dtype)))
    return active


def prepare_sparse(unit: ControlUnit | None, control_images: dict | None, control_scale: float | None, vae,
                   num_frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> list[_Active]:
    """Check and embed SparseCtrl key frames: ``control_images`` maps a frame index to a PIL image, a (3, H, W)
    tensor in [0, 1] or an image path, each ``height`` x ``width``; ``control_scale`` (default 1.0) multiplies the
    residuals. RGB key frames go through ``vae`` (posterior mean, scaled latents: no noise is drawn, so a seed
    gives the same initial latents as without SparseCtrl). ValueError naming the argument otherwise."""
    if unit is None:
        if control_images is not None or control_scale is not None:
            raise ValueError("control_images/control_scale given but the pipeline has no SparseCtrl; load one with "
                             "load_pipeline(..., sparsectrl='v3_sd15_sparsectrl_rgb.ckpt')")
        return []
    model = unit.model
    if not isinstance(control_images, dict) or not control_images:
        raise ValueError(f"control_images: the pipeline has SparseCtrl ({unit.source}); pass a dict of at least one "
                         "{frame index: image}, e.g. control_images={0: 'first.png'}")
    scale = 1.0 if control_scale is None else control_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"control_scale must be a number, got {control_scale!r}")
    frames = sorted(control_images)
    for i in frames:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_frames:
            raise ValueError(f"control_images: frame index {i!r} is outside the video's frames 0..{num_frames - 1}")
    images = torch.stack([_read_image(control_images[i], f"control_images[{i}]", height, width) for i in frames])
    w = model.controlnet_cond_embedding.weight if model.simplified else model.controlnet_cond_embedding.conv_in.weight
    if model.simplified:  # RGB: VAE latents of the key frames
        v = next(vae.parameters())
        mean, _ = vae.encode_frames((images * 2 - 1).to(v.device, v.dtype))
        keys = mean * vae.config.scaling_factor
    else:
        keys = images
    cond = torch.zeros((num_frames, *keys.shape[1:]), device=w.device, dtype=w.dtype)
    mask = torch.zeros((num_frames, 1, *keys.shape[2:]), device=w.device, dtype=w.dtype)
    cond[frames] = keys.to(w.device, w.dtype)
    mask[frames] = 1
    embedded = model.embed_condition(cond, mask).to(device, dtype)
    return [_Active(ControlUnit(model, float(scale), unit.source), 0.0, 1.0, embedded, zero_input=True)]


def _read_image(image, name: str, height: int, width: int) -> torch.Tensor:
    """A PIL image, a (3, H, W) float tensor in [0, 1] or an image path -> float32 CPU (3, H, W) of the video's size."""
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image[None]
    elif hasattr(image, "convert"):
        image = [image]
    elif not isinstance(image, (str, os.PathLike)):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected a PIL image, a (3, H, W) tensor in [0, 1] or an image path, got {got}")
    frame = read_video(image, name)[0]  # a path is read as a one-frame video (an animated file: its first frame)
    if tuple(frame.shape[-2:]) != (height, width):
        raise ValueError(f"{name}: the image is {frame.shape[-1]}x{frame.shape[-2]}, the video is {width}x{height}; "
                         "resize it to the video size")
    return frame


def control_for_call(pipe, control_frames, control_start, control_end, control_images, control_scale,
                     num_frames: int, height: int, width: int) -> Control | None:
    """The ControlNets and SparseCtrl of ``pipe`` prepared for one generation (see :func:`prepare_control` and
    :func:`prepare_sparse`), or None when neither is loaded nor asked for."""
    # ControlNets first, then SparseCtrl, in one sum
    active = prepare_control(pipe.controlnets, control_frames, control_start, control_end, num_frames, height,
                             width, pipe.device, pipe.dtype)
    active += prepare_sparse(pipe.sparsectrl, control_images, control_scale, pipe.vae, num_frames, height, width,
                             pipe.device, pipe.dtype)
    return Control(active) if active else None
