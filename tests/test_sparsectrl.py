"""SparseCtrl: our module and pipeline vs diffusers' AnimateDiffSparseControlNetPipeline on the tiny random model
of tests/test_pipeline.py (motion GroupNorms patched to per frame in the UNet and in SparseCtrl, as the original
AnimateDiff; RGB key frames encoded as the VAE posterior mean on both sides), loaders, converters, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import require_oracle
from PIL import Image

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.motion_map import motion_state_from_diffusers
from animatediff_lite.loading.pipeline_load import load_pipeline
from animatediff_lite.loading.sparsectrl_map import save_sparsectrl

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from diffusers.pipelines.animatediff import pipeline_animatediff_sparsectrl as sparse_pipeline  # noqa: E402

from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_cli import use_presets  # noqa: E402
from tests.test_pipeline import FRAMES, H, W, _check, _randomize  # noqa: E402

models = tp.models
PROMPT = "a corgi running on the beach"
STEPS = 3


def _sparse(seed: int, rgb: bool):
    torch.manual_seed(seed)
    net = diffusers.SparseControlNetModel(
        in_channels=4, conditioning_channels=4 if rgb else 3, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16),
        motion_max_seq_length=32, motion_num_attention_heads=8, use_simplified_condition_embedding=rgb)
    _randomize(net, seed, 0.05)
    return net.eval()


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sc(models, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sparsectrl")
    nets = {"rgb": _sparse(20, True), "scribble": _sparse(21, False)}
    for name, net in nets.items():
        net.save_pretrained(str(root / name))
        original = motion_state_from_diffusers(net.state_dict(), keep_pe=True)  # original names, PE tables kept
        # one temporal attention per motion module: keep the PE table of attention block 0 only, as upstream's files
        original = {k: v for k, v in original.items() if "attention_blocks.1.pos_encoder" not in k}
        torch.save({"controlnet": {**original, "animatediff_config": {"x": 1}}},
                   root / f"v3_sd15_sparsectrl_{name}.ckpt")
    return SimpleNamespace(root=root, nets=nets)


def _oracle(models, net, monkeypatch):
    # diffusers draws the RGB key frames' posterior noise from the global RNG: take the mean, as we do.
    monkeypatch.setattr(sparse_pipeline, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                        steps_offset=1, clip_sample=False)
    pipe = diffusers.AnimateDiffSparseControlNetPipeline(
        vae=models.base.vae, text_encoder=models.base.text, tokenizer=models.tokenizer, unet=models.base.unet,
        motion_adapter=models.adapter, controlnet=net, scheduler=scheduler)
    tp.per_frame_motion_norms([*pipe.unet.modules(), *pipe.controlnet.modules()])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(models, net, monkeypatch, keys: dict, **kwargs) -> torch.Tensor:
    pipe = _oracle(models, net, monkeypatch)
    frames = sorted(keys)
    with torch.no_grad():
        out = pipe(PROMPT, num_frames=FRAMES, height=H, width=W, num_inference_steps=STEPS, output_type="pt",
                   conditioning_frames=[keys[i] for i in frames], controlnet_frame_indices=frames,
                   generator=torch.Generator("cpu").manual_seed(0), **kwargs).frames
    return out.float()


def _ours(pipe, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, num_frames=FRAMES, height=H, width=W, steps=STEPS, seed=0, progress=False, **kwargs)


@pytest.mark.parametrize("variant", ["rgb", "scribble"])
def test_original_file_matches_diffusers(models, sc, monkeypatch, variant: str) -> None:
    keys = {0: _image(1), 3: _image(2)}
    expected = _reference(models, sc.nets[variant], monkeypatch, keys, controlnet_conditioning_scale=0.9)
    path = sc.root / f"v3_sd15_sparsectrl_{variant}.ckpt"
    assert read_checkpoint(path).layout == "sparsectrl"
    pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=path)
    got = _ours(pipe, control_images=keys, control_scale=0.9)
    _check(f"sparsectrl {variant}", got, expected)
    plain = _ours(load_pipeline(models.sd, motion_module=models.mm))
    assert (got - plain).abs().max() > 1e-2, "SparseCtrl changed nothing: the test could not fail"


def test_diffusers_folder_and_converted_files_load_the_same(models, sc, tmp_path: Path) -> None:
    folder = sc.root / "rgb"
    assert read_checkpoint(folder).layout == "diffusers_sparsectrl"
    original = sc.root / "v3_sd15_sparsectrl_rgb.ckpt"
    save_sparsectrl(read_checkpoint(original), tmp_path / "as_diffusers.safetensors", "diffusers")
    save_sparsectrl(read_checkpoint(tmp_path / "as_diffusers.safetensors"), tmp_path / "back.ckpt", "original")
    assert read_checkpoint(tmp_path / "as_diffusers.safetensors").layout == "diffusers_sparsectrl"
    assert set(torch.load(tmp_path / "back.ckpt", weights_only=True)) == {"controlnet"}  # upstream's wrapper
    states = []
    for path in (folder, original, tmp_path / "as_diffusers.safetensors", tmp_path / "back.ckpt"):
        pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=path)
        states.append(pipe.sparsectrl.model.state_dict())
    assert all(s.keys() == states[0].keys() and all(torch.equal(s[k], states[0][k]) for k in s) for s in states)


def test_key_frame_inputs_and_errors(models, sc) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    im = _image(5)
    im.save(sc.root / "first.png")
    tensor = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    a = _ours(pipe, control_images={0: im})
    assert torch.equal(a, _ours(pipe, control_images={0: tensor}))
    assert torch.equal(a, _ours(pipe, control_images={0: str(sc.root / "first.png")}))
    with pytest.raises(ValueError, match=r"control_images: frame index 4 is outside the video's frames 0\.\.3"):
        _ours(pipe, control_images={4: im})
    with pytest.raises(ValueError, match=r"control_images\[0\]: the image is 8x8, the video is 16x16"):
        _ours(pipe, control_images={0: im.resize((8, 8))})
    with pytest.raises(ValueError, match="control_images: the pipeline has SparseCtrl"):
        _ours(pipe)
    with pytest.raises(ValueError, match="no SparseCtrl"):
        _ours(load_pipeline(models.sd, motion_module=models.mm), control_images={0: im})


def test_wrong_files_name_the_file(models, sc) -> None:
    from tests.test_controlnet import _controlnet

    cn_dir = sc.root / "a_controlnet"
    _controlnet(3).save_pretrained(str(cn_dir))
    with pytest.raises(CheckpointError, match="a_controlnet.*a ControlNet: pass it in controlnets="):
        load_pipeline(models.sd, motion_module=models.mm, sparsectrl=cn_dir)
    with pytest.raises(CheckpointError, match=r"sparsectrl_rgb\.ckpt.*a SparseCtrl file: pass it as sparsectrl="):
        load_pipeline(models.sd, motion_module=models.mm, controlnets=[(sc.root / "v3_sd15_sparsectrl_rgb.ckpt", 1)])


def test_info_describes_sparsectrl(sc, capsys) -> None:
    from animatediff_lite.cli import main

    assert main(["info", str(sc.root / "v3_sd15_sparsectrl_scribble.ckpt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "sparsectrl" and info["variant"].startswith("image condition")
    assert info["condition_channels"] == 3 and info["max_position_len"] == 32 and info["channels"] == [32, 64]


@pytest.mark.parametrize("rgb", [True, False])
def test_full_size_keys_on_meta_match_diffusers(rgb: bool) -> None:
    """SD1.5-size SparseCtrl on the meta device: our native keys, renamed by the converter, are exactly diffusers'
    SparseControlNetModel keys and shapes (RGB: 4 latent channels + mask; scribble: 3 image channels + mask)."""
    from animatediff_lite.config import SD15, MotionConfig
    from animatediff_lite.controlnet import ControlNetConfig
    from animatediff_lite.loading.motion_map import motion_state_to_diffusers
    from animatediff_lite.sparsectrl import SparseControlNet

    with torch.device("meta"):
        theirs = diffusers.SparseControlNetModel(conditioning_channels=4 if rgb else 3, cross_attention_dim=768,
                                                 use_simplified_condition_embedding=rgb).state_dict()
        motion = MotionConfig(version="v3", mid_block=False, num_attention_blocks=1)
        ours = SparseControlNet(ControlNetConfig(SD15.unet, 4 if rgb else 3), motion, simplified=rgb).state_dict()
    renamed = motion_state_to_diffusers(ours, 32)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "down_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" \
        in ours and ("controlnet_cond_embedding.weight" in ours) == rgb


def test_cli_sparsectrl_flags_give_the_librarys_video(models, sc, tmp_path: Path, capsys) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.video import load_video_frames

    _image(7).save(tmp_path / "first.png")
    _image(8).save(tmp_path / "last.png")
    ckpt = sc.root / "v3_sd15_sparsectrl_scribble.ckpt"
    out = tmp_path / "out"
    common = ["generate", PROMPT, "--base", str(models.sd), "--motion-module", str(models.mm), "--frames",
              str(FRAMES), "--height", str(H), "--width", str(W), "--steps", str(STEPS), "--seed", "0",
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--sparsectrl", str(ckpt), "--control-image", f"0:{tmp_path / 'first.png'}",
                 "--control-image", f"3:{tmp_path / 'last.png'}", "--control-scale", "0.8", "-o", str(out)]) == 0
    pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=ckpt)
    expected = _ours(pipe, control_images={0: _image(7), 3: _image(8)}, control_scale=0.8)
    assert (load_video_frames(out) - expected[0]).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG frames
    capsys.readouterr()
    assert main([*common, "--sparsectrl", str(ckpt), "-o", str(out)]) == 2
    assert "--sparsectrl needs at least one --control-image" in capsys.readouterr().err
    assert main([*common, "--control-image", f"0:{tmp_path / 'first.png'}", "-o", str(out)]) == 2
    assert "--control-image/--control-scale need --sparsectrl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--sparsectrl", str(ckpt), "--control-image", "first.png"])
    assert "expected FRAME:FILE" in capsys.readouterr().err


def test_v3_presets_and_a_sparsectrl_preset_run(models, sc, tmp_path: Path, monkeypatch) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.presets import get_preset

    board = get_preset("SparseCtrl_Scribble_Storyboard")
    assert board.sparsectrl == "SparseCtrl/v3_sd15_sparsectrl_scribble.ckpt" and board.guidance_scale == 8.5
    assert [f for f, _ in board.control_images] == [0, 8, 15] and board.lora == "Motion_Module/v3_sd15_adapter.ckpt"
    assert board.runs()[1][2] is None  # seed -1: random, as upstream
    rgb = get_preset("SparseCtrl_RGB_Firework")
    assert rgb.motion_modules == ("Motion_Module/v3_sd15_mm.ckpt",) and rgb.control_images[0][0] == 0

    root = tmp_path / "models"
    (root / "StableDiffusion").mkdir(parents=True)
    (root / "StableDiffusion" / "sd").symlink_to(models.sd)
    (root / "mm").symlink_to(models.mm)
    (root / "sc.ckpt").symlink_to(sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    _image(9).save(root / "key.png")
    text = ('[Tiny]\nbase = "StableDiffusion/sd"\nmotion_modules = ["mm"]\ndreambooth = ""\nlora_scale = 1.0\n'
            f'width = {W}\nheight = {H}\nframes = {FRAMES}\nfps = 8\nsteps = {STEPS}\nguidance_scale = 8.5\n'
            'sparsectrl = "sc.ckpt"\ncontrol_images = [{ frame = 2, path = "key.png" }]\n'
            'seeds = ["3"]\nprompts = ["a boat"]\nnegative_prompts = ["worst quality"]\n')
    use_presets(tmp_path, monkeypatch, text)
    out = tmp_path / "samples"
    assert main(["generate", "--preset", "Tiny", "--models-dir", str(root), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    log = json.loads((out / "config.json").read_text())
    assert log["control_images"] == {"2": str(root / "key.png")}
    pipe = load_pipeline(models.sd, motion_module=models.mm, sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    expected = pipe("a boat", negative_prompt="worst quality", num_frames=FRAMES, height=H, width=W, steps=STEPS,
                    guidance_scale=8.5, seed=3, progress=False, control_images={2: _image(9)})
    from animatediff_lite.video import load_video_frames
    got = load_video_frames(next((out / "sample").iterdir()))
    assert (got - expected[0]).abs().max() <= 2 / 255 + 1e-6  # GIF palette quantisation


def test_converter_script(sc, tmp_path: Path, capsys) -> None:
    import runpy
    import sys

    script = Path(__file__).parents[1] / "weights" / "convert" / "sparsectrl_convert.py"
    out = tmp_path / "d.safetensors"
    argv = sys.argv
    try:
        sys.argv = [str(script), str(sc.root / "v3_sd15_sparsectrl_scribble.ckpt"), str(out), "--to", "diffusers"]
        runpy.run_path(str(script), run_name="__main__")
        assert read_checkpoint(out).layout == "diffusers_sparsectrl"
        assert "image condition" in capsys.readouterr().out
        sys.argv = [str(script), str(sc.root / "rgb" / "config.json"), str(out), "--to", "original"]
        with pytest.raises(SystemExit, match="error: .*config.json"):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def test_to_bfloat16_moves_controlnet_and_sparsectrl(models, sc) -> None:
    """pipe.to(dtype=...) casts the control models too; bf16 follows fp32 loosely (8-bit mantissa)."""
    from tests.test_controlnet import _controlnet

    cn_dir = sc.root / "cn_bf16"
    _controlnet(4).save_pretrained(str(cn_dir))
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn_dir, 1.0)],
                         sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    kwargs = dict(control_frames=[[_image(i) for i in range(FRAMES)]], control_images={1: _image(9)})
    fp32 = _ours(pipe, **kwargs)
    pipe.to(dtype=torch.bfloat16)
    assert pipe.controlnets[0].model.conv_in.weight.dtype == torch.bfloat16
    assert pipe.sparsectrl.model.controlnet_cond_embedding.weight.dtype == torch.bfloat16
    _check("bf16 with ControlNet + SparseCtrl vs fp32", _ours(pipe, **kwargs), fp32, atol=0.1)


def test_v3_motion_module_and_domain_adapter_match_diffusers(models, sc, monkeypatch, tmp_path: Path) -> None:
    """The original v3 recipe: v3 motion module (no mid block) + v3 domain adapter LoRA + SparseCtrl RGB, against
    diffusers with the adapter merged by hand (W += scale * up @ down) into its UNet."""
    import copy

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(6)
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=8, motion_norm_num_groups=8,
                                      motion_max_seq_length=32, use_motion_mid_block=False)
    _randomize(adapter, 6)
    torch.save({"state_dict": motion_state_from_diffusers(adapter.state_dict(), keep_pe=True)},
               tmp_path / "v3_sd15_mm.ckpt")
    unet = copy.deepcopy(models.base.unet)
    mods = dict(unet.named_modules())
    lora = {}
    for base in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                 "mid_block.attentions.0.transformer_blocks.0.attn2"):
        for proj, native in (("to_q", "to_q"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            w = mods[f"{base}.{native}"].weight
            down, up = torch.randn(4, w.shape[1], generator=gen) * 0.1, torch.randn(w.shape[0], 4, generator=gen) * 0.1
            lora[f"{base}.processor.{proj}_lora.down.weight"] = down
            lora[f"{base}.processor.{proj}_lora.up.weight"] = up
            with torch.no_grad():
                w += 0.8 * up @ down
    torch.save({"state_dict": lora}, tmp_path / "v3_sd15_adapter.ckpt")

    keys = {0: _image(11)}
    oracle_models = SimpleNamespace(**{**vars(models), "adapter": adapter.eval(),
                                       "base": SimpleNamespace(**{**vars(models.base), "unet": unet})})
    expected = _reference(oracle_models, sc.nets["rgb"], monkeypatch, keys, guidance_scale=8.5)
    pipe = load_pipeline(models.sd, motion_module=tmp_path / "v3_sd15_mm.ckpt",
                         loras=[(tmp_path / "v3_sd15_adapter.ckpt", 0.8)],
                         sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    assert pipe.unet.motion.version == "v3"
    _check("v3 motion module + adapter + SparseCtrl", _ours(pipe, control_images=keys, guidance_scale=8.5), expected)
    no_adapter = load_pipeline(models.sd, motion_module=tmp_path / "v3_sd15_mm.ckpt",
                               sparsectrl=sc.root / "v3_sd15_sparsectrl_rgb.ckpt")
    assert (_ours(no_adapter, control_images=keys, guidance_scale=8.5) - expected).abs().max() > 1e-3
