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


def _frame_image(text: str) -> tuple[int, str]:
    """``FRAME:FILE`` -> (frame, path)."""
    frame, sep, path = text.partition(":")
    try:
        if not sep or not path:
            raise ValueError
        return int(frame), path
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FRAME:FILE (e.g. 0:first.png), got {text!r}") from None


def add_arguments(g: argparse.ArgumentParser) -> None:
    """Add the ControlNet and SparseCtrl flags to the ``generate`` parser."""
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
    g.add_argument("--sparsectrl", metavar="FILE", help="AnimateDiff v3 SparseCtrl (v3_sd15_sparsectrl_rgb.ckpt or "
                   "..._scribble.ckpt, or a diffusers SparseControlNetModel) steered by --control-image key frames")
    g.add_argument("--control-image", action="append", default=[], type=_frame_image, metavar="FRAME:FILE",
                   help="SparseCtrl key frame: the image (the video's size) for frame FRAME (repeatable)")
    g.add_argument("--control-scale", type=float, help="SparseCtrl residual scale (default 1.0)")


def load_options(args: argparse.Namespace) -> dict:
    """``load_pipeline`` keyword arguments of the control flags (empty when none is given)."""
    options: dict = {"controlnets": args.controlnet} if args.controlnet else {}
    if args.sparsectrl:
        options["sparsectrl"] = args.sparsectrl
    return options


def call_options(args: argparse.Namespace, preset=None) -> dict:
    """``pipe(...)`` keyword arguments of the control flags; ValueError naming the flag for a bad combination.

    preset: the --preset's :class:`~animatediff_lite.presets.Preset`, if any: a v3 SparseCtrl preset's file and
    key frames count as --sparsectrl and --control-image (flags given win over them)."""
    preset_sparse = preset is not None and preset.sparsectrl is not None
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
    if (args.control_image or args.control_scale is not None) and not (args.sparsectrl or preset_sparse):
        raise ValueError("--control-image/--control-scale need --sparsectrl FILE (or a SparseCtrl --preset)")
    if args.sparsectrl and not (args.control_image or preset_sparse):
        raise ValueError("--sparsectrl needs at least one --control-image FRAME:FILE key frame")
    if args.control_image:
        options["control_images"] = dict(args.control_image)
    if args.control_scale is not None:
        options["control_scale"] = args.control_scale
    return options
