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

# (diffusers suffix, native suffix) after "motion_modules.{j}."; "{k}" is the transformer block index.
MOTION_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("norm.", "temporal_transformer.norm."),
    ("proj_in.", "temporal_transformer.proj_in."),
    ("proj_out.", "temporal_transformer.proj_out."),
    ("transformer_blocks.{k}.attn1.", "temporal_transformer.transformer_blocks.{k}.attention_blocks.0."),
    ("transformer_blocks.{k}.attn2.", "temporal_transformer.transformer_blocks.{k}.attention_blocks.1."),
    ("transformer_blocks.{k}.norm1.", "temporal_transformer.transformer_blocks.{k}.norms.0."),
    ("transformer_blocks.{k}.norm2.", "temporal_transformer.transformer_blocks.{k}.norms.1."),
    ("transformer_blocks.{k}.norm3.", "temporal_transformer.transformer_blocks.{k}.ff_norm."),
    ("transformer_blocks.{k}.ff.", "temporal_transformer.transformer_blocks.{k}.ff."),
)

# Position tables: diffusers has one per block, the original one per attention block (same values).
DIFFUSERS_PE = "transformer_blocks.{k}.pos_embed.pe"
NATIVE_PE = "temporal_transformer.transformer_blocks.{k}.attention_blocks.{n}.pos_encoder.pe"
NUM_ATTENTION_BLOCKS = 2

_MOTION_KEY = re.compile(r"^(.*?motion_modules\.\d+\.)(.*)$")


def _pattern(template: str, end: str = "") -> re.Pattern:
    """A prefix pattern (``end="$"``: a whole-name pattern) for a template whose "{k}"/"{n}" are integers."""
    escaped = re.escape(template).replace(r"\{k\}", r"(?P<k>\d+)").replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile("^" + escaped + end)


_FROM_DIFFUSERS = [(_pattern(d), n) for d, n in MOTION_SUFFIXES]
_TO_DIFFUSERS = [(_pattern(n), d) for d, n in MOTION_SUFFIXES]
_DIFFUSERS_PE = _pattern(DIFFUSERS_PE, "$")
_NATIVE_PE = _pattern(NATIVE_PE, "$")


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    """One motion key through a suffix table; non-motion keys and unmatched suffixes are returned unchanged."""
    m = _MOTION_KEY.match(key)
    for pattern, target in table if m else ():
        found = pattern.match(m.group(2))
        if found:
            return m.group(1) + target.format(**found.groupdict()) + m.group(2)[found.end():]
    return key


def motion_key_to_diffusers(key: str) -> str:
    """One native motion key -> diffusers name (non-motion keys unchanged); PE keys are not handled here."""
    return _rename(key, _TO_DIFFUSERS)


def motion_state_from_diffusers(state: Mapping[str, torch.Tensor],
                                keep_pe: bool = False) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter/UNetMotionModel motion state -> native (original AnimateDiff) names.

    ``pos_embed.pe`` buffers are dropped, or with ``keep_pe`` copied to each attention block's
    ``pos_encoder.pe`` as in the original files (useful to read the PE length). Other keys pass through.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _MOTION_KEY.match(key)
        pe = _DIFFUSERS_PE.match(m.group(2)) if m else None
        if pe:
            if keep_pe:
                for n in range(NUM_ATTENTION_BLOCKS):
                    out[m.group(1) + NATIVE_PE.format(k=pe["k"], n=n)] = value
            continue
        out[_rename(key, _FROM_DIFFUSERS)] = value
    return out


def motion_state_to_diffusers(native: Mapping[str, torch.Tensor],
                              max_seq_length: int | None = None) -> dict[str, torch.Tensor]:
    """Native motion state -> diffusers names.

    Position tables: ``pos_encoder.pe`` entries present in ``native`` become one ``pos_embed.pe`` per
    transformer block (that of attention block 0); when absent and ``max_seq_length`` is given, a table of
    that length is generated for every transformer block (diffusers stores them as persistent buffers).
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}  # "<prefix>transformer_blocks.k." -> a weight of that block
    for key, value in native.items():
        m = _MOTION_KEY.match(key)
        pe = _NATIVE_PE.match(m.group(2)) if m else None
        if pe:
            if pe["n"] == "0":
                out[m.group(1) + DIFFUSERS_PE.format(k=pe["k"])] = value
            continue
        new = _rename(key, _TO_DIFFUSERS)
        out[new] = value
        block = re.match(r"^(.*?motion_modules\.\d+\.transformer_blocks\.\d+\.)norm1\.weight$", new)
        if block:
            blocks[block.group(1)] = value
    if max_seq_length is not None:
        for prefix, weight in blocks.items():
            out.setdefault(prefix + "pos_embed.pe", sinusoidal_table(max_seq_length, weight.shape[0]))
    return out
