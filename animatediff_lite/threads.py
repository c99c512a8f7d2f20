"""How many CPU threads torch's intra-op pool uses when a pipeline is loaded (``threads=`` / ``--threads``).

torch defaults to one thread per core. On a small machine that also runs other work, that default is the slow
case by a wide margin: with every core already busy, each of the many small ops of a video model waits for
a descheduled OpenMP worker (measured 3-20x slower than one thread on 2 cores, see docs/threads.md). So without
an explicit choice, CPU sampling runs on one thread unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os

import torch

DEFAULT_CPU_THREADS = 1


def check_threads(threads: object) -> int | None:
    """``threads`` if it is None or an int >= 1; ValueError naming ``threads`` otherwise."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 or None (automatic), got {threads!r}")
    return threads


def apply_threads(threads: int | None, device: torch.device) -> int:
    """Set torch's intra-op thread count for this process; returns the count in use.

    threads: a count, or None for the default: :data:`DEFAULT_CPU_THREADS` on the CPU unless the
    ``OMP_NUM_THREADS`` environment variable is set (then torch already follows it); on a GPU device None
    leaves torch's setting alone (the CPU only feeds the GPU there). The setting is process-wide.
    """
    check_threads(threads)
    if threads is None and device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        threads = DEFAULT_CPU_THREADS
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
