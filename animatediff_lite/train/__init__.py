"""Training: config (train.config), data (train.data), models and what trains (train.models), the text stage
(train.text_stage), LR schedule and EMA (train.schedule), the loop (train.loop: setup, train_step, save) and
checkpoints (train.checkpoint). docs/training.md describes them.

``main(argv)`` is the ``animatediff-lite train CONFIG [--section.key value ...]`` entry point.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    """Run ``animatediff-lite train``; see :mod:`animatediff_lite.train.loop`."""
    from .loop import main as _main  # torch-heavy imports only when training

    return _main(argv)


__all__ = ["main"]
