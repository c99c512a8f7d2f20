"""Training data: video-caption datasets (WebVid-style CSV, a folder of videos with .txt captions, procedural
clips), the latent cache, time reversal, the chain a config builds from them (:func:`build_dataset`), and the
sampler that can start mid-epoch, so a resumed run sees the same samples as an uninterrupted one.

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
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from ..atomic import atomic_write
from ..loading.io import save_state_dict
from ..toy import synthetic as S  # the one import of the procedural clip generator in train/
from .config import DataSection, TrainConfig

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


class SeededSamples(Dataset):
    """What the training datasets share: captions, a seed, the epoch, and samples that carry their own seed.

    A sample is a dict: the data (``video`` float32 (3, F, H, W) in [-1, 1], or ``latents`` (4, F, h, w)),
    ``caption`` str, ``index`` int, ``sample_seed`` int (:func:`sample_seed`) and ``skipped`` int (unreadable
    videos passed over to produce it). Call :meth:`set_epoch` before each epoch (DataLoader workers copy the
    dataset when iteration starts).
    """

    def __init__(self, captions: list[str], seed: int):
        self.captions, self.seed, self.epoch = captions, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, index: int, caption: str, skipped: int = 0, **data: torch.Tensor) -> dict:
        """The sample dict of ``index`` in this epoch, holding ``data`` (``video=...`` or ``latents=...``)."""
        return {**data, "caption": caption, "index": index, "sample_seed": sample_seed(self.seed, self.epoch, index),
                "skipped": skipped}


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
            if not videoid or not caption:
                problems.append(f"{where} (videoid {videoid or '-'}): empty {'caption' if videoid else 'videoid'}"
                                ", skipped")
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
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        if not caption:
            problems.append(f"{path}: no caption file {txt.name}, skipped" if caption is None
                            else f"{txt}: empty caption file, skipped")
            continue
        items.append(VideoItem(str(path), caption, str(txt)))
    return items, problems


def frame_indices(n_frames: int, frames: int, stride: int, key) -> list[int]:
    """``frames`` indices with ``stride`` (lowered to fit short clips) at a random start; raises if n < frames.

    ``key`` seeds the draw (``np.random.default_rng(key)``): the same key gives the same window for the same
    ``n_frames``, so a reader may draw again once it knows the true frame count.
    """
    if n_frames < frames:
        raise UnreadableVideo(f"has {n_frames} frames, fewer than the {frames} needed")
    stride = min(stride, (n_frames - 1) // max(frames - 1, 1)) if frames > 1 else stride
    span = (frames - 1) * stride + 1
    start = int(np.random.default_rng(key).integers(0, n_frames - span + 1))
    return [start + k * stride for k in range(frames)]


def read_frames(path: str, frames: int, stride: int, key) -> np.ndarray:
    """Decode the sampled frames of one video: uint8 (frames, H, W, 3). Raises UnreadableVideo."""
    if not os.path.isfile(path):
        raise UnreadableVideo("no such file")
    try:
        read = _read_pil if Path(path).suffix.lower() in PIL_SUFFIXES else _read_ffmpeg
        return read(path, frames, stride, key)
    except UnreadableVideo:
        raise
    except Exception as e:  # decoders raise many kinds (OSError, RuntimeError, IndexError, ...)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UnreadableVideo(f"cannot be decoded ({type(e).__name__}: {first_line})") from e


def _read_pil(path: str, frames: int, stride: int, key) -> np.ndarray:
    with Image.open(path) as im:
        out = []
        for i in frame_indices(getattr(im, "n_frames", 1), frames, stride, key):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def _read_ffmpeg(path: str, frames: int, stride: int, key) -> np.ndarray:
    try:
        import imageio_ffmpeg  # noqa: F401  (lazy: the optional `video` extra, needed only for these files)
    except ImportError as e:
        raise UnreadableVideo("needs imageio-ffmpeg to decode: pip install 'animatediff-lite[video]'") from e
    with imageio.get_reader(path, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
        n_est = meta.get("duration", 0) * meta.get("fps", 0)
        # The header's frame count can be off by a frame or two: trust it for the window, then fall back.
        if math.isfinite(n_est) and n_est > frames + 1:
            idx = frame_indices(int(n_est) - 1, frames, stride, key)
            # one forward pass up to the last wanted frame; fewer than wanted: the video ended early
            got = {i: frame for i, frame in enumerate(itertools.islice(reader.iter_data(), idx[-1] + 1)) if i in idx}
            if len(got) == len(idx):
                return np.stack([got[i] for i in idx])
    with imageio.get_reader(path, format="FFMPEG") as reader:  # no usable header, or it lied: count by decoding
        all_frames = list(reader.iter_data())
    return np.stack([all_frames[i] for i in frame_indices(len(all_frames), frames, stride, key)])


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


class VideoDataset(SeededSamples):
    """Video clips (``frames`` frames ``stride`` apart, ``size`` x ``size``) with captions; samples as
    :class:`SeededSamples` describes, with ``video``."""

    def __init__(self, items: list[VideoItem], frames: int = 16, stride: int = 4, size: int = 256, seed: int = 0):
        if not items:  # (frames, stride and size are checked with the config)
            raise ValueError("the dataset has no usable videos (see the warnings above)")
        super().__init__([item.caption for item in items], seed)
        self.items, self.frames, self.stride, self.size = items, frames, stride, size
        self._warned: set[str] = set()

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
            item = self.items[(index + skipped) % n]
            key = [self.seed, self.epoch, index, skipped]
            try:
                video = to_clip_tensor(read_frames(item.path, self.frames, self.stride, key), self.size)
            except UnreadableVideo as e:
                if item.path not in self._warned:  # once per file (per worker)
                    self._warned.add(item.path)
                    log.warning("skipping unreadable video %s (%s): %s", item.path, item.where, e)
                continue
            return self.sample(index, item.caption, skipped, video=video)
        raise RuntimeError(f"{min(n, MAX_CONSECUTIVE_BAD)} consecutive videos from {self.items[index].path} on "
                           "are unreadable; check the data (see the warnings above)")


def build_video_dataset(data: DataSection, seed: int = 0) -> VideoDataset:
    """A :class:`VideoDataset` from ``data.csv`` (+ ``root``, ``suffix``) or ``data.folder``; logs index problems."""
    if bool(data.csv) == bool(data.folder):
        raise ValueError("set exactly one of data.csv (WebVid-style CSV) and data.folder (videos + .txt captions)")
    items, problems = read_csv_index(data.csv, data.root, data.suffix) if data.csv else read_folder_index(data.folder)
    for p in problems[:20]:
        log.warning("%s", p)
    if len(problems) > 20:
        log.warning("... and %d more index problems", len(problems) - 20)
    log.info("dataset: %d videos (%d skipped at indexing)", len(items), len(problems))
    return VideoDataset(items, data.frames, data.stride, data.size, seed)


class SyntheticClips(SeededSamples):
    """``n_clips`` procedural clips of coloured shapes (the embedded default model's data, ``data.synthetic``).

    The pool is fixed: clip ``i`` has a spec and a render seed drawn from ``(seed, i)``, rendered on demand, so
    every epoch sees the same clips (and a latent cache of them stays valid); augmentations and noise vary.
    ``which``: "train" (the training combinations of :func:`animatediff_lite.toy.synthetic.split_specs`, its
    held-out ones never appear) or "all". ``direction_share`` > 0: the first ``round(direction_share * n_clips)``
    clips move left/right/up/down and the rest grow, shrink or rotate; 0: every combination equally likely.
    """

    def __init__(self, which: str, n_clips: int, frames: int, size: int, direction_share: float = 0.0,
                 seed: int = 0):
        specs = S.split_specs()[0] if which == "train" else S.all_specs()  # (the config checks data.synthetic)
        moving = [s for s in specs if s.motion in S.DIRECTIONS]
        other = [s for s in specs if s.motion not in S.DIRECTIONS]
        n_moving = round(direction_share * n_clips)
        self.specs, self.render_seeds = [], []
        for i in range(n_clips):
            group = specs if direction_share == 0 else moving if i < n_moving else other
            rng = np.random.default_rng([seed, i, 11])
            self.specs.append(group[int(rng.integers(len(group)))])
            self.render_seeds.append(int(rng.integers(2**31)))
        super().__init__([s.caption for s in self.specs], seed)
        self.frames, self.size = frames, size

    def __getitem__(self, index: int) -> dict:
        clip = S.render_clip(self.specs[index], self.frames, self.size, seed=self.render_seeds[index])  # (F, 3, H, W)
        video = torch.from_numpy(clip).transpose(0, 1) * 2 - 1  # (3, F, H, W) in [-1, 1]
        return self.sample(index, self.captions[index], video=video.contiguous())


# ---------------------------------------------------------------- latent cache
# A folder of shards `latents_00000.safetensors` (up to SHARD samples each: "latents" (n, 4, F, h, w))
# plus `index.json` (captions, shard sizes, the data settings they were made with). The frame window
# and posterior sample are those of epoch 0, fixed for the whole run: the price of not decoding video.

SHARD = 1024


class LatentDataset(SeededSamples):
    """Samples of a latent cache, with ``latents`` (4, F, h, w) times ``scale`` (``skipped`` always 0)."""

    def __init__(self, folder: str | os.PathLike, seed: int = 0, scale: float = 1.0):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        super().__init__(index["captions"], seed)
        self.shards, self.scale = index["shards"], scale
        self._offsets = np.cumsum([0, *self.shards])

    @staticmethod
    def write(folder: str | os.PathLike, latents: list[torch.Tensor], captions: list[str], settings: dict) -> None:
        """Write per-sample latents (each (4, F, h, w)) and captions as a cache folder (atomic per file)."""
        folder = Path(folder)
        sizes = []
        for k in range(0, len(latents), SHARD):
            chunk = torch.stack(latents[k:k + SHARD])
            save_state_dict({"latents": chunk}, folder / f"latents_{k // SHARD:05d}.safetensors")
            sizes.append(chunk.shape[0])
        index = {"captions": captions, "shards": sizes, "settings": settings}
        atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index)))

    @staticmethod
    def matches(folder: str | os.PathLike, settings: dict) -> bool:
        """Whether a complete cache made with the same data settings exists in ``folder``."""
        try:
            return json.loads((Path(folder) / "index.json").read_text()).get("settings") == settings
        except (OSError, ValueError):  # no index yet, or a broken one: make the cache again
            return False

    def all_latents(self) -> torch.Tensor:
        """Every cached latent, unscaled, as one float32 tensor (N, 4, F, h, w)."""
        return torch.cat([load_file(str(self.folder / f"latents_{k:05d}.safetensors"))["latents"].float()
                          for k in range(len(self.shards))])

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        with safe_open(str(self.folder / f"latents_{shard:05d}.safetensors"), "pt") as f:
            k = index - int(self._offsets[shard])
            latents = f.get_slice("latents")[k:k + 1][0].float()
        return self.sample(index, self.captions[index], latents=latents * self.scale)  # (x * 1.0 is x exactly)


class TimeReversed(SeededSamples):
    """Plays a share of ``dataset``'s samples backwards, with the caption's motion words swapped.

    ``pairs`` are "word:opposite" strings ("moving left:moving right"), swapped both ways. A sample is
    reversed only when its swapped caption is one of the dataset's own captions, so a combination the data
    leaves out (a held-out test prompt) is never made; a caption without any of the words reverses as it is.
    Works on ``video`` (3, F, H, W) and cached ``latents`` (4, F, h, w) alike: the VAE codes frames one by one,
    so reversing latents is reversing the clip. The draw comes from (seed, epoch, index), like the rest.
    """

    def __init__(self, dataset: SeededSamples, share: float, pairs: list[str], seed: int = 0):
        super().__init__(list(dataset.captions), seed)
        self.dataset, self.share = dataset, share
        self.opposite: dict[str, str] = {}
        for pair in pairs:
            a, b = (w.strip() for w in pair.split(":"))
            self.opposite.update({a: b, b: a})
        words = sorted(self.opposite, key=len, reverse=True)
        self._pattern = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words)) if words else None
        self._known = set(self.captions)

    def swapped(self, caption: str) -> str:
        """``caption`` with every listed word replaced by its opposite."""
        if self._pattern is None:
            return caption
        return self._pattern.sub(lambda m: self.opposite[m.group(0)], caption)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

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


# ---------------------------------------------------------------- what a run trains on

def build_dataset(cfg: TrainConfig, vae: nn.Module, device: torch.device, main: bool = True,
                  barrier: Callable[[], None] = lambda: None):
    """The training samples: videos (files or synthetic), optionally as a latent cache, optionally time-reversed.

    Rank 0 (``main``) writes the cache; ``barrier`` makes the other ranks wait for it.
    """
    data = cfg.data
    if data.synthetic:
        source = SyntheticClips(data.synthetic, data.synthetic_clips, data.frames, data.size,
                                data.synthetic_direction_share, seed=cfg.train.seed)
        log.info("dataset: %d synthetic clips (%s combinations)", len(source), data.synthetic)
    else:
        source = build_video_dataset(data, seed=cfg.train.seed)
    dataset = _latent_cache(cfg, source, vae, device, main, barrier) if data.latent_cache else source
    if data.reverse_share > 0:
        dataset = TimeReversed(dataset, data.reverse_share, data.reverse_words, seed=cfg.train.seed)
    return dataset


@torch.no_grad()
def _latent_cache(cfg: TrainConfig, source, vae: nn.Module, device: torch.device, main: bool,
                  barrier: Callable[[], None]) -> LatentDataset:
    data = cfg.data
    settings = {"csv": data.csv, "root": data.root, "folder": data.folder, "frames": data.frames,
                "stride": data.stride, "size": data.size, "seed": cfg.train.seed, "n": len(source),
                "synthetic": [data.synthetic, data.synthetic_clips, data.synthetic_direction_share],
                "vae": [cfg.model.vae, vae.config.scaling_factor]}
    if main and not LatentDataset.matches(data.latent_cache, settings):
        log.info("encoding %d clips into the latent cache %s", len(source), data.latent_cache)
        latents, captions = [], []
        for s in (source[i] for i in range(len(source))):
            z = vae.encode(s["video"][None].to(device), generator=torch.Generator().manual_seed(s["sample_seed"]))
            latents.append(z[0].cpu().to(torch.float16))
            captions.append(s["caption"])
        LatentDataset.write(data.latent_cache, latents, captions, settings)
    barrier()
    cached = LatentDataset(data.latent_cache, seed=cfg.train.seed)
    if data.latent_std > 0:
        # Like SD's 0.18215: scale latents to a chosen std, and keep the factor with the VAE for sampling.
        cached.scale = data.latent_std / float(cached.all_latents().std())
        vae.config = replace(vae.config, scaling_factor=vae.config.scaling_factor * cached.scale)
        log.info("latents scaled by %.5f to std %g: VAE scaling_factor %.5f", cached.scale, data.latent_std,
                 vae.config.scaling_factor)
    return cached


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (shuffled by seed + epoch, this rank's share) that can start mid-epoch."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
