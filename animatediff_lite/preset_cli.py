"""``generate --preset NAME`` and ``presets NAME``: run and show the reference configs of the original repository.

cli.py parses the flags and hands a preset over to :func:`run`; under torchrun the samples are shared over the
ranks as ``--batch`` shares jobs (rank r makes samples r, r + world, ...) and rank 0 writes the grid and the log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path


def ranks() -> tuple[int, int]:
    """(rank, world size) under torchrun (its RANK / WORLD_SIZE variables), (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def _all_gather(world: int) -> Iterator[Callable[[object], list]]:
    """A function giving every rank's object (in rank order), over a gloo group held for the block."""
    if world == 1:
        yield lambda obj: [obj]
        return
    import torch.distributed as dist  # only under torchrun; torch is loaded by then anyway

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")  # small CPU objects, whatever device the samples are made on

    def gather(obj: object) -> list:
        parts: list = [None] * world
        dist.all_gather_object(parts, obj)
        return parts

    try:
        yield gather
    finally:
        if own:
            dist.destroy_process_group()


def run(args: argparse.Namespace, preset, prompts: list[str], weights: dict, sampling: dict) -> int:
    """One GIF per (motion module, prompt) plus the combined grid ``sample.gif`` and ``config.json``, as
    upstream's animate.py. Under torchrun rank r makes samples r, r + world, ...; the files equal one process's."""
    import torch  # lazy: cli.py imports this module to build its parser, which must not load torch

    from .loading.pipeline_load import load_pipeline  # torch: lazy, as the import above
    from .video import save_video  # torch: lazy, as the import above

    files = preset.files(args.models_dir)
    if prompts:  # prompts on the command line replace the preset's; seeds are paired with them as upstream
        preset = dataclasses.replace(preset, prompts=tuple(prompts), negative_prompts=("",))
    if args.negative is not None:
        preset = dataclasses.replace(preset, negative_prompts=(args.negative,))
    for key in ("base", "dreambooth", "loras", "motion_loras"):  # command-line weights win over the preset's
        weights[key] = weights[key] or files[key]
    if files["sparsectrl"] is not None:  # v3 SparseCtrl presets: the file and its key frames, unless given
        weights.setdefault("sparsectrl", files["sparsectrl"])
        sampling.setdefault("control_images", files["control_images"])
    motion_modules = [args.motion_module] if args.motion_module else files["motion_modules"]
    samples = [(m, *r) for m in motion_modules for r in preset.runs()]  # upstream's order: motion module major
    rank, world = ranks()
    with _all_gather(world) as gather:
        stamp = gather(datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))[0]  # rank 0's: one folder
        out_dir = Path(args.out or f"samples/{preset.name}-{stamp}")
        made, pipe, loaded = [], None, None
        for i in range(rank, len(samples), world):
            motion_module, prompt, negative, seed = samples[i]
            if loaded != motion_module:
                pipe, loaded = None, motion_module  # free the last one first
                pipe = load_pipeline(motion_module=motion_module, **weights)
            seed = args.seed if args.seed is not None else seed
            if seed is None:
                seed = random.SystemRandom().randrange(2**63)
            video = pipe(prompt, negative_prompt=negative, seed=seed, **sampling)
            name = "-".join(prompt.replace("/", "").split(" ")[:10])  # upstream's file naming
            path = save_video(video, out_dir / "sample" / f"{i}-{name}.gif", fps=args.fps)
            print(f"{path}  (seed {seed})")
            log = {"motion_module": str(motion_module), "prompt": prompt, "negative_prompt": negative, "seed": seed,
                   "file": str(path)}
            made.append((i, log, video.clamp(0, 1).mul(255).to(torch.uint8)))  # 8 bits: what the grid keeps
        del pipe
        everything = sorted((m for part in gather(made) for m in part), key=lambda m: m[0])
    if rank != 0:
        return 0
    # u + 0.5 over 255 truncates back to u in save_video: the grid equals one made from the float videos.
    grid = torch.cat([(frames.float() + 0.5) / 255 for _, _, frames in everything])
    print(save_video(grid, out_dir / "sample.gif", fps=args.fps, n_rows=4))
    settings = {"preset": preset.name, "source": preset.source, "samples": [log for _, log, _ in everything],
                **{k: v for k, v in sampling.items() if k != "progress"}}
    (out_dir / "config.json").write_text(json.dumps(settings, indent=1, default=str), encoding="utf-8")
    return 0


def describe_preset(preset) -> str:
    """One preset as text: model files (relative to --models-dir), sampling settings, then every sample's
    prompt, negative prompt and seed, paired as upstream pairs them."""
    loras = [f"{preset.lora} (scale {preset.lora_scale:g})"] if preset.lora else []
    rows = [f"{preset.name}  (upstream {preset.source})" if preset.source else preset.name,
            f"  base            {preset.base}",
            f"  motion modules  {', '.join(preset.motion_modules)}",
            f"  dreambooth      {preset.dreambooth or '-'}",
            f"  lora            {', '.join(loras) or '-'}",
            f"  motion loras    {', '.join(f'{p} (scale {s:g})' for p, s in preset.motion_loras) or '-'}",
            *([f"  sparsectrl      {preset.sparsectrl}, key frames "
               f"{', '.join(f'{frame}: {path}' for frame, path in preset.control_images)}"]
              if preset.sparsectrl else []),
            f"  sampling        {preset.sampler}, {preset.steps} steps, guidance {preset.guidance_scale:g}, "
            f"{preset.frames} frames of {preset.width}x{preset.height}, {preset.fps:g} fps",
            f"  samples         {len(preset.runs())} per motion module:"]
    for i, (prompt, negative, seed) in enumerate(preset.runs()):
        rows += [f"  [{i}] seed      {'random' if seed is None else seed}",
                 f"      prompt    {prompt}",
                 f"      negative  {negative or '-'}"]
    return "\n".join(rows)
