"""The models a training run builds (fp32, on its device) and what it trains (``train.modules``): presets, fresh
motion modules, MotionLoRA, the loss module DDP wraps, and the weight files a checkpoint exports.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import TextEncoder
from ..config import MOTION_VERSIONS, SD15, TINY, ModelConfig
from ..loading.default_model import DEFAULT_CONFIG
from ..loading.io import load_strict, read_state_dict
from ..loading.motion_load import load_motion_module, motion_state_to_original
from ..loading.pipeline_load import load_pipeline
from ..loading.unet_map import MOTION_TAG, split_motion
from ..motion import MotionModule
from ..tokenizer import Tokenizer
from ..unet import UNet3D
from ..vae import AutoencoderKL
from .config import TrainConfig

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build_preset(cfg: TrainConfig) -> tuple[object, nn.Module, nn.Module, nn.Module, ModelConfig]:
    """(tokenizer, text_encoder, vae, unet, model config) of a preset with seeded random init."""
    base = {"tiny": TINY, "sd15": SD15, "default": DEFAULT_CONFIG}[cfg.model.preset]
    model_cfg = replace(base, motion=replace(base.motion, **MOTION_VERSIONS[cfg.model.motion_version]))
    torch.manual_seed(cfg.model.init_seed)
    text_encoder = TextEncoder(model_cfg.clip)
    vae = AutoencoderKL(model_cfg.vae)
    unet = UNet3D(model_cfg.unet, model_cfg.motion)
    if cfg.model.vae:
        load_strict(vae, read_state_dict(cfg.model.vae, "a VAE"), cfg.model.vae,
                    f"the VAE of model.preset = {cfg.model.preset!r}")
    return Tokenizer(), text_encoder, vae, unet, model_cfg


def build_models(cfg: TrainConfig, device: torch.device):
    """Tokenizer, text encoder, VAE and UNet3D (motion module from the file, or fresh) on ``device``, fp32."""
    if cfg.model.preset:
        tokenizer, text_encoder, vae, unet, model_cfg = build_preset(cfg)
        if cfg.model.motion_module:
            load_motion_module(unet, cfg.model.motion_module)
    else:
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
        for name, module in unet.named_modules():  # (only motion modules have attention_blocks)
            if isinstance(module, nn.Linear) and ".attention_blocks." in name and name.endswith(LORA_TARGETS):
                self.names.append(name)
                self.down.append(nn.Parameter(torch.randn(rank, module.in_features) / rank))
                self.up.append(nn.Parameter(torch.zeros(module.out_features, rank)))
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

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """noisy, target (B, 4, F, h, w); t (B,); ids (B, 77); weight (B,) or None -> scalar MSE to the target
        (noise or velocity), each sample's MSE times its weight when given."""
        text = self.text_encoder(ids)  # (B, 77, D)
        pred = self.unet(noisy, t, text)
        if weight is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        # A mean, not sum(w * l) / sum(w): the batch's weights must not rescale it, so ranks stay equivalent.
        return (weight * per_sample).mean()


def select_trainable(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module,
                     vae: nn.Module) -> tuple[dict[str, nn.Parameter], Trainee]:
    """Freeze everything, then enable the trained part; returns (trainable params by name, the Trainee)."""
    mode = cfg.train.modules
    unet.requires_grad_(mode in ("unet", "all"))  # the whole UNet, motion modules included
    text_encoder.requires_grad_(mode == "all")
    vae.requires_grad_(False)
    if mode == "motion":
        for name, p in unet.named_parameters():
            p.requires_grad_(MOTION_TAG in f".{name}")
    lora = MotionLoRA(unet, cfg.train.lora_rank) if mode == "motion_lora" else None  # adapters on a frozen UNet
    trainee = Trainee(unet, text_encoder, lora)
    params = {k: p for k, p in trainee.named_parameters() if p.requires_grad}  # "unet.*", "text_encoder.*", "lora.*"
    if not params:
        raise ValueError(f"train.modules = {mode!r} selects no parameters (does the UNet have motion modules?)")
    return params, trainee


def export_weights(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module, lora) -> dict:
    """The files a checkpoint holds: name -> state dict (copies) in the layout other tools load.

    Always the trained part (``motion_module.safetensors`` in the original layout, or
    ``motion_lora.safetensors``); the whole UNet too for ``train.modules`` "unet"/"all", and the text encoder
    when it was trained ("all") or pretrained by the text stage.
    """
    copy = cpu_copy(unet.state_dict())
    if cfg.train.modules == "motion_lora":
        weights = {"motion_lora.safetensors": lora.original_state()}
    else:
        motion = split_motion(copy)[1]
        weights = {"motion_module.safetensors": motion_state_to_original(motion, max_len=unet.motion.max_position_len)}
    if cfg.train.modules in ("unet", "all"):
        weights["unet.safetensors"] = copy
    if cfg.train.modules == "all" or cfg.text_stage.steps > 0:
        weights["text_encoder.safetensors"] = cpu_copy(text_encoder.state_dict())
    return weights


def cpu_copy(tensors) -> dict[str, torch.Tensor]:
    """Detached CPU copies of named tensors (a state dict, trainable parameters, EMA averages)."""
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}
