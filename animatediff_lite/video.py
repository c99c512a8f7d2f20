"""Writing and reading videos: GIF, MP4, WebP and folders of PNG frames.

A batch of videos is laid out as one grid video, like the original AnimateDiff ``save_videos_grid``
(torchvision ``make_grid`` with its default 2-pixel black padding): ``n_rows`` videos per grid row
(torchvision's ``nrow``, upstream default 6), a single video is written as is without padding.
Pixels are quantised as upstream does: ``uint8(clamp(x, 0, 1) * 255)`` (truncation, not rounding).
Every file is written atomically (temporary file + rename), so a failed write leaves no partial file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from .atomic import atomic_write
from .checks import finite_number

FORMATS = ("gif", "mp4", "webp", "frames")
_SUFFIX_FORMAT = {".gif": "gif", ".mp4": "mp4", ".webp": "webp", "": "frames"}
GRID_PADDING = 2  # torchvision make_grid default, used by save_videos_grid
DEFAULT_N_ROWS = 6  # save_videos_grid default


def video_grid(video: torch.Tensor, n_rows: int | None = None, padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile a batch of videos into one video.

    video: (B, F, 3, H, W) or (F, 3, H, W), any float range. ``n_rows`` is the number of videos per
    grid row (upstream naming; default 6). Returns (F, 3, H', W'): for B == 1 the video itself, else
    ``ceil(B / cols)`` rows and ``cols = min(n_rows, B)`` columns of cells ``padding`` pixels apart,
    with ``padding`` pixels of zeros around the edges too.
    """
    if video.dim() == 4:
        video = video[None]
    if video.dim() != 5 or video.shape[2] not in (1, 3):
        raise ValueError(f"video must have shape (B, F, 3, H, W) or (F, 3, H, W), got {tuple(video.shape)}")
    if video.shape[2] == 1:  # grey -> RGB, as make_grid does
        video = video.expand(-1, -1, 3, -1, -1)
    b, f, c, h, w = video.shape
    if b == 1:
        return video[0]
    n_rows = DEFAULT_N_ROWS if n_rows is None else n_rows
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    cols = min(n_rows, b)
    rows = -(-b // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = video.new_zeros(f, c, rows * cell_h + padding, cols * cell_w + padding)
    for k in range(b):
        y, x = (k // cols) * cell_h + padding, (k % cols) * cell_w + padding
        grid[:, :, y:y + h, x:x + w] = video[k]
    return grid


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) float in [0, 1] -> (F, H, W, 3) uint8, truncating like upstream."""
    x = video.detach().float().clamp(0, 1).mul(255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_video(video: torch.Tensor, path: str | os.PathLike, fps: float = 8, n_rows: int | None = None,
               format: str | None = None) -> Path:
    """Save a video (or a grid of a batch of videos) to ``path``.

    video: (B, F, 3, H, W) or (F, 3, H, W) float in [0, 1] (values outside are clamped).
    format: "gif" (loops forever, frame delay 1/fps in GIF's 10 ms units), "mp4" (H.264 yuv420p via
    imageio-ffmpeg, the ``video`` extra; odd sizes get one black row/column), "webp" (animated, if
    Pillow supports it) or "frames" (a folder of ``0000.png``...); by default taken from the suffix of
    ``path`` (no suffix -> frames). Returns the written path.
    """
    path = Path(path)
    format = video_format(path, format)
    finite_number("fps", fps, minimum=0, exclusive=True)
    frames = to_uint8_frames(video_grid(video, n_rows))
    if format == "gif":
        atomic_write(path, lambda tmp: _write_pillow(frames, tmp, fps, "GIF"))
    elif format == "webp":
        from PIL import features

        if not features.check("webp"):
            raise ValueError("this Pillow build has no WebP support: save as .gif or .mp4 instead")
        atomic_write(path, lambda tmp: _write_pillow(frames, tmp, fps, "WEBP"))
    elif format == "mp4":
        atomic_write(path, lambda tmp: _write_mp4(frames, tmp, fps))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            atomic_write(path / f"{i:04d}.png", lambda tmp, fr=frame: Image.fromarray(fr).save(tmp, format="PNG"))
    return path


def video_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format :func:`save_video` writes to ``path``: ``format`` if given, else from the suffix.

    ValueError naming the path when the suffix is not one of .gif/.mp4/.webp/none, or ``format`` unknown.
    """
    if format is None:
        format = _SUFFIX_FORMAT.get(Path(path).suffix.lower())
        if format is None:
            raise ValueError(f"cannot tell the video format from {path}: use a suffix .gif, .mp4 or .webp, "
                             f"no suffix for a folder of PNG frames, or pass format= one of {FORMATS}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def _write_pillow(frames: np.ndarray, tmp: str, fps: float, fmt: str) -> None:
    images = [Image.fromarray(f) for f in frames]
    extra = {"lossless": False, "quality": 90} if fmt == "WEBP" else {}
    # loop=0: repeat forever; GIF stores the delay in 1/100 s, so 8 fps -> 120 ms.
    images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0,
                   **extra)


def _imageio_ffmpeg(action: str):
    try:
        import imageio_ffmpeg  # optional: the [video] extra
    except ImportError as e:
        raise ValueError(f"{action} .mp4 needs imageio-ffmpeg: pip install 'animatediff-lite[video]' "
                         "(or use .gif)") from e
    return imageio_ffmpeg


def _write_mp4(frames: np.ndarray, tmp: str, fps: float) -> None:
    imageio_ffmpeg = _imageio_ffmpeg("writing")
    # yuv420p needs even sizes: pad odd ones with one row/column of black (the grid's padding colour).
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, output_params=["-f", "mp4"], ffmpeg_log_level="error")
    writer.send(None)  # start the generator
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def load_video_frames(path: str | os.PathLike) -> torch.Tensor:
    """Read a GIF, WebP, MP4 or folder of PNG frames as (F, 3, H, W) float32 in [0, 1]."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        images: Sequence[np.ndarray] = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))]
    elif path.suffix.lower() == ".mp4":
        images = _read_mp4(path)
    else:
        with Image.open(path) as im:
            images = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(im)]
    if not images:
        raise ValueError(f"{path}: no frames found")
    x = torch.from_numpy(np.stack(images))  # (F, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).float() / 255


def _read_mp4(path: Path) -> list[np.ndarray]:
    reader = _imageio_ffmpeg("reading").read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    return [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
