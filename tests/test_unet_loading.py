"""Base UNet loading: LDM <-> diffusers key maps (tiny configs and full-size SD1.5 on meta), config
inference, and load_unet numerics against diffusers UNet2DConditionModel applied frame by frame."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import save_file

from animatediff_lite.config import SD15, TINY, MotionConfig, UNetConfig
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.motion_load import load_motion_module
from animatediff_lite.loading.unet_map import (
    load_spatial,
    read_unet_source,
    split_motion,
    unet_config_from_diffusers,
    unet_config_from_state,
    unet_config_to_diffusers,
    unet_state_from_ldm,
    unet_state_to_ldm,
)
from animatediff_lite.unet import UNet3D
from tests.keylists import (
    SD15_DIFFUSERS_CONFIG,
    count,
    diffusers_unet_shapes,
    ldm_unet_shapes,
    meta_state,
    original_motion_shapes,
)


def load_unet(source, motion: MotionConfig | None = None) -> UNet3D:
    """A UNet3D with its spatial weights loaded strictly from ``source`` (motion modules left on the meta device)."""
    checkpoint = read_checkpoint(source, "a Stable Diffusion UNet")
    spatial, cfg, where = read_unet_source(checkpoint)
    with torch.device("meta"):
        unet = UNet3D(cfg, motion)
    load_spatial(unet, spatial, where, "cpu", torch.float32, checkpoint.part("unet", "").file)
    return unet.eval()


# Tiny configs that exercise every branch of the block table: attention on some levels only, a level
# without attention first, three levels, two layers per level, transformer depth 2, linear projections.
TINY_CONFIGS = {
    "tiny": TINY.unet,
    # SD1.5's head count and group count, tiny widths: what LDM single-file inference assumes.
    "tiny_sd_like": dataclasses.replace(TINY.unet, attention_head_dim=8, norm_num_groups=32),
    "three_levels": UNetConfig(block_out_channels=(16, 32, 32), down_cross_attention=(False, True, True),
                               layers_per_block=2, cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8,
                               transformer_layers_per_block=2, use_linear_projection=True),
}


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def tiny_diffusers_unet(cfg: UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    with torch.no_grad():  # random everything (incl. zero-init convs) so every weight matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


# ---------------------------------------------------------------------------------- full-size SD1.5 on meta

def test_sd15_ldm_keylist_known_keys():
    ldm = ldm_unet_shapes(SD15.unet)
    p = "model.diffusion_model."
    assert ldm[p + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] == (320, 320)
    assert ldm[p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert ldm[p + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert ldm[p + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert ldm[p + "output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert ldm[p + "middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert ldm[p + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert ldm[p + "input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert ldm[p + "output_blocks.0.0.skip_connection.weight"] == (1280, 2560, 1, 1)
    assert ldm[p + "time_embed.0.weight"] == (1280, 320) and ldm[p + "out.2.weight"] == (4, 320, 3, 3)
    assert not any(k.startswith(p + "input_blocks.12") for k in ldm)
    assert len(ldm) == 686


def test_sd15_unet_maps_completely_both_ways():
    """SD1.5's UNet in LDM and diffusers layout map onto each other and onto UNet3D's spatial keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm, dif = ldm_unet_shapes(SD15.unet), diffusers_unet_shapes(SD15_DIFFUSERS_CONFIG)
    ldm_state = meta_state(ldm)
    native = unet_state_from_ldm(ldm_state, SD15.unet)
    assert shapes(native) == dif
    back = unet_state_to_ldm(native, SD15.unet)
    assert set(back) == set(ldm) and all(back[k] is ldm_state[k] for k in ldm)
    # Oracle: diffusers' own LDM converter pairs every tensor the same way.
    theirs = convert_ldm_unet_checkpoint(dict(ldm_state), SD15_DIFFUSERS_CONFIG)
    assert set(theirs) == set(native) and all(theirs[k] is native[k] for k in native)
    # Configs: from config.json, from diffusers tensors, from LDM tensors.
    assert unet_config_from_diffusers(SD15_DIFFUSERS_CONFIG) == SD15.unet
    assert unet_config_from_state(meta_state(dif)) == SD15.unet
    assert unet_config_from_state(ldm_state) == SD15.unet
    for version in ("v1", "v2", "v3"):
        with torch.device("meta"):
            unet = UNet3D(SD15.unet, MotionConfig.for_version(version))
        spatial, motion = split_motion(shapes(unet.state_dict()))
        assert spatial == dif
        assert motion == {k: s for k, s in original_motion_shapes(version).items() if not k.endswith(".pe")}
        print(f"UNet3D(SD15, {version}): {count(spatial):,} spatial + {count(motion):,} motion parameters")
    print(f"SD1.5 UNet: {len(ldm)} tensors, {count(ldm):,} parameters in both layouts")
    assert count(ldm) == count(dif) == 859_520_964


# ------------------------------------------------------------------------------------------- tiny configs

@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_ldm_round_trip(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = TINY_CONFIGS[name]
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg
    state = tiny_diffusers_unet(cfg).state_dict()
    ldm = unet_state_to_ldm(state, cfg)
    assert shapes(ldm) == ldm_unet_shapes(cfg)  # the independent LDM generator agrees
    native = unet_state_from_ldm(ldm, unet_config_from_state(ldm))  # the inferred config maps it
    assert set(native) == set(state) and all(torch.equal(native[k], state[k]) for k in state)
    theirs = convert_ldm_unet_checkpoint(ldm, unet_config_to_diffusers(cfg))
    assert set(theirs) == set(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    inferred = unet_config_from_state(ldm)
    assert inferred == dataclasses.replace(cfg, attention_head_dim=8, norm_num_groups=32)  # documented defaults
    assert unet_config_from_state(state) == inferred


def _per_frame_reference(model, sample, t, ctx):
    b, c, f, h, w = sample.shape
    frames = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    with torch.no_grad():
        out = model(frames, t, ctx.repeat_interleave(f, dim=0)).sample
    return out.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("layout", ["diffusers_folder", "ldm_safetensors", "ldm_ckpt_fp16_with_extras"])
def test_load_unet_matches_diffusers_per_frame(tmp_path, layout, caplog):
    cfg = TINY_CONFIGS["tiny_sd_like"]
    model = tiny_diffusers_unet(cfg)
    if layout == "diffusers_folder":
        model.save_pretrained(tmp_path / "sd" / "unet")
        source = tmp_path / "sd"
    elif layout == "ldm_safetensors":
        source = tmp_path / "model.safetensors"
        save_file(unet_state_to_ldm(model.state_dict(), cfg), str(source))
    else:
        source = tmp_path / "model.ckpt"
        ldm = {k: v.half() for k, v in unet_state_to_ldm(model.state_dict(), cfg).items()}
        extras = {"first_stage_model.decoder.conv_in.weight": torch.zeros(3),
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(3),
                  "model_ema.decay": torch.tensor(0.9999),
                  "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(3)}
        torch.save({"state_dict": ldm | extras, "global_step": 10}, str(source))
        model = model.half().float()  # the reference sees the same rounded weights
    with caplog.at_level(logging.INFO, logger="animatediff_lite.loading.unet_map"):
        unet = load_unet(source)
    if layout == "ldm_ckpt_fp16_with_extras":
        assert "EMA" in caplog.text and "cond_stage_model" in caplog.text and "first_stage_model" in caplog.text
    assert unet.config == cfg and unet.motion is None
    assert all(p.dtype == torch.float32 and not p.is_meta for p in unet.parameters())
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 3, 16, 16, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        ours = unet(sample, 37, ctx)
    ref = _per_frame_reference(model, sample, 37, ctx)
    err = (ours - ref).abs().max().item()
    print(f"{layout}: max abs diff vs diffusers per frame {err:.2e}")
    assert err <= 1e-4


def test_load_unet_then_motion_module(tmp_path):
    """load_unet leaves motion weights to load_motion_module; together every parameter is filled."""
    cfg = TINY.unet
    model = tiny_diffusers_unet(cfg)
    model.save_pretrained(tmp_path / "sd" / "unet")
    motion = MotionConfig.for_version("v2", cfg.norm_num_groups)
    motion = dataclasses.replace(motion, num_heads=2)
    unet = load_unet(tmp_path / "sd", motion=motion)
    assert all(p.is_meta == (".motion_modules." in n) for n, p in unet.named_parameters())
    mm = {k: torch.randn(s) * 0.1 for k, s in
          original_motion_shapes("v2", cfg.block_out_channels, cfg.layers_per_block).items()}
    mm |= {k: _pe(*s) for k, s in original_motion_shapes("v2", cfg.block_out_channels, cfg.layers_per_block).items()
           if k.endswith(".pe")}
    torch.save(mm, str(tmp_path / "mm.ckpt"))
    load_motion_module(unet, tmp_path / "mm.ckpt")
    assert not any(p.is_meta for p in unet.parameters()) and not any(b.is_meta for b in unet.buffers())
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 4, 8, 8), 10, torch.randn(1, 3, cfg.cross_attention_dim))
    assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out).all()


def _pe(_, length, dim):
    from animatediff_lite.motion import sinusoidal_table

    return sinusoidal_table(length, dim)


# ------------------------------------------------------------------------------------------------- errors

def test_errors_name_the_file(tmp_path):
    cfg = TINY_CONFIGS["tiny_sd_like"]
    ldm = unet_state_to_ldm(tiny_diffusers_unet(cfg).state_dict(), cfg)
    missing = dict(ldm)
    del missing["model.diffusion_model.middle_block.2.out_layers.3.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    match = r"missing\.safetensors: does not fit .*mid_block\.resnets\.1\.conv2\.bias"
    with pytest.raises(CheckpointError, match=match):
        load_unet(tmp_path / "missing.safetensors")
    extra = dict(ldm)
    extra["model.diffusion_model.input_blocks.1.0.weird.weight"] = torch.zeros(1)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: 1 LDM UNet keys do not fit.*weird"):
        load_unet(tmp_path / "extra.safetensors")
    mm = {k: torch.zeros(s) for k, s in original_motion_shapes("v3", cfg.block_out_channels, 1).items()}
    save_file(mm, str(tmp_path / "mm_sd_v15.safetensors"))
    match = r"mm_sd_v15\.safetensors: holds an original AnimateDiff motion module .*not a base UNet"
    with pytest.raises(CheckpointError, match=match):
        load_unet(tmp_path / "mm_sd_v15.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="empty_folder: a folder that is neither a diffusers model folder"):
        load_unet(tmp_path / "empty_folder")
    lcm = tmp_path / "lcm" / "unet"
    lcm.mkdir(parents=True)
    (lcm / "config.json").write_text('{"time_cond_proj_dim": 256}')
    with pytest.raises(CheckpointError, match=r"config\.json: unet config time_cond_proj_dim=256 is not supported"):
        load_unet(tmp_path / "lcm")


def test_config_from_diffusers_rejects_unsupported():
    with pytest.raises(ValueError, match="per-level"):
        unet_config_from_diffusers({"attention_head_dim": [5, 10, 20, 20]})
    with pytest.raises(ValueError, match="do not mirror"):
        unet_config_from_diffusers({"up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]})
    sd2 = unet_config_from_diffusers({"attention_head_dim": [8, 8, 8, 8], "use_linear_projection": True,
                                      "cross_attention_dim": 1024})
    assert sd2.use_linear_projection and sd2.cross_attention_dim == 1024 and sd2.attention_head_dim == 8
