"""Atomic file writes: a temporary file in the target's folder, then a rename.

Readers never see a partial file, and a failed write leaves none behind. The written file gets the
permissions a plain ``open(path, "w")`` would give: an existing file keeps its mode, a new one gets
``0o666`` minus the process umask (``tempfile.mkstemp`` alone would leave ``0o600``). Used by video
writing, weight saving and training checkpoints, so it depends on nothing else in the package.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (parent folders created).

    ``write`` receives the temporary file's path as a str and must create or fill that file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable read; restored at once
    os.umask(mask)
    return mask
