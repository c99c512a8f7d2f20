"""Training (config, data, models, text stage, LR schedule and EMA, the loop, checkpoints; docs/training.md).

``main(argv)`` is the ``animatediff-lite train CONFIG [--section.key value ...]`` entry point.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    """Run ``animatediff-lite train``; see :mod:`animatediff_lite.train.loop`."""
    from .loop import main as _main  # torch-heavy imports only when training

    return _main(argv)


__all__ = ["main"]
