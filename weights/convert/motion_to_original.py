"""Convert a motion module (native, original or diffusers) to the original AnimateDiff layout, with the
``pos_encoder.pe`` tables the published checkpoints carry (.ckpt as {"state_dict": ...}, or .safetensors).

    python weights/convert/motion_to_original.py mm.safetensors mm_sd_v15_v2.ckpt
"""

from __future__ import annotations

import argparse

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.io import CAST_DTYPES, cast_floating
from animatediff_lite.loading.motion_load import read_motion_module, save_motion_module_original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("source", help="motion module file or diffusers MotionAdapter folder")
    parser.add_argument("output", help="output .ckpt or .safetensors file")
    parser.add_argument("--version", choices=["v1", "v2", "v3"], default=None, help="override the detected generation")
    parser.add_argument("--max-len", type=int, default=None,
                        help="rows of the written PE tables (default: the module's, 24 for v1, 32 for v2/v3)")
    parser.add_argument("--no-pe", action="store_true", help="do not write pos_encoder.pe tables")
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), default="keep", help="cast floating tensors")
    args = parser.parse_args(argv)
    native, info = read_motion_module(args.source, version=args.version)
    native = cast_floating(native, args.dtype)
    save_motion_module_original(native, args.output, max_len=args.max_len or info.max_position_len,
                                with_pe=not args.no_pe)
    print(info.summary())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
