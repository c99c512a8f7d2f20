"""DDIM sampling as AnimateDiff uses it: a noise table plus pure functions of (t, x, eps).

The defaults are the ``noise_scheduler_kwargs`` of the original AnimateDiff inference configs
(``configs/inference/inference-v*.yaml``): linear betas 0.00085 -> 0.012 over 1000 training steps,
``steps_offset=1``, ``clip_sample=False``, and otherwise DDIM's usual settings (``set_alpha_to_one=True``,
"leading" spacing, epsilon prediction). 25 steps give the timesteps 961, 921, ..., 1.

Numbers follow diffusers' ``DDIMScheduler`` bit for bit in float32: the tables are built in float32 and
the per-step coefficients are computed in float32 before they touch the latents. In particular the
previous timestep is ``t - num_train_timesteps // num_steps`` for every spacing, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import finite_number

BETA_SCHEDULES = ("linear", "scaled_linear")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DDIMConfig:
    """DDIM settings; the defaults are AnimateDiff's (not Stable Diffusion's "scaled_linear" PNDM)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"  # "linear" (AnimateDiff) or "scaled_linear" (SD1.5's own scheduler)
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"  # "leading", "trailing" or "linspace"
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" or "sample"

    def __post_init__(self) -> None:
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("timestep_spacing", SPACINGS),
                              ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            finite_number(f"DDIMConfig.{name}", getattr(self, name), minimum=0)


def alphas_cumprod(config: DDIMConfig) -> torch.Tensor:
    """Cumulative products of (1 - beta), float32 (num_train_timesteps,)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    else:  # "scaled_linear": linear in sqrt(beta)
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped ``shape`` on like's device, drawn as diffusers' ``randn_tensor`` does: on the
    generator's device when it differs in type from like's (a CPU generator draws on the CPU), then moved."""
    dtype = dtype or like.dtype
    draw_on = generator.device if generator is not None and generator.device.type != like.device.type else like.device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(like.device)


def seeded_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (the global CPU RNG without one), then moved to
    ``device``, like diffusers' ``randn_tensor`` with a CPU generator: a CPU seed gives the same noise anywhere."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


class DDIM:
    """DDIM (Song et al. 2020) over a fixed noise table.

    ``step`` is a pure function of its arguments: the sampling loop pairs each timestep with the one
    that follows it (``prev_timestep``), so no state is kept between calls.
    """

    init_noise_sigma = 1.0  # DDIM starts from unit-variance noise

    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config or DDIMConfig()
        self.alphas_cumprod = alphas_cumprod(self.config)  # float32 CPU (T,)
        # Alpha-bar "before" the first training step: 1 (fully clean) or alpha-bar at t = 0.
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The ``num_steps`` timesteps to visit, descending, as an int64 CPU tensor (num_steps,)."""
        c = self.config
        num_steps_check(num_steps)
        if num_steps > c.num_train_timesteps:
            raise ValueError(f"steps must be <= num_train_timesteps ({c.num_train_timesteps}), got {num_steps}")
        T = c.num_train_timesteps
        if c.timestep_spacing == "leading":
            ts = np.arange(num_steps, dtype=np.int64)[::-1] * (T // num_steps) + c.steps_offset
        elif c.timestep_spacing == "trailing":
            # Evenly spaced down from T - 1 (numpy's float arange, as diffusers; float error can give it
            # one element too many, e.g. 61 steps, so keep the first num_steps).
            ts = np.round(np.arange(T, 0, -T / num_steps)[:num_steps]).astype(np.int64) - 1
        else:  # "linspace": from T - 1 down to 0 inclusive
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(ts))

    def prev_timestep(self, t: int, num_steps: int) -> int:
        """The timestep that follows ``t`` in a ``num_steps`` schedule (negative after the last one)."""
        return int(t) - self.config.num_train_timesteps // num_steps

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """Alpha-bar at timestep t, or "before" the first training step for t < 0."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, t_prev: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM update from timestep ``t`` to ``t_prev``.

        eps: the model output at (x, t) (noise, velocity or clean sample per ``prediction_type``), any
        shape, same as x. eta: 0 is deterministic DDIM, 1 is DDPM-like; for eta > 0 the extra noise is
        drawn from ``generator`` on the generator's device (a CPU generator draws on the CPU, then the
        noise moves to x's device, as diffusers does). Returns x at ``t_prev``, same shape and dtype.
        """
        t, t_prev = int(t), int(t_prev)
        a_t = self.alpha_bar(t)  # float32 0-d
        a_prev = self.alpha_bar(t_prev)
        b_t = 1 - a_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - (b_t**0.5).item() * eps) / (a_t**0.5).item()
            eps_hat = eps
        elif kind == "v_prediction":
            x0 = (a_t**0.5).item() * x - (b_t**0.5).item() * eps
            eps_hat = (a_t**0.5).item() * eps + (b_t**0.5).item() * x
        else:  # "sample"
            x0 = eps
            eps_hat = (x - (a_t**0.5).item() * x0) / (b_t**0.5).item()
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        # sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), scaled by eta
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        x_prev = (a_prev**0.5).item() * x0 + ((1 - a_prev - std**2) ** 0.5).item() * eps_hat
        if eta > 0:
            x_prev = x_prev + std.item() * draw_noise(x.shape, generator, x)
        return x_prev

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) for training: sqrt(a_t) x0 + sqrt(1 - a_t) noise.

        x0, noise: (B, ...) same shape; t: int64 (B,) timesteps, one per sample. Returns (B, ...).
        """
        a = self._broadcast(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The "v_prediction" training target sqrt(a_t) noise - sqrt(1 - a_t) x0, shapes as ``add_noise``."""
        a = self._broadcast(t, x0)
        return a**0.5 * noise - (1 - a) ** 0.5 * x0

    def _broadcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # alpha-bar per sample in like's dtype/device, shaped (B, 1, 1, ...) to broadcast over the rest.
        a = self.alphas_cumprod.to(like.device, like.dtype)[t.to(like.device)].flatten()
        return a.reshape(a.shape[0], *([1] * (like.dim() - 1)))

    def __repr__(self) -> str:
        return f"DDIM({self.config})"


def num_steps_check(steps: int) -> None:
    """Raise ValueError naming ``steps`` unless it is an integer >= 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


__all__ = ["DDIM", "DDIMConfig", "alphas_cumprod", "draw_noise", "num_steps_check", "seeded_noise"]
