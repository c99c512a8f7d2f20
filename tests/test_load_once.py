"""Every file is read once through a whole load_pipeline: .safetensors, .ckpt and folders (issue 13).

Reads are counted at the two doors a file can go through from Python: ``open`` (builtins / io, which
pathlib uses too) and ``torch.load`` / safetensors' own readers. The tiny files come from the load
benchmark's builder (examples/bench_load.py), so the benchmark measures the same formats.
"""

from __future__ import annotations

import builtins
import importlib.util
import io
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from animatediff_lite.config import TINY, CLIPConfig, MotionConfig
from animatediff_lite.loading.io import read_state_dict, save_state_dict
from animatediff_lite.loading.motion_load import read_motion_module
from animatediff_lite.loading.motion_map import motion_state_to_diffusers
from animatediff_lite.loading.pipeline_load import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
# CLIP 64 wide: an LDM file states no head count, 64-wide heads are inferred. UNet context = CLIP width.
CONFIG = replace(TINY, clip=CLIPConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1),
                 unet=replace(TINY.unet, cross_attention_dim=64))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "examples" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_once")
    paths = _bench_module().build_files(root, CONFIG, "v2")
    width = CONFIG.unet.block_out_channels[0]
    g = torch.Generator().manual_seed(1)
    q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # an LDM-named kohya key
    lora = {f"{q}.lora_down.weight": torch.randn(2, width, generator=g),
            f"{q}.lora_up.weight": torch.randn(width, 2, generator=g), f"{q}.alpha": torch.tensor(2.0)}
    save_state_dict(lora, root / "lora.safetensors")
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor."
    motion_lora = {key + "to_q_lora.down.weight": torch.randn(2, width, generator=g),
                   key + "to_q_lora.up.weight": torch.randn(width, 2, generator=g)}
    save_state_dict(motion_lora, root / "motion_lora.ckpt")
    native, info = read_motion_module(paths["motion"])
    adapter = root / "mm_adapter"
    adapter_state = motion_state_to_diffusers(native, max_seq_length=32)
    save_state_dict(adapter_state, adapter / "diffusion_pytorch_model.safetensors")
    (adapter / "config.json").write_text(json.dumps({
        "_class_name": "MotionAdapter", "block_out_channels": list(CONFIG.unet.block_out_channels),
        "motion_layers_per_block": CONFIG.unet.layers_per_block, "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": MotionConfig.for_version("v2").num_heads,
        "motion_norm_num_groups": CONFIG.unet.norm_num_groups, "motion_max_seq_length": 32,
        "use_motion_mid_block": True}))
    return {**paths, "lora": root / "lora.safetensors", "motion_lora": root / "motion_lora.ckpt", "adapter": adapter,
            "root": root}


@pytest.fixture
def reads(monkeypatch, files):
    """Counter of reads per file under the test folder, from every door a file can be read through."""
    counts: Counter = Counter()
    root = str(files["root"])

    def note(target) -> None:
        name = target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)  # a file object
        if isinstance(name, (str, os.PathLike)) and os.path.abspath(name).startswith(root):
            counts[os.path.relpath(os.path.abspath(name), root)] += 1

    def wrap(real, first_is_path: bool = True):
        def counted(target, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", "r")
            if not first_is_path or (isinstance(mode, str) and "r" in mode and "+" not in mode):
                note(target)
            return real(target, *args, **kwargs)
        return counted

    real_open = io.open
    opener = wrap(real_open)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    # torch.load and safetensors' readers: a path given to them is a read of its own (a file object was
    # already counted when it was opened).
    real_load = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            note(f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(safetensors.torch, "load_file", wrap(safetensors.torch.load_file, False))
    monkeypatch.setattr(safetensors, "safe_open", wrap(safetensors.safe_open, False))
    return counts


def _weights(counts: Counter) -> dict[str, int]:
    return {k: v for k, v in counts.items() if not k.endswith(".json")}


def test_the_counter_sees_a_second_read(files, reads):
    """The check can fail: reading a file twice counts two (each door once)."""
    read_state_dict(files["ldm_fp32"])
    read_state_dict(files["ldm_fp32"])
    safetensors.torch.load_file(str(files["ldm_fp16"]))
    assert reads == {"ldm_fp32.ckpt": 2, "ldm_fp16.safetensors": 1}


@pytest.mark.parametrize("base", ["ldm_fp16", "ldm_fp32"])
def test_single_file_base_motion_dreambooth_and_loras_each_read_once(files, reads, base):
    pipe = load_pipeline(files[base], motion_module=files["motion"], dreambooth=files[base],
                         loras=[(files["lora"], 0.5)], motion_loras=[(files["motion_lora"], 1.0)])
    assert pipe.unet.motion is not None
    name = files[base].name
    assert _weights(reads) == {name: 1, "mm_v2.ckpt": 1, "lora.safetensors": 1, "motion_lora.ckpt": 1}, reads


def test_dreambooth_from_another_file_is_read_once_too(files, reads):
    load_pipeline(files["ldm_fp32"], motion_module=files["motion"], dreambooth=files["ldm_fp16"])
    assert _weights(reads) == {"ldm_fp32.ckpt": 1, "mm_v2.ckpt": 1, "ldm_fp16.safetensors": 1}, reads


def test_diffusers_folders_read_each_file_once(files, reads):
    pipe = load_pipeline(files["diffusers"], motion_module=files["adapter"])
    assert pipe.unet.motion is not None
    expected = {"diffusers/unet/diffusion_pytorch_model.safetensors",
                "diffusers/vae/diffusion_pytorch_model.safetensors", "diffusers/text_encoder/model.safetensors",
                "mm_adapter/diffusion_pytorch_model.safetensors",
                "diffusers/unet/config.json", "diffusers/vae/config.json", "diffusers/text_encoder/config.json",
                "mm_adapter/config.json"}
    assert set(reads) == expected and set(reads.values()) == {1}, reads


def test_the_default_model_is_read_once(monkeypatch, tmp_path):
    import shutil

    from animatediff_lite.loading import default_model

    copy = Path(shutil.copy(default_model.default_weights_path(), tmp_path / "default.safetensors"))
    seen: Counter = Counter()
    real_open = builtins.open

    def opener(target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)) and os.path.abspath(target) == str(copy):
            seen["default"] += 1
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    pipe = load_pipeline(copy)  # a default-model file given as base, alone
    assert pipe.sample_defaults and seen == {"default": 1}


def test_loads_from_every_format_agree(files):
    """The same random weights through the fp32 .ckpt and the diffusers folder give the same model."""
    a = load_pipeline(files["ldm_fp32"], motion_module=files["motion"])
    b = load_pipeline(files["diffusers"], motion_module=files["adapter"])
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, f"{name}: {len(bad)} tensors differ, e.g. {bad[:3]}"


PEAK_SCRIPT = r"""
import sys, torch
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.io import load_strict

def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

path, n = sys.argv[1], int(sys.argv[2])
with torch.device("meta"):
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(1024, 1024)) for _ in range(n)])
before = vm("VmRSS")
checkpoint = read_checkpoint(path)
load_strict(model, checkpoint.state, path, "a test model", file=checkpoint.file)
del checkpoint
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print((vm("VmHWM") - before) / model_bytes)
"""


def test_peak_memory_stays_near_the_model_size(tmp_path):
    """fp16 file -> fp32 model: file pages are handed back as tensors are copied (without that: 1.5x)."""
    import subprocess
    import sys

    n = 64  # 64 tensors of 1024x1024: a 128 MiB file, a 256 MiB model
    path = tmp_path / "half.safetensors"
    save_state_dict({str(i): torch.randn(1024, 1024).half() for i in range(n)}, path)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(n)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.strip())
    assert ratio < 1.2, f"peak RSS above the start was {ratio:.2f}x the model's bytes"
