"""FreeInit against diffusers' AnimateDiffPipeline with ``enable_free_init`` on the tiny model of test_pipeline.py.

Same seed, same settings: the oracle's noise draws (initial latents, each round's fresh float32 noise, eta noise)
come from the same CPU generator in the same order, so the videos must agree to 2e-4. "box" is not in diffusers:
its mask is checked by hand and then fed to the oracle in place of diffusers' filter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_oracle

import animatediff_lite as ad
from animatediff_lite.free_init import FreeInit, frequency_mix

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_pipeline import FRAMES, PROMPTS, H, W, _check, _run_oracle, _sample  # noqa: E402

models, oracle, ours = tp.models, tp.oracle, tp.ours  # the tiny model and its diffusers oracle (module fixtures)


def _oracle_free_init(oracle, free_init: FreeInit, steps: int = tp.STEPS, **kwargs) -> torch.Tensor:
    oracle.enable_free_init(num_iters=free_init.iterations, use_fast_sampling=free_init.use_fast_sampling,
                            method=free_init.method, order=free_init.order,
                            spatial_stop_frequency=free_init.spatial_stop,
                            temporal_stop_frequency=free_init.temporal_stop)
    try:
        with torch.no_grad():
            out = oracle(num_frames=kwargs.pop("num_frames", FRAMES), height=H, width=W, num_inference_steps=steps,
                         output_type="pt", **kwargs).frames
        return out.float()
    finally:
        oracle.disable_free_init()


@pytest.mark.parametrize("free_init", [
    FreeInit(iterations=3, method="butterworth", order=4, spatial_stop=0.25, temporal_stop=0.25),
    FreeInit(iterations=2, method="gaussian", spatial_stop=0.4, temporal_stop=0.6),
    FreeInit(iterations=3, method="ideal", spatial_stop=0.3, temporal_stop=0.5),
    FreeInit(iterations=2, method="butterworth", order=2, spatial_stop=0.5, temporal_stop=0.0),  # stop 0: no filter
], ids=["butterworth", "gaussian", "ideal", "stop0"])
def test_free_init_matches_diffusers(ours, oracle, free_init: FreeInit) -> None:
    expected = _oracle_free_init(oracle, free_init, prompt=PROMPTS[0], negative_prompt="blurry", guidance_scale=7.5,
                                 generator=torch.Generator("cpu").manual_seed(11))
    got = _sample(ours, PROMPTS[0], negative_prompt="blurry", guidance_scale=7.5, seed=11, free_init=free_init)
    _check(f"FreeInit {free_init.method}", got, expected)
    plain = _sample(ours, PROMPTS[0], negative_prompt="blurry", guidance_scale=7.5, seed=11)
    assert (got - plain).abs().max() > 1e-3  # the extra rounds did change the video


def test_fast_sampling_batch_and_eta_noise_match_diffusers(ours, oracle) -> None:
    free_init = FreeInit(iterations=3, method="butterworth", use_fast_sampling=True)
    assert free_init.round_steps(4) == [1, 2, 4]
    expected = _oracle_free_init(oracle, free_init, steps=4, prompt=PROMPTS, guidance_scale=6.0, eta=0.7,
                                 generator=torch.Generator("cpu").manual_seed(2))
    got = _sample(ours, PROMPTS, guidance_scale=6.0, eta=0.7, seed=2, steps=4, free_init=free_init)
    _check("FreeInit fast sampling, 2 prompts, eta 0.7", got, expected)


def test_box_filter_mask_and_run_with_it_in_the_oracle(ours, oracle, monkeypatch) -> None:
    box = FreeInit(iterations=2, method="box", spatial_stop=0.5, temporal_stop=0.5)
    mask = box.low_pass_filter(16, 8, 8)
    expected = torch.zeros(16, 8, 8)
    expected[4:12, 2:6, 2:6] = 1  # half-sizes round(8 // 2 * 0.5) = 2 in space, round(16 // 2 * 0.5) = 4 in time
    assert torch.equal(mask, expected)
    assert not FreeInit(method="box").low_pass_filter(4, 8, 8).any()  # round(2 * 0.25) = 0: an empty box

    # diffusers has no box filter: give its FreeInit loop ours; the rest (diffusion, draw, mix) is the oracle's
    monkeypatch.setattr(type(oracle), "_get_free_init_freq_filter",
                        lambda self, shape, device, *a, **k: box.low_pass_filter(*shape[-3:]).expand(shape).to(device))
    reference = _oracle_free_init(oracle, FreeInit(iterations=2, method="ideal"), prompt=PROMPTS[1], guidance_scale=7.5,
                                  generator=torch.Generator("cpu").manual_seed(4))
    got = _sample(ours, PROMPTS[1], guidance_scale=7.5, seed=4, free_init=box)
    _check("FreeInit box", got, reference)


def test_one_iteration_is_plain_sampling_and_windows_work(ours) -> None:
    kwargs = dict(guidance_scale=7.5, seed=5)
    assert torch.equal(_sample(ours, free_init=FreeInit(iterations=1), **kwargs), _sample(ours, **kwargs))
    free_init = FreeInit(iterations=2)
    whole = _sample(ours, free_init=free_init, **kwargs)
    assert torch.equal(whole, _sample(ours, free_init=free_init, context_frames=FRAMES, context_overlap=1, **kwargs))
    seen = []
    _sample(ours, free_init=free_init, callback=lambda i, t, x: seen.append((i, t)), **kwargs)
    assert seen == [(i, t) for _ in range(2) for i, t in enumerate(ours.scheduler.timesteps(tp.STEPS).tolist())]


def test_frequency_mix_extremes() -> None:
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 4, 6, 8, 8, generator=g), torch.randn(2, 4, 6, 8, 8, generator=g)
    assert torch.allclose(frequency_mix(x, noise, torch.ones(6, 8, 8)), x, atol=1e-5)
    assert torch.allclose(frequency_mix(x, noise, torch.zeros(6, 8, 8)), noise, atol=1e-5)
    half = FreeInit().low_pass_filter(6, 8, 8)
    assert 0 < half.min() and half.max() <= 1 and half[3, 4, 4] == 1  # the centre (zero frequency) passes


BAD = [({"iterations": 0}, "iterations"), ({"iterations": 2.0}, "iterations"), ({"method": "lanczos"}, "method"),
       ({"order": 0}, "order"), ({"spatial_stop": 1.5}, "spatial_stop"), ({"temporal_stop": -0.1}, "temporal_stop")]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[n for _, n in BAD])
def test_bad_settings_name_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"FreeInit {name}"):
        FreeInit(**kwargs)


def test_free_init_is_exported_and_type_checked(ours) -> None:
    assert ad.FreeInit is FreeInit
    with pytest.raises(ValueError, match="free_init"):
        _sample(ours, free_init={"iterations": 3})


def test_reference_run_helper_is_unchanged(oracle) -> None:
    # the oracle fixture is shared with test_pipeline.py: FreeInit must be off again after our runs
    assert not oracle.free_init_enabled
    assert _run_oracle(oracle, prompt=PROMPTS[0], guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(0)).shape == (1, FRAMES, 3, H, W)


def test_cli_free_init_flags(models, ours, tmp_path, capsys) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.video import load_video_frames, save_video

    common = ["generate", "a red car", "--base", str(models.sd), "--motion-module", str(models.mm), "--frames",
              str(FRAMES), "--height", str(H), "--width", str(W), "--steps", "3", "--guidance", "7.5", "--seed", "3",
              "--device", "cpu", "--no-progress"]
    free_init = FreeInit(iterations=2, method="gaussian", order=4, spatial_stop=0.4, temporal_stop=0.6,
                         use_fast_sampling=True)
    save_video(_sample(ours, "a red car", guidance_scale=7.5, seed=3, steps=3, free_init=free_init),
               tmp_path / "expected.gif")
    flags = ["--free-init", "2", "--free-init-method", "gaussian", "--free-init-stop", "0.4:0.6", "--free-init-fast"]
    assert main([*common, *flags, "-o", str(tmp_path / "got.gif")]) == 0
    assert torch.equal(load_video_frames(tmp_path / "got.gif"), load_video_frames(tmp_path / "expected.gif"))
    assert main([*common, "--free-init", "0", "-o", str(tmp_path / "x.gif")]) == 2
    assert "FreeInit iterations must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--free-init", "2", "--free-init-stop", "a:b"])
