"""Atomic writes: no partial file on failure, and the permissions a plain open(..., "w") would give."""

import os
import stat

import pytest

from animatediff_lite.atomic import atomic_write, current_umask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write(tmp_path / "atomic.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~umask


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "kept.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new"))
    assert path.read_bytes() == b"new" and _mode(path) == 0o640


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "sub" / "out.bin"

    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert list(path.parent.iterdir()) == []


def test_saved_video_and_weights_follow_the_umask(tmp_path):
    import torch

    from animatediff_lite.loading.io import save_state_dict
    from animatediff_lite.video import save_video

    old = os.umask(0o022)
    try:
        save_video(torch.rand(1, 2, 3, 8, 8), tmp_path / "v.gif")
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "v.gif") == _mode(tmp_path / "w.safetensors") == 0o644
