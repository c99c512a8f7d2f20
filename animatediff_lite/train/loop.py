"""The training loop, top to bottom: one process or torchrun (DDP), motion modules / MotionLoRA / whole model.

    animatediff-lite train run.toml --optim.lr 3e-4
    torchrun --nproc_per_node 4 -m animatediff_lite train run.toml

Objective: epsilon-prediction MSE on VAE latents noised with the linear-beta DDPM schedule; captions are
replaced by "" with probability ``train.caption_dropout``. Everything a step draws for a sample (VAE
posterior noise, timestep, caption dropout, noise) comes from that sample's own seed (see
``train/data.py``), so N ranks with batch b train exactly like 1 rank with batch N*b, and a resumed run
continues bit for bit. Rank 0 logs (JSONL + progress bar), validates and saves; the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..config import MOTION_VERSIONS, SD15, TINY, ModelConfig, to_dict
from ..loading.io import atomic_write, save_state_dict
from ..loading.motion_load import motion_state_to_original
from ..scheduler import DDIM, DDIMConfig
from . import checkpoint as ckpt
from .config import TrainConfig, load_config, to_json
from .data import LatentDataset, build_video_dataset, collate, latent_cache_matches, write_latent_cache

log = logging.getLogger("animatediff_lite.train")
MOTION_TAG = ".motion_modules."
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# ----------------------------------------------------------------------------------------------- setup

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not device:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, dev)


def build_preset(cfg: TrainConfig) -> tuple[object, nn.Module, nn.Module, nn.Module, ModelConfig]:
    """(tokenizer, text_encoder, vae, unet, model config) of a preset with seeded random init."""
    from ..clip import TextEncoder
    from ..tokenizer import Tokenizer
    from ..unet import UNet3D
    from ..vae import AutoencoderKL

    base = {"tiny": TINY, "sd15": SD15}[cfg.model.preset]
    motion = dataclasses.replace(base.motion, **MOTION_VERSIONS[cfg.model.motion_version])
    model_cfg = dataclasses.replace(base, motion=motion)
    torch.manual_seed(cfg.model.init_seed)
    text_encoder = TextEncoder(model_cfg.clip)
    vae = AutoencoderKL(model_cfg.vae)
    unet = UNet3D(model_cfg.unet, model_cfg.motion)
    return Tokenizer(), text_encoder, vae, unet, model_cfg


def build_models(cfg: TrainConfig, device: torch.device):
    """Tokenizer, text encoder, VAE and UNet3D (motion module from the file, or fresh) on ``device``, fp32."""
    if cfg.model.preset:
        tokenizer, text_encoder, vae, unet, model_cfg = build_preset(cfg)
        if cfg.model.motion_module:
            from ..loading.motion_load import load_motion_module
            load_motion_module(unet, cfg.model.motion_module)
    else:
        from ..loading.pipeline_load import load_pipeline
        pipe = load_pipeline(base=cfg.model.base, motion_module=cfg.model.motion_module or None,
                             device="cpu", dtype=torch.float32)
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        if getattr(unet, "motion", None) is None or not any(MOTION_TAG in k for k in unet.state_dict()):
            raise ValueError("model.base gave a UNet without motion modules; set model.motion_module")
        if not cfg.model.motion_module:  # fresh motion module: re-init with zero proj_out
            _reinit_motion(unet)
        model_cfg = None
    return tokenizer, text_encoder.to(device), vae.to(device), unet.to(device), model_cfg


def _reinit_motion(unet: nn.Module) -> None:
    from ..motion import MotionModule
    for m in unet.modules():
        if isinstance(m, MotionModule):
            for sub in m.modules():
                if isinstance(sub, (nn.Linear, nn.LayerNorm, nn.GroupNorm)):
                    sub.reset_parameters()
            m._init_weights()


# ------------------------------------------------------------------------------------------ MotionLoRA

class MotionLoRA(nn.Module):
    """Rank-r adapters ``W x + up(down(x))`` on the temporal attention projections of a motion module.

    The adapters live here, not inside the UNet, so the UNet's state_dict keeps its names; forward hooks
    on the target Linears add the low-rank term. ``up`` starts at zero (the adapted model starts equal to
    the base), ``down`` ~ N(0, 1/r). :meth:`original_state` gives the original MotionLoRA file layout.
    """

    def __init__(self, unet: nn.Module, rank: int):
        super().__init__()
        self.names: list[str] = []
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        self._hooks = []
        for name, module in unet.named_modules():
            if MOTION_TAG in f".{name}" and isinstance(module, nn.Linear) and name.endswith(LORA_TARGETS) \
                    and ".attention_blocks." in name:
                down = nn.Parameter(torch.randn(rank, module.in_features) / rank)
                up = nn.Parameter(torch.zeros(module.out_features, rank))
                self.names.append(name)
                self.down.append(down)
                self.up.append(up)
                self._hooks.append(module.register_forward_hook(self._hook(len(self.names) - 1)))
        if not self.names:
            raise ValueError("the UNet has no motion-module attention projections to adapt")

    def _hook(self, i: int):
        def add_low_rank(module, args, out):
            x = args[0]
            return out + F.linear(F.linear(x, self.down[i].to(x.dtype)), self.up[i].to(x.dtype))
        return add_low_rank

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def original_state(self) -> dict[str, torch.Tensor]:
        """``{module}.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` as guoyww/AnimateDiff reads it."""
        out = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            module, _, proj = name.removesuffix(".0").rpartition(".")
            out[f"{module}.processor.{proj}_lora.down.weight"] = down.detach().clone()
            out[f"{module}.processor.{proj}_lora.up.weight"] = up.detach().clone()
        return out


class Trainee(nn.Module):
    """What DDP wraps: the UNet, the text encoder and the LoRA adapters, with the loss as forward."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, lora: MotionLoRA | None):
        super().__init__()
        self.unet, self.text_encoder, self.lora = unet, text_encoder, lora

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """noisy, noise (B, 4, F, h, w); t (B,); ids (B, 77) -> scalar epsilon MSE."""
        text = self.text_encoder(ids)  # (B, 77, D)
        pred = self.unet(noisy, t, text)
        return F.mse_loss(pred.float(), noise.float())


def select_trainable(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module):
    """Freeze everything, then enable the trained part; returns (trainable params by name, lora or None)."""
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False)
    lora = None
    mode = cfg.train.modules
    if mode == "motion":
        for name, p in unet.named_parameters():
            p.requires_grad_(MOTION_TAG in f".{name}")
    elif mode == "motion_lora":
        lora = MotionLoRA(unet, cfg.train.lora_rank)
    else:  # "all": the whole UNet (motion modules included) and the text encoder; the VAE stays frozen
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
    params = {f"unet.{k}": p for k, p in unet.named_parameters() if p.requires_grad}
    params.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters() if p.requires_grad})
    if lora is not None:
        params.update({f"lora.{k}": p for k, p in lora.named_parameters()})
    if not params:
        raise ValueError(f"train.modules = {mode!r} selects no parameters (does the UNet have motion modules?)")
    return params, lora


# ------------------------------------------------------------------------------------------------ data

class ResumableSampler(DistributedSampler):
    """A DistributedSampler (shuffled by seed + epoch, this rank's share) that can start mid-epoch."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_dataset(cfg: TrainConfig, vae: nn.Module, d: Dist):
    data = cfg.data
    videos = build_video_dataset(csv_path=data.csv, root=data.root, folder=data.folder, suffix=data.suffix,
                                 frames=data.frames, stride=data.stride, size=data.size, seed=cfg.train.seed)
    if not data.latent_cache:
        return videos
    settings = {"csv": data.csv, "root": data.root, "folder": data.folder, "frames": data.frames,
                "stride": data.stride, "size": data.size, "seed": cfg.train.seed, "n": len(videos)}
    if d.main and not latent_cache_matches(data.latent_cache, settings):
        log.info("encoding %d clips into the latent cache %s", len(videos), data.latent_cache)
        latents, captions = [], []
        with torch.no_grad():
            for i in range(len(videos)):
                s = videos[i]
                g = torch.Generator().manual_seed(s["sample_seed"])
                z = vae.encode(s["video"][None].to(d.device), generator=g)[0]
                latents.append(z.cpu().to(torch.float16))
                captions.append(s["caption"])
        write_latent_cache(data.latent_cache, latents, captions, settings)
    _barrier(d)
    return LatentDataset(data.latent_cache, seed=cfg.train.seed)


# ------------------------------------------------------------------------------------------------ loop

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run described by ``cfg``.

    Returns a summary: ``steps``, ``losses`` (all-reduced, one per step of this process's run), ``last`` (the
    last log record), ``output`` (the folder) and the models (``unet``, ``text_encoder``, ``vae``, ``tokenizer``).
    """
    cfg.validate()
    d = setup_distributed(cfg.train.device)
    out = Path(cfg.output.dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda p: Path(p).write_text(to_json(cfg)))
    _seed_all(cfg.train.seed + d.rank)
    precision = cfg.train.precision
    if precision == "fp16" and d.device.type != "cuda":
        raise ValueError("train.precision = 'fp16' needs a CUDA device (GradScaler); use 'bf16' or 'fp32' on CPU")
    amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    tokenizer, text_encoder, vae, unet, model_cfg = build_models(cfg, d.device)
    if d.main and model_cfg is not None:  # random-init preset: keep the frozen base so the result is usable
        _save_base(out, model_cfg, unet, text_encoder, vae)
    params, lora = select_trainable(cfg, unet, text_encoder, vae)
    if lora is not None:
        lora.to(d.device)
    unet.gradient_checkpointing = cfg.train.gradient_checkpointing
    unet.train()
    text_encoder.train(cfg.train.modules == "all")
    vae.eval()

    dataset = build_dataset(cfg, vae, d)
    sampler = ResumableSampler(dataset, d.world, d.rank, cfg.train.seed)
    bs = cfg.train.batch_size
    if sampler.num_samples < bs:
        raise ValueError(f"{len(dataset)} clips over {d.world} ranks give {sampler.num_samples} per rank per epoch, "
                         f"fewer than train.batch_size={bs}")
    loader_kw = dict(batch_size=bs, sampler=sampler, collate_fn=collate, drop_last=True,
                     num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda")
    micro_per_epoch = sampler.num_samples // bs

    trainee = Trainee(unet, text_encoder, lora)
    model = trainee
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            trainee, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)
    o = cfg.optim
    optimizer = torch.optim.AdamW(list(params.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    warmup = max(o.warmup_steps, 0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    noise_sched = DDIM(DDIMConfig(num_train_timesteps=cfg.noise.num_train_timesteps, beta_start=cfg.noise.beta_start,
                                  beta_end=cfg.noise.beta_end, beta_schedule=cfg.noise.beta_schedule))

    step, epoch, pos = 0, 0, 0
    resume = _resume_folder(cfg, out)
    if resume is not None:
        state = ckpt.load_training_state(resume)
        missing = set(params) - set(state["trainable"])
        if missing:
            raise ValueError(f"{resume}: the checkpoint lacks {len(missing)} trainable tensors "
                             f"(e.g. {sorted(missing)[0]}); was it made with another train.modules?")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["trainable"][k])
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, pos = state["step"], state["epoch"], state["position"]
        ckpt.set_rng_states(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        if d.main:
            log.info("resumed from %s at step %d", resume, step)

    pbar = None
    if d.main:
        from tqdm.auto import tqdm
        pbar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    log_path = out / "log.jsonl"
    t0 = time.time()
    losses, skipped_total, last = [], 0, {}
    accum = 0
    micro_losses = []
    while step < cfg.train.max_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.start = pos * bs
        if pos >= micro_per_epoch:
            epoch, pos = epoch + 1, 0
            continue
        for batch in DataLoader(dataset, **loader_kw):
            pos += 1
            accum += 1
            sync = accum == cfg.train.grad_accum
            latents, t, ids, noise = _prepare(batch, vae, tokenizer, noise_sched, cfg, d.device)
            skipped_total += int(batch["skipped"].sum())
            ctx = model.no_sync() if (d.world > 1 and not sync) else _nullcontext()
            with ctx:
                with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    noisy = noise_sched.add_noise(latents, noise, t)
                    loss = model(noisy, t, ids, noise)
                scaler.scale(loss / cfg.train.grad_accum).backward()
            micro_losses.append(loss.detach())
            if not sync:
                continue
            accum = 0
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                       cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0
                                                       else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_sched.step()
            step += 1
            step_loss = torch.stack(micro_losses).mean()
            micro_losses = []
            stats = torch.stack([step_loss.float().cpu(), torch.tensor(float(skipped_total))])
            if d.world > 1:
                stats = stats.to(d.device)
                dist.all_reduce(stats)
                stats = stats.cpu() / torch.tensor([d.world, 1.0])
            losses.append(float(stats[0]))
            last = {"step": step, "loss": float(stats[0]), "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm), "epoch": epoch, "skipped_videos": int(stats[1]),
                    "samples": step * bs * cfg.train.grad_accum * d.world, "elapsed_s": round(time.time() - t0, 3)}
            if d.main:
                pbar.update(1)
                pbar.set_postfix(loss=f"{last['loss']:.4f}")
                if step % cfg.output.log_every == 0 or step == cfg.train.max_steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
            if step % cfg.output.save_every == 0 or step == cfg.train.max_steps:
                _save(cfg, out, d, step, epoch, pos, params, unet, text_encoder, lora, optimizer, lr_sched, scaler)
            if cfg.validation.every and step % cfg.validation.every == 0 and d.main:
                _validate(cfg, out, step, tokenizer, text_encoder, vae, unet, noise_sched, d.device)
            if step >= cfg.train.max_steps:
                break
        else:
            epoch, pos = epoch + 1, 0
    if pbar is not None:
        pbar.close()
    if lora is not None:
        lora.remove()
    # The models come back too, so scripts (the default-model recipe, tests) can use them in-process.
    summary = {"steps": step, "losses": losses, "last": last, "output": str(out), "unet": unet,
               "text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    if d.world > 1:
        dist.barrier()
    return summary


def _prepare(batch: dict, vae, tokenizer, noise_sched: DDIM, cfg: TrainConfig, device):
    """Latents, timesteps, token ids (with caption dropout) and noise for a batch, each sample from its seed."""
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["sample_seed"]]
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            video = batch["video"].to(device, non_blocking=True)
            latents = torch.cat([vae.encode(video[i:i + 1], generator=g) for i, g in enumerate(gens)]).float()
    n_t = cfg.noise.num_train_timesteps
    t = torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in gens]).to(device)
    drop = [bool(torch.rand((), generator=g) < cfg.train.caption_dropout) for g in gens]
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device)
    ids = tokenizer([("" if dropped else c) for c, dropped in zip(batch["caption"], drop, strict=True)]).to(device)
    return latents, t, ids, noise


def _save(cfg, out, d: Dist, step, epoch, pos, params, unet, text_encoder, lora, optimizer, lr_sched, scaler):
    rngs = [ckpt.rng_states()]
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if d.main:
        weights = export_weights(cfg, unet, text_encoder, lora)
        state = {"step": step, "epoch": epoch, "position": pos, "world": d.world,
                 "trainable": {k: p.detach().cpu().clone() for k, p in params.items()},
                 "optimizer": optimizer.state_dict(), "lr_schedule": lr_sched.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rngs}
        ckpt.save_checkpoint(out, step, weights, state, cfg.output.keep_last)
    _barrier(d)


def export_weights(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module, lora) -> dict:
    """The files a checkpoint holds: name -> state dict in the layout other tools load."""
    if cfg.train.modules == "motion_lora":
        return {"motion_lora.safetensors": lora.original_state()}
    motion = {k: v for k, v in unet.state_dict().items() if MOTION_TAG in f".{k}"}
    weights = {"motion_module.safetensors": motion_state_to_original(motion, max_len=unet.motion.max_position_len)}
    if cfg.train.modules == "all":
        weights["unet.safetensors"] = unet.state_dict()
        weights["text_encoder.safetensors"] = text_encoder.state_dict()
    return weights


def _save_base(out: Path, model_cfg: ModelConfig, unet, text_encoder, vae) -> None:
    base = out / "base"
    spatial = {k: v for k, v in unet.state_dict().items() if MOTION_TAG not in f".{k}"}
    save_state_dict(spatial, base / "unet.safetensors")
    save_state_dict(text_encoder.state_dict(), base / "text_encoder.safetensors")
    save_state_dict(vae.state_dict(), base / "vae.safetensors")
    atomic_write(base / "model_config.json", lambda p: Path(p).write_text(json.dumps(to_dict(model_cfg), indent=2)))


def _validate(cfg, out, step, tokenizer, text_encoder, vae, unet, noise_sched, device) -> None:
    if not cfg.validation.prompts:
        return
    from ..pipeline import Pipeline
    from ..video import save_video

    v = cfg.validation
    size = v.size or cfg.data.size
    was_training = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    try:
        pipe = Pipeline(tokenizer, text_encoder, vae, unet, DDIM(), device=device)
        video = pipe(list(v.prompts), num_frames=v.frames, height=size, width=size, steps=v.steps,
                     guidance_scale=v.guidance_scale, seed=v.seed, progress=False)
        save_video(video, out / "validation" / f"step_{step:08d}.gif", fps=v.fps)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])


def _resume_folder(cfg: TrainConfig, out: Path) -> Path | None:
    r = cfg.output.resume
    if r in ("", "none"):
        return None
    if r == "auto":
        found = ckpt.list_checkpoints(out)
        return found[-1] if found else None
    return Path(r)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: ``animatediff-lite train CONFIG [--section.key value ...]``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: animatediff-lite train CONFIG.toml [--section.key VALUE ...]")
        return {}
    config_path, overrides = (None, argv) if argv[0].startswith("--") else (argv[0], argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(config_path, overrides)
    return train(cfg)


__all__ = ["MotionLoRA", "ResumableSampler", "build_models", "build_preset", "export_weights", "main", "train"]
