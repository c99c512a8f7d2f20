"""Training checkpoints: one folder per saved step, written atomically, the last K kept.

``{out}/checkpoints/step_00000500/`` holds the exported weight files (``train.models.export_weights``) and
``training_state.pt`` (trainable tensors, optimiser, LR schedule, grad scaler, EMA, step, data position) for
an exact resume: no global RNG state, since every draw of a step comes from its sample's seed. The folder is
filled under a temporary name and renamed when complete, so a resume never picks up a half-written one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..loading.io import save_state_dict


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``out_dir``, oldest first."""
    found = (Path(out_dir) / "checkpoints").glob("step_" + "[0-9]" * 8)  # zero-padded: name order is step order
    return sorted(p for p in found if (p / "training_state.pt").is_file())


def save_checkpoint(out_dir: str | os.PathLike, step: int, weights: Mapping[str, Mapping[str, torch.Tensor]],
                    training_state: dict, keep_last: int, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``weights`` (file name -> state dict, with safetensors ``metadata``) and ``training_state`` as
    checkpoint ``step``, copy each weights file to ``out_dir`` itself (the latest result, replaced atomically),
    keep the newest ``keep_last`` checkpoint folders; returns the checkpoint folder.
    """
    final = Path(out_dir) / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    for name, state in weights.items():
        save_state_dict(state, tmp / name, metadata)
    atomic_write(tmp / "training_state.pt", lambda p: torch.save(training_state, p))
    shutil.rmtree(final, ignore_errors=True)  # a rerun of this step
    os.replace(tmp, final)
    for name in weights:
        atomic_write(Path(out_dir) / name, lambda p, src=final / name: shutil.copyfile(src, p))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(folder: str | os.PathLike) -> dict:
    """The ``training_state.pt`` of a checkpoint folder (tensors and plain Python values only)."""
    path = Path(folder) / "training_state.pt"
    if not path.is_file():
        raise ValueError(f"{folder}: not a checkpoint folder (no training_state.pt)")
    return torch.load(path, map_location="cpu", weights_only=True)
