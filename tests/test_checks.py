"""Numbers and sizes checked in the API: NaN/inf refused with a ValueError naming the argument, a warning for
sizes the loaded model was not trained on, and the CPU thread count chosen at load time."""

from __future__ import annotations

import warnings

import pytest
import torch

import animatediff_lite as ad
from animatediff_lite.checks import finite_number, untrained_sizes
from animatediff_lite.threads import DEFAULT_CPU_THREADS, apply_threads

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.fixture(scope="module")
def default_pipe():
    return ad.load_pipeline()


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_finite_number():
    assert finite_number("x", 3) == 3.0 and finite_number("x", torch.tensor(0.5)) == 0.5
    assert finite_number("x", 0, minimum=0) == 0.0
    for value in BAD:
        with pytest.raises(ValueError, match="x must be a finite number"):
            finite_number("x", value)
    with pytest.raises(ValueError, match="x must be >= 0"):
        finite_number("x", -1, minimum=0)
    with pytest.raises(ValueError, match="x must be > 0"):
        finite_number("x", 0, minimum=0, exclusive=True)
    for value in ("7", None, True):
        with pytest.raises(ValueError, match="x must be a number"):
            finite_number("x", value)


@pytest.mark.parametrize("value", [*BAD, -1.0])
def test_pipeline_refuses_bad_guidance_and_eta(default_pipe, value):
    with pytest.raises(ValueError, match="guidance_scale"):
        default_pipe("a red circle", steps=1, seed=0, guidance_scale=value, progress=False)
    with pytest.raises(ValueError, match="eta"):
        default_pipe("a red circle", steps=1, seed=0, eta=value, progress=False)


def test_guidance_zero_is_allowed(default_pipe):
    video = default_pipe("a red circle", steps=1, seed=0, guidance_scale=0.0, progress=False)
    assert torch.isfinite(video).all()


@pytest.mark.parametrize("fps", [*BAD, 0.0, -8.0])
def test_fps_refused_in_save_video_and_before_generating(tmp_path, fps, monkeypatch):
    with pytest.raises(ValueError, match="fps"):
        ad.save_video(torch.rand(2, 3, 8, 8), tmp_path / "x.gif", fps=fps)
    assert not (tmp_path / "x.gif").exists()

    def no_loading(*args, **kwargs):
        raise AssertionError("generate() loaded the model before checking fps")

    monkeypatch.setattr("animatediff_lite.api.load_pipeline", no_loading)  # api imports it at module level
    with pytest.raises(ValueError, match="fps"):
        ad.generate("a red circle", out=tmp_path / "y.gif", fps=fps)


@pytest.mark.parametrize("scale", BAD)
def test_lora_scales_refused_before_any_merge(default_pipe, scale, tmp_path):
    before = {k: v.clone() for k, v in default_pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="LoRA scale for .*b.safetensors"):
        ad.apply_loras(default_pipe, [(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", scale)])
    with pytest.raises(ValueError, match="LoRA scale"):
        ad.merge_lora(default_pipe.unet, {}, scale)
    after = default_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_default_model_records_its_training_sizes(default_pipe):
    assert default_pipe.trained_for == {"num_frames": 8, "height": 32, "width": 32}
    assert untrained_sizes(None, num_frames=99) is None  # a model that records nothing: never warned about
    assert untrained_sizes(default_pipe.trained_for, num_frames=8, height=32, width=32) is None


@pytest.mark.parametrize("kwargs,expected", [
    ({}, None), ({"num_frames": 16}, "num_frames=16"), ({"height": 64, "width": 64}, "height=64"),
    ({"num_frames": 16, "context_frames": 8, "context_overlap": 2}, None),  # the motion module sees 8 at a time
    ({"num_frames": 12, "context_frames": 12, "context_overlap": 4}, "num_frames=12"),
])
def test_warning_outside_the_trained_sizes(default_pipe, kwargs, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default_pipe("a red circle moving up", steps=1, seed=0, progress=False, **kwargs)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and expected in notes[0] and "8 frames of 32x32" in notes[0]
        assert "\n" not in notes[0]


def test_threads_argument(keep_threads, monkeypatch):
    ad.load_pipeline(threads=2)
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ad.load_pipeline()
    assert torch.get_num_threads() == DEFAULT_CPU_THREADS
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: left alone
    assert apply_threads(None, torch.device("cpu")) == 2
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="threads"):
            ad.load_pipeline(threads=bad)


@pytest.mark.parametrize("name", ["beta_start", "beta_end", "clip_sample_range"])
@pytest.mark.parametrize("value", [*BAD, -0.1])
def test_scheduler_config_floats_checked(name, value):
    with pytest.raises(ValueError, match=f"DDIMConfig.{name}"):
        ad.DDIMConfig(**{name: value})
