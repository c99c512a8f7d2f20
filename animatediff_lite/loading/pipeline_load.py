"""``load_pipeline``: read every given file once, then compose the part loaders into a ready Pipeline.

Order: every file is read and checked first (motion module, base, DreamBooth, LoRAs), so an error names the
file at fault; then the base model (diffusers folder or LDM single file) with the motion module (original
or diffusers layout, version from its tensors), the DreamBooth single file (replaces the base weights it
holds, in place; the same file as the base is not read again) and the LoRAs and MotionLoRAs merged. The
scheduler is AnimateDiff's DDIM unless given: a base folder's ``scheduler/`` (PNDM, "scaled_linear" for
SD1.5) is deliberately not used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..control import ControlUnit
from ..errors import CheckpointError
from ..lora import apply_loras
from ..pipeline import Pipeline, check_device_dtype
from ..scheduler import DDIM, DDIMConfig
from ..threads import apply_threads
from ..unet import UNet3D
from .checkpoint import Checkpoint, read_checkpoint
from .clip_map import clip_state_from_ldm, load_text_encoder, load_tokenizer
from .controlnet_map import controlnet_from_checkpoint, read_controlnets
from .default_model import load_default_pipeline
from .detect import BASE_LAYOUTS
from .io import load_strict
from .motion_load import assign_motion_state, read_motion_module
from .sparsectrl_map import WHAT as SPARSECTRL_WHAT
from .sparsectrl_map import sparsectrl_from_checkpoint
from .unet_map import load_spatial, read_unet_source, unet_state_from_ldm
from .vae_map import load_vae, vae_state_from_ldm

LoraSpec = tuple[str | os.PathLike, float]
BASE_WHAT = "a Stable Diffusion 1.5 base model (a diffusers folder or an LDM .safetensors/.ckpt single file)"
DREAMBOOTH_WHAT = "a DreamBooth / personalised SD1.5 single file (LDM layout)"


def load_pipeline(base: str | os.PathLike | None = None, motion_module: str | os.PathLike | None = None,
                  dreambooth: str | os.PathLike | None = None, loras: Sequence[LoraSpec] = (),
                  motion_loras: Sequence[LoraSpec] = (), motion_module_version: str | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: DDIMConfig | None = None, backend: str | None = None,
                  compile: bool | str = False, threads: int | None = None, controlnets: Sequence[LoraSpec] = (),
                  sparsectrl: str | os.PathLike | None = None) -> Pipeline:
    """Build a text-to-video pipeline from weight files, each read once.

    base: a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) or
    an LDM single file (.safetensors / .ckpt) with UNet, VAE and text encoder (or a file in the embedded
    default model's format, taken alone). motion_module: an original AnimateDiff checkpoint
    (``mm_sd_v15_v2.ckpt`` ...) or a diffusers MotionAdapter (folder or file); its version (v1/v2/v3) is read
    from the tensors unless ``motion_module_version`` says. Without one the UNet denoises every frame
    independently (an image model). dreambooth: an LDM single file whose UNet / VAE / text-encoder weights
    (whichever it has) replace the base ones. loras / motion_loras: ``(path, scale)`` pairs merged into the
    weights (kohya LoRA and the v3 domain adapter / MotionLoRA), see :mod:`animatediff_lite.lora`.
    scheduler: DDIM settings, default AnimateDiff's (:class:`DDIMConfig`). With no weights at all it returns
    the embedded default model (:mod:`animatediff_lite.loading.default_model`).
    backend: kernel choice, resolved once ("auto" | "triton" | "torch"; None: ANIMATEDIFF_LITE_BACKEND, else
    "auto"), see :meth:`Pipeline.set_backend`. compile: True (or a torch.compile mode such as "reduce-overhead")
    compiles the UNet3D with fullgraph=True, see :meth:`Pipeline.compile`. threads: CPU threads for this
    process (None: 1 on the CPU unless OMP_NUM_THREADS is set, see :mod:`animatediff_lite.threads`).
    controlnets: ``(path, scale)`` pairs of SD1.5 ControlNets (diffusers folder/file or an original
    ``control_*.pth``/``.safetensors``), applied per frame with ``pipe(..., control_frames=[...])``.
    sparsectrl: an AnimateDiff v3 SparseCtrl file (``v3_sd15_sparsectrl_rgb.ckpt`` / ``..._scribble.ckpt``) or a
    diffusers SparseControlNetModel, steered by ``pipe(..., control_images={frame: image})``.
    Raises CheckpointError for unusable files, ValueError for bad arguments.
    """
    device, dtype = check_device_dtype(device, dtype)
    apply_threads(threads, device)
    # Read (and so check) every given file before judging how they combine: errors name the file at fault.
    motion = read_checkpoint(motion_module, "a motion module") if motion_module is not None else None
    base_ckpt = read_checkpoint(base, BASE_WHAT) if base is not None else None
    db = _read_again_or_reuse(dreambooth, base_ckpt, DREAMBOOTH_WHAT)
    lora_ckpts = [(read_checkpoint(path, "a LoRA"), scale) for path, scale in loras]
    control_ckpts = read_controlnets(controlnets, read_checkpoint)
    sparse_ckpt = read_checkpoint(sparsectrl, SPARSECTRL_WHAT) if sparsectrl is not None else None
    motion_lora_ckpts = [(read_checkpoint(path, "a MotionLoRA"), scale) for path, scale in motion_loras]
    others = [name for name, v in (("motion_module", motion_module), ("dreambooth", dreambooth), ("loras", loras),
                                   ("motion_loras", motion_loras), ("scheduler", scheduler),
                                   ("controlnets", controlnets), ("sparsectrl", sparsectrl)) if v]
    if base_ckpt is None or base_ckpt.layout == "default_model":
        if others:
            where = "without base=" if base_ckpt is None else f"with base={base_ckpt.where} (an embedded default model)"
            raise ValueError(f"{', '.join(others)} given {where}: the embedded default model takes no other "
                             "weights; pass base= a diffusers Stable Diffusion folder or an SD1.5 single file")
        return _finish(load_default_pipeline(device, dtype, base_ckpt), backend, compile)
    if base_ckpt.layout not in BASE_LAYOUTS:
        raise CheckpointError(f"{base_ckpt.where}: {base_ckpt.looks}; base must be {BASE_WHAT}")

    unet = _load_video_unet(base_ckpt, motion, motion_module_version, device, dtype)
    text_encoder = load_text_encoder(base_ckpt, device, dtype)
    vae = load_vae(base_ckpt, device, dtype)
    tokenizer = load_tokenizer(base_ckpt)
    if db is not None:
        replace_from_checkpoint(db, unet, vae, text_encoder, device, dtype)
    pipe = Pipeline(tokenizer, text_encoder, vae, unet, DDIM(scheduler or DDIMConfig()), device, dtype)
    apply_loras(pipe, lora_ckpts, motion_lora_ckpts)  # nothing to do without any
    pipe.controlnets = [ControlUnit(controlnet_from_checkpoint(c, unet.config, device, dtype), scale, c.where)
                        for c, scale in control_ckpts]
    if sparse_ckpt is not None:  # its scale is set per call
        model = sparsectrl_from_checkpoint(sparse_ckpt, unet.config, device, dtype)
        pipe.sparsectrl = ControlUnit(model, 1.0, sparse_ckpt.where)
    return _finish(pipe, backend, compile)


def _finish(pipe: Pipeline, backend: str | None, compile: bool | str) -> Pipeline:
    """The kernel backend (once, for the pipeline's device) and the optional compile, after every weight change."""
    pipe.set_backend(backend)
    return pipe.compile("default" if compile is True else compile) if compile else pipe


def _read_again_or_reuse(path: str | os.PathLike | None, base: Checkpoint | None, what: str) -> Checkpoint | None:
    """The checkpoint of ``path``; the base's own when it is the same file (read once)."""
    if path is None:
        return None
    if base is not None and base.weights is not None and Path(path).exists() and \
            os.path.samefile(path, base.weights):
        return base
    return read_checkpoint(path, what)


def replace_from_checkpoint(checkpoint: Checkpoint, unet: torch.nn.Module, vae: torch.nn.Module,
                            text_encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Overwrite the UNet (spatial layers), VAE and text-encoder weights present in an LDM single file.

    Every part the file has must fit its model exactly (CheckpointError naming the file and the keys
    otherwise); parts it lacks (many DreamBooth files carry no VAE) keep the base weights. Motion modules
    are never touched. Returns the names of the replaced parts.
    """
    where = checkpoint.where
    if checkpoint.layout != "ldm_single_file":
        raise CheckpointError(f"{where}: {checkpoint.looks}; dreambooth must be an LDM "
                              "single file (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)")
    state = checkpoint.state
    replaced = []
    if any(k.startswith("model.diffusion_model.") for k in state):
        load_spatial(unet, unet_state_from_ldm(state, unet.config, where), where, device, dtype, checkpoint.file)
        replaced.append("unet")
    for name, model, native in (("vae", vae, vae_state_from_ldm(state)),
                                ("text_encoder", text_encoder, clip_state_from_ldm(state))):
        if native is not None:
            load_strict(model, native, where, f"the base {name}", device=device, dtype=dtype,
                        file=checkpoint.file)
            replaced.append(name)
    if not replaced:
        raise CheckpointError(f"{where}: no UNet, VAE or text-encoder weights found ({DREAMBOOTH_WHAT})")
    return replaced


def _load_video_unet(base: Checkpoint, motion: Checkpoint | None, version: str | None,
                     device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base UNet's spatial weights plus the motion module, each loaded strictly.

    The UNet is built once on the meta device with the motion settings read from the motion file
    (generation, PE length, heads) and the base's GroupNorm groups.
    """
    native, info = read_motion_module(motion, version) if motion is not None else (None, None)  # info sizes the UNet
    spatial, config, where = read_unet_source(base)
    motion_config = info.motion_config(norm_num_groups=config.norm_num_groups) if info is not None else None
    with torch.device("meta"):
        unet = UNet3D(config, motion_config)
    load_spatial(unet, spatial, where, device, dtype, base.part("unet", BASE_WHAT).file)
    if info is not None:  # strict, with version/width checks
        assign_motion_state(unet, native, info, device, dtype, motion.file)
    unet.reset_buffers()  # position tables follow the weights' device
    return unet.eval()

