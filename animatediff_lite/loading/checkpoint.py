"""The one entry that reads weights: each file read once, its layout decided once, with the reason.

:func:`read_checkpoint` takes what a user passes (a weights file, a diffusers model folder, a part folder such
as ``vae/`` or a MotionAdapter folder) and returns a :class:`Checkpoint`: the tensors (memory-mapped for
safetensors, see :mod:`.io`), the metadata, the config.json beside them, and for a model folder one
sub-checkpoint per part. Each part has one loader (``load_text_encoder``, ``load_vae``, ``read_unet_source``,
``read_motion_module``, ``read_default_model`` ...) taking a path or a Checkpoint already read (which
``read_checkpoint`` returns as it is), so a file given twice (base and DreamBooth) or needed by several
parts is still read once; key maps take state dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .detect import CONFIG_CLASSES, LAYOUTS, decide_layout, unknown_error
from .io import StateDict, WeightsFile, read_file

# Weight file names inside a diffusers / transformers model folder, in order of preference (every part).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")
PART_FOLDERS = ("unet", "vae", "text_encoder")


@dataclass
class Checkpoint:
    """A weights file or folder as read once.

    path: what was given; weights: the file the tensors came from (None for a model folder); layout: a key
    of :data:`~animatediff_lite.loading.detect.LAYOUTS` and reason: why; state: the tensors in the file's
    names (wrappers and ``module.`` removed; empty for a model folder); metadata: the safetensors header
    metadata; config: the config.json beside the weights ({} when none); parts: ``unet`` / ``vae`` /
    ``text_encoder`` sub-checkpoints of a model folder; tokenizer: the folder with vocab.json + merges.txt;
    file: the :class:`~animatediff_lite.loading.io.WeightsFile` behind ``state`` (pass it to ``load_strict``).
    """

    path: Path
    layout: str
    reason: str
    state: StateDict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    parts: dict[str, Checkpoint] = field(default_factory=dict)
    weights: Path | None = None
    tokenizer: Path | None = None
    file: WeightsFile | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The file to name in messages (the weights file itself for a folder part)."""
        return str(self.weights or self.path)

    @property
    def kind(self) -> str:
        """The layout in words."""
        return LAYOUTS[self.layout]

    @property
    def looks(self) -> str:
        """What the file holds and why it was judged so, for messages: "holds <kind> [<reason>]"."""
        return f"holds {self.kind} [{self.reason}]"

    def part(self, name: str, what: str) -> Checkpoint:
        """The sub-checkpoint ``name`` of a model folder, else this checkpoint itself."""
        if self.layout != "diffusers_folder" or self.weights is not None:
            return self
        if name not in self.parts:
            raise CheckpointError(f"{self.path / name}: no such folder in this diffusers model folder; expected "
                                  f"{what} there (config.json + one of {', '.join(WEIGHT_FILES)})")
        return self.parts[name]

    def require_weights(self, what: str) -> None:
        """CheckpointError naming the folder when it has a config.json but no weights file."""
        if self.weights is None:
            raise CheckpointError(f"{self.path}: no weights file, expected one of {', '.join(WEIGHT_FILES)} ({what})")


def read_checkpoint(path: str | os.PathLike | Checkpoint, what: str = "model weights") -> Checkpoint:
    """Read a weights file or folder once and decide its layout (see the module docstring).

    ``what`` names the expected content in error messages. A Checkpoint already read is returned as it is, so
    every part loader takes a path or a Checkpoint. Raises CheckpointError naming the file for a missing path,
    an unreadable or truncated file and content of no known layout.
    """
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, what)
    in_part = path.name.startswith(("diffusion_pytorch_model", "model.", "pytorch_model"))
    config = _config(path.parent / "config.json") if in_part else {}  # a part folder's config applies to its file
    return _from_file(path, path, config, what)  # a missing path is reported by the reader


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of a weights file or folder: a key of :data:`~animatediff_lite.loading.detect.LAYOUTS`.

    Raises CheckpointError naming the file when it is missing, unreadable or of no known layout.
    """
    checkpoint = read_checkpoint(path)
    if checkpoint.layout == "unknown":
        raise unknown_error(checkpoint.where, checkpoint.reason)
    return checkpoint.layout


@contextmanager
def naming(where: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a ValueError/TypeError raised inside (a bad config, shapes that fit no model) into a CheckpointError
    naming ``where``: "<where>: <what> (<error>)", or "<where>: <error>" without ``what``."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {what} ({e})" if what else f"{where}: {e}") from e


def _from_file(given: Path, weights: Path, config: dict, what: str, tokenizer: Path | None = None) -> Checkpoint:
    wf = read_file(weights, what)
    layout, reason = decide_layout(wf.state, wf.metadata, _class_name(config))
    return Checkpoint(given, layout, reason, wf.state, wf.metadata, config, weights=weights, tokenizer=tokenizer,
                      file=wf)


def _read_folder(path: Path, what: str) -> Checkpoint:
    markers = [path / "model_index.json", *(path / name / "config.json" for name in PART_FOLDERS)]
    found = [m for m in markers if m.is_file()]
    if found:
        parts = {name: _read_part(path / name, what) for name in PART_FOLDERS
                 if (path / name / "config.json").is_file() or _weights_in(path / name) is not None}
        reason = f"the folder has {found[0].relative_to(path)}"
        return Checkpoint(path, "diffusers_folder", reason, parts=parts, tokenizer=tokenizer_folder(path / "tokenizer"))
    if (path / "config.json").is_file():
        checkpoint = _read_part(path, what)
        checkpoint.require_weights(what)
        return checkpoint
    raise CheckpointError(f"{path}: a folder that is neither a diffusers model folder (model_index.json or "
                          "unet/config.json) nor a part or MotionAdapter folder (config.json + weights); "
                          f"expected {what}")


def _read_part(folder: Path, what: str) -> Checkpoint:
    """A part folder (``unet/``, ``vae/``, a MotionAdapter ...): config.json and its weights file if there is one."""
    config = _config(folder / "config.json")
    weights = _weights_in(folder)
    if weights is None:  # the loader checks the config first, then reports the missing weights
        name = _class_name(config)
        layout = CONFIG_CLASSES.get(name or "", "diffusers_folder")
        return Checkpoint(folder, layout, f"its config.json names {name}", config=config)
    return _from_file(folder, weights, config, what, tokenizer_folder(folder))


def tokenizer_folder(*folders: Path) -> Path | None:
    """The first of ``folders`` holding CLIP tokenizer files (vocab.json + merges.txt), else None."""
    return next((f for f in folders if (f / "vocab.json").is_file() and (f / "merges.txt").is_file()), None)


def _weights_in(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def _config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, expected a config object")
    return config


def _class_name(config: dict) -> str | None:
    name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    return name if isinstance(name, str) else None
