import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from animatediff_lite.video import load_video_frames, save_video, to_uint8_frames, video_grid


def _levels_video(shape, seed=0, levels=6):
    # Few distinct colours, so GIF's 256-colour palette is lossless and frames differ from each other.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float() / (levels - 1)


def _smooth_video(f=6, h=32, w=48):
    # Smooth content for lossy codecs: a moving diagonal gradient per channel.
    t = torch.arange(f)[:, None, None, None]
    y = torch.arange(h)[None, None, :, None]
    x = torch.arange(w)[None, None, None, :]
    c = torch.arange(3)[None, :, None, None]
    return (0.5 + 0.4 * torch.sin((x + y + 3 * t) / 9 + c)).float()


@pytest.mark.parametrize("b,n_rows", [(1, None), (2, None), (5, 2), (4, 4), (7, 3), (3, 1)])
def test_grid_layout_matches_hand_computation(b, n_rows):
    f, h, w, pad = 3, 5, 4, 2
    v = torch.rand(b, f, 3, h, w)
    grid = video_grid(v, n_rows)
    if b == 1:  # make_grid returns a single image unpadded
        assert torch.equal(grid, v[0])
        return
    cols = min(n_rows or 6, b)
    rows = (b + cols - 1) // cols
    assert grid.shape == (f, 3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    covered = torch.zeros(grid.shape[-2:], dtype=torch.bool)
    for k in range(b):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        assert torch.equal(grid[:, :, y0:y0 + h, x0:x0 + w], v[k])
        covered[y0:y0 + h, x0:x0 + w] = True
    assert torch.all(grid[:, :, ~covered] == 0)  # padding and empty cells are black


def test_grid_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        video_grid(torch.rand(3, 4, 5))
    with pytest.raises(ValueError, match="n_rows"):
        video_grid(torch.rand(2, 1, 3, 4, 4), n_rows=0)


def test_quantisation_truncates_like_upstream():
    v = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.2, 0.999]).view(1, 1, 6, 1).expand(1, 3, 6, 1)
    out = to_uint8_frames(v)[0, :, 0, 0]
    assert out.tolist() == [0, 127, 255, 255, 0, 254]


@pytest.mark.parametrize("fps,duration_ms", [(8, 120), (10, 100), (4, 250)])
def test_gif_roundtrip(tmp_path, fps, duration_ms):
    v = _levels_video((3, 5, 3, 9, 7))
    p = save_video(v, tmp_path / "out.gif", fps=fps, n_rows=2)
    with Image.open(p) as im:
        assert im.n_frames == 5
        assert im.info["loop"] == 0  # loops forever
        assert im.info["duration"] == duration_ms  # GIF stores 1/100 s
    back = load_video_frames(p)
    expected = torch.from_numpy(to_uint8_frames(video_grid(v, 2))).permute(0, 3, 1, 2).float() / 255
    assert back.shape == expected.shape == (5, 3, 2 * 11 + 2, 2 * 9 + 2)
    assert torch.equal(back, expected), (back - expected).abs().max()


def test_frames_folder_and_format_override(tmp_path):
    v = torch.rand(4, 3, 8, 6)  # (F, 3, H, W): a single video
    save_video(v, tmp_path / "frames")
    files = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png"]
    back = load_video_frames(tmp_path / "frames")
    assert torch.equal(back, torch.from_numpy(to_uint8_frames(v)).permute(0, 3, 1, 2).float() / 255)
    save_video(v, tmp_path / "odd.name", format="frames")
    assert len(list((tmp_path / "odd.name").glob("*.png"))) == 4


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="imageio-ffmpeg not installed")
@pytest.mark.parametrize("h,w", [(32, 48), (31, 47)])
def test_mp4_roundtrip(tmp_path, h, w):
    v = _smooth_video(6, h, w)
    p = save_video(v, tmp_path / "out.mp4", fps=8)
    back = load_video_frames(p)
    assert back.shape == (6, 3, h + h % 2, w + w % 2)  # odd sizes padded to even for yuv420p
    err = (back[:, :, :h, :w] - v).abs()
    assert err.mean() < 0.03, err.mean()  # lossy H.264 + yuv420p chroma subsampling
    header = p.read_bytes()[:12]
    assert header[4:8] == b"ftyp"


def test_mp4_missing_extra_message(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match=r"animatediff-lite\[video\]"):
        save_video(torch.rand(2, 3, 8, 8), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_webp_roundtrip(tmp_path):
    from PIL import features

    if not features.check("webp"):
        with pytest.raises(ValueError, match="WebP"):
            save_video(torch.rand(2, 3, 8, 8), tmp_path / "x.webp")
        return
    v = _smooth_video(4, 32, 32)
    back = load_video_frames(save_video(v, tmp_path / "x.webp", fps=8))
    assert back.shape == v.shape
    assert (back - v).abs().mean() < 0.03


def test_atomic_no_partial_file_on_error(tmp_path, monkeypatch):
    target = tmp_path / "out.gif"
    save_video(_levels_video((3, 3, 8, 8)), target)
    before = target.read_bytes()

    def boom(self, *args, **kwargs):
        with open(args[0], "wb") as f:  # write half a file, then fail
            f.write(b"GIF89a partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_video(_levels_video((3, 3, 8, 8), seed=1), target)
    assert target.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif"]  # no temp files left
    with pytest.raises(OSError):
        save_video(_levels_video((3, 3, 8, 8)), tmp_path / "new.gif")
    assert not (tmp_path / "new.gif").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"path": "x.avi"}, "suffix"), ({"path": "x.gif", "format": "mkv"}, "format"), ({"path": "x.gif", "fps": 0}, "fps"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs = dict(kwargs, path=tmp_path / kwargs["path"])
    with pytest.raises(ValueError, match=match):
        save_video(torch.rand(2, 3, 8, 8), **kwargs)


def test_load_missing(tmp_path):
    with pytest.raises(ValueError, match="no such"):
        load_video_frames(tmp_path / "nope.gif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frames"):
        load_video_frames(tmp_path / "empty")


def test_uint8_values_are_exact_numpy(tmp_path):
    # The numpy frames written equal the grid quantised by hand.
    v = torch.rand(2, 2, 3, 4, 4)
    frames = to_uint8_frames(video_grid(v))
    hand = (video_grid(v).clamp(0, 1).numpy() * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(frames, hand)
