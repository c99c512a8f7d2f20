"""Video-to-video against diffusers' AnimateDiffVideoToVideoPipeline on the tiny model of test_pipeline.py.

The oracle shares the (GroupNorm-patched) UNetMotionModel, VAE, CLIP and tokenizer of test_pipeline's oracle and
gets the input as a list of PIL images; ours gets the same frames as a tensor, a PIL list or a GIF path. Same seed:
the VAE posterior noise (per 16 frames) and then the diffusion noise are drawn in diffusers' order, so <= 2e-4.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_oracle
from PIL import Image

from animatediff_lite.free_init import FreeInit
from animatediff_lite.video import load_video_frames, save_video
from animatediff_lite.video_input import first_step

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_pipeline import PROMPTS, H, W, _check  # noqa: E402

models, oracle, ours = tp.models, tp.oracle, tp.ours  # the tiny model and its diffusers oracle (module fixtures)


@pytest.fixture(scope="module")
def v2v_oracle(oracle):
    pipe = diffusers.AnimateDiffVideoToVideoPipeline(
        vae=oracle.vae, text_encoder=oracle.text_encoder, tokenizer=oracle.tokenizer, unet=oracle.unet,
        motion_adapter=oracle.motion_adapter, scheduler=diffusers.DDIMScheduler.from_config(oracle.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(frames: int, seed: int = 0) -> torch.Tensor:
    """A smooth moving pattern, quantised to 8 bits so PIL and tensor inputs hold the same values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, H // 4, W // 4, generator=g)
    video = torch.stack([torch.nn.functional.interpolate(base.roll(i, dims=2)[None], size=(H, W), mode="bilinear",
                                                         align_corners=False)[0] for i in range(frames)])
    return (video.clamp(0, 1) * 255).round() / 255  # (F, 3, H, W)


def _pil(video: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()) for f in video]


def _oracle_run(pipe, video: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(video=_pil(video), height=H, width=W, num_inference_steps=steps, output_type="pt",
                    **kwargs).frames.float()


def _ours(pipe, prompt, video, steps: int, **kwargs) -> torch.Tensor:
    return pipe(prompt, video=video, steps=steps, progress=False, **kwargs)


def test_tensor_input_with_guidance_matches_diffusers(ours, v2v_oracle) -> None:
    video = _clip(4)
    expected = _oracle_run(v2v_oracle, video, 5, prompt=PROMPTS[0], negative_prompt="blurry", strength=0.6,
                           guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0))
    got = _ours(ours, PROMPTS[0], video, 5, negative_prompt="blurry", strength=0.6, guidance_scale=7.5, seed=0)
    _check("video-to-video, tensor input, strength 0.6", got, expected)
    full = _ours(ours, PROMPTS[0], video, 5, negative_prompt="blurry", strength=1.0, guidance_scale=7.5, seed=0)
    assert (got - full).abs().max() > 1e-3  # the strength matters


def test_gif_path_and_pil_list_with_eta_match_diffusers(ours, v2v_oracle, tmp_path) -> None:
    save_video(_clip(5, seed=1), tmp_path / "in.gif")
    video = load_video_frames(tmp_path / "in.gif")
    expected = _oracle_run(v2v_oracle, video, 4, prompt=PROMPTS[1], strength=0.8, guidance_scale=6.0, eta=0.5,
                           generator=torch.Generator("cpu").manual_seed(1))
    for given in (tmp_path / "in.gif", str(tmp_path / "in.gif"), _pil(video)):
        got = _ours(ours, PROMPTS[1], given, 4, strength=0.8, guidance_scale=6.0, eta=0.5, seed=1)
        _check(f"video-to-video from {type(given).__name__}, eta 0.5", got, expected)


def test_18_frames_match_diffusers(ours, v2v_oracle) -> None:
    # diffusers encodes (and draws posterior noise for) 16 frames at a time; on a CPU generator draws whose sizes
    # are multiples of 16 continue one stream, so this checks the frame order rather than the grouping itself
    video = _clip(18, seed=2)
    expected = _oracle_run(v2v_oracle, video, 3, prompt=PROMPTS[0], strength=1.0, guidance_scale=1.0,
                           generator=torch.Generator("cpu").manual_seed(2))
    got = _ours(ours, PROMPTS[0], video, 3, strength=1.0, guidance_scale=1.0, seed=2)
    _check("video-to-video, 18 frames, strength 1, no CFG", got, expected)


def test_windows_batch_and_prompt_travel(ours) -> None:
    video = _clip(6, seed=3)
    kwargs = dict(strength=0.7, guidance_scale=7.5, seed=3)
    whole = _ours(ours, PROMPTS[0], video, 4, **kwargs)
    assert torch.equal(whole, _ours(ours, PROMPTS[0], video, 4, context_frames=6, context_overlap=2, **kwargs))
    windowed = _ours(ours, PROMPTS[0], video, 4, context_frames=4, context_overlap=2, **kwargs)
    assert windowed.shape == whole.shape == (1, 6, 3, H, W)
    batch = _ours(ours, PROMPTS, video, 4, num_videos_per_prompt=2, **kwargs)
    assert batch.shape == (4, 6, 3, H, W) and (batch[0] - batch[1]).abs().max() > 1e-4  # own noise per video
    travel = _ours(ours, {0: PROMPTS[0], 5: PROMPTS[1]}, video, 4, **kwargs)
    assert travel.shape == whole.shape and (travel - whole).abs().max() > 1e-4


def test_strength_picks_the_schedule_tail() -> None:
    assert first_step(25, 0.6) == 10 and first_step(25, 1.0) == 0 and first_step(5, 0.6) == 2
    with pytest.raises(ValueError, match="strength=0.1 with steps=5"):
        first_step(5, 0.1)


def _bad_cases(tmp_path):
    (tmp_path / "notes.gif").write_text("not a gif")
    (tmp_path / "notes.mp4").write_text("not an mp4")
    ok = _clip(4)
    return [
        (dict(video=ok, height=24), "video: the input has height=16 but height=24"),
        (dict(video=ok, num_frames=5), "num_frames=5"),
        (dict(video=ok, strength=0.0), "strength must be a number in \\(0, 1\\]"),
        (dict(video=ok, strength=1.5), "strength"),
        (dict(video=ok, strength=float("nan")), "strength"),
        (dict(strength=0.5), "strength applies to video-to-video only"),
        (dict(video=torch.zeros(33, 3, H, W)), "video: has 33 frames, more than the motion module's limit of 32"),
        (dict(video=tmp_path / "notes.gif"), "video: cannot read"),
        (dict(video=tmp_path / "missing.mp4"), "video: cannot read"),
        (dict(video=tmp_path / "notes.mp4"), "video: cannot read .*notes.mp4"),
        (dict(video=torch.zeros(4, 3, 20, 16)), "video: frames are 20x16"),
        (dict(video=ok * 2), "video: values must be finite and in \\[0, 1\\]"),
        (dict(video=ok[:, :2]), "video: expected a float tensor"),
        (dict(video=(ok * 255).byte()), "video: expected a float tensor"),
        (dict(video=[1, 2]), "video: expected"),
        (dict(video=ok, latents=torch.zeros(1, 4, 4, 8, 8)), "video and latents"),
        (dict(video=ok, free_init=FreeInit()), "video and free_init"),
        (dict(video=ok, strength=0.1, steps=5), "runs no denoising step"),
    ]


def test_bad_inputs_name_the_argument(ours, tmp_path) -> None:
    for kwargs, message in _bad_cases(tmp_path):
        kwargs = {"steps": 2, **kwargs}
        with pytest.raises(ValueError, match=message) as info:
            ours(PROMPTS[0], progress=False, **kwargs)
        assert "\n" not in str(info.value)  # one line for the CLI (ffmpeg's log is cut)


def test_cli_video_and_strength(models, ours, tmp_path, capsys) -> None:
    from animatediff_lite.cli import main

    save_video(_clip(4, seed=5), tmp_path / "in.gif")
    save_video(_ours(ours, "a red car", tmp_path / "in.gif", 4, strength=0.5, guidance_scale=7.5, seed=9),
               tmp_path / "expected.gif")
    common = ["generate", "a red car", "--base", str(models.sd), "--motion-module", str(models.mm), "--steps", "4",
              "--guidance", "7.5", "--seed", "9", "--device", "cpu", "--no-progress", "--video",
              str(tmp_path / "in.gif")]
    assert main([*common, "--strength", "0.5", "-o", str(tmp_path / "got.gif")]) == 0
    assert torch.equal(load_video_frames(tmp_path / "got.gif"), load_video_frames(tmp_path / "expected.gif"))
    assert main([*common, "--strength", "2", "-o", str(tmp_path / "x.gif")]) == 2
    assert "strength must be a number in (0, 1]" in capsys.readouterr().err
    assert main([*common[:-1], str(tmp_path / "none.mp4"), "-o", str(tmp_path / "x.gif")]) == 2
    assert "video: cannot read" in capsys.readouterr().err


def test_all_three_on_the_embedded_default_model() -> None:
    import animatediff_lite as ad

    kwargs = dict(steps=10, seed=0, progress=False)
    travel = ad.generate({0: "a red circle moving up", 7: "a blue square moving left"}, **kwargs)
    assert travel.shape == (1, 8, 3, 32, 32)
    assert ad.generate("a red circle moving up", free_init=ad.FreeInit(iterations=2), **kwargs).shape == travel.shape
    near = ad.generate("a blue square moving left", video=travel[0], strength=0.3, **kwargs)
    far = ad.generate("a blue square moving left", video=travel[0], strength=1.0, **kwargs)
    # a low strength keeps more of the input video
    assert (near - travel).abs().mean() < (far - travel).abs().mean()


@pytest.mark.gpu
def test_cuda_fp32_follows_cpu_for_all_three(models, ours, monkeypatch) -> None:
    # CPU generators on a CUDA pipeline: the same draws, moved; TF32 off so fp32 means fp32 (see test_pipeline.py)
    from animatediff_lite.loading.pipeline_load import load_pipeline

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gpu = load_pipeline(models.sd, motion_module=models.mm, device="cuda", dtype=torch.float32)
    runs = [dict(prompt={0: PROMPTS[0], 3: PROMPTS[1]}, num_frames=4, height=H, width=W),
            dict(prompt=PROMPTS[0], num_frames=4, height=H, width=W,
                 free_init=FreeInit(iterations=2, method="gaussian")),
            dict(prompt=PROMPTS[1], video=_clip(4), strength=0.6)]
    for kwargs in runs:
        common = dict(steps=3, guidance_scale=7.5, seed=6, progress=False, **kwargs)
        _check(f"cuda fp32 vs cpu: {sorted(kwargs)}", gpu(**common), ours(**common), atol=1e-3)
