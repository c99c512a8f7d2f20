"""Video-to-video: read an input video, encode it with the VAE and noise it to the strength's first timestep.

Numbers and noise follow diffusers' ``AnimateDiffVideoToVideoPipeline``: of a ``steps``-step schedule the last
``min(int(steps * strength), steps)`` timesteps are run; each video's frames are encoded 16 at a time, every
group drawing its posterior noise ``mean + exp(logvar / 2) * n`` from the generator in turn; then one (B, F, C,
h, w) noise draw (frames before channels, as diffusers lays out the encoded video) diffuses the scaled latents
to the first timestep. The same seed therefore gives diffusers' video.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .scheduler import seeded_noise
from .video import load_video_frames

VideoInput = torch.Tensor | Sequence[Image.Image] | str | os.PathLike
NOISE_GROUP = 16  # frames per posterior-noise draw: diffusers' default decode_chunk_size, used when encoding


def read_video(video: VideoInput, name: str = "video") -> torch.Tensor:
    """A (F, 3, H, W) float tensor in [0, 1], a list of PIL images or a GIF/MP4/WebP/PNG-folder path
    -> float32 CPU (F, 3, H, W) in [0, 1]. ValueError naming ``name`` for anything else or an unreadable file."""
    if isinstance(video, (str, os.PathLike)):
        try:
            frames = load_video_frames(video)
        except ValueError as e:
            raise ValueError(f"{name}: cannot read {os.fspath(video)!r}: {e}") from e
        except (OSError, RuntimeError) as e:  # PIL/ffmpeg: not an image or video file
            raise ValueError(f"{name}: cannot read {os.fspath(video)!r} as a GIF/MP4/WebP or PNG folder "
                             f"({_one_line(e)})") from e
    elif isinstance(video, torch.Tensor):
        if video.dim() != 4 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor (frames, 3, height, width) in [0, 1], "
                             f"got {video.dtype} {tuple(video.shape)}")
        frames = video.detach().float().cpu()
        if not bool(torch.isfinite(frames).all()) or frames.min() < 0 or frames.max() > 1:
            raise ValueError(f"{name}: values must be finite and in [0, 1], got the range "
                             f"[{frames.min().item():.3g}, {frames.max().item():.3g}]")
    elif isinstance(video, Sequence) and video and all(hasattr(im, "convert") for im in video):
        arrays = [np.asarray(im.convert("RGB")) for im in video]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{name}: the images differ in size: {sorted({a.shape[:2] for a in arrays})}")
        frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    else:
        raise ValueError(f"{name}: expected a (frames, 3, H, W) float tensor in [0, 1], a list of PIL images or a "
                         f"GIF/MP4 path, got {type(video).__name__}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name}: the video has no frames")
    return frames


def _one_line(error: Exception) -> str:
    # ffmpeg errors carry its whole log: keep the first line and the final reason
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(error).__name__


def check_video_size(frames: torch.Tensor, num_frames: int | None, height: int | None, width: int | None,
                     name: str = "video") -> tuple[int, int, int]:
    """(num_frames, height, width) of the input video; a value that was given must agree with it."""
    f, _, h, w = frames.shape
    if h % 8 or w % 8:
        raise ValueError(f"{name}: frames are {h}x{w} (height x width); both must be multiples of 8, "
                         "resize or crop the video")
    for arg, given, actual in (("num_frames", num_frames, f), ("height", height, h), ("width", width, w)):
        if given is not None and given != actual:
            raise ValueError(f"{name}: the input has {arg}={actual} but {arg}={given} was passed; "
                             f"resize the video or leave {arg} out")
    return f, h, w


def check_strength(strength: float) -> float:
    """strength must be a finite number in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (1 = ignore the input video), got {strength!r}")
    return float(strength)


def first_step(steps: int, strength: float) -> int:
    """Index of the first timestep to run in a ``steps``-step schedule (diffusers' ``get_timesteps``)."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength={strength} with steps={steps} runs no denoising step (int(steps * strength) = 0); "
                         "raise strength or steps")
    return steps - run


def encode_video(vae, frames: torch.Tensor, batch: int, generator: torch.Generator | None,
                 device: torch.device, dtype: torch.dtype, chunk_size: int = 8) -> torch.Tensor:
    """Posterior samples of the video for each of ``batch`` outputs -> scaled latents (batch, C, F, h, w).

    Noise for each group of ``NOISE_GROUP`` frames is drawn from ``generator`` on its device (the global CPU
    RNG without one) in the sampling dtype, then moved; the encoder runs ``chunk_size`` frames at a time.
    """
    pixels = (frames * 2 - 1).to(device, dtype)  # [0, 1] -> [-1, 1]
    videos = []
    for _ in range(batch):
        parts = []
        for g in range(0, pixels.shape[0], NOISE_GROUP):
            end = min(g + NOISE_GROUP, pixels.shape[0])
            moments = [vae.encode_frames(pixels[s:min(s + chunk_size, end)]) for s in range(g, end, chunk_size)]
            mean, logvar = torch.cat([m for m, _ in moments]), torch.cat([lv for _, lv in moments])
            noise = seeded_noise(mean.shape, generator, device, mean.dtype)
            parts.append(mean + torch.exp(0.5 * logvar) * noise)
        videos.append(torch.cat(parts))  # (F, C, h, w)
    z = torch.stack(videos).to(dtype) * vae.config.scaling_factor  # (B, F, C, h, w)
    return z.transpose(1, 2)


def noised_latents(scheduler, latents: torch.Tensor, t: int | float, generator: torch.Generator | None) -> torch.Tensor:
    """q(x_t | x_0): the encoded video (B, C, F, h, w) diffused to timestep ``t`` with noise drawn frames-first.

    ``scheduler.add_noise(x0, noise, t_batch)`` does the diffusing: a DDIM, or a
    :class:`~animatediff_lite.samplers.SamplerRun` (each sampler noises as its diffusers scheduler does,
    e.g. ``x0 + sigma * noise`` for the Euler samplers)."""
    b, c, f, h, w = latents.shape
    noise = seeded_noise((b, f, c, h, w), generator, latents.device, latents.dtype).transpose(1, 2)
    return scheduler.add_noise(latents, noise, torch.full((b,), t))  # t int64, or float32 (Euler)


def check_video_call(num_frames: int, max_frames: int | None, context_frames: int | None, latents, free_init) -> None:
    """Refuse what video-to-video cannot combine with: given latents, FreeInit, too many frames for one window."""
    if latents is not None:
        raise ValueError("video and latents: pass one of them (video-to-video makes its latents from the video)")
    if free_init is not None:
        raise ValueError("video and free_init: FreeInit is not supported for video-to-video; pass one of them")
    if max_frames is not None and num_frames > max_frames and context_frames is None:
        raise ValueError(f"video: has {num_frames} frames, more than the motion module's limit of {max_frames}; "
                         f"pass context_frames<={max_frames} to denoise in sliding windows, or fewer frames")



__all__ = ["NOISE_GROUP", "VideoInput", "check_strength", "check_video_call", "check_video_size", "encode_video",
           "first_step", "noised_latents", "read_video"]
