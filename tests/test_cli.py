"""The command line: help everywhere, argument errors, info/convert on tiny files, presets, generate end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require_oracle
from PIL import Image
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
        if p.sparsectrl:  # the v3 SparseCtrl presets (guidance 8.5, random seeds): tests/test_sparsectrl.py
            continue
        runs = p.runs()
        assert len(runs) == len(p.prompts), name  # every prompt gets a negative prompt and a seed
        assert all(isinstance(seed, int) and 0 <= seed < 2**64 for _, _, seed in runs), name
        if p.sampler != "ddim":  # AnimateLCM: its own recipe (tests/test_samplers_animatelcm.py)
            continue
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


def test_convert_motion_keeps_v1_pe_length_and_native_config(tmp_path):
    from animatediff_lite.loading.io import read_state_dict
    from animatediff_lite.loading.motion_load import read_motion_module
    from animatediff_lite.unet import UNet3D

    unet = UNet3D(TINY.unet, MotionConfig.for_version("v1", TINY.unet.norm_num_groups))
    motion = {k: v for k, v in unet.state_dict().items() if "motion_modules." in k}
    torch.save({"state_dict": motion}, tmp_path / "mm_sd_v15.ckpt")
    assert main(["convert", "motion", str(tmp_path / "mm_sd_v15.ckpt"), str(tmp_path / "orig.ckpt"),
                 "--to", "original", "--motion-module-version", "v1"]) == 0
    pe = [v for k, v in read_state_dict(tmp_path / "orig.ckpt").items() if k.endswith("pos_encoder.pe")]
    assert pe and all(t.shape[1] == 24 for t in pe)  # v1 tables written back at their own length
    assert read_motion_module(tmp_path / "orig.ckpt")[1].version == "v1"  # detected from the PE length alone
    assert main(["convert", "motion", str(tmp_path / "orig.ckpt"), str(tmp_path / "mm.safetensors"),
                 "--to", "native"]) == 0
    assert read_motion_module(tmp_path / "mm.safetensors")[1].version == "v1"  # from the native metadata


def use_presets(tmp_path: Path, monkeypatch, text: str) -> Path:
    """Write ``text`` as tmp_path/presets.toml and make it the presets file the CLI reads."""
    import animatediff_lite.presets as presets_mod

    path = tmp_path / "presets.toml"
    path.write_text(text)
    monkeypatch.setattr(presets_mod, "PRESETS_FILE", path)
    return path


def write_tiny_loras(tmp_path: Path) -> tuple[Path, Path]:
    """A kohya LoRA (l.safetensors) and a MotionLoRA (ml.ckpt) on one projection each of the tiny models."""
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 4, generator=g)}, str(tmp_path / "l.safetensors"))
    mkey = ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
            ".processor.to_v_lora")
    torch.save({f"{mkey}.down.weight": torch.randn(4, 32, generator=g),
                f"{mkey}.up.weight": torch.randn(32, 4, generator=g)}, tmp_path / "ml.ckpt")
    return tmp_path / "l.safetensors", tmp_path / "ml.ckpt"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny SD folder saved by diffusers/transformers plus an original-layout v2 motion module, laid out
    like upstream's models/ folder (StableDiffusion/, Motion_Module/)."""
    diffusers = require_oracle("diffusers")
    transformers = require_oracle("transformers")
    from animatediff_lite.unet import UNet3D

    root = tmp_path_factory.mktemp("models")
    sd = root / "StableDiffusion" / "stable-diffusion-v1-5"
    torch.manual_seed(0)
    u = TINY.unet
    diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=u.cross_attention_dim, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups).save_pretrained(sd / "unet")
    diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                            latent_channels=4).save_pretrained(sd / "vae")
    c = TINY.clip
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, max_position_embeddings=77,
    )).save_pretrained(sd / "text_encoder")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                     "unet": ["diffusers", "UNet2DConditionModel"],
                                                     "vae": ["diffusers", "AutoencoderKL"],
                                                     "text_encoder": ["transformers", "CLIPTextModel"]}))
    unet = UNet3D(u, MotionConfig.for_version("v2", u.norm_num_groups))
    motion = {k: torch.randn_like(v) * 0.05 for k, v in unet.state_dict().items()
              if "motion_modules." in k and not k.endswith(".pe")}
    (root / "Motion_Module").mkdir()
    torch.save({"state_dict": motion}, root / "Motion_Module" / "mm_tiny_v2.ckpt")
    return root


@pytest.mark.parametrize("with_motion", [False, True])
def test_generate_end_to_end_gif(tiny_models, tmp_path, with_motion):
    from animatediff_lite.video import load_video_frames

    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    mm = ["--motion-module", str(tiny_models / "Motion_Module" / "mm_tiny_v2.ckpt")] if with_motion else []
    common = ["--base", str(sd), *mm, "--frames", "3", "--height", "16", "--width", "16",
              "--steps", "2", "--seed", "7", "--device", "cpu", "--no-progress"]
    assert main(["generate", "a corgi", "a cat", *common, "-o", str(tmp_path / "a.gif")]) == 0
    a = load_video_frames(tmp_path / "a.gif")
    assert a.shape == (3, 3, 16 + 4, 2 * 18 + 2)  # two videos side by side, 2 pixels of padding
    assert main(["generate", "a corgi", "a cat", *common, "-o", str(tmp_path / "b.gif")]) == 0
    assert torch.equal(a, load_video_frames(tmp_path / "b.gif"))  # same seed, same file
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 3 and im.info["loop"] == 0


def test_generate_prompts_split_over_torchrun_ranks(tiny_models, tmp_path):
    """torchrun ... generate --prompts FILE: each rank writes its share; files equal a 1-process --per-prompt run."""
    import subprocess
    import sys

    from animatediff_lite.video import load_video_frames

    prompts = ["a corgi", "a cat", "a red car", "a boat at sea", "a tree"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = ["generate", "--prompts", str(tmp_path / "prompts.txt"), "--base",
              str(tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"), "--motion-module",
              str(tiny_models / "Motion_Module" / "mm_tiny_v2.ckpt"), "--frames", "2", "--height", "16",
              "--width", "16", "--steps", "2", "--seed", "3", "--device", "cpu", "--no-progress"]
    assert main([*common, "--per-prompt", "-o", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "animatediff_lite", *common, "-o", str(tmp_path / "two")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == len(prompts)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(load_video_frames(a), load_video_frames(b)), a.name


def test_per_prompt_needs_a_seed(tiny_models, tmp_path, capsys):
    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    assert main(["generate", "a cat", "--base", str(sd), "--per-prompt", "-o", str(tmp_path / "x")]) == 2
    assert "--seed is required" in capsys.readouterr().err


def test_generate_preset_writes_gif_per_prompt_and_grid(tiny_models, tmp_path, monkeypatch):

    text = ('[defaults]\nbase = "StableDiffusion/stable-diffusion-v1-5"\nwidth = 16\nheight = 16\nframes = 2\n'
            'fps = 8\nsteps = 1\nguidance_scale = 7.5\nlora_scale = 0.8\n\n[Tiny]\n'
            'motion_modules = ["Motion_Module/mm_tiny_v2.ckpt"]\ndreambooth = ""\n'
            'seeds = ["18339859844376517918", "5"]\nprompts = ["a/b c", "d"]\nnegative_prompts = [""]\n')
    use_presets(tmp_path, monkeypatch, text)
    out = tmp_path / "samples"
    assert main(["generate", "--preset", "Tiny", "--models-dir", str(tiny_models), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["0-ab-c.gif", "1-d.gif"]
    with Image.open(out / "sample.gif") as im:
        assert im.n_frames == 2 and im.size == (2 * 18 + 2, 16 + 4)  # n_rows=4 grid of the two samples
    log = json.loads((out / "config.json").read_text())
    assert [s["seed"] for s in log["samples"]] == [18339859844376517918, 5]


def test_preset_split_over_torchrun_ranks(tiny_models, tmp_path):
    """torchrun ... generate --preset: rank r makes samples r, r+2, ... (each rank made every sample); the sample
    GIFs, the grid and the log equal a one-process run's, byte for byte."""
    text = ('[Tiny]\nbase = "StableDiffusion/stable-diffusion-v1-5"\nwidth = 16\nheight = 16\nframes = 2\nfps = 8\n'
            'steps = 1\nguidance_scale = 7.5\nlora_scale = 1.0\ndreambooth = ""\n'
            'motion_modules = ["Motion_Module/mm_tiny_v2.ckpt", "Motion_Module/mm_tiny_v2.ckpt"]\n'
            'seeds = ["1", "2", "3"]\nprompts = ["a corgi", "a cat", "a boat"]\nnegative_prompts = [""]\n')
    (tmp_path / "presets.toml").write_text(text)
    script = tmp_path / "run.py"  # the presets file is swapped in each process, as monkeypatch does in-process
    script.write_text("import sys\nfrom pathlib import Path\nimport animatediff_lite.presets as p\n"
                      "p.PRESETS_FILE = Path(sys.argv[1])\nfrom animatediff_lite.cli import main\n"
                      "sys.exit(main(sys.argv[2:]))\n")
    args = [str(script), str(tmp_path / "presets.toml"), "generate", "--preset", "Tiny", "--models-dir",
            str(tiny_models), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in both runs: equal thread counts give equal bits
    one = subprocess.run([sys.executable, *args, "-o", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "-o", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    made = re.findall(r"sample/(\d+)-[^ ]*\.gif  \(seed", two.stdout)  # the ranks' lines may interleave
    assert sorted(map(int, made)) == list(range(6)), two.stdout  # 2 motion modules x 3 prompts, each once
    assert two.stdout.count("sample.gif") == 1  # the grid: rank 0 only
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len(files) == 8  # 6 samples, the grid, config.json
    for name in files:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "two" / name).read_bytes()
        assert a == (b.replace(b"/two/", b"/one/") if name.suffix == ".json" else b), name


def test_generate_preset_with_video_takes_the_videos_frames_and_size(tiny_models, tmp_path, monkeypatch):
    """--preset with --video: the preset's frames / height / width must not be passed (they clashed with the input's:
    'the input has num_frames=3 but num_frames=2 was passed', with no way to leave them out)."""
    from animatediff_lite.video import load_video_frames, save_video

    text = ('[defaults]\nbase = "StableDiffusion/stable-diffusion-v1-5"\nwidth = 16\nheight = 16\nframes = 2\n'
            'fps = 8\nsteps = 2\nguidance_scale = 7.5\nlora_scale = 0.8\n\n[Tiny]\n'
            'motion_modules = ["Motion_Module/mm_tiny_v2.ckpt"]\ndreambooth = ""\n'
            'seeds = ["5"]\nprompts = ["d"]\nnegative_prompts = [""]\n')
    use_presets(tmp_path, monkeypatch, text)
    save_video(torch.rand(1, 3, 3, 24, 24), tmp_path / "in.gif")
    out = tmp_path / "samples"
    assert main(["generate", "--preset", "Tiny", "--models-dir", str(tiny_models), "-o", str(out), "--device", "cpu",
                 "--no-progress", "--video", str(tmp_path / "in.gif"), "--strength", "0.5"]) == 0
    assert tuple(load_video_frames(out / "sample" / "0-d.gif").shape) == (3, 3, 24, 24)


def test_convert_unet_ldm_roundtrip_and_info_folder(tiny_models, tmp_path, capsys):
    from animatediff_lite.loading.io import read_state_dict

    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    assert main(["convert", "unet", str(sd), str(tmp_path / "ldm.safetensors"), "--to", "ldm"]) == 0
    ldm = read_state_dict(tmp_path / "ldm.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    assert main(["convert", "unet", str(tmp_path / "ldm.safetensors"), str(tmp_path / "back.safetensors"),
                 "--to", "diffusers"]) == 0
    back = read_state_dict(tmp_path / "back.safetensors")
    original = read_state_dict(sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    capsys.readouterr()
    assert main(["info", str(sd), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "diffusers_folder" and info["parameters"] > 0
    assert info["dtypes"] == {"float32": info["tensors"]}


def test_generate_with_lora_and_motion_lora(tiny_models, tmp_path):
    from animatediff_lite.video import load_video_frames

    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    mm = tiny_models / "Motion_Module" / "mm_tiny_v2.ckpt"
    write_tiny_loras(tmp_path)
    common = ["a corgi", "--base", str(sd), "--motion-module", str(mm), "--frames", "2", "--height", "16",
              "--width", "16", "--steps", "1", "--seed", "3", "--device", "cpu", "--no-progress", "-o"]
    videos = {}
    for name, extra in [("plain", []), ("zero", ["--lora", f"{tmp_path / 'l.safetensors'}:0",
                                                 "--motion-lora", f"{tmp_path / 'ml.ckpt'}:0"]),
                        ("lora", ["--lora", f"{tmp_path / 'l.safetensors'}:2"]),
                        ("motion", ["--motion-lora", f"{tmp_path / 'ml.ckpt'}:2"])]:
        assert main(["generate", *common, str(tmp_path / f"{name}.gif"), *extra]) == 0
        videos[name] = load_video_frames(tmp_path / f"{name}.gif")
    assert torch.equal(videos["plain"], videos["zero"])  # scale 0 merges nothing
    assert not torch.equal(videos["plain"], videos["lora"]) and not torch.equal(videos["plain"], videos["motion"])


# ------------------------------------------------------------------ user errors: one line, exit 2, no traceback

def _bad_file(tmp_path, kind: str):
    """A path of one kind of bad user file: missing, a folder, empty, or binary (not UTF-8, not a checkpoint)."""
    path = tmp_path / f"{kind}.txt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    return path


FILE_COMMANDS = {  # every command line that reads a user file; {f} is the bad file
    "generate --prompts": ["generate", "--prompts", "{f}"],
    "generate --base": ["generate", "a cat", "--base", "{f}"],
    "generate --models-dir": ["generate", "--preset", "ToonYou", "--models-dir", "{f}"],
    "info": ["info", "{f}"],
    "convert motion": ["convert", "motion", "{f}", "{tmp}/out.safetensors", "--to", "native"],
    "convert unet": ["convert", "unet", "{f}", "{tmp}/out.safetensors", "--to", "ldm"],
    "train": ["train", "{f}"],
}


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "binary"])
@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_bad_user_file_is_one_line_exit_2(command, kind, tmp_path, capsys):
    bad = _bad_file(tmp_path, kind)
    argv = [a.format(f=bad, tmp=tmp_path) for a in FILE_COMMANDS[command]]
    assert main(argv) == 2  # (--models-dir given an empty folder lists the preset's missing files)
    out, err = capsys.readouterr()
    print(err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"animatediff-lite {argv[0]}: error:")
    assert bad.name in err  # names the file
    assert "seed:" not in err and out == ""


def test_bad_user_file_through_the_entry_point(tmp_path):
    """The real entry point (what a user runs), not just main(): the issue's --prompts /nonexistent.txt."""
    r = subprocess.run([sys.executable, "-m", "animatediff_lite", "generate", "--prompts", str(tmp_path / "no.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "no.txt: no such file" in r.stderr and "one prompt per line" in r.stderr


@pytest.mark.parametrize("argv,named", [
    (["generate", "x", "--guidance", "nan"], "--guidance"), (["generate", "x", "--guidance", "inf"], "--guidance"),
    (["generate", "x", "--guidance", "-3"], "--guidance"), (["generate", "x", "--fps", "nan"], "--fps"),
    (["generate", "x", "--fps", "inf"], "--fps"), (["generate", "x", "--fps", "0"], "--fps"),
    (["generate", "x", "--lora", "a.safetensors:nan"], "--lora"),
    (["generate", "x", "--motion-lora", "b.ckpt:-inf"], "--motion-lora"),
    (["generate", "x", "--threads", "0"], "--threads"), (["generate", "x", "--frames", "two"], "--frames"),
])
def test_bad_numbers_one_line_exit_2(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "seed:" not in err


@pytest.mark.parametrize("extra,named", [(["--frames", "0"], "num_frames"), (["--height", "20"], "height"),
                                         (["-o", "out.txt"], "-o/--out")])
def test_argument_errors_come_before_the_seed_line(extra, named, tmp_path, capsys):
    argv = ["generate", "a red circle moving up", "--steps", "1", "--no-progress", *extra]
    if "-o" not in extra:
        argv += ["-o", str(tmp_path / "x.gif")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "seed:" not in err and err.count("\n") == 1


def test_seed_printed_once_sampling_started(tmp_path, capsys):
    assert main(["generate", "a red circle moving up", "--steps", "1", "--seed", "5", "--no-progress",
                 "-o", str(tmp_path / "x.gif")]) == 0
    assert "seed: 5\n" in capsys.readouterr().err


def test_seed_printed_once_with_free_init(tmp_path, capsys):
    """FreeInit restarts the step index every round: the seed line still comes once."""
    assert main(["generate", "a red circle moving up", "--steps", "1", "--seed", "5", "--no-progress",
                 "--free-init", "2", "-o", str(tmp_path / "x.gif")]) == 0
    assert capsys.readouterr().err.count("seed: 5\n") == 1


def test_untrained_size_warns_once(tmp_path, capsys):
    """The default model was trained on 8 frames of 32x32: other sizes print one warning line, once."""
    argv = ["generate", "a red circle moving up", "a blue square moving left", "--steps", "1", "--seed", "0",
            "--no-progress", "-o", str(tmp_path / "x.gif")]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # its own sizes: no warning
    assert main([*argv, "--frames", "16", "--height", "64", "--width", "64"]) == 0
    warnings_seen = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings_seen) == 1, warnings_seen
    assert "8 frames of 32x32" in warnings_seen[0] and "num_frames=16" in warnings_seen[0]
    assert "height=64" in warnings_seen[0]


def test_presets_shows_one_preset(capsys):
    assert main(["presets", "toonyou"]) == 0  # names are case-insensitive
    out = capsys.readouterr().out
    preset = get_preset("ToonYou")
    for text in [*preset.prompts, *(n for n in preset.negative_prompts if n), *map(str, preset.seeds),
                 *preset.motion_modules, preset.dreambooth, preset.base, f"{preset.steps} steps",
                 f"guidance {preset.guidance_scale:g}"]:
        assert text in out, text
    assert main(["presets", "ZoomIn"]) == 0
    assert "v2_lora_ZoomIn.ckpt" in capsys.readouterr().out  # its MotionLoRA
    assert main(["presets", "AnimateLCM"]) == 0
    assert "lcm, 6 steps" in capsys.readouterr().out  # its sampler
    assert main(["presets", "SparseCtrl_RGB_Firework"]) == 0
    out = capsys.readouterr().out
    assert "v3_sd15_sparsectrl_rgb.ckpt" in out and "RealisticVision_firework.png" in out  # SparseCtrl + key frame
    assert main(["presets", "NoSuch"]) == 2
    assert "available: ToonYou" in capsys.readouterr().err


def test_presets_shows_the_sampler_and_sparsectrl_files(capsys):
    """The sampler (AnimateLCM: lcm) and a v3 preset's SparseCtrl file and key frames are part of what it runs."""
    assert main(["presets", "AnimateLCM"]) == 0
    assert "lcm, 6 steps" in capsys.readouterr().out
    preset = get_preset("SparseCtrl_RGB_Firework")
    assert main(["presets", preset.name]) == 0
    out = capsys.readouterr().out
    assert "ddim, " in out and preset.sparsectrl in out
    assert all(f"{frame}: {path}" in out for frame, path in preset.control_images)


def test_help_texts_say_defaults_and_config(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "default out.gif" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "examples/train_config.toml" in out and "--section.key VALUE" in out and "--optim.lr 3e-4" in out


def test_threads_flag_sets_torch_threads(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # restored after the test
    monkeypatch.delenv("OMP_WAIT_POLICY")
    try:
        assert main(["generate", "a red circle moving up", "--steps", "1", "--seed", "0", "--no-progress",
                     "--threads", "2", "-o", str(tmp_path / "x.gif")]) == 0
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # for a fresh process's OpenMP runtime
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert main(["generate", "a red circle moving up", "--steps", "1", "--seed", "0", "--no-progress",
                     "-o", str(tmp_path / "y.gif")]) == 0
        assert torch.get_num_threads() == 1  # the default on the CPU
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_train_refuses_non_finite_config_numbers(value, capsys):
    config = os.path.join(os.path.dirname(__file__), "..", "examples", "train_config.toml")
    assert main(["train", config, "--optim.lr", value]) == 2
    err = capsys.readouterr().err
    assert "optim.lr must be a finite number" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "binary"])
@pytest.mark.parametrize("flag", ["--motion-module", "--dreambooth", "--lora", "--motion-lora"])
def test_bad_weight_file_next_to_a_good_base(tiny_models, flag, kind, tmp_path, capsys):
    bad = _bad_file(tmp_path, kind)
    sd = tiny_models / "StableDiffusion" / "stable-diffusion-v1-5"
    argv = ["generate", "a cat", "--base", str(sd), flag, str(bad), "--frames", "2", "--height", "16", "--width",
            "16", "--steps", "1", "--seed", "0", "--device", "cpu", "--no-progress", "-o", str(tmp_path / "x.gif")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    print(err)
    assert "Traceback" not in err and err.count("\n") == 1 and bad.name in err and "seed:" not in err
    assert not (tmp_path / "x.gif").exists()


def test_short_context_windows_get_a_default_overlap_and_flag_errors(tmp_path, capsys):
    """--context-frames 4 used to fail on the default overlap of 4 with a message naming context_overlap: without
    --context-overlap the overlap is min(4, N // 2), in the CLI, batch jobs and the app alike; a bad one names
    the flags."""
    from animatediff_lite import load_pipeline, save_video
    from animatediff_lite.app.studio import Studio
    from animatediff_lite.video import load_video_frames

    argv = ["generate", "a red circle moving up", "--frames", "8", "--steps", "1", "--seed", "2", "--no-progress"]
    assert main([*argv, "--context-frames", "4", "-o", str(tmp_path / "cli.gif")]) == 0
    video = load_pipeline()("a red circle moving up", num_frames=8, steps=1, seed=2, context_frames=4,
                            context_overlap=2, progress=False)
    save_video(video, tmp_path / "lib.gif")
    assert torch.equal(load_video_frames(tmp_path / "cli.gif"), load_video_frames(tmp_path / "lib.gif"))
    capsys.readouterr()
    for extra, message in ((["--context-frames", "4", "--context-overlap", "4"],
                            "--context-overlap 4: expected 0 <= --context-overlap < --context-frames (4)"),
                           (["--context-overlap", "2"], "--context-overlap 2: needs --context-frames N"),
                           (["--context-frames", "0"], "--context-frames 0: expected an integer >= 1")):
        assert main([*argv, *extra, "-o", str(tmp_path / "x.gif")]) == 2
        err = capsys.readouterr().err
        assert message in err and "context_overlap" not in err and err.count("\n") == 1, err

    (tmp_path / "jobs.toml").write_text('[[jobs]]\nid = "a"\nprompt = "a red circle moving up"\nframes = 8\n'
                                        'steps = 1\nseed = 2\ncontext_frames = 4\n')
    assert main(["generate", "--batch", str(tmp_path / "jobs.toml"), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "a.json").read_text())["context_overlap"] == 2
    assert torch.equal(load_video_frames(tmp_path / "o" / "a.gif"), load_video_frames(tmp_path / "lib.gif"))
    form = {"prompt": "a red circle moving up", "frames": "8", "steps": "1", "seed": "2", "context_frames": "4",
            "context_overlap": ""}
    path, settings = Studio(None, tmp_path / "app", "cpu").generate(form)
    assert settings["context_overlap"] == 2
    assert torch.equal(load_video_frames(path), load_video_frames(tmp_path / "lib.gif"))


@pytest.mark.parametrize("argv", [["presets", "ToonYou"], ["presets"], ["generate", "--help"]])
def test_closed_stdout_ends_quietly(argv):
    """`animatediff-lite presets NAME | head -1` printed "error: Broken pipe": a reader that went away ends the
    command without a word (status 141, as a command killed by SIGPIPE; 0 for --help, which argparse ends)."""
    run = subprocess.Popen([sys.executable, "-m", "animatediff_lite", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    run.stdout.close()  # the reader is gone before the first write
    err = run.stderr.read().decode()
    assert run.wait(timeout=120) in (0, 141) and err == "", err
    shell = subprocess.run(f"{sys.executable} -m animatediff_lite {' '.join(argv)} | head -1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and shell.stderr == "" and shell.stdout.count("\n") == 1, shell.stderr
