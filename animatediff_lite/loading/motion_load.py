"""Motion modules: read every published format, decide the generation (v1/v2/v3), load, export.

Formats read by :func:`read_motion_module`:

- original AnimateDiff ``.ckpt``/``.safetensors`` (``mm_sd_v14``, ``mm_sd_v15``, ``mm_sd_v15_v2``,
  ``v3_sd15_mm``, community fine-tunes): keys like ``down_blocks.0.motion_modules.0.temporal_transformer.*``,
  optionally wrapped in ``{"state_dict": ...}``, prefixed ``module.``, with or without the
  ``...attention_blocks.{n}.pos_encoder.pe`` (1, L, C) tables;
- diffusers ``MotionAdapter`` folders (``config.json`` + ``diffusion_pytorch_model.safetensors``) or single
  files in that key layout (``...motion_modules.0.transformer_blocks.0.attn1.to_q.weight``);
- our native safetensors (original layout without PE, the MotionConfig as JSON in the metadata).

Native keys are the original layout without ``pos_encoder.pe``: our model recomputes the sinusoid, so a
stored table is only used for its length (the generation) and checked to be the standard sinusoid.

Generation, in this order: an explicit ``version=``; a mid-block module -> v2; a stored PE length of 24
-> v1, 32 -> v3; the file name (mm_sd_v14/v15 -> v1, v2, v3); else v3. ``MotionInfo.reason`` says which.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import MOTION_VERSIONS, MotionConfig, to_dict
from ..errors import CheckpointError
from ..motion import sinusoidal_table
from .animatelcm import animatelcm_pe_len
from .checkpoint import Checkpoint, naming, read_checkpoint
from .detect import MOTION_LAYOUTS, NATIVE_MOTION_FORMAT
from .io import StateDict, WeightsFile, load_strict, save_state_dict
from .motion_map import motion_state_from_diffusers
from .unet_map import MOTION_TAG, split_motion

logger = logging.getLogger(__name__)

ORIGINAL_PE = "pos_encoder.pe"
DIFFUSERS_PE = "pos_embed.pe"
BASE_PARTS = ("diffusers_folder", "ldm_single_file", "diffusers_unet", "diffusers_vae", "clip_text_encoder")
PE_VERSION = {24: "v1", 32: "v3"}  # stored PE length -> generation, for files without a mid-block module
DEFAULT_VERSION = "v3"
_PROJ_IN = re.compile(r"^(?P<side>down_blocks|up_blocks|mid_block)(?:\.(?P<level>\d+))?\.motion_modules\.\d+\."
                      r"temporal_transformer\.proj_in\.weight$")


@dataclass(frozen=True)
class MotionInfo:
    """What a motion-module file holds and how its generation was decided.

    channels: width of each down level's modules (up levels mirror them, the mid module has the last).
    max_position_len: rows of the stored PE table, or the generation's default when none is stored.
    stored_pe_len: rows of the stored table (None when the file has none).
    layout: "original", "diffusers" or "native". dtype: the file's floating dtype, e.g. "float16".
    reason: a sentence saying how ``version`` was decided. num_heads: as stated by the file, None when
    it states none (original checkpoints; every published module uses 8).
    """

    path: str
    version: str
    max_position_len: int
    mid_block: bool
    channels: tuple[int, ...]
    num_parameters: int
    layout: str
    dtype: str
    reason: str
    stored_pe_len: int | None = None
    num_heads: int | None = None  # only when the file states it (diffusers config.json, native metadata)

    def motion_config(self, norm_num_groups: int = 32) -> MotionConfig:
        """The MotionConfig a UNet3D needs for this file (PE length as stored, heads as configured)."""
        base = MotionConfig.for_version(self.version, norm_num_groups=norm_num_groups)
        return replace(base, max_position_len=self.max_position_len, num_heads=self.num_heads or base.num_heads)

    def summary(self) -> str:
        """One line for logs and the CLI ``info`` command."""
        pe = f"PE {self.stored_pe_len} stored" if self.stored_pe_len else "no PE stored"
        return (f"{self.path}: motion module {self.version} ({self.layout} layout, {self.dtype}, "
                f"{self.num_parameters / 1e6:.1f}M parameters, channels {list(self.channels)}, "
                f"mid block {'yes' if self.mid_block else 'no'}, {pe}, max {self.max_position_len} frames); "
                f"{self.reason}")


# ----------------------------------------------------------------------------------------------- reading

def read_motion_module(source: str | os.PathLike | Checkpoint,
                       version: str | None = None) -> tuple[StateDict, MotionInfo]:
    """Read a motion module in any supported format once (or take a :class:`Checkpoint` already read)
    -> (native state without PE, MotionInfo).

    Raises CheckpointError naming the file for unreadable/truncated files, base SD checkpoints passed as
    motion modules, inconsistent widths, non-sinusoidal PE tables and a ``version`` contradicting the keys.
    """
    checkpoint = read_checkpoint(source, "a motion module")
    where = checkpoint.where
    if checkpoint.layout not in (*MOTION_LAYOUTS, "unknown"):  # unknown keys: parse_motion_state says what it missed
        base = "is a base Stable Diffusion checkpoint, it " if checkpoint.layout in BASE_PARTS else ""
        raise CheckpointError(f"{where}: {base}{checkpoint.looks}, not a motion module (expected *.motion_modules.* "
                              "keys: an original AnimateDiff .ckpt/.safetensors, a diffusers MotionAdapter or an "
                              "animatediff-lite motion module)")
    path = checkpoint.path
    named = path.parent if path.name.startswith("diffusion_pytorch_model") else path  # a MotionAdapter folder's file
    name = named.name if named.is_dir() else named.stem
    native_config = None
    if checkpoint.metadata.get("format") == NATIVE_MOTION_FORMAT:
        with naming(where, "native motion-module metadata without a valid motion_config"):
            native_config = json.loads(checkpoint.metadata.get("motion_config", ""))
    return parse_motion_state(checkpoint.state, name, version, where, checkpoint.config or None, native_config)


def split_pe(state: StateDict) -> tuple[StateDict, dict[str, torch.Tensor]]:
    """(``state`` without position tables, the tables), original or diffusers names."""
    tables = {k: v for k, v in state.items() if k.endswith((ORIGINAL_PE, DIFFUSERS_PE))}
    return {k: v for k, v in state.items() if k not in tables}, tables


def check_pe(tables: dict[str, torch.Tensor], where: str) -> int | None:
    """Length of the stored PE tables after checking they hold the standard sinusoid."""
    if not tables:
        return None
    lengths = {tuple(t.shape[:2]) for t in tables.values()}
    if len(lengths) != 1 or next(iter(lengths))[0] != 1 or any(t.dim() != 3 for t in tables.values()):
        raise CheckpointError(f"{where}: position tables of mixed or odd shapes {sorted(lengths)} "
                              "(expected (1, L, C) with one L)")
    length = next(iter(lengths))[1]
    for key, table in tables.items():
        if table.device.type == "meta":
            continue
        ref = sinusoidal_table(length, table.shape[2])
        tol = max(4 * torch.finfo(table.dtype).eps, 1e-5) if table.is_floating_point() else 0.0
        err = (table.float() - ref).abs().max().item()
        if err > tol:
            raise CheckpointError(f"{where}: stored position table {key} is not the standard sinusoid "
                                  f"(max difference {err:.3g} > {tol:.1g}); this model recomputes the sinusoid, "
                                  "so such a module cannot be reproduced")
    return length


def _structure(native: StateDict, where: str) -> tuple[tuple[int, ...], bool]:
    """(channels per down level, has mid module), checking that up levels mirror down levels."""
    found: dict[str, dict[int, set[int]]] = {"down_blocks": {}, "up_blocks": {}, "mid_block": {}}  # level -> widths
    for key, value in native.items():
        if m := _PROJ_IN.match(key):
            found[m["side"]].setdefault(int(m["level"] or 0), set()).add(value.shape[0])
    down, up, mid = found["down_blocks"], found["up_blocks"], found["mid_block"].get(0, set())
    if not down:
        raise CheckpointError(f"{where}: no down-block motion modules found "
                              "(expected down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight)")
    if sorted(down) != list(range(len(down))) or any(len(w) != 1 for w in down.values()):
        raise CheckpointError(f"{where}: down-block motion modules have gaps or mixed widths: "
                              f"{ {i: sorted(w) for i, w in sorted(down.items())} }")
    channels = tuple(next(iter(down[i])) for i in range(len(down)))
    up_channels = tuple(sorted(up[i])[0] if i in up and len(up[i]) == 1 else -1 for i in range(len(up)))
    if up_channels != channels[::-1]:
        raise CheckpointError(f"{where}: up-block motion module widths {list(up_channels)} do not mirror "
                              f"the down-block widths {list(channels)}")
    if mid and mid != {channels[-1]}:
        raise CheckpointError(f"{where}: mid-block motion module width {sorted(mid)} != last level {channels[-1]}")
    return channels, bool(mid)


def version_from_name(name: str) -> str | None:
    """Generation named by a file/folder name: mm_sd_v14/mm_sd_v15 -> v1, ``v2``/``v3`` tokens, hub
    folder names ...-v1-5-2 / -v1-5-3; None when the name says nothing."""
    s = name.lower()
    m = re.search(r"v1[-_.]?5[-_.]([23])(?![0-9])", s) or re.search(r"(?<![a-z0-9])v([123])(?![0-9])", s)
    if m:
        return "v" + m.group(1)
    return "v1" if re.search(r"(?<![a-z0-9])v1[-_.]?[45](?![0-9])", s) else None


def _decide(version: str | None, mid: bool, pe_len: int | None, name: str, native: dict,
            where: str, layout: str) -> tuple[str, str]:
    """(version, reason) following the documented order."""
    if version is not None:
        if version not in MOTION_VERSIONS:
            raise ValueError(f"version must be one of {sorted(MOTION_VERSIONS)} or None, got {version!r}")
        if mid != MOTION_VERSIONS[version]["mid_block"]:
            have = "has a" if mid else "has no"
            raise CheckpointError(f"{where}: version={version!r} was given but the file {have} mid-block motion "
                                  f"module (v2 has one, v1/v3 do not)")
        reason = f"version {version!r} given explicitly"
        default_len = MOTION_VERSIONS[version]["max_position_len"]
        if pe_len is not None and pe_len != default_len:
            reason += f" (the stored position table has {pe_len} rows, {version} uses {default_len})"
        return version, reason
    if native.get("version") in MOTION_VERSIONS:
        return native["version"], "stored in the file's animatediff-lite metadata"
    if mid:
        return "v2", "a mid-block motion module is present (only v2 has one)"
    by_name = version_from_name(name)
    if layout == "diffusers" and pe_len == 32 and by_name == "v1":
        # diffusers' converter builds every adapter with 32 positions: its "32" does not rule out v1.
        return "v1", (f"no mid-block module; the name {name!r} says v1 (a diffusers adapter's 32-row "
                      "table is not evidence)")
    if pe_len in PE_VERSION:
        v = PE_VERSION[pe_len]
        return v, f"no mid-block module and the stored position table has {pe_len} rows ({v})"
    seen = (f"the stored position table has {pe_len} rows (neither 24 = v1 nor 32 = v3)" if pe_len
            else "no position table is stored")
    if by_name in ("v1", "v3"):
        return by_name, f"no mid-block module, {seen}; the name {name!r} says {by_name}"
    note = f"; the name {name!r} says v2 but there is no mid-block module" if by_name == "v2" else ""
    return DEFAULT_VERSION, (f"no mid-block module, {seen}, and the name names no version{note}: assuming "
                             f"{DEFAULT_VERSION} (per-frame GroupNorm); pass version='v1' for a module "
                             "derived from mm_sd_v14/v15")


def parse_motion_state(state: StateDict, name: str = "", version: str | None = None, where: str = "<memory>",
                       adapter_config: dict | None = None,
                       native_config: dict | None = None) -> tuple[StateDict, MotionInfo]:
    """The format-independent half of :func:`read_motion_module`: tensors -> (native state, MotionInfo).

    name: the file/folder name used for version detection; where: named in errors; adapter_config: a
    MotionAdapter ``config.json``; native_config: the MotionConfig dict of a native file's metadata.
    Works on meta tensors (the sinusoid check is skipped for them).
    """
    spatial, motion = split_motion(state)
    if not motion:
        raise CheckpointError(f"{where}: no motion-module keys (expected e.g. down_blocks.0.motion_modules.0."
                              f"temporal_transformer.*; got e.g. {', '.join(list(state)[:3])})")
    if spatial:
        logger.info("%s: ignoring %d non-motion keys (a full UNet checkpoint?)", where, len(spatial))
    weights, tables = split_pe(motion)
    stored = check_pe(tables, where)
    original = any(".temporal_transformer." in k for k in weights)  # else diffusers names
    layout = ("native" if native_config is not None else "original") if original else "diffusers"
    native = weights if original else motion_state_from_diffusers(weights)
    channels, mid = _structure(native, where)
    adapter, ours = adapter_config or {}, native_config or {}
    stated = adapter.get("motion_num_attention_heads") or ours.get("num_heads")
    heads = int(stated) if stated else None  # original files do not store it (8 in every published module)
    if stored is None:
        stored = int(adapter.get("motion_max_seq_length") or ours.get("max_position_len") or 0) or None
    ver, reason = _decide(version, mid, stored, name, ours, where, layout)
    implied = None if stored else animatelcm_pe_len(name)  # AnimateLCM files store no table; theirs has 64 rows
    if implied:
        reason += f"; an AnimateLCM module by its name: {implied} positions"
    floats = Counter(str(v.dtype).replace("torch.", "") for v in native.values() if v.is_floating_point())
    return native, MotionInfo(
        path=where, version=ver, max_position_len=stored or implied or MOTION_VERSIONS[ver]["max_position_len"],
        mid_block=mid, channels=channels, num_parameters=sum(v.numel() for v in native.values()),
        layout=layout, dtype=floats.most_common(1)[0][0] if floats else "none", reason=reason,
        stored_pe_len=stored, num_heads=heads)


# ----------------------------------------------------------------------------------------------- loading

def load_motion_module(unet: torch.nn.Module, path: str | os.PathLike, version: str | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MotionInfo:
    """Fill every motion-module parameter of ``unet`` (a UNet3D) from ``path``, strictly.

    The UNet must have been built with the file's generation (``MotionConfig.for_version(info.version)``;
    see :func:`read_motion_module` or ``MotionInfo.motion_config``) and widths. Tensors go to ``device``/``dtype``,
    by default those of the spatial weights (``conv_in``). Returns the MotionInfo (``reason`` says how the
    version was decided). Raises CheckpointError naming the file on any mismatch.
    """
    _built_motion(unet)
    checkpoint = read_checkpoint(path, "a motion module")
    native, info = read_motion_module(checkpoint, version)
    return assign_motion_state(unet, native, info, device, dtype, checkpoint.file)


def assign_motion_state(unet: torch.nn.Module, native: StateDict, info: MotionInfo,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        file: WeightsFile | None = None) -> MotionInfo:
    """The second half of :func:`load_motion_module`, for a module already read with :func:`read_motion_module`
    (so a caller that needs ``info`` to build the UNet reads the file once). ``file``: the
    :class:`~animatediff_lite.loading.io.WeightsFile` the tensors came from (``Checkpoint.file``)."""
    built = _built_motion(unet)
    if info.version != built.version:
        raise CheckpointError(f"{info.path}: is a {info.version} motion module ({info.reason}) but the UNet was built "
                              f"for {built.version}; build it with MotionConfig.for_version({info.version!r}) "
                              "or pass version= to override the detection")
    widths = tuple(unet.config.block_out_channels)
    if info.channels != widths:
        raise CheckpointError(f"{info.path}: motion module channels {list(info.channels)} do not fit the base UNet's "
                              f"block_out_channels {list(widths)} (a motion module for another base model?)")
    if info.num_heads is not None and info.num_heads != built.num_heads:
        raise CheckpointError(f"{info.path}: the file's config says {info.num_heads} attention heads but the UNet's "
                              f"motion modules were built with {built.num_heads}")
    if info.stored_pe_len is not None and built.max_position_len > info.stored_pe_len:
        logger.warning("%s: UNet built for %d frames but the module was trained with a %d-row position table",
                       info.path, built.max_position_len, info.stored_pe_len)
    spatial = unet.conv_in.weight
    if spatial.device.type != "meta":  # by default the motion modules follow the spatial weights
        device, dtype = device or spatial.device, dtype or spatial.dtype
    expected = [k for k in unet.state_dict() if MOTION_TAG in k]
    load_strict(unet, native, info.path, f"the UNet's {built.version} motion modules", keys=expected, device=device,
                dtype=dtype, file=file)
    unet.reset_buffers()
    logger.info("%s", info.summary())
    return info


def _built_motion(unet: torch.nn.Module) -> MotionConfig:
    if getattr(unet, "motion", None) is None:
        raise ValueError("unet was built without motion modules (motion=None); build it with "
                         "MotionConfig.for_version(...) to load a motion module")
    return unet.motion


# ----------------------------------------------------------------------------------------------- export

def motion_state_to_original(native: StateDict, with_pe: bool = True, max_len: int = 32) -> StateDict:
    """Native motion state -> original AnimateDiff layout.

    With ``with_pe`` each attention block gets ``pos_encoder.pe`` (1, max_len, C) in its weights' dtype,
    as in the published checkpoints (24 rows for v1, 32 for v2/v3).
    """
    if with_pe and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tables = {key[: -len("to_q.weight")] + ORIGINAL_PE: sinusoidal_table(max_len, value.shape[0]).to(value.dtype)
              for key, value in native.items()
              if with_pe and key.endswith(".to_q.weight") and ".attention_blocks." in key}
    return {**native, **tables}


def save_motion_module(native: StateDict, path: str | os.PathLike, config: MotionConfig) -> None:
    """Write a native motion module: safetensors, original keys without PE, ``config`` in the metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"native motion modules are safetensors files, got {path.name!r}")
    meta = {"format": NATIVE_MOTION_FORMAT, "motion_config": json.dumps(to_dict(config))}
    save_state_dict(native, path, metadata=meta)


def save_motion_module_original(native: StateDict, path: str | os.PathLike, max_len: int = 32,
                                with_pe: bool = True) -> None:
    """Write the original AnimateDiff layout (``.ckpt`` as ``{"state_dict": ...}`` or ``.safetensors``)."""
    save_state_dict(motion_state_to_original(native, with_pe, max_len), path)
