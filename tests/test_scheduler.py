"""DDIM parity with diffusers' DDIMScheduler: timesteps, steps (eta 0 and > 0), add_noise, velocity."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.scheduler import DDIM, DDIMConfig

diffusers = require_oracle("diffusers")

CONFIGS = {
    "animatediff": DDIMConfig(),
    "sd15_scaled": DDIMConfig(beta_schedule="scaled_linear", steps_offset=0, set_alpha_to_one=False),
    "trailing_v": DDIMConfig(timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=True),
    "linspace_clip": DDIMConfig(timestep_spacing="linspace", clip_sample=True, clip_sample_range=0.5),
    "sample_pred": DDIMConfig(prediction_type="sample", steps_offset=0),
}


def oracle(config: DDIMConfig) -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler(**dataclasses.asdict(config))


@pytest.mark.parametrize("name", CONFIGS)
def test_timesteps_match_for_1_to_50_steps(name: str) -> None:
    config = CONFIGS[name]
    ours, ref = DDIM(config), oracle(config)
    for n in range(1, 51):
        ref.set_timesteps(n)
        ts = ours.timesteps(n)
        assert ts.dtype == torch.int64
        assert torch.equal(ts, ref.timesteps), f"{name}, {n} steps: {ts.tolist()} vs {ref.timesteps.tolist()}"


def test_animatediff_defaults() -> None:
    ts = DDIM().timesteps(25).tolist()
    assert ts[0] == 961 and ts[-1] == 1 and len(ts) == 25
    assert torch.equal(DDIM().alphas_cumprod, oracle(DDIMConfig()).alphas_cumprod)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_steps", [1, 3, 25, 50])
def test_steps_are_identical(name: str, num_steps: int) -> None:
    config = CONFIGS[name]
    ours, ref = DDIM(config), oracle(config)
    ref.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(num_steps)
    x = torch.randn(2, 4, 3, 5, 6, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps(num_steps).tolist():
        eps = torch.randn(x.shape, generator=g)
        x = ours.step(eps, t, x, ours.prev_timestep(t, num_steps))
        x_ref = ref.step(eps, t, x_ref).prev_sample
        diff = (x - x_ref).abs().max().item()
        assert torch.equal(x, x_ref), f"{name}, {num_steps} steps, t={t}: max diff {diff}"


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("name", ["animatediff", "trailing_v"])
def test_eta_with_cpu_generator_is_identical(name: str, eta: float) -> None:
    config, num_steps = CONFIGS[name], 10
    ours, ref = DDIM(config), oracle(config)
    ref.set_timesteps(num_steps)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x_ref = x.clone()
    g, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    eps_gen = torch.Generator().manual_seed(1)
    for t in ours.timesteps(num_steps).tolist():
        eps = torch.randn(x.shape, generator=eps_gen)
        x = ours.step(eps, t, x, ours.prev_timestep(t, num_steps), eta=eta, generator=g)
        x_ref = ref.step(eps, t, x_ref, eta=eta, generator=g_ref).prev_sample
        assert torch.equal(x, x_ref), f"t={t}: max diff {(x - x_ref).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_velocity_match(dtype: torch.dtype) -> None:
    ours, ref = DDIM(), oracle(DDIMConfig())
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 2, 4, 4, generator=g).to(dtype)
    noise = torch.randn(3, 4, 2, 4, 4, generator=g).to(dtype)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
def test_bad_steps_raise(steps) -> None:
    with pytest.raises(ValueError, match="steps"):
        DDIM().timesteps(steps)


@pytest.mark.parametrize("field,value", [("beta_schedule", "cosine"), ("timestep_spacing", "even"),
                                         ("prediction_type", "x0")])
def test_bad_config_raises(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        DDIMConfig(**{field: value})
