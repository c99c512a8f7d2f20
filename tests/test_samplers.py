"""Samplers vs diffusers' schedulers built with ``Scheduler.from_config(AnimateDiff's DDIM config)``.

Timesteps, sigmas and the initial noise scale for 1..50 steps; whole step loops (random model outputs, the
same CPU generator for the ancestral / LCM noise); name and argument errors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.samplers import SAMPLERS, SamplerRun, make_sampler
from animatediff_lite.scheduler import DDIM, DDIMConfig

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true

# name -> (diffusers class, extra from_config arguments); "ddim" is DDIMScheduler itself.
ORACLES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
CONFIGS = {
    "animatediff": DDIMConfig(),
    "linspace_v": DDIMConfig(timestep_spacing="linspace", prediction_type="v_prediction"),
    "trailing_scaled": DDIMConfig(timestep_spacing="trailing", beta_schedule="scaled_linear", steps_offset=0),
}


def oracle(name: str, config: DDIMConfig):
    """diffusers' scheduler for ``name``: from_config of a DDIMScheduler holding every field of ``config``."""
    cls, extra = ORACLES[name]
    ddim = diffusers.DDIMScheduler(**dataclasses.asdict(config))
    return getattr(diffusers, cls).from_config(ddim.config, **extra)


def test_every_name_has_an_oracle() -> None:
    assert set(SAMPLERS) == set(ORACLES)


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_sigmas_and_initial_sigma_match_for_1_to_50_steps(name: str, config_name: str) -> None:
    config = CONFIGS[config_name]
    ours, ref = make_sampler(name, DDIM(config)), oracle(name, config)
    for n in range(1, 51):
        ref.set_timesteps(n)
        schedule = ours.schedule(n)
        where = f"{name}, {config_name}, {n} steps"
        assert schedule.timesteps.dtype == ref.timesteps.dtype, where
        assert torch.equal(schedule.timesteps, ref.timesteps), \
            f"{where}: {schedule.timesteps.tolist()} vs {ref.timesteps.tolist()}"
        if schedule.sigmas is not None:
            assert torch.equal(schedule.sigmas, ref.sigmas), f"{where}: sigmas {schedule.sigmas} vs {ref.sigmas}"
        else:
            assert not hasattr(ref, "sigmas") or name == "ddim", where
        assert float(schedule.init_noise_sigma) == float(ref.init_noise_sigma), where


def test_animatediff_config_values() -> None:
    # Facts the docs rely on: leading spacing from AnimateDiff's config, Karras spans the full sigma range.
    assert make_sampler("euler").schedule(25).timesteps[0].item() == 961.0
    karras = make_sampler("dpmpp_2m_karras").schedule(4)
    assert karras.timesteps.tolist() == [999, 689, 171, 0]
    assert make_sampler("lcm").schedule(4).timesteps.tolist() == [999, 759, 499, 259]
    assert make_sampler("dpmpp_2m").schedule(4).init_noise_sigma == 1.0
    euler = make_sampler("euler").schedule(4)  # leading spacing: starts at t=751, scaled by sqrt(sigma^2 + 1)
    assert euler.timesteps[0].item() == 751.0
    assert float(euler.init_noise_sigma) == float((euler.sigmas[0] ** 2 + 1) ** 0.5)


def _run_oracle(name: str, config: DDIMConfig, steps: int, x: torch.Tensor, outputs: list[torch.Tensor], seed: int):
    ref = oracle(name, config)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = x * ref.init_noise_sigma
    inputs = []
    for t, out in zip(ref.timesteps, outputs, strict=True):
        inputs.append(ref.scale_model_input(x, t))
        x = ref.step(out, t, x, generator=g).prev_sample
    return x, inputs


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_loops_match(name: str, steps: int, config_name: str) -> None:
    config = CONFIGS[config_name]
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(2, 4, 3, 5, 6, generator=g)
    outputs = [torch.randn(noise.shape, generator=g) for _ in range(steps)]
    expected, expected_inputs = _run_oracle(name, config, steps, noise, outputs, seed=11)

    run = SamplerRun(make_sampler(name, DDIM(config)), steps)
    gen = torch.Generator().manual_seed(11)
    x = run.init(noise)
    for i, out in enumerate(outputs):
        x_in = run.scale_input(i, x)
        assert torch.allclose(x_in, expected_inputs[i], rtol=0, atol=1e-6), f"{name} step {i}: model input"
        x = run.step(i, out, x, gen)
    err = (x - expected).abs().max().item()
    print(f"{name}, {config_name}, {steps} steps: max abs diff {err:.2e}")
    assert x.dtype == torch.float32 and x.shape == noise.shape
    # the same float32 arithmetic in the same order (measured: bit-equal); allow a few ulps elsewhere
    assert err <= 1e-5 * max(1.0, expected.abs().max().item()), f"{name}: {err}"


def test_ancestral_and_lcm_draw_noise_and_the_others_do_not() -> None:
    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    for name in SAMPLERS:
        results = []
        for seed in (0, 1):
            run = SamplerRun(make_sampler(name), 3)
            results.append(run.step(0, out, run.init(noise), torch.Generator().manual_seed(seed)))
        differs = not torch.equal(*results)
        assert differs == (name in ("euler_a", "lcm")), name


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="sampler") as info:
        make_sampler("heun")
    for name in SAMPLERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler(None)  # type: ignore[arg-type]


def test_eta_is_ddim_only_and_lcm_steps_are_bounded() -> None:
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler_a", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("ddim", eta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        SamplerRun(make_sampler("lcm"), 51)
    with pytest.raises(ValueError, match="steps"):
        SamplerRun(make_sampler("euler"), 0)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("euler", DDIM(DDIMConfig(prediction_type="sample")))
