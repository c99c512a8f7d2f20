"""The embedded default model's recipe, the two parts that are not the library's trainer: the VAE stage and the export.

    python examples/train_tiny_default.py vae --work runs/vae                          # stage 1: the VAE
    animatediff-lite train examples/train_default_model.toml                           # stage 2: text encoder, UNet
    python examples/train_tiny_default.py export runs/default_model --out model.safetensors  # score, one file

Stage 1 trains the 3-level AutoencoderKL of ``DEFAULT_CONFIG`` from scratch on single frames of procedural clips
(L1 + MSE with the shape's saturated pixels weighted up so colours come out right, a small KL, Adam with a
cosine LR); real models start from SD's VAE instead, so this stays out of the library. Stage 2 is the
library's trainer (the config's comments say what each setting does). The export reads a run folder (the
EMA weights, the frozen VAE and text encoder, the model config with the measured latent scale, the prediction
type), scores the held-out prompts (dominant colour and direction of motion, through the library's Pipeline)
and writes the single fp16 file the package ships, with the scheduler and the scores in its metadata.
docs/default_model.md has the results, docs/training.md the comparison with the previous standalone script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from animatediff_lite.config import ModelConfig, from_dict
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.default_model import DEFAULT_CONFIG, DEFAULT_SAMPLE, save_default_model
from animatediff_lite.loading.io import load_strict, read_state_dict, save_state_dict
from animatediff_lite.pipeline import Pipeline
from animatediff_lite.scheduler import DDIM, DDIMConfig
from animatediff_lite.toy.metrics import dominant_colour, motion_direction
from animatediff_lite.toy.synthetic import render_clip, split_specs
from animatediff_lite.train.config import load_config
from animatediff_lite.train.models import build_models
from animatediff_lite.vae import AutoencoderKL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vae", help="stage 1: train the VAE, write WORK/vae.safetensors")
    v.add_argument("--work", default="runs/vae")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a shared machine)")
    v.add_argument("--frames", type=int, default=8)
    v.add_argument("--size", type=int, default=32)
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--batch", type=int, default=16, help="images per step (one random frame per clip)")
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--shape-weight", type=float, default=10.0,
                   help="extra reconstruction weight on saturated (shape) pixels, so colours come out right")
    v.add_argument("--kl-weight", type=float, default=1e-5)
    e = sub.add_parser("export", help="score a stage-2 run on the held-out prompts and write the default-model file")
    e.add_argument("run", help="output.dir of `animatediff-lite train examples/train_default_model.toml`")
    e.add_argument("--out", required=True, help="the file to write (the shipped one is "
                   "animatediff_lite/assets/default_model.safetensors)")
    e.add_argument("--checkpoint", default="", help="a checkpoints/step_N folder of the run (default: the latest)")
    e.add_argument("--eval-steps", type=int, default=int(DEFAULT_SAMPLE["steps"]))
    e.add_argument("--guidance", type=float, default=float(DEFAULT_SAMPLE["guidance_scale"]))
    return p.parse_args(argv)


def train_vae(args) -> Path:
    """Stage 1; returns the path of the VAE weights."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(DEFAULT_CONFIG.vae)
    specs = split_specs()[0]  # training combinations only
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    rng = np.random.default_rng([args.seed, 1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        opt.param_groups[0]["lr"] = lr  # (one group)
        clips = [render_clip(specs[int(rng.integers(len(specs)))], args.frames, args.size,
                             seed=int(rng.integers(2**31))) for _ in range(args.batch)]
        frame = rng.integers(args.frames, size=args.batch)
        x = torch.from_numpy(np.stack([c[f] for c, f in zip(clips, frame, strict=True)])) * 2 - 1  # (n, 3, H, W)
        mean, logvar = vae.encode_frames(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        rec = vae.decode_frames(z)
        # The grey background is most of every frame: weight the shape's pixels up so its colour is exact.
        sat = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)  # (n, 1, H, W), 0 on grey
        weight = 1 + args.shape_weight * (sat / 2).clamp(0, 1)
        l1, l2 = ((rec - x).abs() * weight).mean(), ((rec - x).pow(2) * weight).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = l1 + l2 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps:
            line = json.dumps({"stage": "vae", "step": step, "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                               "kl": round(kl.item(), 3), "lr": round(lr, 6)})
            with open(work / "log.jsonl", "a") as f:
                print(line, file=f)
            print(line, flush=True)
    save_state_dict(vae.state_dict(), work / "vae.safetensors")
    return work / "vae.safetensors"


@torch.no_grad()
def evaluate(pipe: Pipeline, specs, steps: int, guidance: float, seed: int = 0) -> dict:
    """Sample every spec's caption once; share with the right dominant colour, direction, both."""
    size = int(DEFAULT_SAMPLE["height"])
    video = pipe([s.caption for s in specs], num_frames=int(DEFAULT_SAMPLE["num_frames"]), height=size, width=size,
                 steps=steps, guidance_scale=guidance, seed=seed, progress=False)
    colour = np.array([dominant_colour(v) == s.colour for v, s in zip(video, specs, strict=True)])
    motion = np.array([motion_direction(v) == s.motion for v, s in zip(video, specs, strict=True)])
    return {"colour": float(colour.mean()), "direction": float(motion.mean()), "both": float((colour & motion).mean())}


def export(args) -> Path:
    """Read a stage-2 run (the EMA weights of its latest or given checkpoint), score it, write the shipped format."""
    run = Path(args.run)
    cfg = load_config(run / "config.json", ["--model.vae", str(run / "base" / "vae.safetensors")])
    folder = Path(args.checkpoint) if args.checkpoint else run
    meta = read_checkpoint(folder / "unet.safetensors").metadata
    model_cfg = from_dict(ModelConfig, json.loads(meta["model_config"])) if "model_config" in meta else DEFAULT_CONFIG
    tokenizer, text_encoder, vae, unet, _ = build_models(cfg, torch.device("cpu"))
    for module, path, what in ((unet, folder / "unet.safetensors", "the trained UNet3D"),
                               (text_encoder, folder / "text_encoder.safetensors", "the text stage's encoder")):
        load_strict(module, read_state_dict(path), path, what)
    vae.config = model_cfg.vae  # the measured latent scale
    sched = DDIM(DDIMConfig(prediction_type=cfg.noise.prediction_type))  # the betas are AnimateDiff's
    pipe = Pipeline(tokenizer, text_encoder.eval(), vae.eval(), unet.eval(), sched)
    scores = evaluate(pipe, split_specs()[1], args.eval_steps, args.guidance)
    print(json.dumps({"held_out": scores, "step": meta.get("step"), "weights": meta.get("weights")}), flush=True)
    extra = {"recipe": " ".join(["python", *sys.argv]) + " (stage 2: animatediff-lite train, config in 'training')",
             "training": json.dumps({"stage2_steps": int(meta.get("step", 0)), "held_out": scores,
                                     "train_config": json.loads(meta.get("train_config", "{}")),
                                     "torch": torch.__version__})}
    save_default_model(args.out, text_encoder, vae, unet, model_cfg, DEFAULT_SAMPLE, extra, scheduler=sched.config)
    return Path(args.out)


def main(argv=None) -> Path:
    args = parse_args(argv)
    return train_vae(args) if args.command == "vae" else export(args)


if __name__ == "__main__":
    main()
