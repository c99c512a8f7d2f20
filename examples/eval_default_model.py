"""Evaluate the embedded default model on held-out prompts and draw a frame strip.

    python examples/eval_default_model.py                       # the shipped weights, 3 seeds
    python examples/eval_default_model.py --weights runs/default_model/snapshot_3000.safetensors --strip out.png
    python examples/eval_default_model.py --probe   # does the UNet use frame order and the direction word?

For every held-out (shape, colour, direction) combination of ``synthetic.split_specs()`` (never seen as a
triple in training) and every seed it samples one clip and checks the dominant colour and the direction the
shape's centroid moves (``toy.metrics.dominant_colour`` / ``motion_direction``); it also scores the
training combinations with directions for comparison. ``--strip`` writes a PNG: one row per prompt, its
frames left to right, upscaled with nearest neighbour.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from animatediff_lite.loading.default_model import DEFAULT_SAMPLE, load_default_pipeline
from animatediff_lite.toy.metrics import dominant_colour, motion_direction
from animatediff_lite.toy.synthetic import DIRECTIONS, split_specs

STRIP_PROMPTS = ("a blue square moving right", "a red circle moving up", "a yellow triangle moving left",
                 "a green square moving down", "a purple circle moving right", "an orange triangle moving up")


def score(pipe, specs, seeds, steps: int, guidance: float) -> tuple[float, float, float, list[str]]:
    size = int(pipe.sample_defaults["height"])
    frames = int(pipe.sample_defaults["num_frames"])
    colour_ok, dir_ok, both, misses = [], [], [], []
    for seed in seeds:
        video = pipe([s.caption for s in specs], num_frames=frames, height=size, width=size, steps=steps,
                     guidance_scale=guidance, seed=seed, progress=False)
        for spec, v in zip(specs, video, strict=True):
            c, d = dominant_colour(v), motion_direction(v)
            colour_ok.append(c == spec.colour)
            dir_ok.append(d == spec.motion)
            both.append(c == spec.colour and d == spec.motion)
            if not both[-1]:
                misses.append(f"seed {seed}: {spec.caption} -> {c} / {d}")
    return float(np.mean(colour_ok)), float(np.mean(dir_ok)), float(np.mean(both)), misses


def predicted_clean(pipe, x_t: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """The clean latent clip the UNet predicts from ``x_t`` at timestep ``t``, whatever its prediction type."""
    a = pipe.scheduler.alphas_cumprod[t]
    out = pipe.unet(x_t, torch.full((x_t.shape[0],), t), emb)
    kind = pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out
    return out


@torch.no_grad()
def direction_probe(pipe, t: int = 950, seed: int = 0) -> dict[str, tuple[float, float]]:
    """How the prediction of the clean clip at noise level ``t`` depends on the direction word.

    One noise draw, the four direction prompts of a red circle: the UNet's output at ``t`` gives a predicted
    clean latent clip, and the centroid of its spatial deviation (per frame, in latent pixels) moves by
    (dx, dy) from the first frame to the last. A model that reads the direction word gives four different
    shifts pointing its four ways; one that ignores it gives four equal ones (the noise decides).
    """
    prompts = [f"a red circle {d}" for d in DIRECTIONS]
    noise = _latent_noise(pipe, seed).expand(len(prompts), -1, -1, -1, -1)
    alpha = pipe.scheduler.alphas_cumprod[t]
    # x_t = sqrt(1 - a) * noise: the clean part is 0, so what the model adds comes from the text alone
    x0 = predicted_clean(pipe, (1 - alpha).sqrt() * noise, t, pipe.text_encoder(pipe.tokenizer(prompts)))
    energy = (x0 - x0.mean(dim=(3, 4), keepdim=True)).pow(2).sum(1)  # (P, F, h, w)
    size = x0.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    cx = (energy * xs).sum((2, 3)) / energy.sum((2, 3))
    cy = (energy * ys).sum((2, 3)) / energy.sum((2, 3))
    return {d: (round(float(cx[i, -1] - cx[i, 0]), 2), round(float(cy[i, -1] - cy[i, 0]), 2))
            for i, d in enumerate(DIRECTIONS)}


@torch.no_grad()
def order_gap(pipe, t: int, seed: int = 0) -> float:
    """How much the UNet uses frame order: mean |rev(U(x)) - U(rev(x))| / mean |U(x)|, rev = time reversal.

    0 means the UNet is a set function of the frames (it cannot tell a clip from its time reversal).
    """
    x = _latent_noise(pipe, seed)
    emb = pipe.text_encoder(pipe.tokenizer(["a red circle moving left"]))
    tt = torch.tensor([t])
    a, b = pipe.unet(x, tt, emb), pipe.unet(x.flip(2), tt, emb)  # (1, C, F, h, w): dim 2 is time
    return float((a.flip(2) - b).abs().mean() / a.abs().mean())


def _latent_noise(pipe, seed: int) -> torch.Tensor:
    size = int(pipe.sample_defaults["height"]) // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    frames = int(pipe.sample_defaults["num_frames"])
    return torch.randn(1, pipe.unet.config.in_channels, frames, size, size,
                       generator=torch.Generator().manual_seed(seed))


def frame_strip(video: torch.Tensor, captions: list[str], path: str, scale: int = 4) -> None:
    """video (B, F, 3, H, W) in [0, 1] -> PNG with one labelled row per clip."""
    from PIL import Image, ImageDraw

    b, f, _, h, w = video.shape
    label_w, pad = 200, 2
    sheet = Image.new("RGB", (label_w + f * (w * scale + pad), b * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(b):
        y = i * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), captions[i], fill="black")
        for j in range(f):
            frame = (video[i, j].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            img = Image.fromarray(frame).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            sheet.paste(img, (label_w + j * (w * scale + pad), y))
    sheet.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default-model file (default: the shipped one)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=int(DEFAULT_SAMPLE["steps"]))
    p.add_argument("--guidance", type=float, default=float(DEFAULT_SAMPLE["guidance_scale"]))
    p.add_argument("--strip", default="", help="write a frame strip PNG here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-too", action="store_true", help="also score the training combinations")
    p.add_argument("--probe", action="store_true",
                   help="only print direction_probe() and order_gap() at t = 950, 800, 600 (no sampling)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    pipe = load_default_pipeline(path=args.weights)
    if args.probe:
        for t in (950, 800, 600):
            print(f"t={t}: order gap {order_gap(pipe, t):.1%}; predicted clean clip, centroid shift first -> "
                  "last frame (dx, dy) in latent pixels:", direction_probe(pipe, t))
        return
    train, held_out = split_specs()
    t0 = time.time()
    c, d, both, misses = score(pipe, held_out, seeds, args.steps, args.guidance)
    print(f"held-out ({len(held_out)} prompts x {len(seeds)} seeds, {args.steps} steps, cfg {args.guidance}): "
          f"colour {c:.0%}, direction {d:.0%}, both {both:.0%}  [{time.time() - t0:.0f} s]")
    for m in misses:
        print("  miss:", m)
    if args.train_too:
        moving = [s for s in train if s.motion in DIRECTIONS]
        c, d, both, _ = score(pipe, moving, seeds[:1], args.steps, args.guidance)
        print(f"training combinations ({len(moving)} prompts): colour {c:.0%}, direction {d:.0%}, both {both:.0%}")
    if args.strip:
        size = int(pipe.sample_defaults["height"])
        t0 = time.time()
        video = pipe(list(STRIP_PROMPTS), num_frames=int(pipe.sample_defaults["num_frames"]), height=size,
                     width=size, steps=args.steps, guidance_scale=args.guidance, seed=seeds[0], progress=False)
        frame_strip(video, list(STRIP_PROMPTS), args.strip)
        print(f"wrote {args.strip} ({len(STRIP_PROMPTS)} prompts in {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
