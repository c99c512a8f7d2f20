"""What is bit-reproducible: the same seed on the embedded default model under other thread counts and dtypes.

Every variant is compared with the reference (float32, 1 thread, on the CPU): the largest difference of the
float video, and of the written GIF frames (uint8) the share of pixels that differ and by how much. A repeat of
the reference in the same process checks run-to-run equality. With CUDA, "cuda float32"/"cuda float16" rows are
added. Numbers go to README's "Reproducibility" section.

    python examples/repro_check.py --seeds 0 1 2 --json repro.json
"""

from __future__ import annotations

import argparse
import json

import torch

import animatediff_lite as ad
from animatediff_lite.video import to_uint8_frames

PROMPTS = ["a red circle moving up", "a blue square moving right", "a green triangle moving left"]


def run(device: str, dtype: torch.dtype, threads: int, seeds: list[int]) -> list[torch.Tensor]:
    pipe = ad.load_pipeline(device=device, dtype=dtype, threads=threads)
    return [pipe(p, seed=s, progress=False) for s in seeds for p in PROMPTS]


def compare(name: str, ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, other, strict=True))
    ref8 = [torch.from_numpy(to_uint8_frames(v[0])).int() for v in ref]
    oth8 = [torch.from_numpy(to_uint8_frames(v[0])).int() for v in other]
    d8 = torch.cat([(a - b).abs().flatten() for a, b in zip(ref8, oth8, strict=True)])
    row = {"variant": name, "videos": len(ref), "max_abs_diff_float": diff, "bitwise_equal": diff == 0.0,
           "gif_values_differing_pct": 100 * float((d8 > 0).float().mean()), "gif_max_diff_of_255": int(d8.max())}
    print(f"{name:28s} max |diff| {diff:.3g}  GIF: {row['gif_values_differing_pct']:.3f}% of values differ, "
          f"by up to {row['gif_max_diff_of_255']}/255", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    ref = run("cpu", torch.float32, 1, args.seeds)
    rows = [compare("cpu float32 1 thread (again)", ref, run("cpu", torch.float32, 1, args.seeds))]
    for n in args.threads:
        rows.append(compare(f"cpu float32 {n} threads", ref, run("cpu", torch.float32, n, args.seeds)))
    rows.append(compare("cpu bfloat16 1 thread", ref, run("cpu", torch.bfloat16, 1, args.seeds)))
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.float16):
            rows.append(compare(f"cuda {str(dtype)[6:]}", ref, run("cuda", dtype, 1, args.seeds)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
