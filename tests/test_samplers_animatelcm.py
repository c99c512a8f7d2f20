"""AnimateLCM: tiny files in the published on-disk layouts, loaded and sampled with sampler="lcm" vs diffusers.

Layouts (animatediff_lite/loading/animatelcm.py): ``AnimateLCM_sd15_t2v.ckpt`` is the original AnimateDiff
motion-module layout with a mid-block module and no ``pos_encoder`` tables (64 positions);
``AnimateLCM_sd15_t2v_lora.safetensors`` is a kohya LoRA over diffusers module names (``lora_unet_...`` with
``lora_down`` / ``lora_up`` / ``alpha``) covering attention, projections, feed-forward and resnet convolutions.
The oracle is diffusers' AnimateDiffPipeline with a MotionAdapter of 64 positions, the LoRA merged by hand as
``W += scale * alpha / rank * up @ down`` (no peft here) and ``LCMScheduler.from_config(AnimateDiff's DDIM)``.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import require_oracle
from test_pipeline import NEGATIVES, PROMPTS, H, W, _check, _oracle, _randomize, models  # noqa: F401
from test_samplers import oracle as scheduler_oracle

from animatediff_lite.cli import main
from animatediff_lite.loading.io import save_state_dict
from animatediff_lite.loading.motion_load import read_motion_module
from animatediff_lite.loading.motion_map import motion_state_from_diffusers
from animatediff_lite.loading.pipeline_load import load_pipeline
from animatediff_lite.presets import get_preset
from animatediff_lite.scheduler import DDIMConfig

diffusers = require_oracle("diffusers")  # skips here, fails under CI=true

RANK, ALPHA, SCALE = 4, 0.5, 0.8  # alpha = rank / 8, as the published recipes imply
# The module kinds an LCM-LoRA touches (suffixes of diffusers module names).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def _lora_targets(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(TARGETS)
            and name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")}


@pytest.fixture(scope="module")
def lcm(models, tmp_path_factory) -> SimpleNamespace:  # noqa: F811
    root = tmp_path_factory.mktemp("animatelcm")
    torch.manual_seed(21)
    adapter = diffusers.MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=8, motion_norm_num_groups=8, motion_max_seq_length=64, use_motion_mid_block=True)
    _randomize(adapter, 21)
    adapter.eval()
    motion = motion_state_from_diffusers(adapter.state_dict())  # original keys, no pos_encoder tables
    assert not any("pos_encoder" in k for k in motion) and any(k.startswith("mid_block.") for k in motion)
    (root / "Motion_Module").mkdir()
    torch.save(motion, root / "Motion_Module" / "AnimateLCM_sd15_t2v.ckpt")
    adapter.save_pretrained(str(root / "AnimateLCM"))  # the hub repository's diffusers copy

    g = torch.Generator().manual_seed(22)
    lora, updates = {}, {}
    for name, module in _lora_targets(models.base.unet).items():
        w = module.weight
        kernel = tuple(w.shape[2:])
        down = (torch.randn(RANK, w.shape[1], *kernel, generator=g) * 0.2).half()
        up = (torch.randn(w.shape[0], RANK, *((1, 1) if kernel else ()), generator=g) * 0.2).half()
        flat = "lora_unet_" + name.replace(".", "_")
        lora[f"{flat}.lora_down.weight"], lora[f"{flat}.lora_up.weight"] = down, up
        lora[f"{flat}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        updates[name] = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)
    assert {n.rsplit(".", 1)[-1] for n in updates} >= {"to_q", "conv1", "conv_shortcut", "time_emb_proj", "proj_in"}
    (root / "LCM_LoRA").mkdir()
    save_state_dict(lora, root / "LCM_LoRA" / "AnimateLCM_sd15_t2v_lora.safetensors")
    (root / "StableDiffusion").mkdir()
    (root / "StableDiffusion" / "stable-diffusion-v1-5").symlink_to(models.sd, target_is_directory=True)

    parts = SimpleNamespace(unet=copy.deepcopy(models.base.unet), vae=models.base.vae, text=models.base.text)
    with torch.no_grad():
        for name, delta in updates.items():
            parts.unet.get_submodule(name).weight += SCALE * (ALPHA / RANK) * delta
    reference = _oracle(parts, SimpleNamespace(tokenizer=models.tokenizer, adapter=adapter))
    reference.scheduler = scheduler_oracle("lcm", DDIMConfig())
    return SimpleNamespace(root=root, mm=root / "Motion_Module" / "AnimateLCM_sd15_t2v.ckpt",
                           folder=root / "AnimateLCM", lora=root / "LCM_LoRA" / "AnimateLCM_sd15_t2v_lora.safetensors",
                           reference=reference, sd=models.sd)


def _expected(lcm: SimpleNamespace, frames: int, steps: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return lcm.reference(num_frames=frames, height=H, width=W, num_inference_steps=steps, output_type="pt",
                             **kwargs).frames.float()


def test_motion_module_layout_reads_as_v2_with_64_positions(lcm) -> None:
    _, info = read_motion_module(lcm.mm)
    assert info.layout == "original" and info.version == "v2" and info.stored_pe_len is None
    assert info.max_position_len == 64 and "AnimateLCM" in info.reason
    _, folder = read_motion_module(lcm.folder)  # the diffusers copy says 64 in its config.json
    assert folder.layout == "diffusers" and folder.max_position_len == 64


@pytest.mark.parametrize("steps,guidance", [(4, 1.5), (6, 2.0), (8, 1.0)])
def test_lcm_recipe_matches_diffusers(lcm, steps: int, guidance: float) -> None:
    pipe = load_pipeline(lcm.sd, motion_module=lcm.mm, loras=[(lcm.lora, SCALE)])
    assert pipe.max_frames == 64
    expected = _expected(lcm, 4, steps, prompt=PROMPTS, negative_prompt=NEGATIVES, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(steps))
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_frames=4, height=H, width=W, steps=steps,
               guidance_scale=guidance, seed=steps, sampler="lcm", progress=False)
    _check(f"AnimateLCM, lcm, {steps} steps, guidance {guidance}", got, expected)
    plain = load_pipeline(lcm.sd, motion_module=lcm.mm)(PROMPTS, negative_prompt=NEGATIVES, num_frames=4, height=H,
                                                        width=W, steps=steps, guidance_scale=guidance, seed=steps,
                                                        sampler="lcm", progress=False)
    assert (got - plain).abs().max() > 1e-4  # the LoRA did change the video


def test_40_frames_use_positions_beyond_32(lcm) -> None:
    # v2 modules stop at 32 frames; AnimateLCM's table has 64 rows, so 40 frames run in one window.
    pipe = load_pipeline(lcm.sd, motion_module=lcm.mm, loras=[(lcm.lora, SCALE)])
    expected = _expected(lcm, 40, 2, prompt=PROMPTS[0], guidance_scale=1.0,
                         generator=torch.Generator("cpu").manual_seed(1))
    got = pipe(PROMPTS[0], num_frames=40, height=H, width=W, steps=2, guidance_scale=1.0, seed=1, sampler="lcm",
               progress=False)
    _check("AnimateLCM, 40 frames", got, expected)


def test_preset_runs_the_recipe_from_the_command_line(lcm, tmp_path) -> None:
    preset = get_preset("AnimateLCM")
    assert preset.sampler == "lcm" and 4 <= preset.steps <= 8 and 1 <= preset.guidance_scale <= 2
    files = preset.files(lcm.root)
    assert files["motion_modules"] == [lcm.mm] and files["loras"] == [(lcm.lora, preset.lora_scale)]
    out = tmp_path / "samples"
    assert main(["generate", "--preset", "AnimateLCM", "--models-dir", str(lcm.root), "-o", str(out), "--device",
                 "cpu", "--no-progress", "--frames", "4", "--height", str(H), "--width", str(W)]) == 0
    log = json.loads((out / "config.json").read_text())
    assert log["sampler"] == "lcm" and log["steps"] == preset.steps and log["guidance_scale"] == preset.guidance_scale
    assert [s["seed"] for s in log["samples"]] == [0] and (out / "sample.gif").is_file()
