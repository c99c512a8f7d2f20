"""Convert a motion module (original AnimateDiff .ckpt/.safetensors or diffusers MotionAdapter) to a
native animatediff-lite safetensors file: original key layout without PE tables, MotionConfig in the metadata.

    python weights/convert/motion_to_native.py mm_sd_v15_v2.ckpt mm_sd_v15_v2.safetensors [--dtype fp16]
"""

from __future__ import annotations

import argparse

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.io import CAST_DTYPES, cast_floating
from animatediff_lite.loading.motion_load import read_motion_module, save_motion_module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("source", help="motion module file or diffusers MotionAdapter folder")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--version", choices=["v1", "v2", "v3"], default=None,
                        help="override the detected generation (v1: mm_sd_v14/v15, v2: mm_sd_v15_v2, v3: v3_sd15_mm)")
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), default="keep", help="cast floating tensors")
    parser.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups of the base UNet (32 for SD1.5)")
    args = parser.parse_args(argv)
    native, info = read_motion_module(args.source, version=args.version)
    native = cast_floating(native, args.dtype)
    save_motion_module(native, args.output, info.motion_config(args.norm_groups))
    print(info.summary())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
