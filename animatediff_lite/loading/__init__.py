"""Checkpoint formats: safe reading, layout detection and key maps. Models never see files."""

from .io import atomic_write, load_strict, read_safetensors_metadata, read_state_dict, save_state_dict

__all__ = ["atomic_write", "load_strict", "read_safetensors_metadata", "read_state_dict", "save_state_dict"]
