"""Train the embedded default model from scratch on procedural clips (the recipe behind the shipped weights).

    python examples/train_tiny_default.py --out animatediff_lite/assets/default_model.safetensors

or in two commands (how the shipped file was made, see docs/default_model.md):

    python examples/train_tiny_default.py --work runs/vae --vae-only
    python examples/train_tiny_default.py --vae-from runs/vae/vae.safetensors

(``--stop-at STEP`` ends stage 2 early on the same learning-rate schedule.)

The defaults are the recipe of the shipped file. Options marked "experiment" below were tried on the way to
a model that follows the direction word; docs/default_model.md gives their settings and results.

Model: ``animatediff_lite.loading.default_model.DEFAULT_CONFIG`` (CLIP text encoder 64 wide x 2 layers, 3-level
AutoencoderKL 32x32 -> 8x8 latents, 2-level UNet3D 32/64 wide with v2 motion modules), random init.
Data: :func:`animatediff_lite.toy.synthetic.render_clip` clips of the *training* combinations of
:func:`animatediff_lite.toy.synthetic.split_specs` (the held-out combinations are never seen), 8 frames of 32x32.

Stage 1, autoencoder: frames -> posterior sample -> reconstruction; L1 + MSE + a small KL, Adam.
          The latent scaling factor is then set to 1 / std of the latent means (SD's 0.18215 is the same idea;
          experiment: --latent-std < 1 lowers the signal-to-noise ratio at every step, see encode_pool).
Stage 1b, text encoder: a linear probe per caption attribute (shape, colour, motion) on every end-of-text /
          padding token, cross-entropy, Adam, 300 steps; then frozen, as SD keeps its CLIP encoder frozen.
          This stands in for CLIP's pretraining: it makes the ~70 padding tokens the UNet attends to carry
          the whole caption (``--text-steps 0``: train the encoder with the UNet instead, which put only the
          colour there, docs/default_model.md).
Stage 2, UNet + motion modules, VAE and text encoder frozen: v-prediction MSE (``--prediction-type``; the
          file's scheduler metadata says so) on latents noised with AnimateDiff's linear-beta schedule
          (``DDIM.add_noise``), half the timesteps from the noisier half (where layout and motion are decided),
          85% of the clips moving in a direction, half of the samples played backwards with the motion word
          reversed (left <-> right, growing <-> shrinking) where that is a training combination, captions
          dropped to "" with probability 0.1 (for classifier-free guidance), AdamW with warm-up and cosine
          decay, gradient clipping, an EMA of the weights (the EMA is what ships).
          Experiments (off by default): --weight-cap (truncated v weighting of the epsilon loss),
          --latent-std, --zero-init-motion 0, --motion-qk-init.
Then: the held-out prompts are sampled through the library's Pipeline and scored (colour + direction), and
the weights are written in fp16 with the config in the safetensors metadata.

The library's trainer (``animatediff_lite.train``) trains from video files with a frozen, given VAE; here
the VAE itself must be trained first and the clips are made in memory, so this script runs its own short
loop over the same parts (modules, ``DDIM.add_noise``, Pipeline). Everything is seeded: the same command on
the same torch build gives the same file. Logs (JSON lines) go to ``--work``/log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from animatediff_lite.clip import TextEncoder
from animatediff_lite.config import to_dict
from animatediff_lite.loading.default_model import DEFAULT_CONFIG, DEFAULT_SAMPLE, save_default_model
from animatediff_lite.motion import TemporalAttention
from animatediff_lite.pipeline import Pipeline
from animatediff_lite.scheduler import DDIM, DDIMConfig
from animatediff_lite.tokenizer import Tokenizer
from animatediff_lite.toy.metrics import dominant_colour, motion_direction
from animatediff_lite.toy.synthetic import COLOURS, DIRECTIONS, MOTIONS, SHAPES, render_clip, split_specs
from animatediff_lite.unet import UNet3D
from animatediff_lite.vae import AutoencoderKL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="animatediff_lite/assets/default_model.safetensors")
    p.add_argument("--work", default="runs/default_model", help="logs, stage-1 VAE, snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a shared machine)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16, help="images per VAE step (one random frame per clip)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--shape-weight", type=float, default=10.0,
                   help="extra reconstruction weight on saturated (shape) pixels, so colours come out right")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--vae-from", default="", help="reuse a stage-1 VAE (work/vae.safetensors) instead of training")
    p.add_argument("--vae-only", action="store_true", help="stop after stage 1 (writes work/vae.safetensors)")
    p.add_argument("--text-steps", type=int, default=300,
                   help="> 0: pretrain the text encoder for this many steps so its end-of-text and padding tokens "
                        "tell shape, colour and motion apart (a stand-in for CLIP's pretraining), then keep it "
                        "frozen in stage 2 as Stable Diffusion does; 0: train it with the UNet from scratch")
    p.add_argument("--text-lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=3000, help="training clips encoded once for stage 2")
    p.add_argument("--direction-share", type=float, default=0.85,
                   help="share of the stage-2 pool with moving left/right/up/down (the rest grow, shrink, rotate)")
    p.add_argument("--reverse-share", type=float, default=0.5,
                   help="share of stage-2 samples played backwards with the motion word reversed "
                        "(left <-> right, growing <-> shrinking) when that combination is a training one")
    # Experiments (docs/default_model.md): off by default, the defaults being the shipped file's recipe.
    p.add_argument("--latent-std", type=float, default=1.0,
                   help="experiment: std of the scaled latents (sets the VAE scaling_factor); < 1 hides the clip "
                        "more at the noisiest steps")
    p.add_argument("--zero-init-motion", type=int, default=1,
                   help="1: motion modules start as the identity (AnimateDiff's zero-initialised proj_out); "
                        "experiment 0: proj_out gets torch's default init")
    p.add_argument("--motion-qk-init", type=float, default=0.0,
                   help="experiment: > 0 starts the temporal to_q and to_k as this multiple of the identity, so each "
                        "frame first attends to itself and its position encoding reaches the residual stream; "
                        "0: torch's init")
    p.add_argument("--weight-cap", type=float, default=1.0,
                   help="experiment: > 1 weights each clip's epsilon MSE by min(1 / alpha_bar_t, cap) (the "
                        "v-prediction loss, truncated), so errors at the noisiest steps count; 1: plain epsilon MSE")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction",
                   help="what the UNet predicts (written to the file's scheduler metadata): v_prediction weights "
                        "errors in the clean clip ~1 at every noise level, epsilon by the SNR (~0.005 at t = 950)")
    p.add_argument("--high-t-share", type=float, default=0.5,
                   help="share of timesteps drawn from the noisier half, where layout and motion are decided")
    p.add_argument("--steps", type=int, default=6000, help="stage-2 optimiser steps")
    p.add_argument("--stop-at", type=int, default=0,
                   help="end after this many steps of the --steps schedule (0: all); the EMA at that step is written")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--snapshot-every", type=int, default=500,
                   help="evaluate the EMA weights and write them to work/snapshot_STEP.safetensors")
    p.add_argument("--eval-steps", type=int, default=int(DEFAULT_SAMPLE["steps"]))
    p.add_argument("--guidance", type=float, default=float(DEFAULT_SAMPLE["guidance_scale"]))
    return p.parse_args(argv)


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")
        self.t0 = time.time()

    def __call__(self, **row) -> None:
        row = {"time_s": round(time.time() - self.t0, 1), **row}
        line = json.dumps(row)
        self.f.write(line + "\n")
        self.f.flush()
        print(line, flush=True)


def clip_batch(specs, n: int, rng: np.random.Generator, frames: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """n random clips of ``specs``: video (n, 3, F, H, W) in [-1, 1] and captions."""
    videos, captions = [], []
    for _ in range(n):
        spec = specs[int(rng.integers(len(specs)))]
        videos.append(render_clip(spec, frames, size, seed=int(rng.integers(2**31))))
        captions.append(spec.caption)
    video = torch.from_numpy(np.stack(videos)).transpose(1, 2) * 2 - 1  # (n, 3, F, H, W)
    return video, captions


def train_vae(args, specs, log: Log) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(DEFAULT_CONFIG.vae)
    if args.vae_from:
        from animatediff_lite.loading.io import load_strict, read_state_dict
        load_strict(vae, read_state_dict(args.vae_from), args.vae_from, "the stage-1 VAE")
        return vae.eval()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    rng = np.random.default_rng([args.seed, 1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae.train()
    for step in range(1, args.vae_steps + 1):
        lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        video, _ = clip_batch(specs, args.vae_batch, rng, args.frames, args.size)
        frame = torch.from_numpy(rng.integers(args.frames, size=args.vae_batch))
        x = video[torch.arange(args.vae_batch), :, frame]  # (n, 3, H, W): one frame of each clip
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
        if step % 50 == 0 or step == args.vae_steps:
            log(stage="vae", step=step, loss=round(loss.item(), 5), l1=round(l1.item(), 5), kl=round(kl.item(), 3),
                lr=round(lr, 6))
    from animatediff_lite.loading.io import save_state_dict
    save_state_dict(vae.state_dict(), Path(args.work) / "vae.safetensors")
    return vae.eval()


def pretrain_text_encoder(args, specs, tokenizer: Tokenizer, held_out, log: Log) -> TextEncoder:
    """Stage 1b: a text encoder whose end-of-text and padding tokens tell shape, colour and motion apart.

    SD1.5's UNet reads all 77 output tokens, and for a short caption ~70 of them are padding (= end-of-text)
    tokens, which see the whole caption through the causal attention. Trained jointly from scratch, the tiny
    encoder put the colour there and little else, so the UNet learned colour but ignored shape and motion
    (docs/default_model.md). CLIP's pretraining is what makes the real end-of-text token summarise the
    caption; here a linear probe per attribute on every padding token does the same job in seconds.
    """
    torch.manual_seed(args.seed + 10)  # the same draw as the UNet-with-encoder init of stage 2 otherwise
    text_encoder = TextEncoder(DEFAULT_CONFIG.clip)
    attrs = {"shape": SHAPES, "colour": tuple(COLOURS), "motion": MOTIONS}
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(DEFAULT_CONFIG.clip.hidden_size, len(v)) for a, v in attrs.items()})

    def batch_of(spec_list):
        ids = tokenizer([s.caption for s in spec_list])
        pad = (ids == tokenizer.eos_id).cumsum(1) > 0  # end-of-text and the padding after it
        labels = {a: torch.tensor([v.index(getattr(s, a)) for s in spec_list]) for a, v in attrs.items()}
        return ids, pad, labels

    def probe_loss(ids, pad, labels):
        hidden = text_encoder(ids)  # (B, 77, D)
        loss, right = 0.0, []
        for a, head in heads.items():
            logits = head(hidden)  # (B, 77, K)
            ce = F.cross_entropy(logits.transpose(1, 2), labels[a][:, None].expand_as(pad), reduction="none")
            loss = loss + (ce * pad).sum() / pad.sum()
            right.append((logits.argmax(-1) == labels[a][:, None]) | ~pad)
        return loss, torch.stack(right).all(0).all(1).float().mean()  # caption right at every padding token

    opt = torch.optim.Adam([*text_encoder.parameters(), *heads.parameters()], lr=args.text_lr)
    rng = np.random.default_rng([args.seed, 4])
    for step in range(1, args.text_steps + 1):
        ids, pad, labels = batch_of([specs[i] for i in rng.integers(len(specs), size=32)])
        loss, _ = probe_loss(ids, pad, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.text_steps:
            with torch.no_grad():
                _, held_acc = probe_loss(*batch_of(held_out))
            log(stage="text", step=step, loss=round(loss.item(), 5), held_out_captions_right=round(float(held_acc), 3))
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(args, vae: AutoencoderKL, specs, log: Log) -> tuple[torch.Tensor, list[str], float]:
    """Encode ``args.pool`` clips to latent means; returns (scaled latents (P, 4, F, h, w), captions, scale)."""
    rng = np.random.default_rng([args.seed, 2])
    moving = [s for s in specs if s.motion in DIRECTIONS]
    other = [s for s in specs if s.motion not in DIRECTIONS]
    latents, captions = [], []
    for start in range(0, args.pool, 16):
        group = moving if start < args.direction_share * args.pool else other
        video, caps = clip_batch(group, min(16, args.pool - start), rng, args.frames, args.size)
        latents.append(vae.encode(video, sample=False, chunk_size=128))  # scaling_factor is 1.0 here
        captions += caps
    latents = torch.cat(latents)
    # Experiment --latent-std < 1 (input scaling, Chen 2023, "On the importance of noise scheduling for diffusion
    # models"): 8 frames of 8x8 latents are few numbers, so at unit scale even t = 950 still shows a moving blob
    # (SNR summed over it ~1) and the model may read the trajectory from the noise instead of the text.
    raw_std = float(latents.std())
    scale = args.latent_std / raw_std
    # Reconstruction error of the pool's first clips, as a check of stage 1.
    video, _ = clip_batch(specs, 8, np.random.default_rng([args.seed, 3]), args.frames, args.size)
    rec = vae.decode(vae.encode(video, sample=False)).clamp(-1, 1)
    log(stage="pool", clips=len(captions), latent_std=round(raw_std, 4), scaling_factor=round(scale, 5),
        recon_l1_01=round(float((rec - video).abs().mean() / 2), 5))
    return latents * scale, captions, scale


def param_groups(text_encoder: TextEncoder, unet: UNet3D, weight_decay: float) -> list[dict]:
    """AdamW groups of the trained parameters (a frozen text encoder has none)."""
    emb = text_encoder.embeddings.token_embedding.weight
    rest = [p for p in list(text_encoder.parameters()) + list(unet.parameters()) if p is not emb and p.requires_grad]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    return groups + ([{"params": [emb], "weight_decay": 0.0}] if emb.requires_grad else [])


@torch.no_grad()
def evaluate(pipe: Pipeline, specs, args, seed: int = 0) -> dict:
    """Sample every spec's caption once; fraction with the right dominant colour and direction."""
    video = pipe([s.caption for s in specs], num_frames=args.frames, height=args.size, width=args.size,
                 steps=args.eval_steps, guidance_scale=args.guidance, seed=seed, progress=False)
    colour = [dominant_colour(v) == s.colour for v, s in zip(video, specs, strict=True)]
    motion = [motion_direction(v) == s.motion for v, s in zip(video, specs, strict=True)]
    both = [a and b for a, b in zip(colour, motion, strict=True)]
    return {"colour": float(np.mean(colour)), "direction": float(np.mean(motion)), "both": float(np.mean(both))}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    log = Log(work / "log.jsonl")
    log(stage="start", argv=sys.argv, args=vars(args), torch=torch.__version__)
    train_specs, held_out = split_specs()
    cfg = DEFAULT_CONFIG

    vae = train_vae(args, train_specs, log)
    if args.vae_only:
        return
    for p in vae.parameters():
        p.requires_grad_(False)
    latents, captions, scale = encode_pool(args, vae, train_specs, log)
    import dataclasses
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=scale))
    vae.config = cfg.vae  # same weights; the pipeline divides by this factor before decoding

    tokenizer = Tokenizer()
    if args.text_steps > 0:
        text_encoder = pretrain_text_encoder(args, train_specs, tokenizer, held_out, log)
        unet = UNet3D(cfg.unet, cfg.motion)
    else:
        torch.manual_seed(args.seed + 10)
        text_encoder, unet = TextEncoder(cfg.clip), UNet3D(cfg.unet, cfg.motion)
    for name, module in unet.named_modules():
        if name.endswith("temporal_transformer.proj_out") and not args.zero_init_motion:
            module.reset_parameters()
        if isinstance(module, TemporalAttention) and args.motion_qk_init > 0:
            with torch.no_grad():
                eye = torch.eye(module.to_q.weight.shape[0]) * args.motion_qk_init
                module.to_q.weight.copy_(eye)
                module.to_k.weight.copy_(eye)
    ids_all = tokenizer(captions)  # (P, 77)
    ids_empty = tokenizer([""])[0]
    # Time reversal: the same frames backwards with the opposite motion word. It doubles the pool and gives
    # pairs that differ only in the direction word and frame order. A reversal that would make a held-out
    # combination is not used (train_specs only).
    train_captions = {s.caption: s for s in train_specs}
    back = [train_captions[c].time_reversed() for c in captions]
    can_reverse = torch.tensor([b in train_captions.values() for b in back])
    ids_back = tokenizer([b.caption for b in back])
    ema = {k: v.detach().clone() for k, v in {**_prefixed(text_encoder, unet)}.items()}
    opt = torch.optim.AdamW(param_groups(text_encoder, unet, args.weight_decay), lr=args.lr)
    sched = DDIM(DDIMConfig(prediction_type=args.prediction_type))
    gen = torch.Generator().manual_seed(args.seed + 20)
    text_encoder.train(args.text_steps == 0)
    unet.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    losses = []
    last = min(args.stop_at or args.steps, args.steps)
    for step in range(1, last + 1):
        warm = min(1.0, step / max(args.warmup, 1))
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen)
        x0 = latents[idx]
        ids = ids_all[idx].clone()
        if args.reverse_share > 0:  # (no draw otherwise, so runs without reversal keep their random stream)
            rev = (torch.rand(args.batch, generator=gen) < args.reverse_share) & can_reverse[idx]
            x0 = torch.where(rev[:, None, None, None, None], x0.flip(2), x0)  # (B, C, F, h, w): dim 2 is time
            ids[rev] = ids_back[idx][rev]
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        ids[drop] = ids_empty
        n_t = sched.config.num_train_timesteps
        t = torch.randint(0, n_t, (args.batch,), generator=gen)
        high = torch.rand(args.batch, generator=gen) < args.high_t_share
        t = torch.where(high, n_t // 2 + t // 2, t)  # the noisier half, uniformly
        noise = torch.randn(x0.shape, generator=gen)
        noisy = sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, text_encoder(ids))
        target = noise if args.prediction_type == "epsilon" else sched.velocity(x0, noise, t)
        # Epsilon MSE weights an error in the predicted clean clip by the SNR, ~0.005 at t = 900, where the
        # direction must be decided; experiment --weight-cap > 1 makes those errors count.
        if args.weight_cap > 1:
            weight = (1 / sched.alphas_cumprod[t]).clamp(max=args.weight_cap)
            per_clip = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3, 4))
            loss = (weight * per_clip).sum() / weight.sum()
        else:
            loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in _prefixed(text_encoder, unet).items():
                ema[k].lerp_(v.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 25 == 0 or step == last:
            log(stage="unet", step=step, loss=round(float(np.mean(losses[-25:])), 5), lr=round(lr, 6),
                grad_norm=round(float(grad_norm), 3))
        if step % args.snapshot_every == 0 or step == last:
            te_ema, unet_ema = _ema_models(cfg, ema)
            pipe = Pipeline(tokenizer, te_ema, vae, unet_ema, sched)
            scores = evaluate(pipe, held_out, args)
            log(stage="eval", step=step, held_out=scores)
            path = work / f"snapshot_{step}.safetensors" if step < last else Path(args.out)
            extra = {"recipe": " ".join(["python", *sys.argv]),
                     "training": json.dumps({"stage2_steps": step, "final_loss": float(np.mean(losses[-100:])),
                                             "held_out": scores, "torch": torch.__version__})}
            save_default_model(path, te_ema, vae, unet_ema, cfg, DEFAULT_SAMPLE, extra, scheduler=sched.config)
    log(stage="done", out=str(args.out), config=to_dict(cfg))


def _prefixed(text_encoder, unet) -> dict[str, torch.Tensor]:
    return {**{f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()},
            **{f"unet.{k}": v for k, v in unet.state_dict().items()}}


def _ema_models(cfg, ema: dict[str, torch.Tensor]):
    te, unet = TextEncoder(cfg.clip), UNet3D(cfg.unet, cfg.motion)
    te.load_state_dict({k[len("text_encoder."):]: v for k, v in ema.items() if k.startswith("text_encoder.")})
    unet.load_state_dict({k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")})
    return te.eval(), unet.eval()


if __name__ == "__main__":
    main()
