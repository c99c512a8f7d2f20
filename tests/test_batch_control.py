"""Control models in batch jobs, presets and the app: a job's ``controlnet`` / ``sparsectrl`` model keys load the
ControlNet / SparseCtrl files as the CLI flags do, the sidecar records them and ``--from`` remakes the video; a v3
SparseCtrl preset's file counts for --control-image and reaches the web app. Tiny random-weight models of
tests/test_controlnet.py and tests/test_sparsectrl.py (diffusers builds them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_oracle

from animatediff_lite.cli import main
from animatediff_lite.video import load_video_frames, save_video

require_oracle("diffusers")  # the fixtures below build their random models with diffusers
from tests import test_app  # noqa: E402
from tests import test_controlnet as tc  # noqa: E402
from tests import test_pipeline as tp  # noqa: E402
from tests import test_sparsectrl as ts  # noqa: E402
from tests.test_cli import use_presets  # noqa: E402
from tests.test_controlnet import _frames  # noqa: E402
from tests.test_pipeline import FRAMES, H, W  # noqa: E402
from tests.test_sparsectrl import _image  # noqa: E402

models, cn, sc = tp.models, tc.cn, ts.sc  # the tiny base, ControlNet and SparseCtrl fixtures
STEPS = 2


def _condition_video(folder: Path) -> Path:
    frames = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in _frames(4)])
    save_video(frames[None], folder, fps=8)  # a folder of PNG frames: lossless
    return folder


def _common(models) -> list[str]:
    return ["--base", str(models.sd), "--motion-module", str(models.mm), "--frames", str(FRAMES), "--height", str(H),
            "--width", str(W), "--steps", str(STEPS), "--seed", "3", "--device", "cpu", "--no-progress"]


def test_control_jobs_run_record_their_models_and_remake(models, cn, sc, tmp_path, capsys):
    """A ControlNet job and a SparseCtrl job give the videos of the same generate flags; their sidecars name the
    control files and inputs; --from remakes each byte for byte."""
    cond = _condition_video(tmp_path / "cond")
    _image(7).save(tmp_path / "first.png")
    _image(8).save(tmp_path / "last.png")
    sparse = sc.root / "v3_sd15_sparsectrl_scribble.ckpt"
    (tmp_path / "jobs.toml").write_text(
        f'[defaults]\nbase = "{models.sd}"\nmotion_module = "{models.mm}"\nframes = {FRAMES}\nheight = {H}\n'
        f'width = {W}\nsteps = {STEPS}\nseed = 3\nprompt = "a corgi"\n'
        f'[[jobs]]\nid = "cn"\ncontrolnet = [["{cn.dirs[0]}", 0.7]]\ncontrol_frames = "cond"\ncontrol_end = 0.6\n'
        f'[[jobs]]\nid = "sc"\nsparsectrl = "{sparse}"\ncontrol_images = {{0 = "first.png", 3 = "last.png"}}\n'
        'control_scale = 0.8\n')
    out = tmp_path / "out"
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().err

    assert main(["generate", "a corgi", *_common(models), "--controlnet", f"{cn.dirs[0]}:0.7", "--control-video",
                 str(cond), "--control-end", "0.6", "-o", str(tmp_path / "cn.gif")]) == 0
    assert main(["generate", "a corgi", *_common(models), "--sparsectrl", str(sparse), "--control-image",
                 f"0:{tmp_path / 'first.png'}", "--control-image", f"3:{tmp_path / 'last.png'}", "--control-scale",
                 "0.8", "-o", str(tmp_path / "sc.gif")]) == 0
    plain = tmp_path / "plain.gif"
    assert main(["generate", "a corgi", *_common(models), "-o", str(plain)]) == 0
    for name in ("cn", "sc"):
        assert torch.equal(load_video_frames(out / f"{name}.gif"), load_video_frames(tmp_path / f"{name}.gif")), name
        assert not torch.equal(load_video_frames(out / f"{name}.gif"), load_video_frames(plain)), name

    c = json.loads((out / "cn.json").read_text())
    assert c["controlnet"] == [[str(cn.dirs[0]), 0.7]] and c["control_frames"] == [str(cond)]
    assert c["control_end"] == 0.6 and c["control_images"] is None and "sparsectrl" not in c
    s = json.loads((out / "sc.json").read_text())
    assert s["sparsectrl"] == str(sparse) and s["control_scale"] == 0.8
    assert s["control_images"] == {"0": str(tmp_path / "first.png"), "3": str(tmp_path / "last.png")}
    for name in ("cn", "sc"):
        assert main(["generate", "--from", str(out / f"{name}.json"), "-o", str(tmp_path / "re"),
                     "--no-progress"]) == 0
        assert (tmp_path / "re" / f"{name}.gif").read_bytes() == (out / f"{name}.gif").read_bytes(), name


@pytest.mark.parametrize("keys, message", [
    ('control_images = {0 = "a.png"}', "job 3 (id x): control_images needs the model key 'sparsectrl'"),
    ('control_scale = 0.5', "job 3 (id x): control_scale needs the model key 'sparsectrl'"),
    ('control_frames = ["c.gif"]', "job 3 (id x): control_frames needs the model key 'controlnet'"),
    ('control_end = 0.5', "job 3 (id x): control_end needs the model key 'controlnet'"),
    ('controlnet = "cn"', "job 3 (id x): controlnet needs control_frames"),
    ('sparsectrl = "sc.ckpt"', "job 3 (id x): sparsectrl needs control_images"),
    ('controlnet = ["a", "b"]\ncontrol_frames = "c.gif"', "control_frames has 1 video(s) for 2 controlnet"),
    ('sparsectrl = "s"\ncontrol_images = {first = "a.png"}', "control_images keys must be frame numbers"),
    ('controlnet = "a"\ncontrol_frames = "c.gif"\ncontrol_start = "x"', "control_start must be a number"),
])
def test_control_keys_without_their_model_key_fail_before_anything_runs(tmp_path, capsys, keys, message):
    (tmp_path / "jobs.toml").write_text(f'[[jobs]]\nprompt = "a"\n[[jobs]]\nid = "y"\nprompt = "b"\n'
                                        f'[[jobs]]\nid = "x"\nprompt = "c"\n{keys}\n')
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing ran, not even the good jobs before it


def test_defaults_may_hold_the_control_model_and_jobs_their_inputs(tmp_path):
    from animatediff_lite.jobs import read_jobs

    (tmp_path / "jobs.toml").write_text('[defaults]\ncontrolnet = ["a", {path = "b", scale = 0.5}]\n'
                                        '[[jobs]]\nprompt = "p"\ncontrol_frames = ["x.gif", "y"]\n'
                                        'control_start = [0.1, 0.2]\n')
    (job,) = read_jobs(tmp_path / "jobs.toml")
    assert job.load_kwargs()["controlnets"] == [(str(tmp_path / "a"), 1.0), (str(tmp_path / "b"), 0.5)]
    assert job.call_kwargs()["control_frames"] == [str(tmp_path / "x.gif"), str(tmp_path / "y")]
    assert job.call_kwargs()["control_start"] == [0.1, 0.2] and "controlnet" not in job.load_kwargs()


@pytest.fixture
def sparse_preset(models, sc, tmp_path, monkeypatch):
    """A tiny v3 SparseCtrl preset (file and key frame under a models folder) as the shipped presets file."""
    root = tmp_path / "models"
    (root / "StableDiffusion").mkdir(parents=True)
    (root / "StableDiffusion" / "sd").symlink_to(models.sd)
    (root / "mm").symlink_to(models.mm)
    (root / "SparseCtrl").mkdir()
    (root / "SparseCtrl" / "sc.ckpt").symlink_to(sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    _image(9).save(root / "key.png")
    use_presets(tmp_path, monkeypatch,
        '[Tiny]\nbase = "StableDiffusion/sd"\nmotion_modules = ["mm"]\ndreambooth = ""\nlora_scale = 1.0\n'
        f'width = {W}\nheight = {H}\nframes = {FRAMES}\nfps = 8\nsteps = {STEPS}\nguidance_scale = 8.5\n'
        'sparsectrl = "SparseCtrl/sc.ckpt"\ncontrol_images = [{ frame = 2, path = "key.png" }]\n'
        'seeds = ["3"]\nprompts = ["a boat"]\nnegative_prompts = ["worst quality"]\n')
    return root


def _library_gif(models, sc, path: Path, **control) -> Path:
    from animatediff_lite.loading.pipeline_load import load_pipeline

    pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    video = pipe("a boat", negative_prompt="worst quality", num_frames=FRAMES, height=H, width=W, steps=STEPS,
                 guidance_scale=8.5, seed=3, progress=False, **control)
    return save_video(video, path)


def test_sparsectrl_preset_takes_control_image_and_scale(models, sc, sparse_preset, tmp_path, capsys):
    """--control-image / --control-scale with a v3 SparseCtrl preset replace its key frames and scale (they were
    refused: "need --sparsectrl" although the preset names the SparseCtrl file)."""
    _image(10).save(tmp_path / "other.png")
    out = tmp_path / "samples"
    assert main(["generate", "--preset", "Tiny", "--models-dir", str(sparse_preset), "-o", str(out), "--device",
                 "cpu", "--no-progress", "--control-image", f"1:{tmp_path / 'other.png'}", "--control-scale",
                 "0.7"]) == 0, capsys.readouterr().err
    expected = _library_gif(models, sc, tmp_path / "expected.gif", control_images={1: _image(10)}, control_scale=0.7)
    (got,) = (out / "sample").iterdir()
    assert torch.equal(load_video_frames(got), load_video_frames(expected))
    log = json.loads((out / "config.json").read_text())
    assert log["control_images"] == {"1": str(tmp_path / "other.png")} and log["control_scale"] == 0.7
    # Without a SparseCtrl preset or --sparsectrl the flags are still refused, naming both ways out.
    assert main(["generate", "a", "--control-image", f"0:{tmp_path / 'other.png'}", "-o", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert "--control-image/--control-scale need --sparsectrl FILE (or a SparseCtrl --preset)" in err


def test_app_passes_a_sparsectrl_presets_file_and_key_frames(models, sc, sparse_preset, tmp_path):
    from animatediff_lite.app.models import NONE, preset_form, scan
    from animatediff_lite.app.studio import Studio
    from animatediff_lite.presets import get_preset

    form = preset_form(get_preset("Tiny"))
    assert (form["sparsectrl"], form["control_images"]) == ("SparseCtrl/sc.ckpt", "2:key.png")
    assert scan(sparse_preset).sparsectrl == ["SparseCtrl/sc.ckpt"]
    studio = Studio(sparse_preset, tmp_path / "out", "cpu")
    path, settings = studio.generate(form)
    assert settings["sparsectrl"] == str((sparse_preset / "SparseCtrl" / "sc.ckpt").resolve())
    assert settings["control_images"] == {"2": str(sparse_preset / "key.png")}
    expected = _library_gif(models, sc, tmp_path / "expected.gif", control_images={2: _image(9)})
    assert torch.equal(load_video_frames(path), load_video_frames(expected))
    with pytest.raises(ValueError, match="Key frames: expected one FRAME:FILE per line"):
        studio.generate({**form, "control_images": "key.png"})
    with pytest.raises(ValueError, match="control_images needs the model key 'sparsectrl'"):
        studio.generate({**form, "sparsectrl": NONE})
    ui = test_app.app_ui()  # the page binds the two fields and a preset fills them
    assert {"sparsectrl", "control_images"} <= set(ui.PRESET_KEYS) <= set(ui.FORM)
