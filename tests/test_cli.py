"""The command line: help everywhere, argument errors, info/convert on tiny files, presets, generate end to end."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from animatediff_lite.cli import build_parser, lora_spec, main
from animatediff_lite.config import TINY, MotionConfig
from animatediff_lite.presets import PRESETS_FILE, get_preset, load_presets

REFERENCE = ["ToonYou", "Lyriel", "RcnzCartoon", "MajicMix", "RealisticVision", "RealisticVision_v2"]


@pytest.mark.parametrize("argv", [[], ["generate"], ["info"], ["convert"], ["convert", "motion"], ["convert", "unet"],
                                  ["train"], ["presets"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: animatediff-lite" in capsys.readouterr().out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "animatediff_lite", "generate", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--motion-module" in r.stdout and "--preset" in r.stdout


@pytest.mark.parametrize("argv", [["generate", "--frames", "x"], ["generate", "--dtype", "float8"],
                                  ["frobnicate"], ["convert", "motion", "a", "b"], ["info"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_library_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage" * 10)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.ckpt" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["generate"]) == 2
    assert "prompt" in capsys.readouterr().err
    assert main(["generate", "--preset", "NoSuchPreset", "--models-dir", str(tmp_path)]) == 2
    assert "ToonYou" in capsys.readouterr().err  # lists the available names


def test_preset_missing_files_listed(tmp_path, capsys):
    assert main(["generate", "--preset", "ToonYou", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for expected in ["StableDiffusion/stable-diffusion-v1-5", "Motion_Module/mm_sd_v14.ckpt",
                     "Motion_Module/mm_sd_v15.ckpt", "DreamBooth_LoRA/toonyou_beta3.safetensors"]:
        assert expected in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("text,expected", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.ckpt:0.6", ("a.ckpt", 0.6)),
    ("C:/x/a.ckpt:-1", ("C:/x/a.ckpt", -1.0)), ("C:/x/a.ckpt", ("C:/x/a.ckpt", 1.0)),
])
def test_lora_spec(text, expected):
    assert lora_spec(text) == expected
    args = build_parser().parse_args(["generate", "p", "--lora", text, "--motion-lora", text])
    assert args.lora == [expected] and args.motion_lora == [expected]


def test_presets_load_and_pair_like_upstream():
    presets = load_presets()
    assert set(REFERENCE) <= set(presets)
    for name, p in presets.items():
        runs = p.runs()
        assert len(runs) == len(p.prompts), name  # every prompt gets a negative prompt and a seed
        assert all(isinstance(seed, int) and 0 <= seed < 2**64 for _, _, seed in runs), name
        assert p.steps == 25 and p.guidance_scale == 7.5 and (p.width, p.height, p.frames) == (512, 512, 16)
        assert p.dreambooth.startswith("DreamBooth_LoRA/") and all(m.startswith("Motion_Module/")
                                                                   for m in p.motion_modules)
    toon = get_preset("toonyou")
    assert toon.seeds[0] == 10788741199826055526 and toon.runs()[1][1].startswith("badhandv4")
    assert toon.motion_modules == ("Motion_Module/mm_sd_v14.ckpt", "Motion_Module/mm_sd_v15.ckpt")
    assert get_preset("RealisticVision_v2").motion_modules == ("Motion_Module/mm_sd_v15_v2.ckpt",)
    zoom = get_preset("ZoomIn")  # one seed and one negative prompt broadcast over the prompts
    assert zoom.motion_loras == (("MotionLoRA/v2_lora_ZoomIn.ckpt", 1.0),) and zoom.runs()[0][2] == 45987230
    assert get_preset("Tusun").lora == "DreamBooth_LoRA/TUSUN.safetensors" and get_preset("Tusun").lora_scale == 0.6


def test_preset_pairing_rules(tmp_path):
    text = PRESETS_FILE.read_text()
    (tmp_path / "p.toml").write_text(text + '\n[Mine]\nmotion_modules = ["m.ckpt"]\ndreambooth = ""\nseeds = ["-1"]\n'
                                     'prompts = ["a", "b", "c"]\nnegative_prompts = ["n1", "n2"]\n')
    mine = load_presets(tmp_path / "p.toml")["Mine"]
    # Upstream: one seed is repeated, the negative list (2 entries) is zipped: the third prompt is dropped.
    assert mine.runs() == [("a", "n1", None), ("b", "n2", None)]
    (tmp_path / "bad.toml").write_text('[Broken]\nprompts = []\n')
    with pytest.raises(ValueError, match="Broken"):
        load_presets(tmp_path / "bad.toml")


def test_info_on_tiny_files(tmp_path, capsys):
    from animatediff_lite.unet import UNet3D

    unet = UNet3D(TINY.unet, MotionConfig.for_version("v2", TINY.unet.norm_num_groups))
    motion = {k: v.half() for k, v in unet.state_dict().items() if "motion_modules." in k and not k.endswith(".pe")}
    torch.save({"state_dict": motion}, tmp_path / "mm_tiny.ckpt")
    assert main(["info", str(tmp_path / "mm_tiny.ckpt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "original_motion_module" and info["generation"] == "v2" and info["mid_block"]
    assert info["reason"] and info["parameters"] == sum(v.numel() for v in motion.values())
    assert info["dtypes"] == {"float16": len(motion)}

    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    assert main(["info", str(tmp_path / "l.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kohya_lora" in out and "lora_modules" in out
    assert "parameters        257" in out  # 2 * 128 + the alpha scalar


def test_convert_motion_roundtrip(tmp_path, capsys):
    from animatediff_lite.loading.motion_load import read_motion_module
    from animatediff_lite.unet import UNet3D

    torch.manual_seed(0)
    unet = UNet3D(TINY.unet, MotionConfig.for_version("v3", TINY.unet.norm_num_groups))
    motion = {k: torch.randn_like(v) for k, v in unet.state_dict().items()
              if "motion_modules." in k and not k.endswith(".pe")}
    torch.save(motion, tmp_path / "mm.ckpt")
    assert main(["convert", "motion", str(tmp_path / "mm.ckpt"), str(tmp_path / "mm_diffusers.safetensors"),
                 "--to", "diffusers", "--motion-module-version", "v3"]) == 0
    assert main(["convert", "motion", str(tmp_path / "mm_diffusers.safetensors"), str(tmp_path / "back.safetensors"),
                 "--to", "original", "--motion-module-version", "v3"]) == 0
    back, info = read_motion_module(tmp_path / "back.safetensors", "v3")
    assert info.version == "v3"
    assert set(back) == set(motion) and all(torch.equal(back[k], motion[k]) for k in motion)
