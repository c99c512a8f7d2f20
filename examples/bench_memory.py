"""Peak memory of a full sampling run (text -> UNet+motion loop -> VAE decode) against the frame count.

Runs a randomly initialised model (the TINY preset by default) so it needs no weights. On CUDA it reads
``torch.cuda.max_memory_allocated``; on the CPU every measurement runs in a fresh subprocess and reports the
growth of the peak resident set size (``ru_maxrss``) over the same process just before sampling. Memory should
grow at most linearly with the frame count (frame-chunked VAE decoding, per-frame attention); past the motion
module's PE length the run uses sliding context windows.

    python examples/bench_memory.py --frames 4 8 16 32 --size 64 [--device cuda] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys

import torch

from animatediff_lite.clip import TextEncoder
from animatediff_lite.config import SD15, TINY
from animatediff_lite.pipeline import Pipeline
from animatediff_lite.tokenizer import Tokenizer
from animatediff_lite.unet import UNet3D
from animatediff_lite.vae import AutoencoderKL

PRESETS = {"tiny": TINY, "sd15": SD15}


def build(preset: str, device: str, dtype: torch.dtype) -> Pipeline:
    """A pipeline over randomly initialised models of one preset (the motion proj_out stays zero-init)."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    parts = [TextEncoder(cfg.clip), AutoencoderKL(cfg.vae), UNet3D(cfg.unet, cfg.motion)]
    for m in parts:
        m.to(device, dtype).eval()
    return Pipeline(Tokenizer(), *parts, device=device, dtype=dtype)


def measure(pipe: Pipeline, frames: int, size: int, steps: int, context: int | None) -> dict:
    """Run one sampling call; returns the peak bytes above the memory in use before it."""
    kwargs = dict(num_frames=frames, height=size, width=size, steps=steps, seed=0, progress=False,
                  context_frames=context)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pipe("a corgi running", **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pipe("a corgi running", **kwargs)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB
    return {"frames": frames, "context_frames": context, "peak_bytes": int(peak)}


def _child(args: argparse.Namespace) -> None:
    pipe = build(args.preset, "cpu", torch.float32)
    # warm up at the smallest size so one-off allocations (kernels, caches) are not counted as growth
    pipe("warm up", num_frames=1, height=8 * pipe.latent_factor, width=8 * pipe.latent_factor, steps=1,
         progress=False)
    print(json.dumps(measure(pipe, args.frames[0], args.size, args.steps, args.context)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=None, help="context_frames (needed beyond the PE length)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    rows = []
    pipe = build(args.preset, args.device, torch.float32) if args.device != "cpu" else None
    for frames in args.frames:
        context = args.context if args.context is not None else (None if frames <= 32 else 16)
        if pipe is not None:
            row = measure(pipe, frames, args.size, args.steps, context)
        else:
            cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--size", str(args.size),
                   "--steps", str(args.steps), "--preset", args.preset]
            if context is not None:
                cmd += ["--context", str(context)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row["bytes_per_frame"] = row["peak_bytes"] // frames
        rows.append(row)
        print(f"frames {frames:3d}{'' if context is None else f' (context {context})':>14}: "
              f"peak +{row['peak_bytes'] / 2**20:8.1f} MiB, {row['bytes_per_frame'] / 2**20:6.2f} MiB/frame",
              flush=True)
    # growth exponent over the plain (no context window) runs: 1.0 = linear, below = sub-linear
    plain = [r for r in rows if r["context_frames"] is None and r["peak_bytes"] > 0]
    exponent = None
    if len(plain) >= 2 and plain[-1]["frames"] > plain[0]["frames"]:
        exponent = (math.log(plain[-1]["peak_bytes"] / plain[0]["peak_bytes"])
                    / math.log(plain[-1]["frames"] / plain[0]["frames"]))
        print(f"growth exponent {exponent:.2f} from {plain[0]['frames']} to {plain[-1]['frames']} frames (1 = linear)")
    result = {"device": torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "cpu",
              "torch": torch.__version__, "preset": args.preset, "size": args.size, "steps": args.steps,
              "measure": "cuda max_memory_allocated" if args.device != "cpu" else "ru_maxrss growth (subprocess)",
              "rows": rows, "growth_exponent": exponent}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
