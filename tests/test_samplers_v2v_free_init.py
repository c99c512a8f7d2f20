"""Every sampler with video-to-video and with FreeInit vs diffusers, on the tiny model of test_pipeline.py.

Video-to-video: diffusers' AnimateDiffVideoToVideoPipeline with ``Scheduler.from_config(AnimateDiff's DDIM
config)`` slices its timesteps at ``t_start * scheduler.order`` and noises the encoded video with that scheduler's
own ``add_noise`` (``x0 + sigma * noise`` for the Euler samplers, variance preserving from the sigma for DPM++).
FreeInit: diffusers' ``enable_free_init`` re-sets the scheduler's timesteps each round (so multistep state starts
over) and diffuses each round's result to t = 999 with the scheduler's ``add_noise``, which looks 999 up in the
last round's timesteps: under AnimateDiff's "leading" spacing 999 is not there, DPM++ then falls back to its last
sigma and the Euler schedulers raise IndexError; ours uses the training sigma at 999 for those (checked against
the oracle with that one lookup patched), and equals the unpatched oracle under "trailing" spacing (999 present).
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.free_init import FreeInit
from animatediff_lite.loading.pipeline_load import load_pipeline
from animatediff_lite.samplers import SAMPLERS, SamplerRun, make_sampler
from animatediff_lite.scheduler import DDIM, DDIMConfig

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_free_init import _oracle_free_init  # noqa: E402
from tests.test_pipeline import FRAMES, PROMPTS, H, W, _check  # noqa: E402
from tests.test_samplers import oracle as scheduler_oracle  # noqa: E402
from tests.test_video_to_video import _clip, _pil  # noqa: E402

models, oracle, ours = tp.models, tp.oracle, tp.ours  # the tiny model and its diffusers oracle (module fixtures)

TRAILING = DDIMConfig(timestep_spacing="trailing")


@pytest.fixture(scope="module")
def trailing(models):
    return load_pipeline(models.sd, motion_module=models.mm, scheduler=TRAILING)


def _v2v_oracle(oracle, name: str, config: DDIMConfig):
    pipe = diffusers.AnimateDiffVideoToVideoPipeline(
        vae=oracle.vae, text_encoder=oracle.text_encoder, tokenizer=oracle.tokenizer, unet=oracle.unet,
        motion_adapter=oracle.motion_adapter, scheduler=scheduler_oracle(name, config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _free_init_oracle(oracle, name: str, config: DDIMConfig, free_init: FreeInit, steps: int, **kwargs):
    saved = oracle.scheduler
    oracle.scheduler = scheduler_oracle(name, config)
    try:
        return _oracle_free_init(oracle, free_init, steps, **kwargs)
    finally:
        oracle.scheduler = saved


# ------------------------------------------------------------------------------------------ video-to-video

@pytest.mark.parametrize("name", SAMPLERS)
def test_video_to_video_every_sampler_matches_diffusers(ours, oracle, name: str) -> None:
    # 5 steps at strength 0.6: diffusers runs the last 3 (t_start 2), so DPM++ takes a second-order step and
    # LCM / Euler a draw step noise after the posterior and diffusion noise
    video = _clip(4, seed=5)
    with torch.no_grad():
        expected = _v2v_oracle(oracle, name, DDIMConfig())(
            video=_pil(video), prompt=PROMPTS[0], negative_prompt="blurry", height=H, width=W,
            num_inference_steps=5, strength=0.6, guidance_scale=7.5, output_type="pt",
            generator=torch.Generator("cpu").manual_seed(4)).frames.float()
    got = ours(PROMPTS[0], video=video, negative_prompt="blurry", steps=5, strength=0.6, guidance_scale=7.5,
               seed=4, sampler=name, progress=False)
    _check(f"video-to-video, {name}, strength 0.6", got, expected)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras"])
def test_video_to_video_full_strength_no_cfg_matches_diffusers(ours, oracle, name: str) -> None:
    video = _clip(4, seed=6)
    with torch.no_grad():
        expected = _v2v_oracle(oracle, name, DDIMConfig())(
            video=_pil(video), prompt=PROMPTS[1], height=H, width=W, num_inference_steps=4, strength=1.0,
            guidance_scale=1.0, output_type="pt", generator=torch.Generator("cpu").manual_seed(6)).frames.float()
    got = ours(PROMPTS[1], video=video, steps=4, strength=1.0, guidance_scale=1.0, seed=6, sampler=name,
               progress=False)
    _check(f"video-to-video, {name}, strength 1, no CFG", got, expected)


def test_sampler_noising_follows_each_diffusers_scheduler() -> None:
    # the starting latents of video-to-video: add_noise at the first step run, per sampler, vs diffusers
    x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for name in SAMPLERS:
        ref = scheduler_oracle(name, DDIMConfig())
        ref.set_timesteps(7)
        run = SamplerRun(make_sampler(name, DDIM()), 7, start=3)
        t = torch.full((2,), run.timesteps[0])
        assert run.timesteps == ref.timesteps[3:].tolist()
        expected = ref.add_noise(x0, noise, ref.timesteps[3:4].repeat(2))
        assert (run.add_noise(x0, noise, t) - expected).abs().max() <= 1e-6, name
    with pytest.raises(ValueError, match="start must be a step index in \\[0, 4\\)"):
        SamplerRun(make_sampler("euler", DDIM()), 4, start=4)


# ------------------------------------------------------------------------------------------ FreeInit

FREE_INIT = FreeInit(iterations=3, method="butterworth", order=4, spatial_stop=0.25, temporal_stop=0.25)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_free_init_leading_spacing_matches_diffusers(ours, oracle, name: str) -> None:
    # AnimateDiff's own config; 3 steps per round so DPM++ takes a second-order step in each
    expected = _free_init_oracle(oracle, name, DDIMConfig(), FREE_INIT, 3, prompt=PROMPTS[0], negative_prompt="blurry",
                                 guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7))
    got = tp._sample(ours, PROMPTS[0], negative_prompt="blurry", guidance_scale=7.5, seed=7, steps=3, sampler=name,
                     free_init=FREE_INIT)
    _check(f"FreeInit, {name}, leading", got, expected)
    plain = tp._sample(ours, PROMPTS[0], negative_prompt="blurry", guidance_scale=7.5, seed=7, steps=3, sampler=name)
    assert (got - plain).abs().max() > 1e-3  # the extra rounds changed the video


@pytest.mark.parametrize("name", SAMPLERS)
def test_free_init_trailing_spacing_matches_diffusers(trailing, oracle, name: str) -> None:
    # "trailing" starts at t = 999, so every diffusers scheduler finds FreeInit's diffusion timestep
    expected = _free_init_oracle(oracle, name, TRAILING, FREE_INIT, 3, prompt=PROMPTS[1], guidance_scale=5.0,
                                 generator=torch.Generator("cpu").manual_seed(8))
    got = tp._sample(trailing, PROMPTS[1], guidance_scale=5.0, seed=8, steps=3, sampler=name, free_init=FREE_INIT)
    _check(f"FreeInit, {name}, trailing", got, expected)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "lcm"])
def test_free_init_fast_sampling_matches_diffusers(ours, trailing, oracle, name: str) -> None:
    # rounds of 1, 2 and 4 steps: each round's schedule (and the lookup of t = 999 in the last one) changes
    free_init = FreeInit(iterations=3, method="gaussian", spatial_stop=0.4, temporal_stop=0.6, use_fast_sampling=True)
    pipe, config = (trailing, TRAILING) if name == "euler_a" else (ours, DDIMConfig())
    expected = _free_init_oracle(oracle, name, config, free_init, 4, prompt=PROMPTS, guidance_scale=6.0,
                                 generator=torch.Generator("cpu").manual_seed(9))
    got = tp._sample(pipe, PROMPTS, guidance_scale=6.0, seed=9, steps=4, sampler=name, free_init=free_init)
    _check(f"FreeInit fast sampling, {name}", got, expected)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_free_init_euler_leading_spacing(ours, oracle, name: str, monkeypatch) -> None:
    # diffusers cannot run this (999 is not among the "leading" timesteps: IndexError); with only that lookup
    # patched to the training sigma at 999 (what ours uses), the rest of diffusers' loop gives our video
    with pytest.raises(IndexError):
        _free_init_oracle(oracle, name, DDIMConfig(), FREE_INIT, 3, prompt=PROMPTS[0], guidance_scale=7.5,
                          generator=torch.Generator("cpu").manual_seed(10))
    cls = type(scheduler_oracle(name, DDIMConfig()))
    original = cls.add_noise

    def add_noise(self, original_samples, noise, timesteps):
        if (self.timesteps == timesteps[0]).any():
            return original(self, original_samples, noise, timesteps)
        a = self.alphas_cumprod[timesteps.long()]
        sigma = ((1 - a) / a) ** 0.5
        return original_samples + noise * sigma.reshape(-1, *[1] * (original_samples.dim() - 1))

    monkeypatch.setattr(cls, "add_noise", add_noise)
    expected = _free_init_oracle(oracle, name, DDIMConfig(), FREE_INIT, 3, prompt=PROMPTS[0], guidance_scale=7.5,
                                 generator=torch.Generator("cpu").manual_seed(10))
    got = tp._sample(ours, PROMPTS[0], guidance_scale=7.5, seed=10, steps=3, sampler=name, free_init=FREE_INIT)
    _check(f"FreeInit, {name}, leading (diffusers' lookup patched)", got, expected)


def test_free_init_with_windows_and_every_sampler_runs(ours) -> None:
    # context windows over all frames change nothing; each round starts a fresh sampler run (same seed, same video)
    free_init = FreeInit(iterations=2)
    for name in ("euler_a", "dpmpp_2m"):
        kwargs = dict(guidance_scale=2.0, seed=1, steps=3, sampler=name, free_init=free_init)
        whole = tp._sample(ours, PROMPTS[0], **kwargs)
        assert torch.equal(whole, tp._sample(ours, PROMPTS[0], context_frames=FRAMES, context_overlap=1, **kwargs))
        small = tp._sample(ours, PROMPTS[0], num_frames=6, context_frames=4, context_overlap=2, **kwargs)
        assert small.shape == (1, 6, 3, H, W) and torch.isfinite(small).all()


# ------------------------------------------------------------------------------------------ CLI and GPU

def test_cli_sampler_with_video_and_with_free_init(models, ours, tmp_path) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.video import load_video_frames, save_video

    common = ["generate", "a red car", "--base", str(models.sd), "--motion-module", str(models.mm), "--steps", "4",
              "--guidance", "7.5", "--seed", "9", "--device", "cpu", "--no-progress"]
    save_video(_clip(4, seed=5), tmp_path / "in.gif")
    save_video(ours("a red car", video=tmp_path / "in.gif", steps=4, strength=0.5, guidance_scale=7.5, seed=9,
                    sampler="euler_a", progress=False), tmp_path / "v2v.gif")
    assert main([*common, "--sampler", "euler_a", "--video", str(tmp_path / "in.gif"), "--strength", "0.5",
                 "-o", str(tmp_path / "got_v2v.gif")]) == 0
    assert torch.equal(load_video_frames(tmp_path / "got_v2v.gif"), load_video_frames(tmp_path / "v2v.gif"))
    save_video(tp._sample(ours, "a red car", steps=4, guidance_scale=7.5, seed=9, sampler="dpmpp_2m",
                          free_init=FreeInit(iterations=2)), tmp_path / "fi.gif")
    assert main([*common, "--sampler", "dpmpp_2m", "--free-init", "2", "--frames", str(FRAMES), "--height", str(H),
                 "--width", str(W), "-o", str(tmp_path / "got_fi.gif")]) == 0
    assert torch.equal(load_video_frames(tmp_path / "got_fi.gif"), load_video_frames(tmp_path / "fi.gif"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "lcm"])
def test_cuda_fp32_follows_cpu_for_video_to_video_and_free_init(models, ours, monkeypatch, name: str) -> None:
    # the CPU generator draws every noise tensor on the CPU, so a CUDA pipeline gets the same draws, moved
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gpu = load_pipeline(models.sd, motion_module=models.mm, device="cuda", dtype=torch.float32)
    runs = [dict(prompt=PROMPTS[0], num_frames=FRAMES, height=H, width=W, free_init=FreeInit(iterations=2)),
            dict(prompt=PROMPTS[1], video=_clip(4), strength=0.6)]
    for kwargs in runs:
        common = dict(steps=3, guidance_scale=7.5, seed=6, sampler=name, progress=False, **kwargs)
        _check(f"{name}, cuda fp32 vs cpu: {sorted(kwargs)}", gpu(**common), ours(**common), atol=1e-3)
