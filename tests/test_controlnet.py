"""ControlNet: our module and pipeline vs diffusers' AnimateDiffControlNetPipeline on the tiny random model of
tests/test_pipeline.py (motion GroupNorm patched to per frame there), loaders of every layout, errors."""

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
from animatediff_lite.loading.controlnet_map import controlnet_block_table, controlnet_config_from_diffusers
from animatediff_lite.loading.io import save_state_dict
from animatediff_lite.loading.pipeline_load import load_pipeline
from animatediff_lite.loading.unet_map import map_keys

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true
from tests import test_pipeline as tp  # noqa: E402 (needs diffusers)
from tests.test_pipeline import FRAMES, H, W, _check, _randomize  # noqa: E402

models = tp.models
PROMPT = "a corgi running on the beach"
STEPS = 3


def controlnet_state_to_ldm(native, cfg):
    """Native ControlNet tensors -> the bare original layout (how the tests write original control_*.pth files)."""
    hint_blocks = 2 * (len(cfg.embedding_channels) - 1)  # two convs per width step
    out, unmapped = map_keys(native, controlnet_block_table(cfg.unet, hint_blocks), to_ldm=True)
    assert not unmapped, unmapped
    return out


def _controlnet(seed: int):
    torch.manual_seed(seed)
    # The tiny VAE halves the size once: a two-width condition embedding halves it once too.
    cn = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16))
    _randomize(cn, seed, 0.05)
    return cn.eval()


def _frames(seed: int, n: int = FRAMES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def cn(models, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("controlnet")
    nets = [_controlnet(10), _controlnet(11)]
    for i, net in enumerate(nets):
        net.save_pretrained(str(root / f"cn{i}"))
    cfg = controlnet_config_from_diffusers(dict(nets[0].config))
    ldm = controlnet_state_to_ldm(nets[0].state_dict(), cfg)
    save_state_dict(ldm, root / "control_bare.safetensors")
    torch.save({"state_dict": {"control_model." + k: v for k, v in ldm.items()}}, root / "control_ldm.pth")
    return SimpleNamespace(root=root, nets=nets, dirs=[root / "cn0", root / "cn1"])


def _oracle(models, nets):
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                        steps_offset=1, clip_sample=False)
    pipe = diffusers.AnimateDiffControlNetPipeline(
        vae=models.base.vae, text_encoder=models.base.text, tokenizer=models.tokenizer, unet=models.base.unet,
        motion_adapter=models.adapter, controlnet=nets if len(nets) > 1 else nets[0], scheduler=scheduler)
    tp.per_frame_motion_norms(pipe.unet.modules())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(models, nets, frames, **kwargs) -> torch.Tensor:
    pipe = _oracle(models, nets)
    with torch.no_grad():
        out = pipe(PROMPT, num_frames=FRAMES, height=H, width=W, num_inference_steps=STEPS, output_type="pt",
                   conditioning_frames=frames, generator=torch.Generator("cpu").manual_seed(0), **kwargs).frames
    return out.float()


def _ours(pipe, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, num_frames=FRAMES, height=H, width=W, steps=STEPS, seed=0, progress=False, **kwargs)


def test_one_controlnet_matches_diffusers(models, cn) -> None:
    frames = _frames(0)
    expected = _reference(models, cn.nets[:1], frames, controlnet_conditioning_scale=0.8)
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 0.8)])
    got = _ours(pipe, control_frames=[frames])
    _check("controlnet", got, expected)
    plain = _ours(load_pipeline(models.sd, motion_module=models.mm))
    assert (got - plain).abs().max() > 1e-2, "the ControlNet changed nothing: the test could not fail"


def test_two_controlnets_with_start_end_match_diffusers(models, cn) -> None:
    frames = [_frames(1), _frames(2)]
    expected = _reference(models, cn.nets, frames, controlnet_conditioning_scale=[1.0, 0.5],
                          control_guidance_start=[0.0, 0.34], control_guidance_end=[0.67, 1.0])
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 1.0), (cn.dirs[1], 0.5)])
    got = _ours(pipe, control_frames=frames, control_start=[0.0, 0.34], control_end=[0.67, 1.0])
    _check("two controlnets, start/end", got, expected)


@pytest.mark.parametrize("name", ["control_bare.safetensors", "control_ldm.pth"])
def test_original_single_files_load_like_the_folder(models, cn, name: str) -> None:
    assert read_checkpoint(cn.root / name).layout == "ldm_controlnet"
    frames = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in _frames(3)])
    folder = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 1.0)])
    single = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.root / name, 1.0)])
    a, b = folder.controlnets[0].model.state_dict(), single.controlnets[0].model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_ours(folder, control_frames=[frames]), _ours(single, control_frames=[frames]))


def test_bad_control_input_names_the_argument(models, cn) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 1.0)])
    with pytest.raises(ValueError, match="control_frames: the pipeline has 1 ControlNet"):
        _ours(pipe)
    with pytest.raises(ValueError, match=r"control_frames\[0\]: 3 condition frames for num_frames=4"):
        _ours(pipe, control_frames=[_frames(0, 3)])
    with pytest.raises(ValueError, match=r"control_frames\[0\]: condition frames are 8x8"):
        _ours(pipe, control_frames=[torch.rand(FRAMES, 3, 8, 8)])
    with pytest.raises(ValueError, match="control_start: 2 entries for 1 ControlNets"):
        _ours(pipe, control_frames=[_frames(0)], control_start=[0.0, 0.5])
    with pytest.raises(ValueError, match=r"control_start\[0\]=0.6, control_end\[0\]=0.5"):
        _ours(pipe, control_frames=[_frames(0)], control_start=0.6, control_end=0.5)
    plain = load_pipeline(models.sd, motion_module=models.mm)
    with pytest.raises(ValueError, match="no ControlNet"):
        _ours(plain, control_frames=[_frames(0)])


def test_wrong_files_are_checkpoint_errors_naming_them(models, cn, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"mm_sd_v15_v2\.ckpt: holds an original AnimateDiff motion module"):
        load_pipeline(models.sd, motion_module=models.mm, controlnets=[(models.mm_original, 1.0)])
    wide = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=48, attention_head_dim=2, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16))
    wide.save_pretrained(str(tmp_path / "sd2ish"))
    with pytest.raises(CheckpointError, match="sd2ish.*a ControlNet for another base model .*text width 48"):
        load_pipeline(models.sd, motion_module=models.mm, controlnets=[(tmp_path / "sd2ish", 1.0)])
    with pytest.raises(ValueError, match=r"controlnets\[0\]: expected a \(path, scale\) pair"):
        load_pipeline(models.sd, motion_module=models.mm, controlnets=[str(cn.dirs[0])])


def test_full_size_keys_on_meta_match_diffusers_and_its_ldm_converter() -> None:
    """SD1.5 ControlNet at full size on the meta device: our module has diffusers' keys and shapes, and our
    original-layout names are the ones diffusers' own single-file converter reads (both directions)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from animatediff_lite.config import SD15
    from animatediff_lite.controlnet import ControlNet, ControlNetConfig
    from animatediff_lite.loading.controlnet_map import controlnet_state_from_ldm

    with torch.device("meta"):
        theirs = diffusers.ControlNetModel(cross_attention_dim=768).state_dict()  # SD1.5 (its default is 1280)
        ours = ControlNet(ControlNetConfig(unet=SD15.unet)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    ldm = controlnet_state_to_ldm(theirs, ControlNetConfig(unet=SD15.unet))
    assert len(ldm) == len(theirs) and "input_hint_block.14.weight" in ldm and "zero_convs.11.0.bias" in ldm
    assert "middle_block_out.0.weight" in ldm and "input_blocks.11.0.out_layers.3.weight" in ldm
    converted = convert_controlnet_checkpoint({"control_model." + k: v for k, v in ldm.items()},
                                              {"layers_per_block": 2})
    # diffusers' converter leaves conv_in/conv_out of the hint block and time/conv_in to its mapping table:
    # every key it produces must carry the very tensor our name carried.
    assert all(converted[k] is theirs[k] for k in converted), "diffusers reads our original names differently"
    back = controlnet_state_from_ldm({"control_model." + k: v for k, v in ldm.items()}, SD15.unet)
    assert back.keys() == theirs.keys() and all(back[k] is theirs[k] for k in back)


def test_cli_controlnet_flags_give_the_librarys_video(models, cn, tmp_path: Path, capsys) -> None:
    from animatediff_lite.cli import main
    from animatediff_lite.video import load_video_frames, save_video

    frames = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in _frames(4)])
    save_video(frames[None], tmp_path / "cond", fps=8)  # a folder of PNG frames: lossless
    cond = load_video_frames(tmp_path / "cond")
    out = tmp_path / "out"
    common = ["generate", PROMPT, "--base", str(models.sd), "--motion-module", str(models.mm), "--frames",
              str(FRAMES), "--height", str(H), "--width", str(W), "--steps", str(STEPS), "--seed", "0",
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--controlnet", f"{cn.dirs[0]}:0.7", "--control-video", str(tmp_path / "cond"),
                 "--control-end", "0.6", "-o", str(out)]) == 0
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 0.7)])
    expected = _ours(pipe, control_frames=[cond], control_end=0.6)
    got = load_video_frames(out)
    assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6  # the PNG frames round to 8 bits
    capsys.readouterr()
    assert main([*common, "--controlnet", str(cn.dirs[0]), "-o", str(out)]) == 2
    assert "--control-video: 0 given for 1 --controlnet" in capsys.readouterr().err
    assert main([*common, "--control-start", "0.2", "-o", str(out)]) == 2
    assert "--control-start needs --controlnet" in capsys.readouterr().err
    assert main(["info", str(cn.root / "control_ldm.pth"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "ldm_controlnet" and info["embedding_channels"] == [8, 16]
    assert info["channels"] == [32, 64] and info["base"] == "not SD1.5" and info["tensors"] == 120


def test_context_windows_take_their_condition_frames(models, cn) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 1.0)])
    frames = _frames(6)
    full = _ours(pipe, control_frames=[frames])
    assert torch.equal(full, _ours(pipe, control_frames=[frames], context_frames=FRAMES, context_overlap=0))
    # Disjoint windows of 2 frames are denoised independently: changing the condition of frames 2-3 must leave
    # frames 0-1 exactly as they were and change frames 2-3 (each window reads its own condition frames).
    a = _ours(pipe, control_frames=[frames], context_frames=2, context_overlap=0)
    b = _ours(pipe, control_frames=[frames[:2] + _frames(7)[2:]], context_frames=2, context_overlap=0)
    assert torch.equal(a[:, :2], b[:, :2]) and (a[:, 2:] - b[:, 2:]).abs().max() > 1e-4  # 6e-4 here


def test_every_video_of_a_batch_gets_the_condition_frames(models, cn) -> None:
    """Two videos in one batch (CFG on) follow the same condition frames as each alone with its own latents."""
    pipe = load_pipeline(models.sd, motion_module=models.mm, controlnets=[(cn.dirs[0], 1.0)])
    frames = _frames(8)
    lat = torch.randn((2, 4, FRAMES, H // 2, W // 2), generator=torch.Generator().manual_seed(1))
    both = _ours(pipe, control_frames=[frames], num_videos_per_prompt=2, latents=lat)
    for i in range(2):
        alone = _ours(pipe, control_frames=[frames], latents=lat[i:i + 1])
        assert (both[i] - alone[0]).abs().max() <= 1e-5
