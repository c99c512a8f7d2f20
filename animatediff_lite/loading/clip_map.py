"""CLIP text encoder and tokenizer: config and key maps for diffusers folders and LDM single files.

Native keys are transformers' ``CLIPTextModel`` keys without ``text_model.`` (see ``clip.py``), so every
layout differs from native by a prefix only:

=========================================  =====================================================
layout                                     key prefix
=========================================  =====================================================
diffusers ``text_encoder/`` (transformers  ``text_model.`` (transformers < 5) or none (>= 5)
``CLIPTextModel.save_pretrained``)
LDM single file (SD1.5 ``.ckpt``)          ``cond_stage_model.transformer.text_model.``, or in some
                                           older files ``cond_stage_model.transformer.``
=========================================  =====================================================

``embeddings.position_ids`` (a persistent buffer in older transformers, so present in many files) is
dropped: positions are always 0..L-1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..clip import TextEncoder
from ..config import CLIPConfig
from ..errors import CheckpointError
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, naming, read_checkpoint, tokenizer_folder
from .io import StateDict, load_strict

DIFFUSERS_PREFIXES = ("text_model.",)
LDM_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
LDM_OUT_PREFIX = "cond_stage_model.transformer.text_model."
POSITION_IDS = "embeddings.position_ids"
TOKEN_EMBEDDING = "embeddings.token_embedding.weight"
# The CLIP convention (OpenAI and OpenCLIP text towers): 64 channels per attention head.
HEAD_DIM = 64

# transformers' CLIPTextConfig defaults, for the fields a config.json leaves out, and its names that differ from ours.
TRANSFORMERS_DEFAULTS = CLIPConfig(hidden_size=512, intermediate_size=2048, num_heads=8)
TRANSFORMERS_NAMES: dict[str, str] = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
WHAT = "a CLIP text encoder"


def clip_config_from_transformers(cfg: Mapping) -> CLIPConfig:
    """CLIPConfig from a transformers ``text_encoder/config.json`` dict (a full CLIP config's ``text_config`` too)."""
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = cfg["text_config"]
    return CLIPConfig(**{f.name: cfg.get(TRANSFORMERS_NAMES.get(f.name, f.name), getattr(TRANSFORMERS_DEFAULTS, f.name))
                         for f in dataclasses.fields(CLIPConfig)})


def clip_config_from_state(state: Mapping[str, torch.Tensor], hidden_act: str = "quick_gelu") -> CLIPConfig:
    """CLIPConfig inferred from native tensor shapes.

    Widths, depth, vocabulary and context length come from the tensors. The head count is not stored in
    the weights: it follows the CLIP convention of 64-wide heads (``hidden_size // 64``; 12 for SD1.5's
    768), and a width that is not a multiple of 64 raises ValueError (pass an explicit config instead).
    ``hidden_act`` cannot be seen in the weights either; SD1.5 uses quick_gelu. ``layer_norm_eps`` is 1e-5.
    """
    try:
        vocab_size, hidden = state["embeddings.token_embedding.weight"].shape
        max_positions = state["embeddings.position_embedding.weight"].shape[0]
        intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"state: no {e.args[0]} tensor, so this is not {WHAT}") from None
    if hidden % HEAD_DIM:
        raise ValueError(f"state: hidden size {hidden} is not a multiple of {HEAD_DIM}, so the number of attention "
                         "heads cannot be inferred; pass the text encoder config explicitly")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    return CLIPConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_layers=max(layers) + 1, num_heads=hidden // HEAD_DIM,
                      max_position_embeddings=max_positions, hidden_act=hidden_act)


def _strip(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], only_prefixed: bool) -> StateDict:
    """Remove the first matching prefix of each key and the dropped keys; keep unprefixed keys unless only_prefixed."""
    out: StateDict = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None if only_prefixed else "")  # None: dropped
        if prefix is not None and key[len(prefix):] != POSITION_IDS:
            out[key[len(prefix):]] = value
    return out


def clip_state_from_diffusers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers/diffusers ``text_encoder`` state (with or without ``text_model.``) -> native state."""
    return _strip(state, DIFFUSERS_PREFIXES, only_prefixed=False)


def clip_state_from_ldm(state: Mapping[str, torch.Tensor]) -> StateDict | None:
    """The text encoder part of an LDM single-file state -> native state; None when the file has none."""
    return _strip(state, LDM_PREFIXES, only_prefixed=True) or None


def clip_state_to_ldm(native: Mapping[str, torch.Tensor], position_ids: bool = True) -> StateDict:
    """Native state -> SD1.5 LDM keys (``cond_stage_model.transformer.text_model.*``).

    With ``position_ids`` the int64 (1, L) ``embeddings.position_ids`` buffer is written too, as in the
    original SD1.5 checkpoints, for readers that load it strictly.
    """
    out = {LDM_OUT_PREFIX + k: v for k, v in native.items()}
    if position_ids:
        length = native["embeddings.position_embedding.weight"].shape[0]
        out[LDM_OUT_PREFIX + POSITION_IDS] = torch.arange(length, dtype=torch.long)[None]
    return out


def load_text_encoder(source: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, config: CLIPConfig | None = None) -> TextEncoder:
    """Build the text encoder on the meta device and load it strictly, reading ``source`` once.

    ``source``: a diffusers model folder or its ``text_encoder/`` (sizes from its config.json), an LDM single
    file or a bare transformers weights file (sizes inferred from the tensors, see
    :func:`clip_config_from_state`; ``config`` overrides both, e.g. for models narrower than 64 channels), or
    a :class:`Checkpoint` already read. Returns the model in eval mode on ``device`` with ``dtype``.
    """
    part = read_checkpoint(source, WHAT).part("text_encoder", WHAT)
    where = part.where
    if part.config and config is None:
        with naming(part.path / "config.json", "not a readable CLIP text config"):
            config = clip_config_from_transformers(part.config)
    part.require_weights(WHAT)
    ldm = part.layout == "ldm_single_file"  # else a text_encoder/ folder or a bare transformers weights file
    state = (clip_state_from_ldm(part.state) if ldm else clip_state_from_diffusers(part.state)) or {}
    if not part.config and TOKEN_EMBEDDING not in state:
        raise CheckpointError(f"{where}: no text encoder in this file, it {part.looks} (expected keys "
                              f"{LDM_PREFIXES[0]}* or {LDM_PREFIXES[1]}*, the SD1.5 CLIP layout)")
    if config is None:
        with naming(where):
            config = clip_config_from_state(state)
    with naming(where, "unusable text encoder config"), torch.device("meta"):
        model = TextEncoder(config).to(dtype)
    return load_strict(model, state, where, WHAT, device=device, file=part.file).eval()  # every tensor on device


def load_tokenizer(source: str | os.PathLike | Checkpoint | None = None) -> Tokenizer:
    """The tokenizer of a diffusers folder (``tokenizer/vocab.json`` + ``merges.txt``) or of a Checkpoint
    already read, else the shipped CLIP one. For a path only the tokenizer files are looked at (no weights)."""
    folder = source.tokenizer if isinstance(source, Checkpoint) else None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = tokenizer_folder(Path(source) / "tokenizer", Path(source))
    if folder is None:
        return Tokenizer()
    try:
        return Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable CLIP tokenizer files ({e})") from e
