"""Safe reading and atomic writing of weight files, and strict loading into modules.

Pickled checkpoints are read with ``torch.load(weights_only=True)``, so a file cannot run code on load.
Every failure is a :class:`CheckpointError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Wrappers that training frameworks put around the tensors.
WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> StateDict:
    """Read every tensor of a ``.safetensors`` or pickle checkpoint file onto the CPU.

    Unwraps ``{"state_dict": ...}``-style wrappers and a ``module.`` prefix (DDP). ``what`` names the
    expected content in error messages ("a motion module", "a LoRA", ...).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected {what})")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a single file with {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (expected {what})")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated? ({e}); expected {what}") from e
    else:
        state = _read_pickle(path, what)
    return unwrap_state_dict(state, path, what)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors file ({} when absent)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return dict(header.get("__metadata__") or {})


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length and then '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_pickle(path: Path, what: str) -> Mapping:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises many kinds here: UnpicklingError, RuntimeError, EOFError...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "it holds Python objects other than tensors, refused for safety (weights_only load)"
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {msg}; expected {what}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors ({what})")
    return obj


def unwrap_state_dict(obj: Mapping, path: str | os.PathLike = "<memory>", what: str = "weights") -> StateDict:
    """Peel wrapper dicts (``state_dict``, ``model``, ``module``), drop non-tensors and ``module.``."""
    for _ in range(3):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: contains no tensors; expected {what}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically: safetensors for ``.safetensors``, a weights-only pickle otherwise."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": tensors}, tmp))


# --dtype choices of the converter scripts: "keep" leaves tensors as stored.
CAST_DTYPES: dict[str, torch.dtype | None] = {"keep": None, "fp32": torch.float32, "fp16": torch.float16,
                                              "bf16": torch.bfloat16}


def cast_floating(state: Mapping[str, torch.Tensor], dtype: str | torch.dtype | None) -> StateDict:
    """Cast the floating-point tensors of ``state`` (a name of :data:`CAST_DTYPES` or a dtype; None keeps all)."""
    dtype = CAST_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                what: str) -> torch.nn.Module:
    """Assign ``state`` to ``module`` (which may live on the meta device), every key accounted for.

    Tensors are cast to each parameter's dtype. Raises CheckpointError naming missing or unexpected
    keys and shape mismatches. Non-persistent buffers are left alone.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {_few(unexpected)})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches (e.g. {_few(bad_shapes)})")
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(parts))
    cast = {k: state[k].to(expected[k].dtype) for k in expected}
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
