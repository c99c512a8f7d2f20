"""The verified-kernel table (kernels/verified.toml): where each Triton kernel passed the GPU suite.

``backend="auto"`` runs a kernel only on a (kernel, compute capability, Triton major.minor, dtype) listed here,
only at shapes at or above the measured thresholds (``[[threshold]]``: below them PyTorch was faster on that
device) and not at the shapes where the kernel lost to PyTorch's best (``[[slower]]``). The table is data written
by a tool, never by hand: ``benchmarks/write_verified.py`` (called by ``benchmarks/gpu_check.sh``) derives the
``[[verified]]`` rows from the junit XML of a green GPU run and the other rows from the kernel benchmarks' JSON.

Pure data (no torch, no triton) so the CPU tests cover it and the writer runs anywhere.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE_PATH = Path(__file__).with_name("verified.toml")
KERNELS = ("attention", "temporal_attention", "group_norm", "geglu")
DTYPE_NAMES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Verified:
    """One row: ``kernel`` passed the GPU suite on ``capability`` ("9.0") with Triton ``triton`` ("3.6")."""

    kernel: str
    capability: str
    triton: str
    dtypes: tuple[str, ...]
    date: str
    source: str


@dataclass(frozen=True)
class Threshold:
    """Below ``min_pixels`` (H*W of the input) PyTorch was faster for ``kernel``/``variant`` on that device."""

    kernel: str
    variant: str
    capability: str
    dtype: str
    min_pixels: int
    source: str


@dataclass(frozen=True)
class Slower:
    """At ``shape`` ("Lq x Lk x D" for attention, "F x C" for temporal attention) ``kernel`` was slower than the
    best PyTorch path on that device: "auto" takes PyTorch there."""

    kernel: str
    capability: str
    dtype: str
    shape: str
    source: str


@dataclass(frozen=True)
class Table:
    verified: tuple[Verified, ...] = ()
    thresholds: tuple[Threshold, ...] = ()
    slower: tuple[Slower, ...] = ()


# The TOML array of tables holding each kind of row, in the order of Table's fields.
ROW_KINDS = (("verified", Verified), ("threshold", Threshold), ("slower", Slower))


def major_minor(version: str) -> str:
    """'3.6.0+git1234' -> '3.6' (a table row holds for every patch release of one Triton minor)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"triton version {version!r} is not 'major.minor[...]'")
    return f"{m.group(1)}.{m.group(2)}"


def capability_str(capability: tuple[int, int] | str) -> str:
    """(9, 0) or '9.0' -> '9.0'."""
    if isinstance(capability, str):
        if not re.fullmatch(r"\d+\.\d+", capability):
            raise ValueError(f"capability {capability!r} is not 'major.minor' (e.g. '9.0')")
        return capability
    return f"{capability[0]}.{capability[1]}"


# How a field read from TOML is normalised (fields not listed are taken as they are).
_READ = {"capability": capability_str, "triton": major_minor, "dtypes": tuple, "date": str, "min_pixels": int,
         "shape": str}


def _row(cls: type, kind: str, i: int, values: dict, source: str):
    names = [f.name for f in fields(cls)]
    try:
        row = cls(*(_READ.get(name, lambda v: v)(values[name]) for name in names))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: [[{kind}]] row {i} lacks or mistypes {e}; expected {', '.join(names)}") from e
    if row.kernel not in KERNELS:
        raise ValueError(f"{source}: [[{kind}]] row {i}: unknown kernel {row.kernel!r}, expected one of {KERNELS}")
    bad = [d for d in getattr(row, "dtypes", None) or (row.dtype,) if d not in DTYPE_NAMES]
    if bad:
        raise ValueError(f"{source}: [[{kind}]] row {i}: unknown dtypes {bad}, expected names from {DTYPE_NAMES}")
    return row


def parse_table(text: str, source: str = "verified.toml") -> Table:
    """Parse the TOML text of a table; ValueError naming ``source`` and the bad row otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from e
    return Table(*(tuple(_row(cls, kind, i, values, source) for i, values in enumerate(data.get(kind, [])))
                   for kind, cls in ROW_KINDS))


def load_table(path: str | os.PathLike = TABLE_PATH) -> Table:
    """Read a table file (the committed one by default); a missing file is an empty table."""
    path = Path(path)
    if not path.exists():
        return Table()
    return parse_table(path.read_text(), str(path))
