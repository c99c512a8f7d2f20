"""Key map between diffusers motion-module names (MotionAdapter / UNetMotionModel) and ours.

Ours ("native") is the original AnimateDiff layout, e.g.
``down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight``;
diffusers drops ``temporal_transformer.`` and renames the inner modules, e.g.
``down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q.weight``. Prefixes before
``motion_modules.`` (``down_blocks.i.``, ``mid_block.``, ``up_blocks.i.``) are the same in both.

The sinusoidal tables are buffers: diffusers stores one per transformer block
(``transformer_blocks.k.pos_embed.pe``), the original one per attention block
(``attention_blocks.n.pos_encoder.pe``, optional in files); ours are not in ``state_dict``.
Keys outside motion modules pass through unchanged, so a strict load reports them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..motion import sinusoidal_table

# Inside a motion module (after "motion_modules.{j}."): native name parts -> diffusers', whole parts only. Native
# names also start with NATIVE_TOP, which diffusers drops; diffusers' motion names start with DIFFUSERS_TOP.
PART_NAMES: dict[str, str] = {"attention_blocks.0": "attn1", "attention_blocks.1": "attn2", "norms.0": "norm1",
                              "norms.1": "norm2", "ff_norm": "norm3"}
NATIVE_TOP = "temporal_transformer."
DIFFUSERS_TOP = ("norm.", "proj_in.", "proj_out.", "transformer_blocks.")
NUM_ATTENTION_BLOCKS = 2

_MOTION_KEY = re.compile(r"^(.*?motion_modules\.\d+\.)(.*)$")
# Position tables: diffusers has one per transformer block, the original one per attention block (same values).
_DIFFUSERS_PE = re.compile(r"^transformer_blocks\.(\d+)\.pos_embed\.pe$")
_BLOCK_NORM1 = re.compile(r"motion_modules\.\d+\.transformer_blocks\.\d+\.norm1\.weight$")  # diffusers names
_NATIVE_PE = re.compile(r"^temporal_transformer\.transformer_blocks\.(\d+)\.attention_blocks\.(\d+)\.pos_encoder\.pe$")


def _replace_parts(name: str, table: Mapping[str, str]) -> str:
    """``name`` with each dotted part sequence found in ``table`` replaced (whole parts only)."""
    name = f".{name}."
    for old, new in table.items():
        name = name.replace(f".{old}.", f".{new}.")
    return name[1:-1]


def motion_key_to_diffusers(key: str) -> str:
    """One native motion key -> diffusers name (other keys unchanged); PE keys are not handled here."""
    m = _MOTION_KEY.match(key)
    if m is None or not m[2].startswith(NATIVE_TOP):
        return key
    return m[1] + _replace_parts(m[2][len(NATIVE_TOP):], PART_NAMES)


def _key_from_diffusers(key: str) -> str:
    m = _MOTION_KEY.match(key)
    if m is None or not m[2].startswith(DIFFUSERS_TOP):
        return key
    return m[1] + NATIVE_TOP + _replace_parts(m[2], {theirs: ours for ours, theirs in PART_NAMES.items()})


def motion_state_from_diffusers(state: Mapping[str, torch.Tensor],
                                keep_pe: bool = False) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter/UNetMotionModel motion state -> native (original AnimateDiff) names.

    ``pos_embed.pe`` buffers are dropped, or with ``keep_pe`` copied to each attention block's
    ``pos_encoder.pe`` as in the original files (useful to read the PE length). Other keys pass through.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _MOTION_KEY.match(key)
        pe = _DIFFUSERS_PE.match(m[2]) if m else None
        if pe is None:
            out[_key_from_diffusers(key)] = value
        elif keep_pe:
            for n in range(NUM_ATTENTION_BLOCKS):
                out[f"{m[1]}{NATIVE_TOP}transformer_blocks.{pe[1]}.attention_blocks.{n}.pos_encoder.pe"] = value
    return out


def motion_state_to_diffusers(native: Mapping[str, torch.Tensor],
                              max_seq_length: int | None = None) -> dict[str, torch.Tensor]:
    """Native motion state -> diffusers names.

    Position tables: ``pos_encoder.pe`` entries present in ``native`` become one ``pos_embed.pe`` per
    transformer block (that of attention block 0); when absent and ``max_seq_length`` is given, a table of
    that length is generated for every transformer block (diffusers stores them as persistent buffers).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in native.items():
        m = _MOTION_KEY.match(key)
        pe = _NATIVE_PE.match(m[2]) if m else None
        if pe is None:
            out[motion_key_to_diffusers(key)] = value
        elif pe[2] == "0":
            out[f"{m[1]}transformer_blocks.{pe[1]}.pos_embed.pe"] = value
    if max_seq_length is not None:  # one table per transformer block, as wide as its norm1
        for key in [k for k in out if _BLOCK_NORM1.search(k)]:
            table = sinusoidal_table(max_seq_length, out[key].shape[0])
            out.setdefault(key[: -len("norm1.weight")] + "pos_embed.pe", table)
    return out
