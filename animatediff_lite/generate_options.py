"""The ``generate`` CLI flags for prompt travel, FreeInit and video-to-video, and their parsing.

Kept apart from cli.py so that file only adds the flags (``add_arguments``) and passes on what
``pipeline_options`` returns.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .checks import default_context_overlap


def add_arguments(g: argparse.ArgumentParser) -> None:
    """Add the context-window, prompt-travel, FreeInit and video-to-video flags to the ``generate`` parser."""
    g.add_argument("--context-frames", type=int, help="sliding-window length over frames (for long videos)")
    g.add_argument("--context-overlap", type=int, help="frames shared by neighbouring windows (default: 4, at most "
                   "half of --context-frames)")
    g.add_argument("--prompt-at", nargs=2, action="append", default=[], metavar=("FRAME", "PROMPT"),
                   help="prompt travel: the prompt from frame FRAME on, interpolated between key frames "
                        "(repeatable; a positional prompt is frame 0's unless --prompt-at 0 is given)")
    g.add_argument("--prompt-map", metavar="FILE",
                   help="prompt travel from a TOML or JSON file: frame = \"prompt\" entries, optionally a "
                        "'negative' string or table of frame = \"prompt\"")
    g.add_argument("--free-init", type=int, metavar="ITERS",
                   help="FreeInit: sample ITERS rounds, each restarting from the last one's low frequencies "
                        "(costs ITERS x the sampling time; 3 is usual)")
    g.add_argument("--free-init-method", default="butterworth",
                   help="FreeInit low-pass filter: butterworth, gaussian, ideal or box (checked by FreeInit)")
    g.add_argument("--free-init-order", type=float, default=4, help="Butterworth order (default 4)")
    g.add_argument("--free-init-stop", type=_stops, default=(0.25, 0.25), metavar="SPATIAL[:TEMPORAL]",
                   help="normalised stop frequencies in [0, 1] (default 0.25:0.25)")
    g.add_argument("--free-init-fast", action="store_true",
                   help="coarse-to-fine: round i of n uses steps * (i + 1) / n steps")
    g.add_argument("--video", metavar="FILE", help="video-to-video: input GIF/MP4/WebP or folder of PNG frames "
                   "(frames and size come from it)")
    g.add_argument("--strength", type=float, help="with --video: share of the schedule re-run, in (0, 1] "
                   "(default 0.8; low keeps more of the input)")


def prompt_map(args: argparse.Namespace, prompts: list[str]) -> tuple[dict | None, dict | str | None]:
    """(prompt map, negative map or string) from --prompt-map / --prompt-at, or (None, None) without them.

    A single positional prompt becomes frame 0's entry unless the map has one; --prompt-at entries win over
    the file's. ValueError naming the flag for a bad frame number, file or combination.
    """
    if not args.prompt_at and not args.prompt_map:
        return None, None
    if len(prompts) > 1 or args.preset or args.per_prompt or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--prompt-at/--prompt-map make one travelling video: give at most one positional prompt "
                         "and no --prompts/--preset/--per-prompt, and run without torchrun")
    mapping: dict[int, str] = {}
    negative: dict[int, str] | str | None = None
    if args.prompt_map:
        mapping, negative = read_prompt_map(args.prompt_map)
    for frame, text in args.prompt_at:
        try:
            mapping[int(frame)] = text
        except ValueError:
            raise ValueError(f"--prompt-at: FRAME must be an integer, got {frame!r}") from None
    if prompts and 0 not in mapping:
        mapping[0] = prompts[0]
    return mapping, negative


def read_prompt_map(path: str | Path) -> tuple[dict[int, str], dict[int, str] | str | None]:
    """Read a TOML (.toml) or JSON file of ``frame = "prompt"`` entries and an optional ``negative`` entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-map {path}: cannot read the file ({e})") from e
    toml = path.suffix.lower() == ".toml"
    loads = _toml_loads(path) if toml else json.loads
    try:
        data = loads(text)
    except ValueError as e:  # both decode errors are ValueErrors
        raise ValueError(f"--prompt-map {path}: not valid {'TOML' if toml else 'JSON'} ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--prompt-map {path}: expected a table of frame = \"prompt\" entries, "
                         f"got {type(data).__name__}")
    negative = data.pop("negative", None)
    if negative is not None and not isinstance(negative, (str, dict)):
        raise ValueError(f"--prompt-map {path}: 'negative' must be a string or a table of frame = \"prompt\"")
    return {_frame(k, path): v for k, v in data.items()}, (
        {_frame(k, path): v for k, v in negative.items()} if isinstance(negative, dict) else negative)


def _frame(key: str, path: Path) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"--prompt-map {path}: keys must be frame numbers (or 'negative'), got {key!r}") from None


def _toml_loads(path: Path):
    try:
        import tomllib  # Python >= 3.11; the package supports 3.10, where JSON still works
    except ImportError:
        raise ValueError(f"--prompt-map {path}: reading TOML needs Python 3.11+; use a .json file") from None
    return tomllib.loads


def _stops(text: str) -> tuple[float, float]:
    spatial, _, temporal = text.partition(":")
    try:
        return float(spatial), float(temporal or spatial)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SPATIAL[:TEMPORAL] numbers, got {text!r}") from None


def context_options(args: argparse.Namespace) -> dict:
    """``context_frames`` / ``context_overlap`` from their flags (empty without --context-frames); ValueError
    naming the flags for a bad window (the library's message would name its arguments, not the flags)."""
    frames, overlap = args.context_frames, args.context_overlap
    if frames is None:
        if overlap is not None:
            raise ValueError(f"--context-overlap {overlap}: needs --context-frames N (the window length)")
        return {}
    if frames < 1:
        raise ValueError(f"--context-frames {frames}: expected an integer >= 1")
    if overlap is None:
        overlap = default_context_overlap(frames)
    elif not 0 <= overlap < frames:
        raise ValueError(f"--context-overlap {overlap}: expected 0 <= --context-overlap < --context-frames ({frames}); "
                         "neighbouring windows share that many frames")
    return {"context_frames": frames, "context_overlap": overlap}


def pipeline_options(args: argparse.Namespace) -> dict:
    """Pipeline keyword arguments from the context-window, FreeInit and video-to-video flags (empty when none is
    given)."""
    options: dict = context_options(args)
    if args.free_init is not None:
        spatial, temporal = args.free_init_stop
        from .free_init import FreeInit  # lazy: it imports torch, which --help and argument errors never need

        options["free_init"] = FreeInit(iterations=args.free_init, method=args.free_init_method,
                                        order=args.free_init_order, spatial_stop=spatial, temporal_stop=temporal,
                                        use_fast_sampling=args.free_init_fast)
    if args.video is not None:
        options["video"] = args.video
    if args.strength is not None:
        options["strength"] = args.strength
    return options
