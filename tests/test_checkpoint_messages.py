"""Checkpoint messages name the file, what it looks like and what was expected; ``info`` describes every kind
of file the library loads, the embedded default model included (issue 14, items 3 and 4)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from animatediff_lite.cli import main
from animatediff_lite.config import TINY, CLIPConfig
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.default_model import default_weights_path
from animatediff_lite.loading.describe import describe
from animatediff_lite.loading.io import save_state_dict
from animatediff_lite.loading.motion_load import read_motion_module, save_motion_module
from animatediff_lite.loading.pipeline_load import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TINY.__class__(clip=CLIPConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1),
                        vae=TINY.vae, unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "cross_attention_dim": 64}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "examples" / "bench_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = bench.build_files(root, CONFIG, "v2")
    native, info = read_motion_module(paths["motion"])
    save_motion_module(native, root / "native_mm.safetensors", info.motion_config(8))
    w = torch.zeros(2, 32)
    k = "lora_unet_down_blocks_0_attentions_0_proj_in"
    kohya = {f"{k}.lora_down.weight": w, f"{k}.lora_up.weight": w.T.contiguous(), f"{k}.alpha": torch.tensor(1.0)}
    save_state_dict(kohya, root / "kohya.safetensors")
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor."
    save_state_dict({key + "to_q_lora.down.weight": w, key + "to_q_lora.up.weight": w.T.contiguous()},
                    root / "motion_lora.ckpt")
    (root / "notes.txt").write_text("remember to buy milk\n")
    return {**paths, "native_motion": root / "native_mm.safetensors", "kohya": root / "kohya.safetensors",
            "motion_lora": root / "motion_lora.ckpt", "notes": root / "notes.txt", "root": root}


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_text_file_as_base_says_it_is_text(files, capsys):
    with pytest.raises(CheckpointError, match=r"notes\.txt: looks like a text file, not a readable weights file; "
                                              r"expected a Stable Diffusion 1\.5 base model") as e:
        load_pipeline(files["notes"])
    assert "pop from empty list" not in str(e.value)  # torch's parse error of text is noise
    err = _cli_error(capsys, ["generate", "x", "--base", str(files["notes"]), "--steps", "1"])
    assert "notes.txt: looks like a text file" in err


def _media(root: Path) -> dict[str, Path]:
    """Images saved by PIL and the container headers of an MP4 and a WebM file: what a user may pass by mistake."""
    from PIL import Image

    paths = {kind: root / f"cond.{kind}" for kind in ("gif", "png", "jpg", "mp4", "webm")}
    for kind in ("gif", "png", "jpg"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(paths[kind])
    paths["mp4"].write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))  # an ISO BMFF box: size, "ftyp", brand
    paths["webm"].write_bytes(b"\x1a\x45\xdf\xa3" + bytes(64))  # the EBML header id
    return paths


@pytest.mark.parametrize("kind,looks", [("gif", "a GIF image"), ("png", "a PNG image"), ("jpg", "a JPEG image"),
                                        ("mp4", "an MP4/MOV video"), ("webm", "a WebM/MKV video")])
def test_an_image_or_video_as_weights_says_what_it_is(files, capsys, tmp_path, kind, looks):
    path = _media(tmp_path)[kind]
    expected = rf"cond\.{kind}: looks like {looks}, not a readable weights file; expected an SD1\.5 ControlNet"
    with pytest.raises(CheckpointError, match=expected) as e:
        load_pipeline(files["ldm_fp32"], controlnets=[(path, 1.0)])
    assert "torch.load" not in str(e.value)  # torch's parse error of an image is noise
    err = _cli_error(capsys, ["generate", "x", "--controlnet", str(path), "--control-video", str(path)])
    assert err.count("\n") == 1 and f"cond.{kind}: looks like {looks}, not a readable weights file" in err
    with pytest.raises(CheckpointError, match=rf"cond\.{kind}: looks like {looks}.*expected a Stable Diffusion"):
        load_pipeline(path)


def test_a_text_file_as_motion_module_is_named_not_the_base(files, capsys):
    default = default_weights_path()
    with pytest.raises(CheckpointError, match=r"notes\.txt: looks like a text file.*expected a motion module") as e:
        load_pipeline(default, motion_module=files["notes"])
    assert "default_model.safetensors" not in str(e.value)
    err = _cli_error(capsys, ["generate", "x", "--base", str(default), "--motion-module", str(files["notes"])])
    assert "notes.txt" in err and "holds an original AnimateDiff motion module" not in err


def test_a_missing_motion_module_without_base_is_checked_first(files, capsys):
    missing = files["root"] / "missing.ckpt"
    with pytest.raises(CheckpointError, match=r"missing\.ckpt: no such file or folder \(expected a motion module\)"):
        load_pipeline(motion_module=missing)
    assert "missing.ckpt: no such file" in _cli_error(capsys, ["generate", "x", "--motion-module", str(missing)])
    with pytest.raises(ValueError, match="motion_module given without base="):  # a good file: then the base
        load_pipeline(motion_module=files["motion"])


def test_wrong_kinds_say_what_they_hold(files):
    with pytest.raises(CheckpointError, match=r"mm_v2\.ckpt: holds an original AnimateDiff motion module .*\[only "
                                              r"motion_modules.*\]; base must be a Stable Diffusion 1\.5 base model"):
        load_pipeline(files["motion"])
    with pytest.raises(CheckpointError, match=r"ldm_fp16\.safetensors: is a base Stable Diffusion checkpoint, it "
                                              r"holds an LDM .*\[keys start with .*not a motion module"):
        load_pipeline(files["ldm_fp32"], motion_module=files["ldm_fp16"])
    with pytest.raises(CheckpointError, match=r"default_model\.safetensors: holds an animatediff-lite embedded "
                                              r"default model .*\[the metadata format is .*not a motion module"):
        load_pipeline(files["ldm_fp32"], motion_module=default_weights_path())
    with pytest.raises(CheckpointError, match=r"kohya\.safetensors: holds a kohya LoRA .*dreambooth must be"):
        load_pipeline(files["ldm_fp32"], dreambooth=files["kohya"])


def test_the_default_model_file_as_base_alone_loads_it(files):
    pipe = load_pipeline(default_weights_path())
    assert pipe.sample_defaults["num_frames"] == 8


@pytest.mark.parametrize("name,layout", [
    ("default", "default_model"), ("ldm_fp16", "ldm_single_file"), ("ldm_fp32", "ldm_single_file"),
    ("diffusers", "diffusers_folder"), ("motion", "original_motion_module"),
    ("native_motion", "native_motion_module"), ("kohya", "kohya_lora"), ("motion_lora", "motion_lora"),
])
def test_info_describes_every_kind(files, capsys, name, layout):
    path = default_weights_path() if name == "default" else files[name]
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == layout and info["reason"] and info["tensors"] > 0 and info["parameters"] > 0
    if layout == "default_model":
        assert info["generation"] == "v2" and info["sample_defaults"]["num_frames"] == 8
        assert info["dtypes"] == {"float16": info["tensors"]}
    if layout.endswith("motion_module"):
        assert info["generation"] == "v2" and info["mid_block"] is True
    if layout == "diffusers_folder":
        assert set(info["parts"]) == {"unet", "vae", "text_encoder"}
    if layout.endswith("lora"):
        assert info["lora_modules"] == 1 and info["ranks"] == [2]
    assert describe(path)["layout"] == layout


def test_info_on_a_text_file_is_one_line(files, capsys):
    err = _cli_error(capsys, ["info", str(files["notes"])])
    assert err.count("\n") == 1 and "notes.txt: looks like a text file" in err


def test_bad_metadata_json_names_the_file(files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    native, _ = read_motion_module(files["native_motion"])
    save_file(native, tmp_path / "mm.safetensors", metadata={"format": "animatediff-lite/motion-module"})
    with pytest.raises(CheckpointError, match=r"mm\.safetensors: native motion-module metadata without a valid "
                                              r"motion_config \("):
        read_motion_module(tmp_path / "mm.safetensors")
    with safe_open(default_weights_path(), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(default_weights_path()), tmp_path / "dm.safetensors", metadata={**metadata, "sample": "{"})
    with pytest.raises(CheckpointError, match=r"dm\.safetensors: the 'sample' metadata is not JSON \("):
        describe(tmp_path / "dm.safetensors")
