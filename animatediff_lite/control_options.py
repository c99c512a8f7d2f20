"""The ``generate`` CLI flags for ControlNet (and SparseCtrl), and their parsing.

Kept apart from cli.py so that file only adds the flags (``add_arguments``) and passes on what
``load_options`` (for ``load_pipeline``) and ``call_options`` (for ``pipe(...)``) return.
"""

from __future__ import annotations

import argparse


def _path_scale(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale), scale 1.0 when no number follows the last colon."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def add_arguments(g: argparse.ArgumentParser) -> None:
    """Add the ControlNet flags to the ``generate`` parser."""
    g.add_argument("--controlnet", action="append", default=[], type=_path_scale, metavar="FILE[:SCALE]",
                   help="SD1.5 ControlNet (diffusers folder or original control_*.pth/.safetensors) applied per "
                        "frame with its scale (default 1.0); repeatable, each with one --control-video")
    g.add_argument("--control-video", action="append", default=[], metavar="FILE",
                   help="condition frames for the matching --controlnet (GIF/MP4/WebP or PNG folder; as many frames "
                        "as --frames and the video's size: pose/depth/edge images made beforehand)")
    g.add_argument("--control-start", action="append", default=[], type=float, metavar="FRACTION",
                   help="share of the schedule before a ControlNet acts (one for all, or one per --controlnet)")
    g.add_argument("--control-end", action="append", default=[], type=float, metavar="FRACTION",
                   help="share of the schedule after which a ControlNet stops (one for all, or one per --controlnet)")


def load_options(args: argparse.Namespace) -> dict:
    """``load_pipeline`` keyword arguments of the control flags (empty when none is given)."""
    return {"controlnets": args.controlnet} if args.controlnet else {}


def call_options(args: argparse.Namespace) -> dict:
    """``pipe(...)`` keyword arguments of the control flags; ValueError naming the flag for a bad combination."""
    n = len(args.controlnet)
    if len(args.control_video) != n:
        raise ValueError(f"--control-video: {len(args.control_video)} given for {n} --controlnet; give one "
                         "condition video per ControlNet, in the same order")
    options: dict = {}
    if n:
        options["control_frames"] = list(args.control_video)
    for flag, values, key in (("--control-start", args.control_start, "control_start"),
                              ("--control-end", args.control_end, "control_end")):
        if values and not n:
            raise ValueError(f"{flag} needs --controlnet")
        if values and len(values) not in (1, n):
            raise ValueError(f"{flag}: {len(values)} given for {n} --controlnet; give one for all or one each")
        if values:
            options[key] = values * n if len(values) == 1 else list(values)
    return options
