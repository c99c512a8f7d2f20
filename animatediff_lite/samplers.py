"""Samplers: DDIM, Euler, Euler ancestral, DPM++ 2M (optionally Karras), LCM, as pure step functions.

Each sampler is built from the pipeline's :class:`~animatediff_lite.scheduler.DDIMConfig` (AnimateDiff's
noise table: linear betas 0.00085 -> 0.012, ``steps_offset`` 1, "leading" spacing, epsilon prediction) and
follows the diffusers scheduler that ``Scheduler.from_config(that config)`` builds, number for number in
float32:

============================  =====================================================================
name                          diffusers scheduler
============================  =====================================================================
``ddim``                      ``DDIMScheduler`` (the pipeline's own :class:`~animatediff_lite.scheduler.DDIM`)
``euler``                     ``EulerDiscreteScheduler``
``euler_a``                   ``EulerAncestralDiscreteScheduler``
``dpmpp_2m``                  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``
``dpmpp_2m_karras``           the same with ``use_karras_sigmas=True``
``lcm``                       ``LCMScheduler`` (``original_inference_steps`` 50, ``timestep_scaling`` 10)
============================  =====================================================================

A sampler has three pure functions: ``schedule(num_steps)`` (the timesteps the UNet sees, the sigmas,
the initial noise scale), ``scale_input(schedule, i, x)`` and ``step(schedule, i, model_output, x,
state, generator)`` -> ``(x_next, state)``; ``state`` is what a multistep method carries from one step to
the next (DPM++ 2M: the previous data prediction), None for the others. :class:`SamplerRun` threads it
through a loop, optionally starting part-way (video-to-video), and ``add_noise(schedule, x0, noise, t)``
diffuses a clean sample to timestep t the way that scheduler's ``add_noise`` does (video-to-video, FreeInit).
Noise of the ancestral and LCM steps is drawn like diffusers' ``randn_tensor``: from
``generator`` on the generator's device (a CPU generator draws on the CPU, then the noise moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import SAMPLERS, sampler_name
from .scheduler import DDIM, DDIMConfig, alphas_cumprod, draw_noise, num_steps_check


@dataclass(frozen=True)
class Schedule:
    """The steps one run visits.

    timesteps: (n,) what the UNet is given at each step (int64, or float32 for the Euler samplers as in
    diffusers). sigmas: (n + 1,) float32 noise levels ending at 0 for the sigma samplers, else None.
    init_noise_sigma: the factor unit noise is scaled by before the first step.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None
    init_noise_sigma: float | torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def _check_prediction(config: DDIMConfig, name: str, supported: tuple[str, ...]) -> None:
    if config.prediction_type not in supported:
        raise ValueError(f"sampler={name!r} supports prediction_type {supported}, "
                         f"got {config.prediction_type!r} (use sampler='ddim')")


def _predict_x0(kind: str, x: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """The clean sample from a model output of prediction type ``kind`` at x = alpha x0 + sigma noise."""
    if kind == "epsilon":
        return (x - sigma * model_output) / alpha
    if kind == "v_prediction":
        return alpha * x - sigma * model_output
    return model_output  # "sample"


class _Sampler:
    """What every sampler shares: a name, and latents fed to the UNet as they are (the Euler samplers scale)."""

    name = ""

    def scale_input(self, schedule: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
        """The latents, unscaled."""
        return x


class DDIMSampler(_Sampler):
    """Today's DDIM (:class:`~animatediff_lite.scheduler.DDIM`) behind the sampler interface; eta > 0 adds noise."""

    name = "ddim"

    def __init__(self, ddim: DDIM, eta: float = 0.0) -> None:
        self.ddim, self.eta, self.config = ddim, eta, ddim.config

    def schedule(self, num_steps: int) -> Schedule:
        """DDIM's timesteps, no sigmas, unit initial noise."""
        return Schedule(self.ddim.timesteps(num_steps), None, self.ddim.init_noise_sigma)

    def step(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor, state: Any,
             generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        """One DDIM update from timestep i to the next (no state)."""
        t = int(schedule.timesteps[i])
        x = self.ddim.step(model_output, t, x, self.ddim.prev_timestep(t, len(schedule)), eta=self.eta,
                           generator=generator)
        return x, None

    def add_noise(self, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' DDIMScheduler.add_noise)."""
        return self.ddim.add_noise(x0, noise, t.long())


class _SigmaSampler(_Sampler):
    """Shared table for the k-diffusion style samplers: sigma_t = sqrt((1 - a_t) / a_t)."""

    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction")

    def __init__(self, config: DDIMConfig) -> None:
        _check_prediction(config, self.name, self.prediction_types)
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # float32 (T,)

    def noise_sigma(self, schedule: Schedule, t: float) -> torch.Tensor:
        """The sigma diffusers' add_noise uses for timestep t: the schedule's sigma at t's position (the second
        position if t repeats); t not in the schedule: :meth:`missing_sigma`."""
        where = (schedule.timesteps == t).nonzero().flatten()
        if len(where):
            return schedule.sigmas[int(where[1 if len(where) > 1 else 0])]
        return self.missing_sigma(schedule, t)

    def missing_sigma(self, schedule: Schedule, t: float) -> torch.Tensor:
        """The training sigma at t (diffusers' Euler schedulers raise IndexError there, e.g. FreeInit's t = 999
        under "leading" spacing)."""
        return torch.tensor(float(self.train_sigmas[int(round(float(t)))]))

    def _sigmas(self, schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # noise_sigma per sample of t (B,), shaped (B, 1, 1, ...) in like's device and dtype
        sigma = torch.stack([self.noise_sigma(schedule, float(v)) for v in t.flatten()]).to(like.device, like.dtype)
        return sigma.reshape(sigma.shape[0], *([1] * (like.dim() - 1)))

    def add_noise(self, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 + sigma noise with sigma looked up per sample as diffusers' Euler schedulers do."""
        return x0 + noise * self._sigmas(schedule, t, x0)


class Euler(_SigmaSampler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022), diffusers' EulerDiscrete."""

    name = "euler"

    def schedule(self, num_steps: int) -> Schedule:
        """Timesteps by the config's spacing (float32), sigmas interpolated at them, then 0."""
        c, n = self.config, num_steps
        T = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + c.steps_offset
        else:  # "trailing"
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1
        sigmas = np.interp(ts, np.arange(0, T), self.train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        top = sigmas.max()
        # Leading spacing starts below the last training step, so diffusers scales by the variance of x_t.
        init = top if c.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        return Schedule(torch.from_numpy(ts.astype(np.float32)), sigmas, init)

    def scale_input(self, schedule: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the UNet expects unit-variance input."""
        sigma = schedule.sigmas[i]
        return x / ((sigma**2 + 1) ** 0.5)

    def denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate from the model output at noise level sigma."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))  # v_prediction

    def euler_to(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor,
                 sigma_next: torch.Tensor) -> torch.Tensor:
        """x + (x - x0) / sigma_i * (sigma_next - sigma_i), computed (and returned) in float32."""
        sample = x.to(torch.float32)
        sigma = schedule.sigmas[i]
        derivative = (sample - self.denoised(sigma, model_output, sample)) / sigma
        return sample + derivative * (sigma_next - sigma)

    def step(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor, state: Any,
             generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        """An Euler step from sigma_i to sigma_{i+1}."""
        return self.euler_to(schedule, i, model_output, x, schedule.sigmas[i + 1]).to(model_output.dtype), None


class EulerAncestral(Euler):
    """Euler ancestral (diffusers' EulerAncestralDiscrete): an Euler step to sigma_down, then fresh noise."""

    name = "euler_a"

    def step(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor, state: Any,
             generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        """Deterministic part to sigma_down, plus sigma_up times noise drawn from ``generator``."""
        sigma_from, sigma_to = schedule.sigmas[i], schedule.sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = self.euler_to(schedule, i, model_output, x, sigma_down)
        prev = prev + draw_noise(model_output.shape, generator, model_output) * sigma_up
        return prev.to(model_output.dtype), None


class DPMSolverPP2M(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form, first order on the first and last step."""

    name = "dpmpp_2m"
    prediction_types = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: DDIMConfig, karras: bool = False) -> None:
        if karras:
            self.name = "dpmpp_2m_karras"
        super().__init__(config)
        self.karras = karras
        self.log_sigmas = np.log(self.train_sigmas)

    def schedule(self, num_steps: int) -> Schedule:
        """Integer timesteps (Karras: rounded from the Karras sigmas), sigmas ending at 0, unit initial noise."""
        c, n = self.config, num_steps
        T = c.num_train_timesteps  # diffusers' last_timestep: lambda_min_clipped is -inf, nothing is clipped
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        else:  # "trailing"
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
        if self.karras:
            sigmas = karras_sigmas(float(self.train_sigmas[-1]), float(self.train_sigmas[0]), n)
            ts = np.array([sigma_to_t(s, self.log_sigmas) for s in sigmas]).round()
        else:
            sigmas = np.interp(ts, np.arange(0, T), self.train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return Schedule(torch.from_numpy(ts).to(torch.int64), sigmas, 1.0)

    def missing_sigma(self, schedule: Schedule, t: float) -> torch.Tensor:
        """As diffusers' DPMSolverMultistepScheduler.index_for_timestep: t not in the schedule falls back to the
        last step's sigma (so FreeInit's t = 999 under "leading" spacing re-noises only slightly, as diffusers)."""
        return schedule.sigmas[len(schedule) - 1]

    def add_noise(self, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise (variance preserving), sigma looked up as diffusers does."""
        alpha, sigma_t = _alpha_sigma(self._sigmas(schedule, t, x0))
        return alpha * x0 + sigma_t * noise

    def step(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor, state: Any,
             generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        """One multistep update; state is the previous step's data prediction (None before the first step)."""
        sigmas = schedule.sigmas
        alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
        x0 = _predict_x0(self.config.prediction_type, x, model_output, alpha_s0, sigma_s0)
        sample = x.to(torch.float32)
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s0, sigma_s0)
        prev = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0  # first order
        # second order except on the first step (no previous x0) and the last one (it ends at sigma 0)
        if state is not None and i < len(schedule) - 1:
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[i - 1])
            r0 = (_lambda(alpha_s0, sigma_s0) - _lambda(alpha_s1, sigma_s1)) / h
            d1 = (1.0 / r0) * (x0 - state)
            prev = prev - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        return prev.to(model_output.dtype), x0


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # sigma in the "variance exploding" table -> (alpha_t, sigma_t) of the variance-preserving x_t
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lambda(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(alpha) - torch.log(sigma)  # half log-SNR; +inf at sigma 0


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep whose sigma is ``sigma``: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


class LCM(_Sampler):
    """Latent consistency sampling (Luo et al. 2023), diffusers' LCMScheduler: predict x0, re-noise to the next t.

    original_inference_steps: the length of the distillation schedule the timesteps are taken from.
    """

    name = "lcm"
    sigma_data = 0.5

    def __init__(self, config: DDIMConfig, original_inference_steps: int = 50, timestep_scaling: float = 10.0) -> None:
        _check_prediction(config, self.name, ("epsilon", "v_prediction", "sample"))
        self.config = config
        self.original_inference_steps = original_inference_steps
        self.timestep_scaling = timestep_scaling
        self.ddim = DDIM(config)  # the same noise table, alpha-bar before step 0 and add_noise as DDIM's

    def schedule(self, num_steps: int) -> Schedule:
        """num_steps timesteps picked evenly (by index) from the distillation schedule k-1, 2k-1, ..., T-1."""
        original = self.original_inference_steps
        if num_steps > original:
            raise ValueError(f"steps must be <= {original} for sampler='lcm' (its distillation schedule), "
                             f"got {num_steps}")
        k = self.config.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        return Schedule(torch.from_numpy(origin[idx]).to(torch.int64), None, 1.0)

    def add_noise(self, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) at training timestep t (diffusers' LCMScheduler.add_noise)."""
        return self.ddim.add_noise(x0, noise, t.long())

    def step(self, schedule: Schedule, i: int, model_output: torch.Tensor, x: torch.Tensor, state: Any,
             generator: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        """Boundary-condition blend of x0 and x, then (except on the last step) noise to the next timestep."""
        t = schedule.timesteps[i]
        last = i == len(schedule) - 1
        t_next = t if last else schedule.timesteps[i + 1]
        a_t, a_next = self.ddim.alphas_cumprod[t], self.ddim.alpha_bar(t_next)
        scaled = t * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        x0 = _predict_x0(self.config.prediction_type, x, model_output, a_t.sqrt(), (1 - a_t).sqrt())
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = c_out * x0 + c_skip * x
        if last:
            return denoised, None
        noise = draw_noise(model_output.shape, generator, model_output, dtype=denoised.dtype)
        return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise, None


def make_sampler(name: str, ddim: DDIM | None = None, eta: float = 0.0):
    """The sampler called ``name`` over ``ddim``'s noise table (AnimateDiff's DDIM when None).

    ValueError listing the names for an unknown one, and for eta > 0 with anything but "ddim".
    """
    sampler_name(name)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and name != "ddim":
        raise ValueError(f"eta={eta} applies to sampler='ddim' only (got sampler={name!r}); leave eta at 0")
    ddim = ddim or DDIM()
    if name == "ddim":
        return DDIMSampler(ddim, eta)
    if name.startswith("dpmpp_2m"):
        return DPMSolverPP2M(ddim.config, karras=name == "dpmpp_2m_karras")
    return {"euler": Euler, "euler_a": EulerAncestral, "lcm": LCM}[name](ddim.config)


class SamplerRun:
    """One sampling run: the schedule of ``sampler`` for ``num_steps`` and the state carried between steps.

    The loop is: ``x = run.init(noise)``, then for each ``i, t`` in ``enumerate(run.timesteps)``:
    ``model_output = model(run.scale_input(i, x), t)`` and ``x = run.step(i, model_output, x, generator)``.
    ``start`` skips the first steps of the ``num_steps`` schedule (video-to-video, as diffusers slices its
    timesteps; every sampler here has diffusers' ``order`` 1); ``i`` counts from there. A new run starts with
    no multistep state (a FreeInit round builds a new run, as diffusers re-sets its timesteps).
    """

    def __init__(self, sampler, num_steps: int, start: int = 0) -> None:
        num_steps_check(num_steps)
        self.sampler = sampler
        self.schedule = sampler.schedule(num_steps)
        if not isinstance(start, int) or not 0 <= start < len(self.schedule):
            raise ValueError(f"start must be a step index in [0, {len(self.schedule)}), got {start!r}")
        self.start = start
        self.state: Any = None

    @property
    def timesteps(self) -> list[int | float]:
        """The UNet's timestep at each step run, as Python numbers (ints, or floats for the Euler samplers)."""
        return self.schedule.timesteps[self.start:].tolist()

    @property
    def config(self):
        """The noise table's :class:`~animatediff_lite.scheduler.DDIMConfig`."""
        return self.sampler.config

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 (B, ...) diffused to timesteps t (B,) as this sampler's diffusers scheduler does after
        ``set_timesteps(num_steps)`` (the Euler/DPM samplers look t up in the full schedule)."""
        return self.sampler.add_noise(self.schedule, x0, noise, t)

    def init(self, noise: torch.Tensor) -> torch.Tensor:
        """Unit noise (B, C, F, h, w) -> the first step's latents (scaled by the initial sigma)."""
        return noise * self.schedule.init_noise_sigma

    def scale_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What the UNet sees at step i for latents x."""
        return self.sampler.scale_input(self.schedule, self.start + i, x)

    def step(self, i: int, model_output: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
        """Latents after step i (the guided model output at step i given)."""
        x, self.state = self.sampler.step(self.schedule, self.start + i, model_output, x, self.state, generator)
        return x


__all__ = ["SAMPLERS", "DDIMSampler", "DPMSolverPP2M", "Euler", "EulerAncestral", "LCM", "SamplerRun", "Schedule",
           "draw_noise", "karras_sigmas", "make_sampler", "sigma_to_t"]
