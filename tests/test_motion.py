"""MotionModule: parity with diffusers' AnimateDiffTransformer3D, PE table, key layout, errors, meta build."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import require_oracle
from torch import nn

from animatediff_lite.config import TINY, MotionConfig
from animatediff_lite.loading.motion_map import motion_state_from_diffusers, motion_state_to_diffusers
from animatediff_lite.motion import MotionModule

diffusers_motion = require_oracle("diffusers.models.unets.unet_motion_model")


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C/G, H, W) of each frame for a (B, C, F, H, W) input, as the original AnimateDiff does.

    diffusers' AnimateDiffTransformer3D applies its GroupNorm to (B, C, F, H, W), i.e. jointly over frames;
    swapping in this module makes the diffusers oracle follow the original AnimateDiff.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * f, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def per_frame_norms(model: nn.Module) -> nn.Module:
    """Replace the GroupNorm of every diffusers AnimateDiffTransformer3D in ``model`` by PerFrameGroupNorm."""
    for module in model.modules():
        if isinstance(module, diffusers_motion.AnimateDiffTransformer3D):
            old = module.norm
            new = PerFrameGroupNorm(old.num_groups, old.num_channels, eps=old.eps)
            new.load_state_dict(old.state_dict())
            module.norm = new
    return model


def randomize(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Perturb every parameter (so norms, biases and the zero-init proj_out all matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def diffusers_module(channels: int, heads: int, groups: int, max_len: int) -> nn.Module:
    return diffusers_motion.AnimateDiffTransformer3D(
        num_attention_heads=heads, attention_head_dim=channels // heads, in_channels=channels, num_layers=1,
        norm_num_groups=groups, cross_attention_dim=None, attention_bias=False, activation_fn="geglu",
        positional_embeddings="sinusoidal", num_positional_embeddings=max_len)


def motion_pair(channels: int = 32, heads: int = 4, groups: int = 8, max_len: int = 32, seed: int = 0):
    """(ours, diffusers-with-per-frame-norm, diffusers-as-is) with the same random weights."""
    torch.manual_seed(seed)
    ref = diffusers_module(channels, heads, groups, max_len).eval()
    randomize(ref, seed)
    ours = MotionModule(channels, MotionConfig(num_heads=heads, norm_num_groups=groups, max_position_len=max_len))
    # Diffusers keys carry no "motion_modules.j." prefix here; give them one for the map and strip it again.
    state = {"m.motion_modules.0." + k: v for k, v in ref.state_dict().items()}
    native = {k.removeprefix("m.motion_modules.0."): v for k, v in motion_state_from_diffusers(state).items()}
    ours.load_state_dict(native, strict=True)
    joint = diffusers_module(channels, heads, groups, max_len).eval()
    joint.load_state_dict(ref.state_dict())
    return ours.eval(), per_frame_norms(ref), joint


@pytest.mark.parametrize("frames", [1, 5, 16])
@pytest.mark.parametrize("channels,heads,groups", [(32, 4, 8), (48, 2, 4)])
def test_parity_with_diffusers(frames: int, channels: int, heads: int, groups: int) -> None:
    ours, ref, _ = motion_pair(channels, heads, groups)
    x = torch.randn(2 * frames, channels, 5, 3)
    with torch.no_grad():
        expected = ref(x, num_frames=frames)
        got = ours(x, frames)
    err = (got - expected).abs().max().item()
    print(f"frames={frames} C={channels}: max abs diff {err:.2e}, |out-in| {(got - x).abs().max().item():.3f}")
    assert err <= 1e-4
    assert (got - x).abs().max() > 1e-2  # proj_out is non-zero: the module is not the identity


def test_diffusers_normalises_jointly_over_frames() -> None:
    """Documents the one diffusers difference: its motion GroupNorm spans all frames (ours per frame)."""
    ours, _, joint = motion_pair()
    for frames, differs in ((1, False), (8, True)):
        x = torch.randn(frames, 32, 4, 4) * torch.linspace(0.2, 3.0, frames)[:, None, None, None]
        with torch.no_grad():
            err = (ours(x, frames) - joint(x, num_frames=frames)).abs().max().item()
        print(f"frames={frames}: ours vs unpatched diffusers {err:.2e}")
        assert (err > 1e-3) == differs


def test_pe_added_to_normed_input_for_every_attention_block() -> None:
    """Zeroing one attention block's PE changes the output: every block uses its table."""
    ours, _, _ = motion_pair()
    x = torch.randn(6, 32, 2, 2)
    with torch.no_grad():
        base = ours(x, 6)
        for n in range(2):
            blocks = ours.temporal_transformer.transformer_blocks[0].attention_blocks
            saved = blocks[n].pos_encoder.pe.clone()
            blocks[n].pos_encoder.pe.zero_()
            assert (ours(x, 6) - base).abs().max() > 1e-3
            blocks[n].pos_encoder.pe.copy_(saved)


def test_too_many_frames_is_value_error() -> None:
    module = MotionModule(16, MotionConfig.for_version("v1", norm_num_groups=4))
    with pytest.raises(ValueError, match=r"24.*context windows"):
        module(torch.randn(25, 16, 2, 2), 25)
    module(torch.randn(24, 16, 2, 2), 24)  # the limit itself is fine


def test_pe_table_values_and_buffer() -> None:
    dim, max_len = 12, 32
    module = MotionModule(dim, MotionConfig(num_heads=2, norm_num_groups=4, max_position_len=max_len))
    expected = torch.zeros(1, max_len, dim)
    for p in range(max_len):
        for i in range(0, dim, 2):
            angle = p / 10000 ** (i / dim)
            expected[0, p, i] = math.sin(angle)
            expected[0, p, i + 1] = math.cos(angle)
    for n in range(2):
        name = f"temporal_transformer.transformer_blocks.0.attention_blocks.{n}.pos_encoder.pe"
        pe = dict(module.named_buffers())[name]
        assert pe.shape == (1, max_len, dim)
        torch.testing.assert_close(pe, expected, atol=1e-6, rtol=0)
    assert not any("pe" in k.split(".")[-1] for k in module.state_dict())


def test_state_dict_keys_follow_original_layout() -> None:
    module = MotionModule(16, MotionConfig(num_heads=2, norm_num_groups=4))
    t = "temporal_transformer."
    b = t + "transformer_blocks.0."
    expected = [t + "norm.weight", t + "norm.bias", t + "proj_in.weight", t + "proj_in.bias"]
    for n in range(2):
        expected += [f"{b}attention_blocks.{n}.to_q.weight", f"{b}attention_blocks.{n}.to_k.weight",
                     f"{b}attention_blocks.{n}.to_v.weight", f"{b}attention_blocks.{n}.to_out.0.weight",
                     f"{b}attention_blocks.{n}.to_out.0.bias"]
    expected += [b + "norms.0.weight", b + "norms.0.bias", b + "norms.1.weight", b + "norms.1.bias",
                 b + "ff.net.0.proj.weight", b + "ff.net.0.proj.bias", b + "ff.net.2.weight", b + "ff.net.2.bias",
                 b + "ff_norm.weight", b + "ff_norm.bias", t + "proj_out.weight", t + "proj_out.bias"]
    assert sorted(module.state_dict()) == sorted(expected)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes[b + "ff.net.0.proj.weight"] == (128, 16) and shapes[b + "ff.net.2.weight"] == (16, 64)


def test_zero_init_is_identity() -> None:
    module = MotionModule(16, TINY.motion)
    assert module.temporal_transformer.proj_out.weight.abs().sum() == 0
    x = torch.randn(8, 16, 3, 3)
    torch.testing.assert_close(module(x, 4), x, atol=0, rtol=0)


def test_meta_build_and_reset_buffers() -> None:
    config = MotionConfig(num_heads=2, norm_num_groups=4)
    with torch.device("meta"):
        module = MotionModule(16, config)
    assert all(p.is_meta for p in module.parameters())
    real = MotionModule(16, config)
    randomize(real, 3)
    module.load_state_dict(real.state_dict(), assign=True)
    module.reset_buffers()
    x = torch.randn(10, 16, 2, 3)
    torch.testing.assert_close(module(x, 5), real(x, 5), atol=0, rtol=0)


def test_motion_map_round_trip() -> None:
    ref = diffusers_module(32, 4, 8, 24)
    state = {f"up_blocks.1.motion_modules.2.{k}": v for k, v in ref.state_dict().items()}
    native = motion_state_from_diffusers(state)
    assert not any(k.endswith(".pe") for k in native)
    back = motion_state_to_diffusers(native, max_seq_length=24)
    assert sorted(back) == sorted(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], atol=1e-6, rtol=0)
    with_pe = motion_state_from_diffusers(state, keep_pe=True)
    pe_keys = sorted(k for k in with_pe if k.endswith("pos_encoder.pe"))
    assert pe_keys == [f"up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.{n}"
                       ".pos_encoder.pe" for n in range(2)]
    assert sorted(motion_state_to_diffusers(with_pe)) == sorted(state)


def _random_module(channels: int = 32, heads: int = 4, seed: int = 0) -> MotionModule:
    torch.manual_seed(seed)
    module = MotionModule(channels, MotionConfig(num_heads=heads, norm_num_groups=8)).eval()
    randomize(module, seed)
    return module


@pytest.mark.parametrize("frames", [1, 7, 16])
def test_fused_temporal_attention_path_equals_module_path(frames: int) -> None:
    """The block calls ops.temporal_attention (one fused op on CUDA); without hooks it must equal the modules."""
    module = _random_module()
    x = torch.randn(2 * frames, 32, 3, 5)
    with torch.no_grad():
        fused = module(x, frames)
        module.temporal_transformer.transformer_blocks[0].attention_blocks[0].to_q.register_forward_hook(
            lambda m, args, out: out)  # a no-op hook forces the module path
        plain = module(x, frames)
    err = (fused - plain).abs().max().item()
    print(f"fused vs module path: max abs diff {err:.2e}")
    assert err <= 1e-5


def test_fused_path_through_the_triton_kernel_in_the_interpreter(monkeypatch) -> None:
    """With the backend forced to Triton (CPU interpreter here, the real kernel on a GPU) the module agrees."""
    pytest.importorskip("triton")
    import animatediff_lite.kernels.temporal_attention as kernel

    module = _random_module(seed=1)
    x = torch.randn(2 * 8, 32, 2, 3)
    with torch.no_grad():
        ref = module(x, 8)
        calls = []
        real = kernel.temporal_attention_core_op
        monkeypatch.setattr(kernel, "temporal_attention_core_op", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setenv("ANIMATEDIFF_LITE_BACKEND", "triton")
        got = module(x, 8)
    assert calls, "the Triton kernel was not used"
    assert (got - ref).abs().max().item() <= 1e-4


def test_hooks_on_projections_are_honoured() -> None:
    """MotionLoRA training puts forward hooks on the projections: the fused op must not bypass them."""
    module = _random_module(seed=2)
    x = torch.randn(4, 32, 2, 2)
    with torch.no_grad():
        before = module(x, 4)
        module.temporal_transformer.transformer_blocks[0].attention_blocks[1].to_v.register_forward_hook(
            lambda m, args, out: out * 2)
        after = module(x, 4)
    assert (after - before).abs().max().item() > 1e-3
