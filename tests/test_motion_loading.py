"""Motion-module loading: every original/diffusers/native variant, version detection, round trips, bad files,
and full-size key coverage of the published SD1.5 motion modules on the meta device."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from animatediff_lite.config import SD15, TINY, MotionConfig
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.motion_load import (
    load_motion_module,
    motion_state_to_original,
    parse_motion_state,
    read_motion_module,
    save_motion_module,
    save_motion_module_original,
    version_from_name,
)
from animatediff_lite.loading.motion_map import motion_state_to_diffusers
from animatediff_lite.loading.unet_map import split_motion
from animatediff_lite.unet import UNet3D
from tests.keylists import MOTION_FILES, PE_LEN, count, ldm_unet_shapes, meta_state, original_motion_shapes

TINY_CH = TINY.unet.block_out_channels
TINY_LAYERS = TINY.unet.layers_per_block
GROUPS = TINY.unet.norm_num_groups


def reference_pe(length: int, dim: int) -> torch.Tensor:
    """The original PositionalEncoding buffer (fp32 torch ops, as stored in the published files): (1, L, dim)."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def tiny_original(version: str, with_pe: bool = True, dtype=torch.float32, channels=TINY_CH, seed=0):
    """A random original-layout motion module for the tiny UNet (proj_out non-zero so it matters)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_motion_shapes(version, channels, TINY_LAYERS, with_pe).items():
        if key.endswith("pos_encoder.pe"):
            state[key] = reference_pe(shape[1], shape[2]).to(dtype)
        else:
            state[key] = torch.randn(shape, generator=g).to(dtype)
    return state


def write(state: dict, path, wrapper: bool, prefix: bool):
    data = {("module." + k if prefix else k): v for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(data, str(path))
    else:
        torch.save({"state_dict": data, "global_step": 7} if wrapper else data, str(path))


def strip_pe(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("pos_encoder.pe")}


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


VARIANTS = [(ext, wrapper, prefix) for ext in (".ckpt", ".safetensors") for wrapper in (False, True)
            for prefix in (False, True) if not (ext == ".safetensors" and wrapper)]


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("with_pe", [True, False])
@pytest.mark.parametrize("ext,wrapper,prefix", VARIANTS)
def test_original_round_trip(tmp_path, version, with_pe, ext, wrapper, prefix):
    original = tiny_original(version, with_pe)
    path = tmp_path / f"tiny_motion{ext}"
    write(original, path, wrapper, prefix)
    native, info = read_motion_module(path)
    # Version: mid block -> v2; else PE 24 -> v1, 32 -> v3; without PE and a neutral name -> default v3.
    expected = version if (version == "v2" or with_pe) else "v3"
    print(info.summary())
    assert info.version == expected, info.reason
    assert info.layout == "original" and info.channels == TINY_CH and info.mid_block == (version == "v2")
    assert info.stored_pe_len == (PE_LEN[version] if with_pe else None)
    assert info.num_parameters == count({k: tuple(v.shape) for k, v in strip_pe(original).items()})
    assert_same(native, strip_pe(original))
    assert_same(motion_state_to_original(native, with_pe=with_pe, max_len=PE_LEN[version]), original)
    out = tmp_path / f"exported{ext}"
    save_motion_module_original(native, out, max_len=PE_LEN[version], with_pe=with_pe)
    again, _ = read_motion_module(out, version=expected)
    assert_same(again, strip_pe(original))


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("with_pe", [True, False])
def test_round_trip_through_unet(tmp_path, version, with_pe):
    """Load strictly into a UNet3D built for the file, read the module back out, export: identical."""
    original = tiny_original(version, with_pe)
    path = tmp_path / "tiny_motion.ckpt"
    write(original, path, wrapper=True, prefix=True)
    _, info = read_motion_module(path, version=version)
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, info.motion_config(GROUPS))
    got = load_motion_module(unet, path, version=version)
    assert got == info and unet.max_frames == PE_LEN[version]
    exported = motion_state_to_original(split_motion(unet.state_dict())[1], with_pe=with_pe, max_len=PE_LEN[version])
    assert_same(exported, original)
    motion_params = [p for n, p in unet.named_parameters() if ".motion_modules." in n]
    assert motion_params and not any(p.is_meta for p in motion_params)
    assert not any(b.is_meta for n, b in unet.named_buffers() if ".motion_modules." in n)


def test_fp16_file_keeps_dtype_and_loads_into_fp32_unet(tmp_path):
    original = tiny_original("v3", dtype=torch.float16)
    path = tmp_path / "v3_sd15_mm.safetensors"
    save_file(original, str(path))
    native, info = read_motion_module(path)
    assert info.dtype == "float16" and info.version == "v3"
    assert_same(motion_state_to_original(native, max_len=32), original)
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, info.motion_config(GROUPS))
    load_motion_module(unet, path, dtype=torch.float32)
    state = split_motion(unet.state_dict())[1]
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], native[k].float()) for k in native)
    pe = unet.down_blocks[0].motion_modules[0].temporal_transformer.transformer_blocks[0].attention_blocks[0]
    torch.testing.assert_close(pe.pos_encoder.pe, reference_pe(32, TINY_CH[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,with_pe,version,expected", [
    ("mm_sd_v14", False, "v1", "v1"), ("mm_sd_v15", False, "v1", "v1"), ("mm_sd_v15_v2", True, "v2", "v2"),
    ("v3_sd15_mm", False, "v3", "v3"), ("mm_sd_v15", True, "v1", "v1"), ("v3_sd15_mm", True, "v3", "v3"),
    ("my_finetune", False, "v1", "v3"), ("mm_sd_v15_v2", False, "v3", "v3"),
])
def test_version_detection_and_reason(tmp_path, name, with_pe, version, expected):
    path = tmp_path / f"{name}.ckpt"
    write(tiny_original(version, with_pe), path, wrapper=True, prefix=False)
    _, info = read_motion_module(path)
    print(f"{name} pe={with_pe}: {info.version}: {info.reason}")
    assert info.version == expected
    if version == "v2":
        assert "mid-block" in info.reason
    elif with_pe:
        assert f"{PE_LEN[version]} rows" in info.reason
    elif name == "my_finetune":
        assert "assuming v3" in info.reason
    elif name == "mm_sd_v15_v2":  # names v2 but has no mid block: the keys win
        assert "says v2 but there is no mid-block" in info.reason
    else:
        assert f"says {expected}" in info.reason


def test_version_override(tmp_path):
    path = tmp_path / "motion.ckpt"
    write(tiny_original("v3", with_pe=True), path, wrapper=False, prefix=False)
    _, info = read_motion_module(path, version="v1")
    assert info.version == "v1" and "given explicitly" in info.reason and "32 rows" in info.reason
    with pytest.raises(CheckpointError, match="motion.ckpt.*no mid-block"):
        read_motion_module(path, version="v2")
    mid = tmp_path / "mid.ckpt"
    write(tiny_original("v2"), mid, wrapper=False, prefix=False)
    with pytest.raises(CheckpointError, match="mid.ckpt.*has a mid-block"):
        read_motion_module(mid, version="v3")
    with pytest.raises(ValueError, match="version must be one of"):
        read_motion_module(path, version="v4")


@pytest.mark.parametrize("name,expected", [
    ("mm_sd_v14", "v1"), ("mm_sd_v15", "v1"), ("mm_sd_v15_v2", "v2"), ("v3_sd15_mm", "v3"),
    ("animatediff-motion-adapter-v1-5", "v1"), ("animatediff-motion-adapter-v1-5-2", "v2"),
    ("animatediff-motion-adapter-v1-5-3", "v3"), ("motion", None), ("sd15_t2v_beta", None),
])
def test_version_from_name(name, expected):
    assert version_from_name(name) == expected


def test_native_safetensors_round_trip(tmp_path):
    original = tiny_original("v1")
    native, info = read_motion_module(_saved(tmp_path / "a.ckpt", original))
    cfg = info.motion_config(GROUPS)
    out = tmp_path / "native.safetensors"
    save_motion_module(native, out, cfg)
    again, info2 = read_motion_module(out)
    assert info2.layout == "native" and info2.version == "v1" and info2.max_position_len == 24
    assert "metadata" in info2.reason
    assert_same(again, native)


def _saved(path, state):
    torch.save(state, str(path))
    return path


# ------------------------------------------------------------------------------------------ diffusers formats

def _tiny_adapter(mid: bool, max_len: int, seed: int = 0):
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=TINY_CH, motion_layers_per_block=TINY_LAYERS,
                            motion_norm_num_groups=GROUPS, motion_num_attention_heads=2,
                            use_motion_mid_block=mid, motion_max_seq_length=max_len)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    return adapter


@pytest.mark.parametrize("mid,max_len,folder,expected", [
    (True, 32, "adapter", "v2"), (False, 32, "adapter", "v3"), (False, 24, "adapter", "v1"),
    (False, 32, "animatediff-motion-adapter-v1-5", "v1"),
])
@pytest.mark.parametrize("as_file", [False, True])
def test_diffusers_adapter(tmp_path, mid, max_len, folder, expected, as_file):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    adapter = _tiny_adapter(mid, max_len)
    adapter.save_pretrained(tmp_path / folder)
    source = tmp_path / folder / "diffusion_pytorch_model.safetensors" if as_file else tmp_path / folder
    native, info = read_motion_module(source)
    print(info.summary())
    assert info.layout == "diffusers" and info.version == expected and info.mid_block == mid
    assert info.max_position_len == max_len and info.num_heads == 2 and info.channels == TINY_CH
    # Oracle: diffusers' own original -> diffusers converter applied to our export gives the adapter back.
    reference = {k: v for k, v in adapter.state_dict().items() if "pos_embed" not in k}
    assert_same(convert_animatediff_checkpoint_to_diffusers(motion_state_to_original(native, True, max_len)),
                reference)
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, info.motion_config(GROUPS))
    load_motion_module(unet, source)
    assert_same(split_motion(unet.state_dict())[1], native)


# ------------------------------------------------------------------------------------------------ bad files

def test_base_checkpoint_as_motion_module(tmp_path):
    path = tmp_path / "sd15_base.safetensors"
    save_file({k: torch.zeros(s) for k, s in ldm_unet_shapes(TINY.unet).items()}, str(path))
    with pytest.raises(CheckpointError, match=r"sd15_base\.safetensors: is a base Stable Diffusion checkpoint"):
        read_motion_module(path)


def test_channel_mismatch(tmp_path):
    path = tmp_path / "wide.ckpt"
    torch.save(tiny_original("v3", channels=(64, 128)), str(path))
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, MotionConfig.for_version("v3", GROUPS))
    match = r"wide\.ckpt: motion module channels \[64, 128\] do not fit .*\[32, 64\]"
    with pytest.raises(CheckpointError, match=match):
        load_motion_module(unet, path)


def test_wrong_version_for_built_unet(tmp_path):
    path = tmp_path / "mm_v2.ckpt"
    torch.save(tiny_original("v2"), str(path))
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, MotionConfig.for_version("v3", GROUPS))
    with pytest.raises(CheckpointError, match=r"mm_v2\.ckpt: is a v2 motion module .* built for v3"):
        load_motion_module(unet, path)
    with torch.device("meta"):
        plain = UNet3D(TINY.unet, None)
    with pytest.raises(ValueError, match="without motion modules"):
        load_motion_module(plain, path)


def test_missing_layer_is_named(tmp_path):
    state = tiny_original("v3")
    del state["up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.ff.net.2.bias"]
    path = tmp_path / "holey.ckpt"
    torch.save(state, str(path))
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, MotionConfig.for_version("v3", GROUPS))
    with pytest.raises(CheckpointError, match=r"holey\.ckpt: does not fit .*1 missing keys .*ff\.net\.2\.bias"):
        load_motion_module(unet, path)


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_truncated_file(tmp_path, ext):
    path = tmp_path / f"cut{ext}"
    write(tiny_original("v3"), path, wrapper=False, prefix=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cut{ext}"):
        read_motion_module(path)


def test_non_sinusoid_pe_and_junk(tmp_path):
    state = tiny_original("v1")
    key = next(k for k in state if k.endswith("pos_encoder.pe"))
    state[key] = state[key] * 2
    path = tmp_path / "odd_pe.ckpt"
    torch.save(state, str(path))
    with pytest.raises(CheckpointError, match=r"odd_pe\.ckpt: stored position table .* not the standard sinusoid"):
        read_motion_module(path)
    junk = tmp_path / "junk.ckpt"
    torch.save({"foo.weight": torch.zeros(2)}, str(junk))
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: no motion-module keys"):
        read_motion_module(junk)
    with pytest.raises(CheckpointError, match="no_such.ckpt"):
        read_motion_module(tmp_path / "no_such.ckpt")


# -------------------------------------------------------------------------------- full-size key coverage

@pytest.mark.parametrize("name", sorted(MOTION_FILES))
def test_full_size_motion_key_coverage(name):
    """The published SD1.5 motion modules map completely, both ways, onto UNet3D(SD15) on meta."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    version = MOTION_FILES[name]
    original = original_motion_shapes(version)
    native, info = parse_motion_state(meta_state(original), name=name, where=name)
    assert info.version == version and info.max_position_len == PE_LEN[version], info.reason
    with torch.device("meta"):
        unet = UNet3D(SD15.unet, info.motion_config())
    model = {k: tuple(v.shape) for k, v in unet.state_dict().items() if ".motion_modules." in k}
    assert {k: tuple(v.shape) for k, v in native.items()} == model
    back = motion_state_to_original({k: torch.empty(s, device="meta") for k, s in model.items()},
                                    max_len=PE_LEN[version])
    assert {k: tuple(v.shape) for k, v in back.items()} == original
    # diffusers direction: our diffusers names == MotionAdapter's == diffusers' converter on the original keys.
    with torch.device("meta"):
        adapter = MotionAdapter(use_motion_mid_block=version == "v2", motion_max_seq_length=PE_LEN[version])
    theirs = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in motion_state_to_diffusers(native, PE_LEN[version]).items()}
    assert ours == theirs
    converted = convert_animatediff_checkpoint_to_diffusers(meta_state(original))
    no_pe = {k: s for k, s in theirs.items() if "pos_embed" not in k}
    assert {k: tuple(v.shape) for k, v in converted.items()} == no_pe
    n = info.num_parameters
    print(f"{name}: {version}, {len(original)} keys in file ({len(native)} parameter tensors), "
          f"{n:,} parameters ({n / 1e6:.1f}M); reason: {info.reason}")
    assert n == (453_209_280 if version == "v2" else 417_137_600)


def test_native_metadata_is_json(tmp_path):
    native, _ = read_motion_module(_saved(tmp_path / "x.ckpt", tiny_original("v2")))
    out = tmp_path / "n.safetensors"
    save_motion_module(native, out, MotionConfig.for_version("v2", GROUPS))
    from animatediff_lite.loading.checkpoint import read_checkpoint

    meta = read_checkpoint(out).metadata
    assert json.loads(meta["motion_config"])["version"] == "v2"


def test_heads_stated_by_file_must_match(tmp_path):
    _tiny_adapter(mid=False, max_len=32).save_pretrained(tmp_path / "adapter")  # states 2 heads
    with torch.device("meta"):
        unet = UNet3D(TINY.unet, MotionConfig.for_version("v3", GROUPS))  # 8 heads
    with pytest.raises(CheckpointError, match=r"adapter.*says 2 attention heads .* built with 8"):
        load_motion_module(unet, tmp_path / "adapter")


def test_full_training_checkpoint_keeps_only_motion_keys(tmp_path, caplog):
    """The original training script saves the whole UNet ({"state_dict": ..., "global_step": n}, DDP
    ``module.`` prefixes): the motion part is read, the spatial keys are ignored with a note."""
    original = tiny_original("v2")
    spatial = {"conv_in.weight": torch.zeros(32, 4, 3, 3), "down_blocks.0.resnets.0.norm1.weight": torch.zeros(32)}
    path = tmp_path / "checkpoint-epoch-3.ckpt"
    write(original | spatial, path, wrapper=True, prefix=True)
    with caplog.at_level(logging.INFO, logger="animatediff_lite.loading.motion_load"):
        native, info = read_motion_module(path)
    assert "ignoring 2 non-motion keys" in caplog.text
    assert info.version == "v2" and info.num_heads is None
    assert_same(native, strip_pe(original))
