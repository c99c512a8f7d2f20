"""``load_pipeline``: compose the part loaders into a ready :class:`~animatediff_lite.pipeline.Pipeline`.

Order: base model (diffusers folder or LDM single file) -> motion module (original or diffusers
layout, version from its tensors) -> DreamBooth single file (replaces the base weights it holds, in
place) -> LoRAs and MotionLoRAs merged. The scheduler is AnimateDiff's DDIM unless given: a base
folder's ``scheduler/`` (PNDM, "scaled_linear" for SD1.5) is deliberately not used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..pipeline import Pipeline, check_device_dtype
from ..scheduler import DDIM, DDIMConfig
from ..threads import apply_threads
from .clip_map import clip_state_from_ldm, load_text_encoder, load_tokenizer
from .detect import LAYOUTS, detect_layout
from .io import read_state_dict
from .motion_load import assign_motion_state, read_motion_module
from .unet_map import MOTION_TAG, assign_strict, read_unet_source, unet_state_from_ldm
from .vae_map import load_vae, vae_state_from_ldm

BASE_LAYOUTS = ("diffusers_folder", "ldm_single_file")
LoraSpec = tuple[str | os.PathLike, float]


def load_pipeline(base: str | os.PathLike | None = None, motion_module: str | os.PathLike | None = None,
                  dreambooth: str | os.PathLike | None = None, loras: Sequence[LoraSpec] = (),
                  motion_loras: Sequence[LoraSpec] = (), motion_module_version: str | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: DDIMConfig | None = None, threads: int | None = None) -> Pipeline:
    """Build a text-to-video pipeline from weight files.

    base: a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) or
    an LDM single file (.safetensors / .ckpt) with UNet, VAE and text encoder. motion_module: an original
    AnimateDiff checkpoint (``mm_sd_v15_v2.ckpt`` ...) or a diffusers MotionAdapter (folder or file); its
    version (v1/v2/v3) is read from the tensors unless ``motion_module_version`` says. Without one the
    UNet denoises every frame independently (an image model). dreambooth: an LDM single file whose UNet /
    VAE / text-encoder weights (whichever it has) replace the base ones. loras / motion_loras: ``(path,
    scale)`` pairs merged into the weights (kohya LoRA and the v3 domain adapter / MotionLoRA), see
    :mod:`animatediff_lite.lora`. scheduler: DDIM settings, default AnimateDiff's (:class:`DDIMConfig`).
    With no weights at all it returns the embedded default model (:mod:`animatediff_lite.default_model`).
    threads: CPU threads for this process (None: 1 on the CPU unless OMP_NUM_THREADS is set, see
    :mod:`animatediff_lite.threads`).
    Raises CheckpointError for unusable files, ValueError for bad arguments.
    """
    device, dtype = check_device_dtype(device, dtype)
    apply_threads(threads, device)
    if base is None:
        given = [name for name, v in (("motion_module", motion_module), ("dreambooth", dreambooth), ("loras", loras),
                                      ("motion_loras", motion_loras), ("scheduler", scheduler)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} given without base=: the embedded default model takes no other "
                             "weights; pass base= a diffusers Stable Diffusion folder or an SD1.5 single file")
        from ..default_model import load_default_pipeline

        return load_default_pipeline(device, dtype)
    layout = detect_layout(base)
    if layout not in BASE_LAYOUTS:
        raise CheckpointError(f"{base}: holds {LAYOUTS[layout]}; base must be a diffusers Stable Diffusion folder "
                              "or an SD1.5 single file")

    unet = _load_video_unet(base, motion_module, motion_module_version, device, dtype)
    text_encoder = load_text_encoder(base, device, dtype)
    vae = load_vae(base, device, dtype)
    tokenizer = load_tokenizer(base if Path(base).is_dir() else None)

    if dreambooth is not None:
        replace_from_single_file(dreambooth, unet, vae, text_encoder, device, dtype)
    pipe = Pipeline(tokenizer, text_encoder, vae, unet, DDIM(scheduler or DDIMConfig()), device, dtype)
    if loras or motion_loras:
        from ..lora import apply_loras

        apply_loras(pipe, loras, motion_loras)
    return pipe


def replace_from_single_file(path: str | os.PathLike, unet: torch.nn.Module, vae: torch.nn.Module,
                             text_encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Overwrite the UNet (spatial layers), VAE and text-encoder weights present in an LDM single file.

    Every part the file has must fit its model exactly (CheckpointError naming the file and the keys
    otherwise); parts it lacks (many DreamBooth files carry no VAE) keep the base weights. Motion modules
    are never touched. Returns the names of the replaced parts.
    """
    what = "a DreamBooth / personalised SD1.5 single file"
    layout = detect_layout(path)
    if layout != "ldm_single_file":
        raise CheckpointError(f"{path}: holds {LAYOUTS[layout]}; dreambooth must be an LDM single file "
                              "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)")
    state = read_state_dict(path, what)
    replaced = []
    if any(k.startswith("model.diffusion_model.") for k in state):
        spatial = unet_state_from_ldm(state, unet.config, str(path))
        expected = [k for k in unet.state_dict() if MOTION_TAG not in k]
        assign_strict(unet, spatial, expected, path, "the base UNet (spatial layers)", device, dtype)
        replaced.append("unet")
    for name, model, native in (("vae", vae, vae_state_from_ldm(state)),
                                ("text_encoder", text_encoder, clip_state_from_ldm(state))):
        if native is not None:
            assign_strict(model, native, model.state_dict().keys(), path, f"the base {name}", device, dtype)
            replaced.append(name)
    if not replaced:
        raise CheckpointError(f"{path}: no UNet, VAE or text-encoder weights found ({what})")
    return replaced


def _load_video_unet(base: str | os.PathLike, motion_module: str | os.PathLike | None, version: str | None,
                     device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base UNet's spatial weights plus the motion module, each loaded strictly.

    The UNet is built once on the meta device with the motion settings read from the motion file
    (generation, PE length, heads) and the base's GroupNorm groups.
    """
    from ..unet import UNet3D  # models are imported lazily: loading only needs them here

    native, info, motion_config = None, None, None
    if motion_module is not None:
        native, info = read_motion_module(motion_module, version)  # read once: info sizes the UNet
    spatial, config, where = read_unet_source(base)
    if info is not None:
        motion_config = info.motion_config(norm_num_groups=config.norm_num_groups)
    with torch.device("meta"):
        unet = UNet3D(config, motion_config)
    expected = [k for k in unet.state_dict() if MOTION_TAG not in k]
    assign_strict(unet, spatial, expected, where, "the base UNet (spatial layers)", device, dtype)
    if info is not None:
        assign_motion_state(unet, native, info, device, dtype)  # strict, with version/width checks
    unet.reset_buffers()  # position tables follow the weights' device
    return unet.eval()
