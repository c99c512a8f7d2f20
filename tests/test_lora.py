"""LoRA / MotionLoRA / v3 adapter merging against the update applied by hand (W + scale * alpha/rank * up @ down).

Stand-ins with the native names: a tiny diffusers UNet2DConditionModel (UNet3D uses diffusers names), the
transformers CLIP text model without ``text_model.`` and a module with original motion-module names.
"""

import copy
import functools
import types

import pytest
import torch
from conftest import require_oracle
from safetensors.torch import save_file
from torch import nn

from animatediff_lite import CheckpointError
from animatediff_lite.config import SD15
from animatediff_lite.loading.lora_map import ldm_to_diffusers_flat, parse_lora
from animatediff_lite.lora import apply_loras, merge_lora, unmerge

diffusers = require_oracle("diffusers")
transformers = require_oracle("transformers")


def tiny_unet(dtype=torch.float32):
    return copy.deepcopy(_tiny_unet()).to(dtype)


@functools.cache
def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


def tiny_text_encoder(dtype=torch.float32):
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=12, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)
    return transformers.CLIPTextModel(cfg).to(dtype)  # transformers >= 5 names: no "text_model." (native)


class TemporalAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])


def motion_standin(c=8):
    """Modules named like UNet3D's motion modules (original AnimateDiff layout)."""
    torch.manual_seed(2)
    root = nn.Module()
    root.down_blocks = nn.ModuleList()
    for _ in range(2):
        blk = nn.Module()
        mm = nn.Module()
        mm.temporal_transformer = nn.Module()
        tb = nn.Module()
        tb.attention_blocks = nn.ModuleList([TemporalAttention(c), TemporalAttention(c)])
        mm.temporal_transformer.transformer_blocks = nn.ModuleList([tb])
        blk.motion_modules = nn.ModuleList([mm])
        blk.attentions = nn.ModuleList([nn.Module()])
        blk.attentions[0].transformer_blocks = nn.ModuleList([nn.Module()])
        blk.attentions[0].transformer_blocks[0].attn1 = TemporalAttention(c)
        root.down_blocks.append(blk)
    return root


def lora_pair(out_shape, rank, gen, kernel=None, dtype=torch.float32):
    out_c, in_c = out_shape[:2]
    if kernel is None:
        down, up = torch.randn(rank, in_c, generator=gen), torch.randn(out_c, rank, generator=gen)
    else:
        down = torch.randn(rank, in_c, *kernel, generator=gen)
        up = torch.randn(out_c, rank, 1, 1, generator=gen)
    return (down * 0.1).to(dtype), (up * 0.1).to(dtype)


def hand_update(weight, down, up, scale, ratio):
    """The oracle: W + scale * ratio * up @ down in float32, reshaped to W, cast back."""
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return (weight.float() + scale * ratio * delta.reshape(weight.shape)).to(weight.dtype)


UNET_TARGETS = [  # (kohya name, native module name, conv kernel of the LoRA or None)
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", None),  # noqa: E501
    ("down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0", None),  # noqa: E501
    ("up_blocks_2_attentions_2_transformer_blocks_0_ff_net_0_proj", "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.0.proj", None),  # noqa: E501
    ("mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in", (1, 1)),  # 1x1 conv
    ("down_blocks_0_resnets_1_conv1", "down_blocks.0.resnets.1.conv1", (3, 3)),  # LoCon 3x3
    ("up_blocks_0_upsamplers_0_conv", "up_blocks.0.upsamplers.0.conv", (3, 3)),
    ("down_blocks_1_resnets_0_time_emb_proj", "down_blocks.1.resnets.0.time_emb_proj", None),
]
TE_TARGETS = [
    ("text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj"),
    ("text_model_encoder_layers_1_mlp_fc2", "encoder.layers.1.mlp.fc2"),
]


def write_kohya(path, unet, te, alphas, dtype=torch.float32, seed=0, names=None):
    """A kohya file with every UNET/TE target; returns {native name: (down, up, ratio, part)}."""
    gen = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    mods = dict(unet.named_modules())
    tmods = dict(te.named_modules())
    for i, (flat, native, kernel) in enumerate(UNET_TARGETS):
        rank = 2 + i % 3
        down, up = lora_pair(mods[native].weight.shape, rank, gen, kernel, dtype)
        key = f"lora_unet_{(names or {}).get(flat, flat)}"
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        alpha = alphas[i % len(alphas)]
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        expected[native] = (down, up, (alpha or rank) / rank, "unet")
    for flat, native in TE_TARGETS:
        down, up = lora_pair(tmods[native].weight.shape, 4, gen, None, dtype)
        state[f"lora_te_{flat}.lora_down.weight"], state[f"lora_te_{flat}.lora_up.weight"] = down, up
        state[f"lora_te_{flat}.alpha"] = torch.tensor(2.0, dtype=dtype)
        expected[native] = (down, up, 2.0 / 4, "te")
    save_file(state, str(path))
    return expected


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_states_equal(a, b):
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("dtype,file_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("scale", [0.8, -1.5])
def test_kohya_merge_matches_hand_update_and_unmerges_exactly(tmp_path, dtype, file_dtype, scale):
    unet, te = tiny_unet(dtype), tiny_text_encoder(dtype)
    before_u, before_t = snapshot(unet), snapshot(te)
    expected = write_kohya(tmp_path / "lora.safetensors", unet, te, alphas=[1, None, 3, 0.5, 8], dtype=file_dtype)
    pipe = types.SimpleNamespace(unet=unet, text_encoder=te)
    handles = apply_loras(pipe, loras=[(tmp_path / "lora.safetensors", scale)])
    umods, tmods = dict(unet.named_modules()), dict(te.named_modules())
    for native, (down, up, ratio, part) in expected.items():
        w0 = (before_u if part == "unet" else before_t)[f"{native}.weight"]
        got = (umods if part == "unet" else tmods)[native].weight
        want = hand_update(w0, down, up, scale, ratio)
        assert got.dtype == dtype
        # fp32: the same float32 sum up to summation order; low precision: at most one rounding step apart.
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, n=native: f"{n}: {m}")
        assert not torch.equal(got, w0)
    touched = {f"{n}.weight" for n, v in expected.items() if v[3] == "unet"}
    assert_states_equal({k: v for k, v in before_u.items() if k not in touched}, unet.state_dict())
    unmerge(handles)
    assert_states_equal(before_u, unet.state_dict())
    assert_states_equal(before_t, te.state_dict())


LDM_NAMES = {  # diffusers flat name -> LDM flat name, SD1.5 block numbering (layers_per_block 2)
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0":
        "input_blocks_5_1_transformer_blocks_0_attn2_to_out_0",
    "up_blocks_2_attentions_2_transformer_blocks_0_ff_net_0_proj":
        "output_blocks_8_1_transformer_blocks_0_ff_net_0_proj",
    "mid_block_attentions_0_proj_in": "middle_block_1_proj_in",
    "down_blocks_0_resnets_1_conv1": "input_blocks_2_0_in_layers_2",
    "up_blocks_0_upsamplers_0_conv": "output_blocks_2_1_conv",
    "down_blocks_1_resnets_0_time_emb_proj": "input_blocks_4_0_emb_layers_1",
}


@pytest.mark.parametrize("ldm,diffusers_name", [
    ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
    ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
    ("input_blocks_7_1_proj_out", "down_blocks_2_attentions_0_proj_out"),
    ("middle_block_0_in_layers_2", "mid_block_resnets_0_conv1"),
    ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
    ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
    ("output_blocks_4_1_transformer_blocks_0_attn1_to_k", "up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_k"),
    ("output_blocks_11_0_skip_connection", "up_blocks_3_resnets_2_conv_shortcut"),
    ("time_embed_0", "time_embedding_linear_1"),
    ("input_blocks_0_0", "conv_in"),
    ("out_2", "conv_out"),
    ("down_blocks_0_resnets_0_conv1", None),
])
def test_ldm_names_sd15(ldm, diffusers_name):
    assert ldm_to_diffusers_flat(ldm, SD15.unet) == diffusers_name


def test_kohya_ldm_names_merge_like_diffusers_names(tmp_path):
    unet_a, te_a = tiny_unet(), tiny_text_encoder()
    unet_b, te_b = tiny_unet(), tiny_text_encoder()
    write_kohya(tmp_path / "d.safetensors", unet_a, te_a, alphas=[4])
    write_kohya(tmp_path / "l.safetensors", unet_b, te_b, alphas=[4], names=LDM_NAMES)
    apply_loras(types.SimpleNamespace(unet=unet_a, text_encoder=te_a), loras=[(tmp_path / "d.safetensors", 0.7)])
    apply_loras(types.SimpleNamespace(unet=unet_b, text_encoder=te_b), loras=[(tmp_path / "l.safetensors", 0.7)])
    assert_states_equal(unet_a.state_dict(), unet_b.state_dict())
    fresh = tiny_unet().mid_block.attentions[0].proj_in.weight
    assert not torch.equal(unet_b.mid_block.attentions[0].proj_in.weight, fresh)


def write_processor_lora(path, module, names, seed=3, rank=4, wrap=True):
    gen = torch.Generator().manual_seed(seed)
    mods = dict(module.named_modules())
    state, expected = {}, {}
    for base in names:
        for proj, native_proj in [("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")]:
            w = mods[f"{base}.{native_proj}"].weight
            down, up = lora_pair(w.shape, rank, gen)
            state[f"{base}.processor.{proj}_lora.down.weight"] = down
            state[f"{base}.processor.{proj}_lora.up.weight"] = up
            expected[f"{base}.{native_proj}"] = (down, up)
    # Original MotionLoRA .ckpt: {"state_dict": ..., "animatediff_config": ...}-style wrapper.
    torch.save({"state_dict": state, "animatediff_config": ""} if wrap else state, path)
    return expected


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_motion_lora_original_layout(tmp_path, scale):
    model = motion_standin()
    before = snapshot(model)
    names = [f"down_blocks.{i}.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.{n}"
             for i in range(2) for n in range(2)]
    expected = write_processor_lora(tmp_path / "v2_lora_ZoomIn.ckpt", model, names)
    pipe = types.SimpleNamespace(unet=model, text_encoder=None)
    handles = apply_loras(pipe, motion_loras=[(tmp_path / "v2_lora_ZoomIn.ckpt", scale)])
    mods = dict(model.named_modules())
    for native, (down, up) in expected.items():
        want = hand_update(before[f"{native}.weight"], down, up, scale, 1.0)  # no alpha/rank for MotionLoRA
        torch.testing.assert_close(mods[native].weight, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                       before["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    unmerge(handles)
    assert_states_equal(before, model.state_dict())


def test_v3_adapter_spatial_processor_lora(tmp_path):
    unet = tiny_unet()
    before = snapshot(unet)
    names = ["down_blocks.0.attentions.1.transformer_blocks.0.attn1",
             "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.attentions.0.transformer_blocks.0.attn1"]
    expected = write_processor_lora(tmp_path / "v3_sd15_adapter.ckpt", unet, names)
    handles = apply_loras(types.SimpleNamespace(unet=unet, text_encoder=None),
                          loras=[(tmp_path / "v3_sd15_adapter.ckpt", 0.9)])
    mods = dict(unet.named_modules())
    for native, (down, up) in expected.items():
        torch.testing.assert_close(mods[native].weight, hand_update(before[f"{native}.weight"], down, up, 0.9, 1.0),
                                   atol=1e-6, rtol=1e-6)
    unmerge(handles)
    assert_states_equal(before, unet.state_dict())
    # The adapter is not a MotionLoRA: a clear error, and nothing changed.
    with pytest.raises(CheckpointError, match="not a MotionLoRA"):
        apply_loras(types.SimpleNamespace(unet=unet, text_encoder=None),
                    motion_loras=[(tmp_path / "v3_sd15_adapter.ckpt", 1.0)])
    assert_states_equal(before, unet.state_dict())


def test_stacked_loras_unmerge_in_reverse(tmp_path):
    unet, te = tiny_unet(torch.float16), tiny_text_encoder(torch.float16)
    before_u, before_t = snapshot(unet), snapshot(te)
    write_kohya(tmp_path / "a.safetensors", unet, te, alphas=[1], seed=1)
    write_kohya(tmp_path / "b.safetensors", unet, te, alphas=[2], seed=2)
    pipe = types.SimpleNamespace(unet=unet, text_encoder=te)
    h = apply_loras(pipe, loras=[(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", 0.5)])
    unmerge(h)
    assert_states_equal(before_u, unet.state_dict())
    assert_states_equal(before_t, te.state_dict())


def _kohya_state(extra):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    base = {f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{key}.lora_up.weight": torch.randn(8, 2, generator=g)}
    base.update(extra)
    return base


@pytest.mark.parametrize("extra,match", [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(2, 2)}, "not in a supported LoRA layout"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8)}, "lora_te1_"),
    ({"model.diffusion_model.foo.weight": torch.zeros(2)}, "model.diffusion_model.foo.weight"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.zeros(2, 8)},
     "needs both down and up"),
    ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, "does not have"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_down.weight": torch.zeros(2, 5),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight": torch.zeros(8, 2)},
     "does not fit the weight"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 8, 1, 1),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1)}, "kernel"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 8, 3, 3),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(8, 3, 1, 1)}, "incompatible shapes"),
])
def test_bad_lora_files_are_clear_errors_and_change_nothing(tmp_path, extra, match):
    unet, te = tiny_unet(), tiny_text_encoder()
    before = snapshot(unet)
    path = tmp_path / "bad.safetensors"
    save_file(_kohya_state(extra), str(path))
    with pytest.raises(CheckpointError, match="bad.safetensors") as e:
        apply_loras(types.SimpleNamespace(unet=unet, text_encoder=te), loras=[(path, 1.0)])
    assert match in str(e.value)
    assert_states_equal(before, unet.state_dict())


def test_failure_in_second_file_unmerges_first(tmp_path):
    unet, te = tiny_unet(), tiny_text_encoder()
    before = snapshot(unet)
    write_kohya(tmp_path / "good.safetensors", unet, te, alphas=[1])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        apply_loras(types.SimpleNamespace(unet=unet, text_encoder=te),
                    loras=[(tmp_path / "good.safetensors", 1.0), (tmp_path / "bad.safetensors", 1.0)])
    assert_states_equal(before, unet.state_dict())


def test_parse_and_kind_validation():
    pairs = parse_lora(_kohya_state({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha":
                                     torch.tensor(1.0)}))
    assert len(pairs) == 1 and pairs[0].rank == 2 and pairs[0].ratio == 0.5
    with pytest.raises(ValueError, match="kind"):
        merge_lora(nn.Linear(2, 2), pairs, kind="vae")
    # Keys for another part are skipped: a UNet-only LoRA merges nothing into a text encoder.
    te = tiny_text_encoder()
    before = snapshot(te)
    assert not merge_lora(te, pairs, 1.0, kind="text_encoder").merged
    assert_states_equal(before, te.state_dict())


# ---- the real modules: UNet3D (diffusers names + original motion-module names) and TextEncoder ----

REAL_UNET_TARGETS = {  # native name -> kohya LDM-style flat name (TINY: 1 layer per level)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.0.attentions.0.proj_in": "input_blocks_1_1_proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_2_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_3_0_skip_connection",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block_1_transformer_blocks_0_attn2_to_k",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_1_1_conv",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": "output_blocks_3_1_transformer_blocks_0_ff_net_2",
    "up_blocks.1.resnets.0.time_emb_proj": "output_blocks_2_0_emb_layers_1",
}


def real_modules(dtype=torch.float32):
    from animatediff_lite.clip import TextEncoder
    from animatediff_lite.config import TINY, MotionConfig
    from animatediff_lite.unet import UNet3D

    torch.manual_seed(5)
    unet = UNet3D(TINY.unet, MotionConfig.for_version("v2", TINY.unet.norm_num_groups))
    te = TextEncoder(TINY.clip)
    for p in list(unet.parameters()) + list(te.parameters()):  # non-zero everywhere (proj_out is zero-init)
        p.data.normal_(0, 0.1)
    return unet.to(dtype), te.to(dtype)


@pytest.mark.parametrize("style", ["diffusers", "ldm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_unet3d_and_text_encoder(tmp_path, style, dtype):
    unet, te = real_modules(dtype)
    before_u, before_t = snapshot(unet), snapshot(te)
    umods, tmods = dict(unet.named_modules()), dict(te.named_modules())
    gen = torch.Generator().manual_seed(9)
    state, expected = {}, {}
    for i, (native, ldm) in enumerate(REAL_UNET_TARGETS.items()):
        w = umods[native].weight
        kernel = tuple(w.shape[2:]) if w.dim() == 4 else None
        down, up = lora_pair(w.shape, 2 + i % 3, gen, kernel, torch.float16)
        key = "lora_unet_" + (native.replace(".", "_") if style == "diffusers" else ldm)
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
        expected[native] = (umods, before_u, down, up, 1.0 / down.shape[0])
    for native in ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]:
        down, up = lora_pair(tmods[native].weight.shape, 4, gen, None, torch.float16)
        key = "lora_te_text_model_" + native.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}  # no alpha: ratio 1
        expected[native] = (tmods, before_t, down, up, 1.0)
    save_file(state, str(tmp_path / "lora.safetensors"))
    mm = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1"
    motion = write_processor_lora(tmp_path / "motion.ckpt", unet, [mm, mm.replace("down_blocks.1", "mid_block")])
    adapter = write_processor_lora(tmp_path / "adapter.ckpt", unet,
                                   ["up_blocks.1.attentions.0.transformer_blocks.0.attn1"], seed=4)
    pipe = types.SimpleNamespace(unet=unet, text_encoder=te)
    handles = apply_loras(pipe, loras=[(tmp_path / "lora.safetensors", 0.7), (tmp_path / "adapter.ckpt", 1.0)],
                          motion_loras=[(tmp_path / "motion.ckpt", 0.5)])
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for native, (mods, before, down, up, ratio) in expected.items():
        want = hand_update(before[f"{native}.weight"], down, up, 0.7, ratio)
        torch.testing.assert_close(mods[native].weight, want, atol=tol, rtol=tol)
    for entries, scale in ((motion, 0.5), (adapter, 1.0)):
        for native, (down, up) in entries.items():
            want = hand_update(before_u[f"{native}.weight"], down, up, scale, 1.0)
            torch.testing.assert_close(umods[native].weight, want, atol=tol, rtol=tol)
    unmerge(handles)
    assert_states_equal(before_u, unet.state_dict())
    assert_states_equal(before_t, te.state_dict())


@pytest.mark.gpu
def test_cuda_fp16_merge_matches_cpu_and_unmerges_exactly(tmp_path):
    unet, te = real_modules(torch.float16)
    write_kohya_real = {}
    gen = torch.Generator().manual_seed(1)
    for native in REAL_UNET_TARGETS:
        w = dict(unet.named_modules())[native].weight
        down, up = lora_pair(w.shape, 4, gen, tuple(w.shape[2:]) if w.dim() == 4 else None, torch.float16)
        key = "lora_unet_" + native.replace(".", "_")
        write_kohya_real |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                             f"{key}.alpha": torch.tensor(2.0, dtype=torch.float16)}
    save_file(write_kohya_real, str(tmp_path / "l.safetensors"))
    gpu = copy.deepcopy(unet).cuda()
    before = snapshot(gpu)
    apply_loras(types.SimpleNamespace(unet=unet, text_encoder=te), loras=[(tmp_path / "l.safetensors", 0.8)])
    handles = apply_loras(types.SimpleNamespace(unet=gpu, text_encoder=None), loras=[(tmp_path / "l.safetensors", 0.8)])
    cpu_state = unet.state_dict()
    for k, v in gpu.state_dict().items():  # fp32 math on either device, one fp16 rounding: at most 1 ulp apart
        torch.testing.assert_close(v.cpu(), cpu_state[k], atol=1e-3, rtol=1e-3)
    unmerge(handles)
    assert_states_equal(before, gpu.state_dict())
