"""The training loop, top to bottom: one process or torchrun (DDP), motion modules / MotionLoRA / UNet / whole model.

    animatediff-lite train run.toml --optim.lr 3e-4
    torchrun --nproc_per_node 4 -m animatediff_lite train run.toml

``train(cfg)`` is ``setup`` (models, optional text stage, data, optimiser, LR schedule, EMA, resume), then
``train_step`` per optimiser step and ``save`` every ``output.save_every`` steps.

Objective: MSE to the noise (``noise.prediction_type = "epsilon"``) or to the velocity ("v_prediction") on
VAE latents noised with the linear-beta DDPM schedule; timesteps uniform, or a share from the noisier half
(``noise.high_t_share``); captions replaced by "" with probability ``train.caption_dropout``. Everything a
step draws for a sample (VAE posterior noise, timestep, caption dropout, noise, time reversal) comes from
that sample's own seed (see ``train/data.py``), so N ranks with batch b train exactly like 1 rank with batch
N*b, and a resumed run continues bit for bit. Rank 0 logs (JSONL + progress bar), validates and saves; the
others wait at a barrier. With ``train.ema_decay`` the exported weight files hold the EMA of the weights
(the raw weights and the EMA are both in ``training_state.pt``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..config import ModelConfig, to_dict
from ..loading.io import save_state_dict
from ..loading.unet_map import split_motion
from ..pipeline import Pipeline
from ..scheduler import DDIM, DDIMConfig
from ..video import save_video
from . import checkpoint as ckpt
from .config import TrainConfig, load_config, to_json
from .data import ResumableSampler, build_dataset
from .models import MotionLoRA, build_models, build_preset, cpu_copy, export_weights, select_trainable
from .schedule import EMA, copy_named, lr_factor
from .text_stage import pretrain_text_encoder

log = logging.getLogger("animatediff_lite.train")
FILE_FORMAT = "animatediff-lite-train/1"


@dataclass
class Run:
    """What ``setup`` builds and each ``train_step`` advances (step, epoch, position in the epoch)."""

    cfg: TrainConfig
    world: int  # processes (torchrun ranks)
    device: torch.device
    main: bool  # rank 0: logs, validates, saves
    out: Path
    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    lora: MotionLoRA | None
    params: dict[str, nn.Parameter]
    model: nn.Module  # the Trainee, or DDP around it
    optimizer: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    noise_sched: DDIM
    ema: EMA | None
    dataset: object
    sampler: ResumableSampler
    model_cfg: ModelConfig | None  # a preset's sizes (with the measured latent scale), None for model.base
    amp_dtype: torch.dtype | None
    step: int = 0
    epoch: int = 0
    pos: int = 0  # micro-batches of this epoch consumed
    skipped: int = 0
    t0: float = field(default_factory=time.time)


# ----------------------------------------------------------------------------------------------- setup

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device); joins the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    # default: this process's GPU (torchrun sets LOCAL_RANK), else the CPU
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def setup(cfg: TrainConfig) -> Run:
    """Build everything a run needs, in order, and restore the latest checkpoint when resuming."""
    cfg.validate()
    rank, world, device = setup_distributed(cfg.train.device)
    main = rank == 0
    out = Path(cfg.output.dir)
    if main:  # (atomic_write makes the folder)
        atomic_write(out / "config.json", lambda p: Path(p).write_text(to_json(cfg)))
    # Seeds what setup draws (a fresh motion module, the LoRA's init); the steps draw from per-sample seeds only.
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision = 'fp16' needs a CUDA device (GradScaler); use 'bf16' or 'fp32' on CPU")
    amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.precision]
    resume = _resume_folder(cfg, out)
    state = ckpt.load_training_state(resume) if resume is not None else None

    tokenizer, text_encoder, vae, unet, model_cfg = build_models(cfg, device)
    # data.latent_std may set vae.config.scaling_factor
    dataset = build_dataset(cfg, vae, device, main, barrier=_barrier)
    if model_cfg is not None:
        model_cfg = replace(model_cfg, vae=vae.config)
    _text_stage(cfg, device, main, out, tokenizer, text_encoder, dataset, state)
    if main and model_cfg is not None:  # random-init preset: keep the frozen base so the result is usable
        _save_base(out, model_cfg, unet, text_encoder, vae)
    params, trainee = select_trainable(cfg, unet, text_encoder, vae)
    unet.gradient_checkpointing = cfg.train.gradient_checkpointing
    unet.train()
    text_encoder.train(cfg.train.modules == "all")
    vae.eval()

    sampler = ResumableSampler(dataset, world, rank, cfg.train.seed)
    if sampler.num_samples < cfg.train.batch_size:
        raise ValueError(f"{len(dataset)} clips over {world} ranks give {sampler.num_samples} per rank per epoch, "
                         f"fewer than train.batch_size={cfg.train.batch_size}")
    model = trainee.to(device)  # moves the LoRA (its parameters stay the same objects)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    o = cfg.optim
    optimizer = torch.optim.AdamW(list(params.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    factor = lr_factor(o.schedule, o.warmup_steps, o.decay_steps or cfg.train.max_steps, o.min_lr_ratio)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16")
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    run = Run(cfg, world, device, main, out, tokenizer, text_encoder, vae, unet, trainee.lora, params, model, optimizer,
              lr_sched, scaler, noise_schedule(cfg), ema, dataset, sampler, model_cfg, amp_dtype)
    if state is not None:
        _restore(run, state, resume)
    return run


def noise_schedule(cfg: TrainConfig) -> DDIM:
    """The DDPM noise schedule of ``[noise]`` (also what sampling the trained model must use)."""
    n = cfg.noise
    return DDIM(DDIMConfig(num_train_timesteps=n.num_train_timesteps, beta_start=n.beta_start, beta_end=n.beta_end,
                           beta_schedule=n.beta_schedule, prediction_type=n.prediction_type))


def _text_stage(cfg: TrainConfig, device: torch.device, main: bool, out: Path, tokenizer, text_encoder: nn.Module,
                dataset, state: dict | None) -> None:
    """Run the text stage, or take its frozen encoder from the checkpoint being resumed (which skips the stage)."""
    ts = cfg.text_stage
    if ts.steps > 0 and state is not None and "text_encoder" in state:
        text_encoder.load_state_dict(state["text_encoder"])  # copies onto the encoder's device
        text_encoder.requires_grad_(False)
    elif ts.steps > 0:
        records = pretrain_text_encoder(text_encoder, tokenizer, dataset.captions, ts.groups, ts.steps, ts.lr,
                                        ts.batch_size, seed=cfg.train.seed, device=device)
        if main:
            _append_log(out, records)
            log.info("text stage: %s", records[-1])


def _restore(run: Run, state: dict, folder: Path) -> None:
    copy_named(run.params, state["trainable"], f"{folder}: the checkpoint", "; was it made with another train.modules?")
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_sched.load_state_dict(state["lr_schedule"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state.get("ema", {}), str(folder))
    run.step, run.epoch, run.pos = state["step"], state["epoch"], state["position"]
    if run.main:
        log.info("resumed from %s at step %d", folder, run.step)


# ------------------------------------------------------------------------------------------------ loop

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run described by ``cfg``.

    Returns a summary: ``steps``, ``losses`` (all-reduced, one per step of this process's run), ``last`` (the
    last log record), ``output`` (the folder), the models (``unet``, ``text_encoder``, ``vae``, ``tokenizer``;
    raw weights) and ``ema`` (name -> averaged tensor, or None).
    """
    run = setup(cfg)
    pbar = tqdm(total=cfg.train.max_steps, initial=run.step, desc="train", dynamic_ncols=True, disable=not run.main)
    batches = micro_batches(run)
    losses, last = [], {}
    while run.step < cfg.train.max_steps:
        last = train_step(run, [next(batches) for _ in range(cfg.train.grad_accum)])
        losses.append(last["loss"])
        pbar.update(1)
        pbar.set_postfix(loss=f"{last['loss']:.4f}")
        if run.main and (run.step % cfg.output.log_every == 0 or run.step == cfg.train.max_steps):
            _append_log(run.out, [last])
        if run.step % cfg.output.save_every == 0 or run.step == cfg.train.max_steps:
            save(run)
        if cfg.validation.every and run.step % cfg.validation.every == 0 and run.main:
            validate(run)
    pbar.close()
    if run.lora is not None:
        run.lora.remove()
    _barrier()
    # The models come back too, so scripts (the default-model export, tests) can use them in-process.
    return {"steps": run.step, "losses": losses, "last": last, "output": str(run.out), "unet": run.unet,
            "text_encoder": run.text_encoder, "vae": run.vae, "tokenizer": run.tokenizer,
            "ema": run.ema.state_dict() if run.ema is not None else None}


def micro_batches(run: Run) -> Iterator[dict]:
    """This rank's batches, epoch after epoch, from the run's position on (``run.epoch``, ``run.pos``)."""
    bs = run.cfg.train.batch_size
    while True:
        run.sampler.set_epoch(run.epoch)
        run.dataset.set_epoch(run.epoch)
        run.sampler.start = run.pos * bs  # past the epoch's end (a resume there): no batches, the next epoch
        for batch in DataLoader(run.dataset, bs, sampler=run.sampler, drop_last=True,
                                num_workers=run.cfg.data.num_workers, pin_memory=run.device.type == "cuda"):
            run.pos += 1
            yield batch
        run.epoch, run.pos = run.epoch + 1, 0


def train_step(run: Run, batches: list[dict]) -> dict:
    """One optimiser step over ``batches`` (gradient accumulation); returns the step's log record."""
    cfg = run.cfg
    lr = run.optimizer.param_groups[0]["lr"]
    micro_losses = []
    for i, batch in enumerate(batches):
        latents, t, ids, noise = prepare(batch, run)
        run.skipped += int(batch["skipped"].sum())
        target = noise if cfg.noise.prediction_type == "epsilon" else run.noise_sched.velocity(latents, noise, t)
        cap = cfg.noise.loss_weight_cap  # > 0: truncated v-like weighting, errors at the noisiest steps count
        weight = (1 / run.noise_sched.alphas_cumprod.to(device=t.device)[t]).clamp(max=cap) if cap > 0 else None
        last_micro = i == len(batches) - 1  # DDP syncs the gradients once, on the last micro-batch
        with run.model.no_sync() if (run.world > 1 and not last_micro) else nullcontext():
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                loss = run.model(run.noise_sched.add_noise(latents, noise, t), t, ids, target, weight)
            run.scaler.scale(loss / len(batches)).backward()
        micro_losses.append(loss.detach())
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(run.params.values()), cfg.train.max_grad_norm or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_sched.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.params, run.step)

    stats = torch.stack([torch.stack(micro_losses).mean().float().cpu(), torch.tensor(float(run.skipped))])
    if run.world > 1:
        stats = stats.to(run.device)
        dist.all_reduce(stats)
        stats = stats.cpu() / torch.tensor([run.world, 1.0])
    samples = run.step * cfg.train.batch_size * cfg.train.grad_accum * run.world
    return {"step": run.step, "loss": float(stats[0]), "lr": lr, "grad_norm": float(grad_norm), "epoch": run.epoch,
            "skipped_videos": int(stats[1]), "samples": samples, "elapsed_s": round(time.time() - run.t0, 3)}


def prepare(batch: dict, run: Run):
    """Latents, timesteps, token ids (with caption dropout) and noise for a batch, each sample from its seed."""
    cfg, device = run.cfg, run.device
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["sample_seed"]]
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            video = batch["video"].to(device, non_blocking=True)
            latents = torch.cat([run.vae.encode(video[i:i + 1], generator=g) for i, g in enumerate(gens)]).float()
    n_t = cfg.noise.num_train_timesteps
    t = torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in gens])
    if cfg.noise.high_t_share > 0:  # (no draw otherwise: runs without it keep their random streams)
        high = torch.cat([torch.rand(1, generator=g) < cfg.noise.high_t_share for g in gens])
        t = torch.where(high, n_t // 2 + t // 2, t)  # the noisier half, uniformly
    drop = [bool(torch.rand((), generator=g) < cfg.train.caption_dropout) for g in gens]
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device)
    ids = run.tokenizer([("" if dropped else c) for c, dropped in zip(batch["caption"], drop, strict=True)])
    return latents, t.to(device), ids.to(device), noise


# ------------------------------------------------------------------------------------------------ save

def save(run: Run) -> None:
    """Checkpoint ``run.step``: exported weights (the EMA when kept) and the full training state, on rank 0."""
    # No global RNG state: nothing after setup draws from one (every draw of a step comes from its sample's seed).
    if run.main:
        state = {"step": run.step, "epoch": run.epoch, "position": run.pos, "world": run.world,
                 "trainable": cpu_copy(run.params), "optimizer": run.optimizer.state_dict(),
                 "lr_schedule": run.lr_sched.state_dict(), "scaler": run.scaler.state_dict()}
        if run.ema is not None:
            state["ema"] = run.ema.state_dict()
        if run.cfg.text_stage.steps > 0:  # frozen after the stage: a resume loads it instead of running the stage
            state["text_encoder"] = cpu_copy(run.text_encoder.state_dict())
        with _ema_weights(run):
            weights = export_weights(run.cfg, run.unet, run.text_encoder, run.lora)
        # Every exported file says what its weights predict, from which step, EMA or raw, and the configs.
        meta = {"format": FILE_FORMAT, "prediction_type": run.cfg.noise.prediction_type, "step": str(run.step),
                "weights": "ema" if run.ema is not None else "raw", "train_config": to_json(run.cfg)}
        if run.model_cfg is not None:
            meta["model_config"] = json.dumps(to_dict(run.model_cfg))
        ckpt.save_checkpoint(run.out, run.step, weights, state, run.cfg.output.keep_last, meta)
    _barrier()


def _ema_weights(run: Run):
    return run.ema.applied(run.params) if run.ema is not None else nullcontext()


def _save_base(out: Path, model_cfg: ModelConfig, unet, text_encoder, vae) -> None:
    base = out / "base"
    save_state_dict(split_motion(unet.state_dict())[0], base / "unet.safetensors")
    save_state_dict(text_encoder.state_dict(), base / "text_encoder.safetensors")
    save_state_dict(vae.state_dict(), base / "vae.safetensors")
    atomic_write(base / "model_config.json", lambda p: Path(p).write_text(json.dumps(to_dict(model_cfg), indent=2)))


def validate(run: Run) -> None:
    """Sample ``validation.prompts`` with the current (EMA) weights into ``validation/step_N.gif``."""
    v = run.cfg.validation
    if not v.prompts:
        return
    unet, text_encoder = run.unet, run.text_encoder
    modes = unet.training, text_encoder.training  # (an error here ends the run: no need to restore on raise)
    unet.eval()
    text_encoder.eval()
    with _ema_weights(run):
        pipe = Pipeline(run.tokenizer, text_encoder, run.vae, unet, noise_schedule(run.cfg), device=run.device)
        size = v.size or run.cfg.data.size
        video = pipe(list(v.prompts), num_frames=v.frames, height=size, width=size, steps=v.steps,
                     guidance_scale=v.guidance_scale, seed=v.seed, progress=False)
    unet.train(modes[0])
    text_encoder.train(modes[1])
    save_video(video, run.out / "validation" / f"step_{run.step:08d}.gif", fps=v.fps)


# ---------------------------------------------------------------------------------------------- helpers

def _append_log(out: Path, records: list[dict]) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _resume_folder(cfg: TrainConfig, out: Path) -> Path | None:
    r = cfg.output.resume
    if r == "auto":
        found = ckpt.list_checkpoints(out)
        return found[-1] if found else None
    return None if r in ("", "none") else Path(r)


def _barrier() -> None:
    if dist.is_initialized():  # (setup joins a process group only when there are several ranks)
        dist.barrier()


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: ``animatediff-lite train CONFIG [--section.key value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{__doc__}\nusage: animatediff-lite train CONFIG.toml [--section.key VALUE ...]")
        return {}
    config_path, overrides = (None, argv) if argv[0].startswith("--") else (argv[0], argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return train(load_config(config_path, overrides))


__all__ = ["MotionLoRA", "ResumableSampler", "Run", "build_models", "build_preset", "export_weights", "main",
           "noise_schedule", "save", "setup", "train", "train_step"]
