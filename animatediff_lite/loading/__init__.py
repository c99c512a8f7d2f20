"""Checkpoint formats: one reader per file (:mod:`.checkpoint`), layout decisions (:mod:`.detect`), key maps
per part, the strict loader (:mod:`.io`) and ``load_pipeline``. Models never see files."""

from .checkpoint import Checkpoint, detect_layout, read_checkpoint
from .io import load_strict, read_state_dict, save_state_dict

__all__ = ["Checkpoint", "detect_layout", "load_strict", "read_checkpoint", "read_state_dict", "save_state_dict"]
