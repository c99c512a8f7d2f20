"""Measure CPU generation time against the intra-op thread count, idle and under load (docs/threads.md).

Every measurement runs in a fresh process (threads are process-wide): load the model, one warm-up generation,
then ``--repeats`` timed generations. Each cell gets ``--rounds`` such processes, interleaved with the other
cells', and reports the median of all its times. Models: the embedded default model at its
trained size (8 frames of 32x32, 20 steps) and a random-weight "mid" model between the tiny test configs and
SD1.5 (UNet widths 64/128/256, 16 frames of 64x64, 10 steps), built from the config dataclasses.
Load: "busy" starts ``--busy`` bounded busy-loop processes (one per core by default) for all its cells,
on top of whatever else the machine runs (the load average is recorded next to each cell).

    python examples/threads_table.py --threads 1 2 --passive --rounds 3 --repeats 2 --json threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def build(model: str, threads: int):
    """(pipeline, sampling kwargs) for one model name, running on ``threads`` CPU threads."""
    import torch

    import animatediff_lite as ad

    if model == "default":
        return ad.load_pipeline(threads=threads), {}
    torch.set_num_threads(threads)
    from animatediff_lite.clip import TextEncoder
    from animatediff_lite.config import CLIPConfig, MotionConfig, UNetConfig, VAEConfig
    from animatediff_lite.tokenizer import Tokenizer
    from animatediff_lite.unet import UNet3D
    from animatediff_lite.vae import AutoencoderKL

    torch.manual_seed(0)
    clip = TextEncoder(CLIPConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16))
    unet = UNet3D(UNetConfig(block_out_channels=(64, 128, 256), down_cross_attention=(True, True, False),
                             layers_per_block=1, cross_attention_dim=256, attention_head_dim=4, norm_num_groups=16),
                  MotionConfig(num_heads=4, norm_num_groups=16))
    pipe = ad.Pipeline(Tokenizer(), clip.eval(), vae.eval(), unet.eval())
    return pipe, dict(num_frames=16, height=64, width=64, steps=10, guidance_scale=7.5)


def child(model: str, threads: int, repeats: int) -> None:
    """Run inside the measuring process: print one JSON line with the times."""
    import torch

    pipe, kwargs = build(model, threads)
    pipe("a red circle moving up", seed=0, progress=False, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe("a red circle moving up", seed=0, progress=False, **kwargs)
        times.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "times": times}))


def run_child(model: str, threads: int, repeats: int, passive: bool) -> dict:
    """One measuring process; returns its JSON line (thread count it ran on, times)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if passive:  # OpenMP workers sleep instead of spinning while they wait (read once, when torch starts)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, __file__, "--child", model, str(threads), str(repeats)], env=env,
                         capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "THREADS", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["default", "mid"], choices=("default", "mid"))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, os.cpu_count() or 1])
    parser.add_argument("--passive", action="store_true", help="also run every thread count > 1 with "
                        "OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per cell, interleaved over the cells "
                        "so that a change in the machine's other load hits every cell alike")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy-loop processes for 'busy'")
    parser.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=("idle", "busy"),
                        help="conditions to measure: idle (only the machine's other work) and/or busy")
    parser.add_argument("--json", help="also write the cells to this JSON file")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    variants = [(n, False) for n in args.threads] + [(n, True) for n in args.threads if args.passive and n > 1]
    cells: dict[tuple, dict] = {}
    for busy in [{"idle": 0, "busy": args.busy}[name] for name in args.loads]:
        loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=1800)]) for _ in range(busy)]
        try:
            for _ in range(args.rounds):
                for model in args.models:
                    for threads, passive in variants:
                        load = os.getloadavg()[0]
                        result = run_child(model, threads, args.repeats, passive)
                        cell = cells.setdefault((model, threads, passive, busy), {
                            "model": model, "threads": result["threads"],
                            "omp_wait_policy": "PASSIVE" if passive else "default", "busy_loops": busy,
                            "load_avg_1min": [], "times_s": []})
                        cell["load_avg_1min"].append(load)
                        cell["times_s"] += result["times"]
                        cell["median_s"] = statistics.median(cell["times_s"])
                        if args.json:  # rewritten after every process: a cut run keeps what it measured
                            with open(args.json, "w", encoding="utf-8") as f:
                                json.dump({"cpu_count": os.cpu_count(), "cells": list(cells.values())}, f, indent=1)
        finally:
            for p in loops:  # bounded anyway (1800 s); stop them as soon as the condition is done
                p.terminate()
                p.wait()
    for c in cells.values():
        times = sorted(c["times_s"])
        print(f"{c['model']:8s} threads={c['threads']} {c['omp_wait_policy']:8s} busy_loops={c['busy_loops']} "
              f"load {min(c['load_avg_1min']):.1f}-{max(c['load_avg_1min']):.1f}  median {c['median_s']:.2f} s  "
              f"min {times[0]:.2f}  max {times[-1]:.2f}  (n={len(times)})")


if __name__ == "__main__":
    main()
