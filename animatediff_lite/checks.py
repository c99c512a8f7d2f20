"""Argument checks shared by the API and the command line: finite numbers, sizes a model was trained for.

No torch import here: the command line checks its numbers before loading anything.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

# The sampler names (animatediff_lite.samplers implements them); here so presets and the CLI check a name
# without importing torch.
SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")


def sampler_name(name: object) -> str:
    """``name`` if it is one of :data:`SAMPLERS`; ValueError listing them otherwise."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return name


def default_context_overlap(context_frames: int) -> int:
    """The overlap of sliding context windows when none is given: 4, at most half the window.

    4 frames is the default of AnimateDiff-Evolved's and animatediff-cli's context schedulers (with 16-frame
    windows); neither adapts it to short windows, where overlap >= window length stops the windows advancing.
    Capping it at half the window keeps 4 for windows of 8+ frames and lets ``context_frames=4`` run (overlap 2).
    """
    return min(4, context_frames // 2)


def finite_number(name: str, value: object, minimum: float | None = None, exclusive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (>= ``minimum``, or > with ``exclusive``).

    ValueError naming ``name`` otherwise: NaN and +-inf are refused everywhere a float is taken (a NaN guidance
    scale silently turns every video grey; an infinite fps writes a GIF with zero delays).
    """
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if minimum is not None and (number <= minimum if exclusive else number < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum:g}, got {number:g}")
    return number


def untrained_sizes(trained_for: Mapping[str, int] | None, **asked: int) -> str | None:
    """A one-line note if an asked size differs from what a model records it was trained on, else None.

    trained_for: e.g. ``{"num_frames": 8, "height": 32, "width": 32}`` (``Pipeline.trained_for``); names it
    lacks are not checked, so a model that records nothing is never warned about.
    """
    if not trained_for:
        return None
    off = [f"{name}={asked[name]} (trained: {trained_for[name]})" for name in asked
           if name in trained_for and asked[name] != trained_for[name]]
    if not off:
        return None
    return (f"this model was trained on {trained_for.get('num_frames', '?')} frames of "
            f"{trained_for.get('width', '?')}x{trained_for.get('height', '?')}; asked {', '.join(off)}: "
            "expect broken shapes or motion")


def warn_untrained(trained_for: Mapping[str, int] | None, stacklevel: int = 3, **asked: int) -> None:
    """``warnings.warn`` (UserWarning) the note of :func:`untrained_sizes`, if any."""
    note = untrained_sizes(trained_for, **asked)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=stacklevel)
