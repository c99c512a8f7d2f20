"""Load-time benchmark: animatediff-lite's loaders against diffusers on the same SD1.5-size files (CPU).

    python examples/bench_load.py build /work/wt/bigfiles          # random SD1.5-size weights, once (~12 GB)
    python examples/bench_load.py run /work/wt/bigfiles [--repeat 1] # each load in a fresh process -> JSON

Files (``build``): the base model as an LDM single file in fp16 (``ldm_fp16.safetensors``) and fp32
(``ldm_fp32.ckpt``, a zip pickle), as a diffusers folder (``diffusers/``, fp32 safetensors + configs), and
a v2 motion module in the original layout (``mm_v2.ckpt``, fp32, with position tables). ``run`` loads each
base with the motion module in a fresh process, for ours and for diffusers (``from_single_file`` /
``from_pretrained`` of UNet, VAE and text encoder + ``MotionAdapter.from_single_file`` and
``UNetMotionModel.from_unet2d``, offline with the folder's configs), and records the wall time of the load
and the process's peak RSS (VmHWM) next to its RSS before loading (imports done) and the loaded model's
bytes. Results: ``benchmarks/results/bench_load-cpu-sd15.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from animatediff_lite.clip import TextEncoder
from animatediff_lite.config import SD15, ModelConfig, MotionConfig
from animatediff_lite.loading.clip_map import clip_state_to_ldm
from animatediff_lite.loading.io import save_state_dict
from animatediff_lite.loading.motion_load import motion_state_to_original
from animatediff_lite.loading.unet_map import split_motion, unet_config_to_diffusers, unet_state_to_ldm
from animatediff_lite.loading.vae_map import vae_state_to_ldm
from animatediff_lite.unet import UNet3D
from animatediff_lite.vae import AutoencoderKL

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
BASES = {"ldm_fp16.safetensors": "from_single_file", "ldm_fp32.ckpt": "from_single_file",
         "diffusers": "from_pretrained"}
MOTION = "mm_v2.ckpt"


# ------------------------------------------------------------------------------------------------ build

def _random(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Small random values for every floating tensor of a (meta) module's state dict; integers zero."""
    return {k: (torch.randn(v.shape, generator=generator) * 0.02 if v.is_floating_point()
                else torch.zeros(v.shape, dtype=v.dtype)) for k, v in module.state_dict().items()}


def vae_config_json(config: ModelConfig) -> dict:
    v = config.vae
    levels = len(v.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_channels,
            "latent_channels": v.latent_channels, "block_out_channels": list(v.block_out_channels),
            "layers_per_block": v.layers_per_block, "norm_num_groups": v.norm_num_groups,
            "scaling_factor": v.scaling_factor, "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "act_fn": "silu", "sample_size": 512}


def clip_config_json(config: ModelConfig) -> dict:
    c = config.clip
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps, "projection_dim": 768, "torch_dtype": "float32"}


def write_adapter_config(out: Path, config: ModelConfig = SD15, motion_version: str = "v2") -> Path:
    """A diffusers MotionAdapter config.json for the motion module (diffusers' from_single_file needs one offline)."""
    motion = MotionConfig.for_version(motion_version, config.unet.norm_num_groups)
    folder = out / "mm_config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "MotionAdapter", "block_out_channels": list(config.unet.block_out_channels),
        "motion_layers_per_block": config.unet.layers_per_block, "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": motion.num_heads, "motion_norm_num_groups": config.unet.norm_num_groups,
        "motion_max_seq_length": motion.max_position_len, "use_motion_mid_block": motion.mid_block}, indent=1))
    return folder


def build_files(out: str | os.PathLike, config: ModelConfig = SD15, motion_version: str = "v2",
                seed: int = 0) -> dict[str, Path]:
    """Write random weights of ``config`` in every base format plus an original-layout motion module."""
    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    motion_config = MotionConfig.for_version(motion_version, config.unet.norm_num_groups)
    with torch.device("meta"):
        unet, vae, text = UNet3D(config.unet, motion_config), AutoencoderKL(config.vae), TextEncoder(config.clip)
    spatial, motion = split_motion(_random(unet, g))
    save_state_dict(motion_state_to_original(motion, True, motion_config.max_position_len), out / MOTION)
    write_adapter_config(out, config, motion_version)
    del motion
    vae_state, text_state = _random(vae, g), _random(text, g)
    folder = out / "diffusers"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config_to_diffusers(config.unet), indent=1))
    save_state_dict(spatial, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config_json(config), indent=1))
    save_state_dict(vae_state, folder / "vae" / "diffusion_pytorch_model.safetensors")
    (folder / "text_encoder").mkdir(exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(clip_config_json(config), indent=1))
    text_file = folder / "text_encoder" / "model.safetensors"
    save_state_dict({"text_model." + k: v for k, v in text_state.items()}, text_file)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    ldm = unet_state_to_ldm(spatial, config.unet) | vae_state_to_ldm(vae_state) | clip_state_to_ldm(text_state)
    del spatial, vae_state, text_state
    save_state_dict(ldm, out / "ldm_fp32.ckpt")  # a zip pickle {"state_dict": ...}, as SD1.5 .ckpt files are
    save_state_dict({k: v.half() if v.is_floating_point() else v for k, v in ldm.items()},
                    out / "ldm_fp16.safetensors")
    return {"ldm_fp16": out / "ldm_fp16.safetensors", "ldm_fp32": out / "ldm_fp32.ckpt", "diffusers": folder,
            "motion": out / MOTION}


# -------------------------------------------------------------------------------------------------- run

def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _model_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def child(lib: str, base: str, folder: str) -> dict:
    """One load in this (fresh) process: wall time, RSS before/peak, model bytes."""
    root = Path(folder)
    if lib == "ours":
        import animatediff_lite as ad
    else:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    before = _vm("VmRSS")
    start = time.perf_counter()
    if lib == "ours":
        pipe = ad.load_pipeline(root / base, motion_module=root / MOTION)
        modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    else:
        modules = _diffusers_load(root, base)
    seconds = time.perf_counter() - start
    return {"lib": lib, "base": base, "seconds": seconds, "rss_before": before, "peak_rss": _vm("VmHWM"),
            "rss_after": _vm("VmRSS"), "model_bytes": _model_bytes(*modules)}


def _diffusers_load(root: Path, base: str) -> tuple:
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = str(root / "diffusers")
    adapter = MotionAdapter.from_single_file(str(root / MOTION), config=str(root / "mm_config"), local_files_only=True)
    if base == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(config, subfolder="unet", local_files_only=True)
        vae = DAutoencoderKL.from_pretrained(config, subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(str(root / "diffusers" / "text_encoder"), local_files_only=True)
    else:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint,
            load_single_file_checkpoint,
        )

        path = str(root / base)
        unet = UNet2DConditionModel.from_single_file(path, config=config, subfolder="unet", local_files_only=True)
        vae = DAutoencoderKL.from_single_file(path, config=config, subfolder="vae", local_files_only=True)
        # diffusers reads the file a third time for the text encoder, as its pipeline's from_single_file does
        state = load_single_file_checkpoint(path, local_files_only=True)
        with torch.device("meta"):
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "diffusers" / "text_encoder")))
        text.load_state_dict(convert_ldm_clip_checkpoint(state), strict=False, assign=True)
        del state
    unet = UNetMotionModel.from_unet2d(unet, adapter)
    return unet, vae, text


def run(folder: Path, repeat: int) -> dict:
    rows = []
    for base in BASES:
        for lib in ("ours", "diffusers"):
            for _ in range(repeat):
                cmd = [sys.executable, __file__, "child", lib, base, str(folder)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode != 0:
                    raise RuntimeError(f"{lib} {base} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{lib:9s} {base:22s} {row['seconds']:7.2f} s  peak RSS {row['peak_rss'] / 2**30:5.2f} GiB  "
                      f"(before {row['rss_before'] / 2**30:4.2f}, model {row['model_bytes'] / 2**30:4.2f} GiB)",
                      flush=True)
    summary = {}
    for base in BASES:
        ours = min((r for r in rows if r["lib"] == "ours" and r["base"] == base), key=lambda r: r["seconds"])
        theirs = min((r for r in rows if r["lib"] == "diffusers" and r["base"] == base), key=lambda r: r["seconds"])
        rss_ratio = (ours["peak_rss"] - ours["rss_before"]) / ours["model_bytes"]
        summary[base] = {"time_vs_diffusers": ours["seconds"] / theirs["seconds"],
                         "peak_rss_above_baseline_vs_model_bytes": rss_ratio,
                         "diffusers_peak_rss_above_baseline_vs_model_bytes":
                             (theirs["peak_rss"] - theirs["rss_before"]) / theirs["model_bytes"],
                         "targets_met": ours["seconds"] <= 0.5 * theirs["seconds"] and rss_ratio <= 1.2}
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write SD1.5-size random weight files into FOLDER")
    b.add_argument("folder")
    r = sub.add_parser("run", help="load each file in fresh processes, write the JSON")
    r.add_argument("folder")
    r.add_argument("--repeat", type=int, default=1)
    c = sub.add_parser("child")  # internal: one load in this process
    c.add_argument("lib", choices=("ours", "diffusers"))
    c.add_argument("base", choices=sorted(BASES))
    c.add_argument("folder")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        for name, path in build_files(args.folder).items():
            print(f"{name}: {path}")
        return 0
    if args.cmd == "child":
        print(json.dumps(child(args.lib, args.base, args.folder)))
        return 0
    import diffusers
    import transformers

    result = {"benchmark": "bench_load", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": 1, "model": "SD1.5 sizes, random weights",
              "motion_module": "v2 original layout, fp32", "dtype": "float32",
              "load_average_before": list(os.getloadavg()),
              **run(Path(args.folder), args.repeat), "load_average_after": list(os.getloadavg())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_load-cpu-sd15.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
