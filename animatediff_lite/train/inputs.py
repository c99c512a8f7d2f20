"""What a run trains on: the dataset chain (videos or synthetic clips -> latent cache -> time reversal) and the
sampler that can start mid-epoch, so a resumed run sees the same samples as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from .config import TrainConfig
from .data import LatentDataset, SyntheticClips, TimeReversed, build_video_dataset

log = logging.getLogger("animatediff_lite.train")


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (shuffled by seed + epoch, this rank's share) that can start mid-epoch."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


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
        source = build_video_dataset(csv_path=data.csv, root=data.root, folder=data.folder, suffix=data.suffix,
                                     frames=data.frames, stride=data.stride, size=data.size, seed=cfg.train.seed)
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
        vae.config = dataclasses.replace(vae.config, scaling_factor=vae.config.scaling_factor * cached.scale)
        log.info("latents scaled by %.5f to std %g: VAE scaling_factor %.5f", cached.scale, data.latent_std,
                 vae.config.scaling_factor)
    return cached
