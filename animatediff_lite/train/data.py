"""Video-caption datasets for training: WebVid-style CSV, a folder of videos with .txt captions, a latent cache.

Every sample is a deterministic function of (seed, epoch, index), so results do not depend on the
number of DataLoader workers, on the number of ranks, or on where a resumed run restarts:

- the frame window is drawn from ``np.random.default_rng([seed, epoch, index])``;
- ``sample_seed`` (an int) seeds everything the training step draws for that sample (timestep, noise,
  caption dropout, the VAE posterior sample), so 2 ranks x batch b see exactly what 1 rank x batch 2b sees.

Clips shorter than ``(frames - 1) * stride + 1`` frames are sampled with the largest stride that fits;
clips with fewer than ``frames`` frames are skipped (padding with frozen frames would teach stillness).
Unreadable, missing or too-short videos are skipped with one logged warning per file and counted: the
dataset returns the next readable sample instead, and ``sample["skipped"]`` says how many it passed over.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..atomic import atomic_write
from ..loading.io import save_state_dict

log = logging.getLogger("animatediff_lite.train")

CSV_COLUMNS = ("videoid", "name", "page_dir")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif", ".webp")
PIL_SUFFIXES = (".gif", ".webp", ".png", ".apng")
# How many consecutive unreadable videos a sample may pass over before the run stops.
MAX_CONSECUTIVE_BAD = 50


@dataclass(frozen=True)
class VideoItem:
    """One video of the index; ``where`` names it in messages ("row 12 of videos.csv" or the .txt file)."""

    path: str
    caption: str
    where: str


class UnreadableVideo(Exception):
    """A video that cannot be used (missing, corrupt, too short); the message says why."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The per-sample seed (a non-negative int63) for everything a training step draws for one sample."""
    return int(np.random.SeedSequence([seed, epoch, index, 7]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def read_csv_index(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                   suffix: str = ".mp4") -> tuple[list[VideoItem], list[str]]:
    """Items of a WebVid-style CSV (``videoid,name,page_dir`` -> ``{root}/{page_dir}/{videoid}{suffix}``).

    ``root`` defaults to the CSV's folder. Returns (items, problems); rows with an empty caption or
    videoid are problems (skipped). A missing column raises ValueError naming it.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent if root in (None, "") else Path(root)
    if not csv_path.is_file():
        raise ValueError(f"data.csv: {csv_path} is not a file")
    items, problems = [], []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(repr(c) for c in missing)}; a WebVid-style "
                             f"CSV needs columns {','.join(CSV_COLUMNS)} (found {','.join(header) or 'no header'})")
        for row_no, row in enumerate(reader, start=2):  # line 1 is the header
            where = f"{csv_path.name} row {row_no}"
            videoid, caption = (row.get("videoid") or "").strip(), (row.get("name") or "").strip()
            if not videoid:
                problems.append(f"{where}: empty videoid, skipped")
                continue
            if not caption:
                problems.append(f"{where} (videoid {videoid}): empty caption, skipped")
                continue
            path = root / (row.get("page_dir") or "").strip() / f"{videoid}{suffix}"
            items.append(VideoItem(str(path), caption, where))
    return items, problems


def read_folder_index(folder: str | os.PathLike) -> tuple[list[VideoItem], list[str]]:
    """Items of a folder (searched recursively) of videos each with a same-name ``.txt`` caption.

    Returns (items, problems); a video without a caption file or with an empty one is a problem (skipped).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data.folder: {folder} is not a folder")
    items, problems = [], []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            problems.append(f"{path}: no caption file {txt.name}, skipped")
            continue
        caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            problems.append(f"{txt}: empty caption file, skipped")
            continue
        items.append(VideoItem(str(path), caption, str(txt)))
    return items, problems


def frame_indices(n_frames: int, frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """``frames`` indices with ``stride`` (lowered to fit short clips) at a random start; raises if n < frames."""
    if n_frames < frames:
        raise UnreadableVideo(f"has {n_frames} frames, fewer than the {frames} needed")
    stride = min(stride, (n_frames - 1) // max(frames - 1, 1)) if frames > 1 else stride
    span = (frames - 1) * stride + 1
    start = int(rng.integers(0, n_frames - span + 1))
    return [start + k * stride for k in range(frames)]


def read_frames(path: str, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Decode the sampled frames of one video: uint8 (frames, H, W, 3). Raises UnreadableVideo."""
    if not os.path.isfile(path):
        raise UnreadableVideo("no such file")
    try:
        if Path(path).suffix.lower() in PIL_SUFFIXES:
            return _read_pil(path, frames, stride, rng)
        return _read_ffmpeg(path, frames, stride, rng)
    except UnreadableVideo:
        raise
    except Exception as e:  # decoders raise many kinds (OSError, RuntimeError, IndexError, ...)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UnreadableVideo(f"cannot be decoded ({type(e).__name__}: {first_line})") from e


def _read_pil(path: str, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        idx = frame_indices(getattr(im, "n_frames", 1), frames, stride, rng)
        out = []
        for i in idx:
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def _read_ffmpeg(path: str, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the `video` extra)
    except ImportError as e:
        raise UnreadableVideo("needs imageio-ffmpeg to decode: pip install 'animatediff-lite[video]'") from e
    with imageio.get_reader(path, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
        n_est = meta.get("duration", 0) * meta.get("fps", 0)
        # The header's frame count can be off by a frame or two: trust it for the window, then fall back.
        n_guess = int(math.floor(n_est)) - 1 if math.isfinite(n_est) and n_est > frames + 1 else None
        state = rng.bit_generator.state
        if n_guess is not None:
            idx = frame_indices(n_guess, frames, stride, rng)
            got = _take(reader, idx)
            if got is not None:
                return got
        all_frames = list(reader.iter_data()) if n_guess is None else None
    if all_frames is None:  # the header lied: count by decoding, redraw the same way
        with imageio.get_reader(path, format="FFMPEG") as reader:
            all_frames = list(reader.iter_data())
    rng.bit_generator.state = state
    idx = frame_indices(len(all_frames), frames, stride, rng)
    return np.stack([all_frames[i] for i in idx])


def _take(reader, idx: list[int]) -> np.ndarray | None:
    """Read frames ``idx`` (ascending) in one forward pass; None when the video ends early."""
    wanted, out = set(idx), {}
    for i, frame in enumerate(reader.iter_data()):
        if i in wanted:
            out[i] = frame
        if i >= idx[-1]:
            break
    if len(out) < len(idx):
        return None
    return np.stack([out[i] for i in idx])


def to_clip_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (3, F, size, size) in [-1, 1]: resize the short side, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H, W)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(-1, 1)
    return x.permute(1, 0, 2, 3).contiguous()


class VideoDataset(Dataset):
    """Video clips with captions: each sample is a dict

    ``video`` float32 (3, frames, size, size) in [-1, 1]; ``caption`` str; ``index`` int;
    ``sample_seed`` int; ``skipped`` int (unreadable videos passed over to produce this sample).
    Call :meth:`set_epoch` before each epoch (DataLoader workers copy the dataset when iteration starts).
    """

    def __init__(self, items: list[VideoItem], frames: int = 16, stride: int = 4, size: int = 256, seed: int = 0):
        if not items:
            raise ValueError("the dataset has no usable videos (see the warnings above)")
        for name, value in (("frames", frames), ("stride", stride), ("size", size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.items, self.frames, self.stride, self.size, self.seed = items, frames, stride, size, seed
        self.epoch = 0
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
            item = self.items[(index + skipped) % n]
            rng = np.random.default_rng([self.seed, self.epoch, index, skipped])
            try:
                video = to_clip_tensor(read_frames(item.path, self.frames, self.stride, rng), self.size)
            except UnreadableVideo as e:
                if item.path not in self._warned:  # once per file (per worker)
                    self._warned.add(item.path)
                    log.warning("skipping unreadable video %s (%s): %s", item.path, item.where, e)
                continue
            return {"video": video, "caption": item.caption, "index": index,
                    "sample_seed": sample_seed(self.seed, self.epoch, index), "skipped": skipped}
        raise RuntimeError(f"{min(n, MAX_CONSECUTIVE_BAD)} consecutive videos from {self.items[index].path} on "
                           "are unreadable; check the data (see the warnings above)")


def build_video_dataset(csv_path: str = "", root: str = "", folder: str = "", suffix: str = ".mp4",
                        frames: int = 16, stride: int = 4, size: int = 256, seed: int = 0) -> VideoDataset:
    """A :class:`VideoDataset` from a CSV (``csv_path`` + ``root``) or a folder; logs index problems."""
    if bool(csv_path) == bool(folder):
        raise ValueError("set exactly one of data.csv (WebVid-style CSV) and data.folder (videos + .txt captions)")
    items, problems = read_csv_index(csv_path, root, suffix) if csv_path else read_folder_index(folder)
    for p in problems[:20]:
        log.warning("%s", p)
    if len(problems) > 20:
        log.warning("... and %d more index problems", len(problems) - 20)
    log.info("dataset: %d videos (%d skipped at indexing)", len(items), len(problems))
    dataset = VideoDataset(items, frames, stride, size, seed)
    dataset.index_problems = problems
    return dataset


# ---------------------------------------------------------------- latent cache
# A folder of shards `latents_00000.safetensors` (up to SHARD samples each: "latents" (n, 4, F, h, w))
# plus `index.json` (captions, shard sizes, the data settings they were made with). The frame window
# and posterior sample are those of epoch 0, fixed for the whole run: the price of not decoding video.

SHARD = 1024


def write_latent_cache(folder: str | os.PathLike, latents: list[torch.Tensor], captions: list[str],
                       settings: dict) -> None:
    """Write per-sample latents (each (4, F, h, w)) and captions as a cache folder (atomic per file)."""
    folder = Path(folder)
    sizes = []
    for k in range(0, len(latents), SHARD):
        chunk = torch.stack(latents[k:k + SHARD])
        save_state_dict({"latents": chunk}, folder / f"latents_{k // SHARD:05d}.safetensors")
        sizes.append(chunk.shape[0])
    index = {"captions": captions, "shards": sizes, "settings": settings}
    atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index)))


def latent_cache_matches(folder: str | os.PathLike, settings: dict) -> bool:
    """Whether a complete cache made with the same data settings exists in ``folder``."""
    path = Path(folder) / "index.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == settings
    except ValueError:
        return False


class LatentDataset(Dataset):
    """Samples of a latent cache: dict with ``latents`` (4, F, h, w) times ``scale``, ``caption``, ``index``,
    ``sample_seed``, ``skipped`` (always 0)."""

    def __init__(self, folder: str | os.PathLike, seed: int = 0, scale: float = 1.0):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.captions, self.shards, self.seed, self.epoch = index["captions"], index["shards"], seed, 0
        self.scale = scale
        self._offsets = np.cumsum([0, *self.shards])

    def all_latents(self) -> torch.Tensor:
        """Every cached latent, unscaled, as one float32 tensor (N, 4, F, h, w)."""
        from safetensors.torch import load_file

        return torch.cat([load_file(str(self.folder / f"latents_{k:05d}.safetensors"))["latents"].float()
                          for k in range(len(self.shards))])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        with safe_open(str(self.folder / f"latents_{shard:05d}.safetensors"), "pt") as f:
            k = index - int(self._offsets[shard])
            latents = f.get_slice("latents")[k:k + 1][0].float()
        if self.scale != 1.0:
            latents = latents * self.scale
        return {"latents": latents, "caption": self.captions[index], "index": index,
                "sample_seed": sample_seed(self.seed, self.epoch, index), "skipped": 0}


class TimeReversed(Dataset):
    """Plays a share of ``dataset``'s samples backwards, with the caption's motion words swapped.

    ``pairs`` are "word:opposite" strings ("moving left:moving right"), swapped both ways. A sample is
    reversed only when its swapped caption is one of the dataset's own captions, so a combination the data
    leaves out (a held-out test prompt) is never made; a caption without any of the words reverses as it is.
    Works on ``video`` (3, F, H, W) and cached ``latents`` (4, F, h, w) alike: the VAE codes frames one by one,
    so reversing latents is reversing the clip. The draw comes from (seed, epoch, index), like the rest.
    """

    def __init__(self, dataset, share: float, pairs: list[str], seed: int = 0):
        self.dataset, self.share, self.seed, self.epoch = dataset, share, seed, 0
        self.opposite: dict[str, str] = {}
        for pair in pairs:
            a, b = (w.strip() for w in pair.split(":"))
            self.opposite.update({a: b, b: a})
        words = sorted(self.opposite, key=len, reverse=True)
        self._pattern = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words)) if words else None
        self.captions = list(dataset.captions)
        self._known = set(self.captions)

    def swapped(self, caption: str) -> str:
        """``caption`` with every listed word replaced by its opposite."""
        if self._pattern is None:
            return caption
        return self._pattern.sub(lambda m: self.opposite[m.group(0)], caption)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        if np.random.default_rng([self.seed, self.epoch, index, 13]).random() >= self.share:
            return sample
        caption = self.swapped(sample["caption"])
        if caption in self._known:
            key = "latents" if "latents" in sample else "video"
            sample[key] = sample[key].flip(1)  # (C, F, ...): dim 1 is time
            sample["caption"] = caption
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep captions as a list, ints as LongTensors."""
    out: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
