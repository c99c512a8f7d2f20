"""Reading weight files once, memory-mapped, and the one strict loader.

``read_file`` opens a file once: a safetensors file is parsed from its header and memory-mapped, so
tensors are read only when used; a pickle is unpickled once with ``torch.load(weights_only=True)``
from the open file, so a file cannot run code on load. The tensors stay
views of the file until :func:`load_strict` copies them into a model and hands their pages back.
Every failure is a :class:`CheckpointError` naming the file and what was expected.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
# Wrappers that training frameworks put around the tensors.
WRAPPER_KEYS = ("state_dict", "model", "module", "controlnet")  # "controlnet": original SparseCtrl files
MAX_HEADER = 100_000_000  # bytes; a larger safetensors header means a corrupt or foreign file
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# A file that is not a checkpoint, by its first bytes: (offset, bytes, what it is, whether torch's load error is
# worth quoting: for its own formats yes, for text, images and videos it is noise).
FILE_MAGIC: tuple[tuple[int, bytes, str, bool], ...] = (
    (0, b"PK\x03\x04", "a zip archive (torch's checkpoint format)", True),
    (0, b"\x80", "a Python pickle", True),
    (0, b"GIF8", "a GIF image", False),
    (0, b"\x89PNG", "a PNG image", False),
    (0, b"\xff\xd8\xff", "a JPEG image", False),
    (4, b"ftyp", "an MP4/MOV video", False),
    (0, b"\x1a\x45\xdf\xa3", "a WebM/MKV video", False),
    (0, b"{", "JSON text", False),
    (0, b"[", "JSON text", False),
)
_MADV_DONTNEED = 4  # Linux; pages of a private file mapping that were not written are dropped, re-read on access
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # madvise


@dataclass
class WeightsFile:
    """The tensors of one file as read once: ``state`` (wrappers and a ``module.`` prefix removed), the
    safetensors ``metadata`` ({} for pickles) and the address ranges of the file mapping behind the tensors."""

    path: Path
    state: StateDict
    metadata: dict[str, str] = field(default_factory=dict)
    mapped: list[tuple[int, int]] = field(default_factory=list)  # (start, end) addresses backed by the file

    def owns(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is a view of this file's mapping (so a model must get a copy)."""
        start = tensor.data_ptr()
        return tensor.numel() > 0 and any(a <= start < b for a, b in self.mapped)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back the memory pages of ``tensor`` if it is a view of this file (after it was copied).

        The mapping is private and never written, so the pages are dropped and re-read from the file if
        touched again: peak memory stays near the model's own size while a large file is loaded.
        """
        if _LIBC is not None and self.owns(tensor):
            start = tensor.data_ptr()
            lo = start - start % mmap.PAGESIZE
            hi = -(-(start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE) * mmap.PAGESIZE
            _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def read_file(path: str | os.PathLike, what: str = "weights") -> WeightsFile:
    """Read a ``.safetensors`` or pickle checkpoint once (see the module docstring).

    ``what`` names the expected content in error messages ("a motion module", "a LoRA", ...).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected {what})")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a single file with {what}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: file is empty (expected {what})")
        head = f.read(9)
        safetensors = path.suffix.lower() in SAFETENSORS_SUFFIXES or _is_safetensors_head(head)
        weights = _read_safetensors(path, f, size, what) if safetensors else _read_pickle(path, f, head, what)
    weights.state = unwrap_state_dict(weights.state, path, what)
    return weights


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> StateDict:
    """Every tensor of a ``.safetensors`` or pickle checkpoint file, in memory on the CPU (file read once).

    Unwraps ``{"state_dict": ...}``-style wrappers and a ``module.`` prefix (DDP).
    """
    weights = read_file(path, what)
    out = {}
    for key, value in weights.state.items():
        out[key] = value.clone() if weights.mapped else value  # own memory: the file may change later
        weights.release(value)
    return out


def _is_safetensors_head(head: bytes) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length and then '{'.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < MAX_HEADER


def _header(f, size: int) -> tuple[dict, int]:
    """(the JSON header, the offset where tensor data starts) of an open safetensors file."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


def _read_safetensors(path: Path, f, size: int, what: str) -> WeightsFile:
    try:
        header, body = _header(f, size)
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        # A private writable mapping: tensors are views that read the file on first touch; writes (none
        # are made while loading) would stay in this process.
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        state = {key: _tensor(buffer, key, spec, body, size) for key, spec in header.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated? ({e}); expected {what}") from e
    start = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()
    return WeightsFile(path, state, metadata, [(start, start + size)])


def _tensor(buffer: mmap.mmap, key: str, spec: Mapping, body: int, size: int) -> torch.Tensor:
    """One tensor of a safetensors header, checked against the file's size, as a view of ``buffer``."""
    if spec.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r} has unsupported dtype {spec.get('dtype')!r}")
    dtype, shape, (begin, end) = SAFETENSORS_DTYPES[spec["dtype"]], spec["shape"], spec["data_offsets"]
    if not 0 <= begin <= end <= size - body:
        raise ValueError(f"tensor {key!r} lies outside the file (bytes {begin}..{end} of {size - body})")
    if end - begin != math.prod(int(s) for s in shape) * dtype.itemsize:
        raise ValueError(f"tensor {key!r}: {end - begin} bytes for shape {shape} {spec['dtype']}")
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=body + begin).view(shape)


def _read_pickle(path: Path, f, head: bytes, what: str) -> WeightsFile:
    # From the already-open file: one open, one read (torch's mmap=True would need the path and open it again).
    f.seek(0)
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here: UnpicklingError, RuntimeError, EOFError...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "it holds Python objects other than tensors, refused for safety (weights_only load)"
        looks, quote = _looks(head)
        detail = f" (torch.load: {msg})" if quote else ""
        raise CheckpointError(f"{path}: looks like {looks}, not a readable weights file{detail}; "
                              f"expected {what}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors ({what})")
    return WeightsFile(path, dict(obj))


def _looks(head: bytes) -> tuple[str, bool]:
    """(what a file that torch cannot load looks like by its first bytes, whether torch's error may say why)."""
    for offset, magic, what, quote in FILE_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what, quote
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format", True
    return "a text file", False


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
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str,
                keys: Iterable[str] | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, file: WeightsFile | None = None) -> torch.nn.Module:
    """Assign ``state`` to ``module`` (which may live on the meta device), every key accounted for.

    keys: the module's parameters/buffers to fill (default all of its ``state_dict``); the others are left
    as they are, so a UNet's spatial layers and its motion modules can be filled by separate strict loads.
    Floating tensors become ``dtype`` (default: each parameter's dtype), all go to ``device`` (default:
    where they are). ``file``: the :class:`WeightsFile` the tensors came from; its memory-mapped tensors
    are copied into the model and their pages handed back one by one (others are assigned without a copy
    when dtype and device already match). Raises CheckpointError naming ``path`` and the missing or
    unexpected keys and shape mismatches. Non-persistent buffers are left alone.
    """
    current = module.state_dict(keep_vars=True)
    expected = set(current if keys is None else keys)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(current[k].shape)}"
           for k in sorted(expected & set(state)) if state[k].shape != current[k].shape]
    if missing or unexpected or bad:
        parts = [f"{len(items)} {label} (e.g. {few(items)})" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)) if items]
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(parts))
    cast = {}
    for k in sorted(expected):
        t = state[k]
        target = (dtype or current[k].dtype) if t.is_floating_point() else current[k].dtype
        mapped = file is not None and file.owns(t)
        cast[k] = t.to(device=device or t.device, dtype=target, copy=mapped)
        if mapped:
            file.release(t)
    module.load_state_dict(cast, strict=False, assign=True)
    return module


def few(items: list[str], n: int = 3) -> str:
    """The first ``n`` of ``items`` for a message, then ", ..." when there are more."""
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
