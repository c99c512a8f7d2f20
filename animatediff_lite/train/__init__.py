"""Training: datasets (train.data), config (train.config), the loop (train.loop), checkpoints (train.checkpoint).

``main(argv)`` is the ``animatediff-lite train CONFIG [--section.key value ...]`` entry point.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    """Run ``animatediff-lite train``; see :mod:`animatediff_lite.train.loop`."""
    from .loop import main as _main  # torch-heavy imports only when training

    return _main(argv)


__all__ = ["main"]
