"""FreeInit (Wu et al. 2023, arXiv 2312.07537): re-sample a video several times, each round starting from the
low frequencies of the previous result and the high frequencies of fresh noise.

Round 0 samples as usual from the initial noise z. After a round that ended at x0, the next starts from
``lowpass(q(x_T | x0) with noise z) + highpass(fresh noise)``, mixed in the 3-D (frames, h, w) Fourier domain,
with T = num_train_timesteps - 1. Numbers follow diffusers' ``enable_free_init`` (same filters, same fresh-noise
draw: float32 from the sampling generator after the previous round's draws), so seeds give diffusers' videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import finite_number
from .scheduler import seeded_noise

METHODS = ("butterworth", "gaussian", "ideal", "box")


@dataclass(frozen=True)
class FreeInit:
    """FreeInit settings: ``pipe(prompt, free_init=FreeInit(...))``.

    iterations: sampling rounds (1 = plain sampling; each round costs a full sampling run).
    method: the low-pass filter, "butterworth", "gaussian", "ideal" (diffusers' three) or "box" (the FreeInit
    repository's approximate ideal filter: a centred box of half-size ``round(h // 2 * spatial_stop)`` and
    ``round(frames // 2 * temporal_stop)``; with few frames it can be empty, which keeps only fresh noise).
    order: Butterworth order (large ~ ideal, small ~ gaussian). spatial_stop / temporal_stop: normalised stop
    frequencies in [0, 1] (0 disables the filter: every round starts from fresh noise).
    use_fast_sampling: coarse-to-fine, round i of n uses ``max(1, int(steps / n * (i + 1)))`` steps.
    """

    iterations: int = 3
    method: str = "butterworth"
    order: float = 4
    spatial_stop: float = 0.25
    temporal_stop: float = 0.25
    use_fast_sampling: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise ValueError(f"FreeInit iterations must be an integer >= 1, got {self.iterations!r}")
        if self.method not in METHODS:
            raise ValueError(f"FreeInit method must be one of {METHODS}, got {self.method!r}")
        finite_number("FreeInit order", self.order, minimum=0, exclusive=True)
        for name in ("spatial_stop", "temporal_stop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"FreeInit {name} must be a number in [0, 1], got {value!r}")

    def round_steps(self, steps: int) -> list[int]:
        """Denoising steps of each round: ``steps`` every round, or coarse-to-fine with ``use_fast_sampling``."""
        if not self.use_fast_sampling:
            return [steps] * self.iterations
        return [max(1, int(steps / self.iterations * (i + 1))) for i in range(self.iterations)]

    def low_pass_filter(self, frames: int, height: int, width: int) -> torch.Tensor:
        """The centred (fftshifted) low-pass mask, float32 CPU (frames, height, width), values in [0, 1]."""
        mask = torch.zeros(frames, height, width, dtype=torch.float64)
        ds, dt = float(self.spatial_stop), float(self.temporal_stop)
        if ds == 0 or dt == 0:
            return mask.float()
        if self.method == "box":
            rs, rt = round(height // 2 * ds), round(frames // 2 * dt)
            cf, ch, cw = frames // 2, height // 2, width // 2
            mask[cf - rt:cf + rt, ch - rs:ch + rs, cw - rs:cw + rs] = 1.0
            return mask.float()
        # squared normalised distance from the centre, the time axis stretched by ds / dt (float64, as Python floats)
        t = ((ds / dt) * (2 * torch.arange(frames, dtype=torch.float64) / frames - 1)) ** 2
        h = (2 * torch.arange(height, dtype=torch.float64) / height - 1) ** 2
        w = (2 * torch.arange(width, dtype=torch.float64) / width - 1) ** 2
        d2 = t[:, None, None] + h[None, :, None] + w[None, None, :]
        if self.method == "butterworth":
            mask = 1 / (1 + (d2 / ds**2) ** self.order)
        elif self.method == "gaussian":
            mask = torch.exp(-1 / (2 * ds**2) * d2)
        else:  # "ideal": the threshold is ds * 2 (not ds**2), as in FreeInit and diffusers
            mask = (d2 <= ds * 2).double()
        return mask.float()

    def reinitialize(self, latents: torch.Tensor, initial_noise: torch.Tensor, scheduler,
                     generator: torch.Generator | None) -> torch.Tensor:
        """The next round's start from the last round's result ``latents`` (B, C, F, h, w).

        ``initial_noise`` is round 0's starting latents (scaled by the sampler's initial sigma);
        ``scheduler.add_noise(x0, noise, t)`` diffuses to the last training timestep: a DDIM, or the last
        round's :class:`~animatediff_lite.samplers.SamplerRun`, which noises as its diffusers scheduler does
        right after that round (DPM++ under "leading" spacing falls back to the last step's sigma, as
        diffusers). The fresh noise is drawn in float32 on the generator's device (the global CPU RNG without
        one) and moved, like diffusers' ``randn_tensor``.
        """
        b, _, f, h, w = latents.shape
        t_last = scheduler.config.num_train_timesteps - 1
        z_t = scheduler.add_noise(latents, initial_noise, torch.full((b,), t_last, dtype=torch.long)).float()
        fresh = seeded_noise(latents.shape, generator, latents.device, torch.float32)
        lpf = self.low_pass_filter(f, h, w).to(latents.device)
        return frequency_mix(z_t, fresh, lpf).to(latents.dtype)


def frequency_mix(x: torch.Tensor, noise: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    """Low frequencies of x plus high frequencies of noise over the last three dims (frames, h, w).

    lpf: the centred mask (f, h, w). Shifting the mask instead of both spectra multiplies the same pairs of
    numbers, so the result equals mixing fftshifted spectra.
    """
    dims = (-3, -2, -1)
    mask = torch.fft.ifftshift(lpf, dim=dims)
    mixed = torch.fft.fftn(x, dim=dims) * mask + torch.fft.fftn(noise, dim=dims) * (1 - mask)
    return torch.fft.ifftn(mixed, dim=dims).real


__all__ = ["METHODS", "FreeInit", "frequency_mix"]
