"""Convert an AnimateDiff SparseCtrl model between the original layout (``{"controlnet": ...}`` .ckpt as
upstream loads it, or .safetensors) and diffusers SparseControlNetModel names.

    python weights/convert/sparsectrl_convert.py v3_sd15_sparsectrl_rgb.ckpt rgb_diffusers.safetensors --to diffusers
"""

from __future__ import annotations

import argparse

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.sparsectrl_map import WHAT, describe_sparsectrl, save_sparsectrl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.splitlines()[:2]))
    parser.add_argument("source", help="SparseCtrl file (original or diffusers) or diffusers folder")
    parser.add_argument("output", help="output .ckpt or .safetensors file")
    parser.add_argument("--to", choices=("original", "diffusers"), required=True)
    args = parser.parse_args(argv)
    checkpoint = read_checkpoint(args.source, WHAT)
    info = describe_sparsectrl(checkpoint)  # also checks the file is SparseCtrl before writing anything
    save_sparsectrl(checkpoint, args.output, args.to)
    print(f"{info['variant']}, channels {info['channels']}: wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
