"""Prompt travel against a reference loop on diffusers' UNetMotionModel fed per-frame text embeddings.

The reference encodes each key prompt with transformers' CLIP, interpolates the (77, D) outputs per frame with
the documented formula, feeds them as (2F, 77, D) encoder_hidden_states ([uncond frames; cond frames]) to the
tiny diffusers UNetMotionModel of tests/test_pipeline.py (motion GroupNorm patched to per frame), and steps
diffusers' DDIMScheduler; context windows average each window's guided prediction over the frames it covers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.prompt_travel import check_prompt_map, interpolate_frames
from animatediff_lite.scheduler import DDIMConfig

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_pipeline import STEPS, H, W, _check, _sample  # noqa: E402
from tests.test_samplers import oracle as scheduler_oracle  # noqa: E402

models, oracle, ours = tp.models, tp.oracle, tp.ours  # the tiny model and its diffusers oracle (module fixtures)

PROMPT_MAP = {0: "a cat walking", 3: "a tiger running", 5: "a lion resting"}


def _encode(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0][0]  # (77, D)


def _per_frame(pipe, prompt_map: dict[int, str] | str, num_frames: int) -> torch.Tensor:
    if isinstance(prompt_map, str):
        return _encode(pipe, prompt_map).expand(num_frames, -1, -1)
    keys = sorted(prompt_map)
    out = []
    for f in range(num_frames):
        if f <= keys[0]:
            out.append(_encode(pipe, prompt_map[keys[0]]))
        elif f >= keys[-1]:
            out.append(_encode(pipe, prompt_map[keys[-1]]))
        else:
            k0 = max(k for k in keys if k <= f)
            k1 = min(k for k in keys if k > f)
            a = (f - k0) / (k1 - k0)
            out.append((1 - a) * _encode(pipe, prompt_map[k0]) + a * _encode(pipe, prompt_map[k1]))
    return torch.stack(out)


def _reference(pipe, prompt, negative, latents: torch.Tensor, guidance: float,
               windows: list[list[int]] | None = None, scheduler=None, generator=None,
               steps: int = STEPS) -> torch.Tensor:
    """scheduler: a diffusers scheduler (default AnimateDiff's DDIM); generator: for its step noise."""
    frames = latents.shape[2]
    scheduler = scheduler or diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                                     steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        cond = _per_frame(pipe, prompt, frames)
        uncond = _per_frame(pipe, negative, frames) if guidance > 1 else None

        def eps(x: torch.Tensor, t, idx: list[int]) -> torch.Tensor:
            if uncond is None:
                return pipe.unet(x, t, encoder_hidden_states=cond[idx]).sample
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond[idx], cond[idx]])).sample
            u, c = out.chunk(2)
            return u + guidance * (c - u)

        x = latents.clone() * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            if windows is None:
                noise = eps(x_in, t, list(range(frames)))
            else:
                total, count = torch.zeros_like(x), torch.zeros(frames)
                for idx in windows:
                    total[:, :, idx] += eps(x_in[:, :, idx], t, idx)
                    count[idx] += 1
                noise = total / count[:, None, None]
            x = scheduler.step(noise, t, x, generator=generator).prev_sample
        video = pipe.decode_latents(x, decode_chunk_size=16)
        return pipe.video_processor.postprocess_video(video=video, output_type="pt").float()


def _latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 4, frames, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def test_prompt_travel_with_guidance_matches_reference_loop(ours, oracle) -> None:
    latents = _latents(6, 0)
    expected = _reference(oracle, PROMPT_MAP, "blurry", latents, 7.5)
    got = _sample(ours, PROMPT_MAP, negative_prompt="blurry", num_frames=6, guidance_scale=7.5, latents=latents)
    _check("prompt travel, guidance 7.5", got, expected)
    # the frames really got different text: the same noise under the first prompt alone differs
    plain = _sample(ours, PROMPT_MAP[0], negative_prompt="blurry", num_frames=6, guidance_scale=7.5, latents=latents)
    assert (got[:, 5] - plain[:, 5]).abs().max() > 1e-3


def test_negative_map_and_context_windows_match_reference_loop(ours, oracle) -> None:
    latents = _latents(7, 1)
    negative = {1: "blurry", 6: "low quality, watermark"}
    windows = [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]
    expected = _reference(oracle, PROMPT_MAP, negative, latents, 5.0, windows)
    got = _sample(ours, PROMPT_MAP, negative_prompt=negative, num_frames=7, guidance_scale=5.0, latents=latents,
                  context_frames=4, context_overlap=2)
    _check("prompt travel, negative map, context windows", got, expected)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m"])
def test_prompt_travel_with_context_windows_and_a_non_ddim_sampler_matches_reference_loop(ours, oracle,
                                                                                           name: str) -> None:
    # Euler a: scaled input, float timesteps and step noise from the generator; DPM++ 2M: second-order steps
    latents = _latents(7, 4)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]
    expected = _reference(oracle, PROMPT_MAP, "blurry", latents, 6.0, windows, steps=4,
                          scheduler=scheduler_oracle(name, DDIMConfig()), generator=torch.Generator().manual_seed(5))
    got = _sample(ours, PROMPT_MAP, negative_prompt="blurry", num_frames=7, guidance_scale=6.0, latents=latents,
                  context_frames=4, context_overlap=2, steps=4, sampler=name, seed=5)
    _check(f"prompt travel, {name}, context windows", got, expected)
    ddim = _sample(ours, PROMPT_MAP, negative_prompt="blurry", num_frames=7, guidance_scale=6.0, latents=latents,
                   context_frames=4, context_overlap=2, steps=4, seed=5)
    assert (got - ddim).abs().max() > 1e-3  # the sampler did change the video


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "lcm"])
def test_context_windows_with_a_non_ddim_sampler_match_reference_loop(ours, oracle, name: str) -> None:
    # one prompt (the reference feeds it to every frame), windows averaged over the frames they share
    latents = _latents(7, 6)
    windows = [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]
    expected = _reference(oracle, PROMPT_MAP[3], "", latents, 4.0, windows, steps=4,
                          scheduler=scheduler_oracle(name, DDIMConfig()), generator=torch.Generator().manual_seed(6))
    got = _sample(ours, PROMPT_MAP[3], num_frames=7, guidance_scale=4.0, latents=latents, context_frames=4,
                  context_overlap=2, steps=4, sampler=name, seed=6)
    _check(f"context windows, {name}", got, expected)


def test_prompt_travel_without_guidance_and_seeded(ours, oracle) -> None:
    seeded = _sample(ours, PROMPT_MAP, num_frames=6, guidance_scale=1.0, seed=3)
    latents = torch.randn(1, 4, 6, H // 2, W // 2, generator=torch.Generator("cpu").manual_seed(3))
    _check("prompt travel, guidance 1.0, seed 3", seeded, _reference(oracle, PROMPT_MAP, "", latents, 1.0))


def test_one_key_equals_the_plain_prompt(ours) -> None:
    kwargs = dict(num_frames=4, guidance_scale=7.5, seed=2, num_videos_per_prompt=2)
    plain = _sample(ours, "a red car", **kwargs)
    travel = _sample(ours, {2: "a red car"}, **kwargs)
    assert travel.shape == plain.shape == (2, 4, 3, H, W)
    assert (travel - plain).abs().max() <= 1e-6


def test_interpolation_formula() -> None:
    keys = torch.tensor([[[0.0]], [[4.0]], [[-2.0]]])  # (K=3, L=1, D=1)
    out = interpolate_frames([2, 6, 8], keys, 11)[:, 0, 0]
    expected = [0, 0, 0, 1, 2, 3, 4, 1, -2, -2, -2]
    assert out.tolist() == expected


BAD_MAPS = [({}, "empty"), ({8: "x"}, "frame 8"), ({-1: "x"}, "frame -1"), ({"two": "x"}, "frame indices"),
            ({1.5: "x"}, "frame indices"), ({0: 3}, "must be a str"), ({0: "a", "0": "b"}, "twice")]


@pytest.mark.parametrize("value,message", BAD_MAPS)
def test_bad_prompt_maps_name_the_argument(value, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_prompt_map(value, "prompt", 8)
    assert "prompt" in str(info.value)


def test_bad_travel_arguments_in_the_pipeline(ours) -> None:
    with pytest.raises(ValueError, match="negative_prompt: frame 9"):
        _sample(ours, "a cat", negative_prompt={9: "x"}, num_frames=4, guidance_scale=7.5)
    with pytest.raises(ValueError, match="negative_prompt"):
        _sample(ours, {0: "a"}, negative_prompt=["x"], num_frames=4, guidance_scale=7.5)
    with pytest.raises(ValueError, match="prompt map keys"):
        _sample(ours, {"x": "a"}, num_frames=4)
    assert check_prompt_map({"3": "b", 1: "a"}, "prompt", 4) == [(1, "a"), (3, "b")]  # TOML/JSON string keys


# ------------------------------------------------------------------------------------------ CLI

def _cli_common(models, tmp_path) -> list[str]:
    return ["generate", "--base", str(models.sd), "--motion-module", str(models.mm), "--frames", "6",
            "--height", str(H), "--width", str(W), "--steps", str(STEPS), "--guidance", "7.5", "--seed", "5",
            "--device", "cpu", "--no-progress"]


def test_cli_prompt_at_and_prompt_map_files(models, ours, tmp_path) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.video import load_video_frames, save_video

    expected = _sample(ours, {0: "a cat", 3: "a tiger"}, negative_prompt={0: "blurry", 5: "dark"}, num_frames=6,
                       guidance_scale=7.5, seed=5)
    save_video(expected, tmp_path / "expected.gif")
    (tmp_path / "map.toml").write_text('0 = "a cat"\n3 = "a tiger"\n[negative]\n0 = "blurry"\n5 = "dark"\n')
    (tmp_path / "map.json").write_text('{"3": "a tiger", "negative": {"0": "blurry", "5": "dark"}}')
    runs = {"toml": ["--prompt-map", str(tmp_path / "map.toml")],
            "json": ["a cat", "--prompt-map", str(tmp_path / "map.json")],  # positional prompt = frame 0
            "flags": ["--prompt-at", "0", "a cat", "--prompt-at", "3", "a tiger", "--prompt-map",
                      str(tmp_path / "map.json")]}
    for name, extra in runs.items():
        assert main([*_cli_common(models, tmp_path), *extra, "-o", str(tmp_path / f"{name}.gif")]) == 0
        assert torch.equal(load_video_frames(tmp_path / f"{name}.gif"), load_video_frames(tmp_path / "expected.gif"))


def test_cli_prompt_map_errors_exit_2(models, tmp_path, capsys, monkeypatch) -> None:
    from animatediff_lite.cli import main

    (tmp_path / "bad.json").write_text('{"zero": "a cat"}')
    (tmp_path / "broken.toml").write_text('0 = "a cat\n')
    cases = [(["--prompt-at", "x", "a cat"], "--prompt-at: FRAME"),
             (["--prompt-map", str(tmp_path / "bad.json")], "keys must be frame numbers"),
             (["--prompt-map", str(tmp_path / "broken.toml")], "not valid TOML"),
             (["--prompt-map", str(tmp_path / "missing.json")], "cannot read"),
             (["--prompt-at", "9", "a cat"], "frame 9"),
             (["a", "b", "--prompt-at", "2", "a cat"], "at most one positional prompt")]
    for extra, message in cases:
        assert main([*_cli_common(models, tmp_path), *extra, "-o", str(tmp_path / "x.gif")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and message in errors[0], errors
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun splits prompts over ranks: one travelling video cannot be split
    assert main([*_cli_common(models, tmp_path), "--prompt-at", "2", "a cat", "-o", str(tmp_path / "x.gif")]) == 2
    assert "run without torchrun" in capsys.readouterr().err
