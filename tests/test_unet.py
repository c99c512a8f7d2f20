"""UNet3D: parity with diffusers UNetMotionModel (v2/v3) and UNet2DConditionModel, v1 joint GroupNorm, SD1.5 sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import require_oracle
from torch import nn

from animatediff_lite.config import SD15, TINY, MotionConfig, UNetConfig
from animatediff_lite.loading.motion_map import motion_state_from_diffusers
from animatediff_lite.unet import UNet3D

diffusers = require_oracle("diffusers")
from test_motion import per_frame_norms, randomize  # noqa: E402

CONFIGS = {
    "tiny": TINY.unet,
    # three levels, two layers, linear projections
    "three_levels": dataclasses.replace(
        TINY.unet, block_out_channels=(32, 64, 64), down_cross_attention=(True, True, False), layers_per_block=2,
        attention_head_dim=4, use_linear_projection=True),
}
SIZE = {"tiny": (8, 6), "three_levels": (12, 10)}  # (h, w); 10 -> 5 -> 3 exercises the odd upsampling size


def diffusers_unet2d(config: UNetConfig) -> nn.Module:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.down_cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.down_cross_attention)]
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=config.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=config.layers_per_block, cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps, use_linear_projection=config.use_linear_projection,
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift)


def diffusers_motion_unet(config: UNetConfig, motion: MotionConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    adapter = diffusers.MotionAdapter(
        block_out_channels=config.block_out_channels, motion_layers_per_block=config.layers_per_block,
        motion_num_attention_heads=motion.num_heads, motion_norm_num_groups=motion.norm_num_groups,
        motion_max_seq_length=motion.max_position_len, use_motion_mid_block=motion.mid_block)
    model = diffusers.UNetMotionModel.from_unet2d(diffusers_unet2d(config), adapter).eval()
    randomize(model, seed)  # every motion proj_out is non-zero from here on
    return model


def ours_from_diffusers(ref: nn.Module, config: UNetConfig, motion: MotionConfig | None) -> UNet3D:
    """Build on meta, map the diffusers state dict (UNet keys as they are), assign strictly."""
    with torch.device("meta"):
        ours = UNet3D(config, motion)
    state = motion_state_from_diffusers(ref.state_dict())
    if motion is None:
        state = {k: v for k, v in state.items() if "motion_modules" not in k}
    assert sorted(state) == sorted(ours.state_dict())  # identical key sets, nothing dropped or invented
    ours.load_state_dict(state, strict=True, assign=True)
    ours.reset_buffers()
    return ours.eval()


def inputs(config: UNetConfig, name: str, frames: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, frames, *SIZE[name], generator=g)
    text = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    return sample, text


TIMESTEPS = [torch.tensor([17, 803]), 511, torch.tensor(999.0)]


@pytest.mark.parametrize("frames", [1, 5, 16])
@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_unet_motion_model(name: str, version: str, frames: int) -> None:
    config = CONFIGS[name]
    motion = MotionConfig.for_version(version, norm_num_groups=config.norm_num_groups)
    motion = dataclasses.replace(motion, num_heads=2)
    ref = diffusers_motion_unet(config, motion, seed=frames)
    ours = ours_from_diffusers(ref, config, motion)
    assert (ours.mid_block.motion_modules is not None) == (version == "v2")
    per_frame_norms(ref)  # the original normalises each frame in the motion modules (see test_motion)
    sample, text = inputs(config, name, frames)
    t = TIMESTEPS[frames % 3]
    with torch.no_grad():
        expected = ref(sample, t, text.repeat_interleave(frames, dim=0)).sample
        got = ours(sample, t, text)
        plain = ours_from_diffusers(ref, config, None)(sample, t, text)
    err = (got - expected).abs().max().item()
    effect = (got - plain).abs().max().item()
    print(f"{name} {version} F={frames}: max abs diff {err:.2e}, |motion - no motion| {effect:.3f}")
    assert got.shape == sample.shape
    assert err <= 1e-4
    assert effect > 1e-2  # the motion modules change the prediction


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_motion_matches_unet2d_per_frame(name: str, flip: bool, shift: int) -> None:
    # The time-embedding flags are only checked here: diffusers' UNetMotionModel hard-codes (True, 0).
    config = dataclasses.replace(CONFIGS[name], flip_sin_to_cos=flip, freq_shift=shift)
    torch.manual_seed(0)
    ref = diffusers_unet2d(config).eval()
    randomize(ref, 5)
    ours = ours_from_diffusers(ref, config, None)
    frames = 3
    sample, text = inputs(config, name, frames)
    t = torch.tensor([3, 640])
    with torch.no_grad():
        got = ours(sample, t, text)
        for f in range(frames):
            expected = ref(sample[:, :, f], t, text).sample
            err = (got[:, :, f] - expected).abs().max().item()
            print(f"{name} frame {f}: max abs diff {err:.2e}")
            assert err <= 1e-4


class JointGroupNorm(nn.GroupNorm):
    """Plain reference for AnimateDiff v1: statistics over (C/G, F, H, W) of each video."""

    frames = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        video = x.reshape(n // self.frames, self.frames, c, h, w).transpose(1, 2)  # (B, C, F, H, W)
        y = F.group_norm(video, self.num_groups, self.weight, self.bias, self.eps)
        return y.transpose(1, 2).reshape(n, c, h, w)


def joint_resnet_norms(model: nn.Module, frames: int) -> None:
    """Swap every resnet GroupNorm and conv_norm_out of a diffusers UNet for JointGroupNorm."""
    targets = [(model, "conv_norm_out")]
    for module in model.modules():
        if isinstance(module, diffusers.models.resnet.ResnetBlock2D):
            targets += [(module, "norm1"), (module, "norm2")]
    for owner, attr in targets:
        old = getattr(owner, attr)
        new = JointGroupNorm(old.num_groups, old.num_channels, eps=old.eps)
        new.load_state_dict(old.state_dict())
        new.frames = frames
        setattr(owner, attr, new)


def test_v1_joint_groupnorm() -> None:
    name, frames = "three_levels", 6
    config = CONFIGS[name]
    v1 = dataclasses.replace(MotionConfig.for_version("v1", norm_num_groups=8), num_heads=2)
    ref = diffusers_motion_unet(config, v1, seed=7)
    ours = ours_from_diffusers(ref, config, v1)
    per_frame = ours_from_diffusers(ref, config, dataclasses.replace(v1, joint_groupnorm=False))
    sample, text = inputs(config, name, frames)
    # Frames with different statistics, so joint and per-frame normalisation really differ.
    sample = sample * torch.linspace(0.3, 2.0, frames)[None, None, :, None, None]
    per_frame_norms(ref)
    joint_resnet_norms(ref, frames)
    with torch.no_grad():
        expected = ref(sample, 500, text.repeat_interleave(frames, dim=0)).sample
        got = ours(sample, 500, text)
        other = per_frame(sample, 500, text)
    err = (got - expected).abs().max().item()
    gap = (got - other).abs().max().item()
    print(f"v1 joint GroupNorm: max abs diff {err:.2e}; joint vs per-frame {gap:.3f}")
    assert err <= 1e-4
    assert gap > 1e-2


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_motion_adapter_keys_map_exactly(version: str) -> None:
    """A diffusers MotionAdapter's state maps onto exactly the motion keys of UNet3D (PE buffers dropped)."""
    config = CONFIGS["three_levels"]
    adapter = diffusers.MotionAdapter(
        block_out_channels=config.block_out_channels, motion_layers_per_block=config.layers_per_block,
        motion_num_attention_heads=2, motion_norm_num_groups=8, use_motion_mid_block=version == "v2")
    native = motion_state_from_diffusers(adapter.state_dict())
    with torch.device("meta"):
        ours = UNet3D(config, MotionConfig.for_version(version, norm_num_groups=8))
    expected = {k: v.shape for k, v in ours.state_dict().items() if ".motion_modules." in k}
    assert {k: v.shape for k, v in native.items()} == expected


def test_text_per_frame_and_errors() -> None:
    config = TINY.unet
    torch.manual_seed(0)
    ours = UNet3D(config, TINY.motion).eval()
    sample, text = inputs(config, "tiny", 4)
    with torch.no_grad():
        same = ours(sample, 10, text)
        per_frame = ours(sample, 10, text.repeat_interleave(4, dim=0))
    torch.testing.assert_close(same, per_frame, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="32"):
        ours(torch.randn(1, 4, 33, 8, 8), 10, text[:1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(sample, 10, text[:1])
    with pytest.raises(ValueError, match="sample"):
        ours(sample[:, :3], 10, text)
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]), text)


def test_gradient_checkpointing_same_grads() -> None:
    torch.manual_seed(0)
    model = UNet3D(TINY.unet, TINY.motion)
    randomize(model, 2)
    sample, text = inputs(TINY.unet, "tiny", 3)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model.train()
        model(sample, 100, text).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("version,expected", [("v1", 417_137_600), ("v2", 453_209_280), ("v3", 417_137_600)])
def test_full_size_on_meta(version: str, expected: int) -> None:
    """SD1.5 + motion modules on the meta device: the UNet has 859.52M parameters (SD1.5), the motion
    modules 417.1M (v1/v3: mm_sd_v15.ckpt is 1.67 GB in fp32) or 453.2M (v2: 1.82 GB)."""
    with torch.device("meta"):
        model = UNet3D(SD15.unet, MotionConfig.for_version(version))
    state = model.state_dict()
    motion = sum(v.numel() for k, v in state.items() if ".motion_modules." in k)
    unet = sum(v.numel() for k, v in state.items() if ".motion_modules." not in k)
    keys = sum(".motion_modules." in k for k in state)
    print(f"{version}: UNet {unet / 1e6:.2f}M, motion modules {motion / 1e6:.2f}M in {keys} tensors")
    assert unet == 859_520_964
    assert motion == expected
    assert keys == (546 if version == "v2" else 520)
    assert all(p.is_meta for p in model.parameters())
