"""The embedded default model: a tiny text-to-video model of the AnimateDiff architecture, shipped in the package.

It has every part of the real thing (the real CLIP tokenizer, a CLIP text encoder, an AutoencoderKL, a UNet3D
with v2-style motion modules, DDIM sampling, v-prediction) at toy sizes, trained from scratch by
``examples/train_tiny_default.py`` on the procedural clips of :mod:`animatediff_lite.toy.synthetic` (coloured
circles, squares and triangles moving, growing, shrinking or rotating on grey backgrounds). It knows the
words of those captions and makes 32x32, 8-frame clips; see ``docs/default_model.md``.

File format (``assets/default_model.safetensors``): native state-dict keys of the three parts behind the
prefixes ``text_encoder.``, ``vae.`` and ``unet.`` (motion modules included), stored as float16; the
safetensors metadata holds ``config`` (JSON of :class:`~animatediff_lite.config.ModelConfig`), ``sample``
(JSON of the sampling defaults), optionally ``scheduler`` (JSON of the
:class:`~animatediff_lite.scheduler.DDIMConfig` fields that differ from AnimateDiff's DDIM, e.g. the
prediction type) and ``recipe`` / ``training`` (how the file was made).

    from animatediff_lite.loading.default_model import load_default_pipeline
    pipe = load_default_pipeline()
    video = pipe("a blue square moving right", **pipe.sample_defaults)   # (1, 8, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..clip import TextEncoder
from ..config import CLIPConfig, ModelConfig, MotionConfig, UNetConfig, VAEConfig, from_dict, to_dict
from ..errors import CheckpointError
from ..pipeline import Pipeline, check_device_dtype
from ..scheduler import DDIM, DDIMConfig
from ..tokenizer import Tokenizer
from ..unet import UNet3D
from ..vae import AutoencoderKL
from .checkpoint import Checkpoint, naming, read_checkpoint
from .detect import DEFAULT_MODEL_FORMAT
from .io import load_strict, save_state_dict

FORMAT = DEFAULT_MODEL_FORMAT
WHAT = "the embedded default model (text_encoder./vae./unet. tensors + config metadata)"
PARTS = ("text_encoder", "vae", "unet")
ASSET = "default_model.safetensors"

# Sizes of the default model. The VAE has three levels (4x downsampling: 32x32 frames -> 8x8 latents);
# its scaling_factor here is a placeholder, the trained value (1 / std of the latents) is in the file.
DEFAULT_CONFIG = ModelConfig(
    clip=CLIPConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0),
    unet=UNetConfig(
        block_out_channels=(32, 64),
        down_cross_attention=(True, True),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    motion=MotionConfig(version="v2", num_heads=4, max_position_len=32, mid_block=True, norm_num_groups=8),
)

# What the model was trained for; load_pipeline()/generate() should use these when the caller gives none.
DEFAULT_SAMPLE: dict[str, float | int] = {"num_frames": 8, "height": 32, "width": 32, "steps": 20,
                                          "guidance_scale": 4.0}


def default_weights_path() -> Path:
    """Path of the shipped weights file inside the installed package."""
    return Path(str(resources.files("animatediff_lite").joinpath("assets").joinpath(ASSET)))


def save_default_model(path: str | os.PathLike, text_encoder: nn.Module, vae: nn.Module, unet: nn.Module,
                       config: ModelConfig, sample: Mapping | None = None, extra: Mapping[str, str] | None = None,
                       dtype: torch.dtype = torch.float16, scheduler: DDIMConfig | None = None) -> None:
    """Write the three parts as one safetensors file in the default-model format (atomically).

    ``config`` must be the config the parts were built from; ``sample`` the sampling defaults (default
    :data:`DEFAULT_SAMPLE`); ``scheduler`` the DDIM settings the UNet was trained for (default AnimateDiff's);
    ``extra`` more metadata strings (the recipe command, a training summary).
    """
    state = {f"{prefix}.{key}": value.detach().to(dtype)
             for prefix, module in zip(PARTS, (text_encoder, vae, unet), strict=True)
             for key, value in module.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(to_dict(config)),
                "sample": json.dumps(dict(sample or DEFAULT_SAMPLE)), **dict(extra or {})}
    default = to_dict(DDIMConfig())
    changed = {k: v for k, v in to_dict(scheduler or DDIMConfig()).items() if v != default[k]}
    if changed:
        metadata["scheduler"] = json.dumps(changed)
    save_state_dict(state, path, metadata)


def read_default_model(path: str | os.PathLike | Checkpoint | None = None) -> tuple[
        dict[str, dict[str, torch.Tensor]], ModelConfig, dict[str, str]]:
    """Read a default-model file once (the shipped one when ``path`` is None; a Checkpoint already read is
    taken as it is): ({part: native state dict}, model config, raw metadata).

    Raises CheckpointError naming the file when it is missing, unreadable or not in this format.
    """
    checkpoint = read_checkpoint(default_weights_path() if path is None else path, WHAT)
    where, metadata = checkpoint.where, checkpoint.metadata
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{where}: holds {checkpoint.kind} (metadata format {metadata.get('format')!r}), "
                              f"expected {FORMAT!r} with a 'config' entry ({WHAT})")
    with naming(where, "the 'config' metadata is not a model config"):
        config = from_dict(ModelConfig, json.loads(metadata["config"]))
    stray = next((key for key in checkpoint.state if key.partition(".")[0] not in PARTS), None)
    if stray is not None:
        raise CheckpointError(f"{where}: unexpected key {stray!r}; keys must start with one of {PARTS} ({WHAT})")
    parts = {p: {k[len(p) + 1:]: v for k, v in checkpoint.state.items() if k.startswith(p + ".")} for p in PARTS}
    return parts, config, metadata


def sample_defaults(metadata: Mapping[str, str] | None = None) -> dict[str, float | int]:
    """Sampling defaults (num_frames, height, width, steps, guidance_scale) of a file's metadata."""
    return {**DEFAULT_SAMPLE, **json.loads((metadata or {}).get("sample", "{}"))}


def scheduler_config(metadata: Mapping[str, str] | None = None) -> DDIMConfig:
    """The DDIM settings of a file's metadata: AnimateDiff's, with the fields its ``scheduler`` entry changes."""
    fields = json.loads((metadata or {}).get("scheduler", "{}"))
    known = {f.name for f in dataclasses.fields(DDIMConfig)}
    if not isinstance(fields, dict) or not set(fields) <= known:
        raise CheckpointError(f"the 'scheduler' metadata must be a JSON object with keys among {sorted(known)}, "
                              f"got {metadata['scheduler']!r}")
    return DDIMConfig(**fields)


def load_default_parts(path: str | os.PathLike | Checkpoint | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """(tokenizer, text_encoder, vae, unet, config, metadata) of the default model (``path`` as in
    :func:`read_default_model`), in eval mode.

    Each part is built on the meta device from the file's config and loaded strictly (CheckpointError
    naming the file and the keys otherwise), then moved to ``device`` / ``dtype``.
    """
    checkpoint = read_checkpoint(default_weights_path() if path is None else path, WHAT)
    parts, config, metadata = read_default_model(checkpoint)
    with torch.device("meta"):
        modules = {"text_encoder": TextEncoder(config.clip), "vae": AutoencoderKL(config.vae),
                   "unet": UNet3D(config.unet, config.motion)}
    for name, module in modules.items():
        # fp16 on disk: restored in fp32 (the parameters' dtype), then cast once below.
        load_strict(module, parts[name], checkpoint.where, f"the default {name}", file=checkpoint.file)
    modules["unet"].reset_buffers()  # the motion modules' position tables, still on the meta device
    for module in modules.values():
        module.to(device=device, dtype=dtype).eval()
    return Tokenizer(), modules["text_encoder"], modules["vae"], modules["unet"], config, metadata


def load_default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          path: str | os.PathLike | Checkpoint | None = None) -> Pipeline:
    """The embedded default model (or the default-model file ``path``, see :func:`read_default_model`) as a
    ready :class:`~animatediff_lite.pipeline.Pipeline`.

    The scheduler is AnimateDiff's DDIM with the settings the file's ``scheduler`` metadata changes (if any).
    ``pipe.sample_defaults`` holds the sizes it was trained for (8 frames of 32x32); pass them to
    ``pipe(...)`` (``pipe(prompt, **pipe.sample_defaults)``) unless you want something else.
    """
    device, dtype = check_device_dtype(device, dtype)
    tokenizer, text_encoder, vae, unet, _, metadata = load_default_parts(path, device, dtype)
    pipe = Pipeline(tokenizer, text_encoder, vae, unet, DDIM(scheduler_config(metadata)), device=device, dtype=dtype)
    pipe.sample_defaults = sample_defaults(metadata)
    pipe.trained_for = {k: int(pipe.sample_defaults[k]) for k in ("num_frames", "height", "width")}  # its clips
    return pipe
