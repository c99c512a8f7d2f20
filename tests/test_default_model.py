"""The embedded default model: the shipped file, and what it generates for prompts it never saw in training.

The semantic test samples the 16 held-out (shape, colour, direction) combinations of
``synthetic.split_specs()`` (never seen as a triple in training) with the shipped weights and checks the
dominant colour and the direction the shape's centroid moves; the checks themselves are first validated on
rendered ground-truth clips.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.default_model import (
    DEFAULT_SAMPLE,
    FORMAT,
    default_weights_path,
    load_default_parts,
    load_default_pipeline,
    read_default_model,
    save_default_model,
    scheduler_config,
)
from animatediff_lite.toy.metrics import dominant_colour, motion_direction
from animatediff_lite.toy.synthetic import DIRECTIONS, ClipSpec, all_specs, render_clip, split_specs

SEED = 1234
STEPS = 15  # fewer than the default 20 to keep the test fast; the rate is about the same (docs/default_model.md)


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


@pytest.fixture(scope="module")
def held_out_videos(pipe):
    _, held_out = split_specs()
    size = DEFAULT_SAMPLE["height"]
    video = pipe([s.caption for s in held_out], num_frames=DEFAULT_SAMPLE["num_frames"], height=size, width=size,
                 steps=STEPS, guidance_scale=DEFAULT_SAMPLE["guidance_scale"], seed=SEED, progress=False)
    return held_out, video


def test_shipped_file_format_and_size():
    path = default_weights_path()
    assert path.is_file(), f"{path} missing: run examples/train_tiny_default.py"
    assert path.stat().st_size <= 20 * 2**20, f"{path} is {path.stat().st_size / 2**20:.1f} MiB > 20 MiB"
    parts, config, metadata = read_default_model(path)
    assert metadata["format"] == FORMAT
    assert set(parts) == {"text_encoder", "vae", "unet"}
    assert all(t.dtype == torch.float16 for p in parts.values() for t in p.values())
    assert any(".motion_modules." in f".{k}" for k in parts["unet"])
    assert config.clip.vocab_size == 49408  # the whole CLIP vocabulary, as the real tokenizer needs
    assert parts["text_encoder"]["embeddings.token_embedding.weight"].shape[0] == 49408
    assert config.vae.scaling_factor != 1.0  # the trained latent scale, not the placeholder
    assert json.loads(metadata["sample"])["num_frames"] == DEFAULT_SAMPLE["num_frames"]
    assert "train_tiny_default.py" in metadata["recipe"]


def test_loads_strictly_and_runs_in_bf16():
    tokenizer, text_encoder, vae, unet, config, _ = load_default_parts(dtype=torch.bfloat16)
    assert unet.motion is not None and unet.motion.version == "v2"
    assert vae.downsample_factor == 4
    assert next(unet.parameters()).dtype == torch.bfloat16
    ids = tokenizer(["a red circle moving up"])
    assert text_encoder(ids).shape == (1, 77, config.clip.hidden_size)


def test_loading_does_not_import_the_compiler():
    """The main command stays quick to start: building modules on the meta device must not pull in
    torch._dynamo (1-2 s, ~150 MB; once triggered by nn.Embedding's init, see clip._embedding)."""
    code = ("import sys, animatediff_lite as ad; ad.load_pipeline(); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_file_is_a_checkpoint_error(tmp_path):
    from animatediff_lite.loading.io import save_state_dict

    other = tmp_path / "other.safetensors"
    save_state_dict({"unet.conv_in.weight": torch.zeros(1)}, other, {"format": "something else"})
    with pytest.raises(CheckpointError, match="format"):
        read_default_model(other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(default_weights_path().read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_default_pipeline(path=truncated)


def test_scheduler_settings_travel_in_the_metadata(tmp_path):
    from animatediff_lite.scheduler import DDIMConfig

    tokenizer, text_encoder, vae, unet, config, metadata = load_default_parts()
    assert scheduler_config(metadata).prediction_type == load_default_pipeline().scheduler.config.prediction_type
    path = tmp_path / "v.safetensors"
    v_pred = DDIMConfig(prediction_type="v_prediction", timestep_spacing="trailing")
    save_default_model(path, text_encoder, vae, unet, config, scheduler=v_pred)
    _, _, saved = read_default_model(path)
    assert json.loads(saved["scheduler"]) == {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    assert load_default_pipeline(path=path).scheduler.config == v_pred
    save_default_model(path, text_encoder, vae, unet, config)  # AnimateDiff's DDIM: no entry needed
    assert "scheduler" not in read_default_model(path)[2]
    with pytest.raises(CheckpointError, match="scheduler"):
        scheduler_config({"scheduler": '{"beta_ends": 0.02}'})


@pytest.mark.parametrize("spec", [s for s in all_specs() if s.motion in DIRECTIONS][::5], ids=lambda s: s.caption)
def test_checks_are_right_on_rendered_clips(spec):
    video = render_clip(spec, frames=8, height=32, seed=7)
    assert dominant_colour(video) == spec.colour
    assert motion_direction(video) == spec.motion


def test_checks_reject_still_and_empty_clips():
    still = render_clip(ClipSpec("square", "red", "growing"), frames=8, height=32, seed=3)
    assert motion_direction(still) is None
    grey = np.full((8, 3, 32, 32), 0.3, np.float32)
    assert dominant_colour(grey) is None and motion_direction(grey) is None


def _held_out_report(held_out, video, check_direction: bool) -> tuple[float, str]:
    rows, hits = [], 0
    for spec, v in zip(held_out, video, strict=True):
        colour, direction = dominant_colour(v), motion_direction(v)
        ok = colour == spec.colour and (direction == spec.motion or not check_direction)
        hits += ok
        rows.append(f"{spec.caption:32s} -> {colour} / {direction} {'ok' if ok else 'MISS'}")
    rate = hits / len(held_out)
    report = "\n".join(rows) + f"\nheld-out success: {hits}/{len(held_out)} = {rate:.0%}"
    print("\n" + report)
    return rate, report


def test_held_out_prompts_colour(held_out_videos):
    held_out, video = held_out_videos
    assert len(held_out) >= 12
    rate, report = _held_out_report(held_out, video, check_direction=False)
    assert rate >= 0.8, report


# The criterion: colour and direction right for >= 80% of the held-out prompts.
def test_held_out_prompts_colour_and_direction(held_out_videos):
    held_out, video = held_out_videos
    assert len(held_out) >= 12
    rate, report = _held_out_report(held_out, video, check_direction=True)
    assert rate >= 0.8, report


def test_it_animates(held_out_videos):
    _, video = held_out_videos
    change = (video[:, -1] - video[:, 0]).abs().mean(dim=(1, 2, 3))  # per video
    assert bool((change > 0.01).all()), change


def test_same_seed_same_video(pipe):
    size = DEFAULT_SAMPLE["height"]
    kw = dict(num_frames=DEFAULT_SAMPLE["num_frames"], height=size, width=size, steps=4, seed=7, progress=False)
    a = pipe("a blue square moving right", **kw)
    b = pipe("a blue square moving right", **kw)
    c = pipe("a blue square moving right", **{**kw, "seed": 8})
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
