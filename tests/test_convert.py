"""weights/convert/ scripts: motion modules original/diffusers <-> native, and LDM single file <-> diffusers
folder (UNet, VAE, text encoder), checked against diffusers/transformers loading the converted folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from animatediff_lite.config import TINY
from animatediff_lite.loading.clip_map import clip_state_from_diffusers, clip_state_to_ldm
from animatediff_lite.loading.io import read_state_dict
from animatediff_lite.loading.motion_load import read_motion_module
from animatediff_lite.loading.unet_map import unet_config_to_diffusers, unet_state_to_ldm
from animatediff_lite.loading.vae_map import vae_state_to_ldm
from tests.keylists import original_motion_shapes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("motion_to_native", "motion_to_original", "ldm_to_diffusers", "diffusers_to_ldm")
UNET = TINY.unet.__class__(**{**TINY.unet.__dict__, "attention_head_dim": 8, "norm_num_groups": 32})


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"convert_{name}", ROOT / "weights" / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def _pe(length: int, dim: int) -> torch.Tensor:
    from animatediff_lite.motion import sinusoidal_table

    return sinusoidal_table(length, dim)


def tiny_motion(version: str) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: _pe(s[1], s[2]) if k.endswith(".pe") else torch.randn(s, generator=g)
            for k, s in original_motion_shapes(version, TINY.unet.block_out_channels, 1).items()}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script(name).main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_script_runs_as_a_file(tmp_path):
    bad = tmp_path / "not_a_module.ckpt"
    torch.save({"foo": torch.zeros(1)}, str(bad))
    proc = subprocess.run([sys.executable, str(ROOT / "weights/convert/motion_to_native.py"), str(bad),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error:" in proc.stderr and "not_a_module.ckpt" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_motion_original_native_original(tmp_path, version, capsys):
    original = tiny_motion(version)
    src = tmp_path / "mm_original.ckpt"
    torch.save({"state_dict": {"module." + k: v for k, v in original.items()}}, str(src))
    native_file = tmp_path / "mm_native.safetensors"
    script("motion_to_native").main([str(src), str(native_file)])
    _, info = read_motion_module(native_file)
    assert info.layout == "native" and info.version == version
    assert "metadata" in info.reason and f"motion module {version}" in capsys.readouterr().out
    back = tmp_path / "mm_back.safetensors"
    script("motion_to_original").main([str(native_file), str(back)])
    assert_same(read_state_dict(back), original)
    half = tmp_path / "mm_half.ckpt"
    script("motion_to_original").main([str(native_file), str(half), "--dtype", "fp16", "--no-pe"])
    assert_same(read_state_dict(half), {k: v.half() for k, v in original.items() if not k.endswith(".pe")})


def test_motion_diffusers_to_native_to_original(tmp_path):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=TINY.unet.block_out_channels, motion_layers_per_block=1,
                            motion_norm_num_groups=8, motion_num_attention_heads=2, use_motion_mid_block=True)
    adapter.save_pretrained(tmp_path / "adapter")
    script("motion_to_native").main([str(tmp_path / "adapter"), str(tmp_path / "n.safetensors")])
    script("motion_to_original").main([str(tmp_path / "n.safetensors"), str(tmp_path / "o.ckpt")])
    original = read_state_dict(tmp_path / "o.ckpt")
    assert sum(k.endswith("pos_encoder.pe") for k in original) == 2 * (2 * 1 + 2 * 2 + 1)
    theirs = {k: v for k, v in adapter.state_dict().items() if "pos_embed" not in k}
    assert_same(convert_animatediff_checkpoint_to_diffusers(original), theirs)
    _, info = read_motion_module(tmp_path / "n.safetensors")
    assert info.version == "v2" and info.num_heads == 2


def _tiny_sd_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config_to_diffusers(UNET))
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu"))
    for model in (unet, vae, text):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return unet, vae, text


def test_ldm_to_diffusers_and_back(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet, vae, text = _tiny_sd_parts()
    ldm = (unet_state_to_ldm(unet.state_dict(), UNET) | vae_state_to_ldm(vae.state_dict())
           | clip_state_to_ldm(clip_state_from_diffusers(text.state_dict())))
    ldm["model_ema.decay"] = torch.tensor(0.999)  # training leftovers are ignored
    src = tmp_path / "tiny_sd.safetensors"
    save_file(ldm, str(src))
    folder = tmp_path / "tiny_sd"
    script("ldm_to_diffusers").main([str(src), str(folder)])
    # Oracle: diffusers / transformers load the converted folder and hold exactly the original tensors.
    assert_same(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(), unet.state_dict())
    assert_same(AutoencoderKL.from_pretrained(folder / "vae").state_dict(), vae.state_dict())
    loaded_text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert loaded_text.config.num_attention_heads == 1 and loaded_text.config.hidden_act == "quick_gelu"
    assert_same(loaded_text.state_dict(), text.state_dict())
    back = tmp_path / "back.safetensors"
    script("diffusers_to_ldm").main([str(folder), str(back)])
    del ldm["model_ema.decay"]
    assert_same(read_state_dict(back), ldm)
    unet_only = tmp_path / "unet_only.ckpt"
    script("diffusers_to_ldm").main([str(folder), str(unet_only), "--unet-only", "--dtype", "fp16"])
    assert_same(read_state_dict(unet_only),
                {k: v.half() for k, v in ldm.items() if k.startswith("model.diffusion_model.")})
