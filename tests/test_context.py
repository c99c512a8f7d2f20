"""Sliding context windows: coverage, shapes, exact single-window path, uniform averaging."""

from __future__ import annotations

import pytest
import torch

from animatediff_lite.context import context_windows, windowed


@pytest.mark.parametrize("num_frames", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("context_frames,overlap", [(4, 0), (8, 4), (16, 4), (16, 15), (7, 3)])
def test_windows_cover_every_frame_with_equal_sizes(num_frames: int, context_frames: int, overlap: int) -> None:
    windows = context_windows(num_frames, context_frames, overlap)
    size = min(context_frames, num_frames)
    covered = sorted({i for w in windows for i in w})
    assert covered == list(range(num_frames))
    assert all(len(w) == size and w == list(range(w[0], w[0] + size)) for w in windows)
    assert windows[0][0] == 0 and windows[-1][-1] == num_frames - 1
    starts = [w[0] for w in windows]
    assert starts == sorted(set(starts))  # increasing, no duplicate windows
    # consecutive windows overlap by at least `overlap` frames (the last may overlap more)
    assert all(a[-1] - b[0] + 1 >= overlap for a, b in zip(windows, windows[1:], strict=False))


def test_windows_example() -> None:
    assert context_windows(10, 4, 1) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert context_windows(16, 16, 4) == [list(range(16))]
    assert context_windows(8, 16, 4) == [list(range(8))]


@pytest.mark.parametrize("args,name", [((0, 4, 1), "num_frames"), ((8, 0, 0), "context_frames"),
                                       ((8, 4, 4), "context_overlap"), ((8, 4, -1), "context_overlap")])
def test_bad_window_args(args: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        context_windows(*args)


def _frame_mixing_fn(x: torch.Tensor) -> torch.Tensor:
    # Depends on every frame of the window (like temporal attention), so windowing changes results.
    return torch.tanh(x * 1.3 + x.mean(dim=2, keepdim=True))


def test_single_full_window_is_exact() -> None:
    x = torch.randn(2, 4, 9, 3, 5, generator=torch.Generator().manual_seed(0))
    out = windowed(_frame_mixing_fn, x, context_windows(9, 16, 4))
    assert torch.equal(out, _frame_mixing_fn(x))


def test_overlaps_are_averaged_uniformly() -> None:
    x = torch.randn(1, 2, 10, 2, 2, generator=torch.Generator().manual_seed(1))
    windows = context_windows(10, 4, 2)
    out = windowed(_frame_mixing_fn, x, windows)
    # reference: per-frame list of predictions, averaged by hand
    preds: dict[int, list[torch.Tensor]] = {i: [] for i in range(10)}
    for w in windows:
        y = _frame_mixing_fn(x[:, :, w])
        for j, i in enumerate(w):
            preds[i].append(y[:, :, j])
    ref = torch.stack([torch.stack(preds[i]).mean(0) for i in range(10)], dim=2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, _frame_mixing_fn(x), atol=1e-3)  # windowing did change the result


def test_windowed_can_change_channels() -> None:
    x = torch.randn(1, 4, 6, 2, 2)
    out = windowed(lambda w: w[:, :2] * 2, x, context_windows(6, 4, 2))
    torch.testing.assert_close(out, x[:, :2] * 2)


def test_uncovered_frames_raise() -> None:
    with pytest.raises(ValueError, match="cover"):
        windowed(_frame_mixing_fn, torch.randn(1, 1, 5, 1, 1), [[0, 1, 2]])
