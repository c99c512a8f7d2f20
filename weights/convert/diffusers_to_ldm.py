"""Convert a diffusers-style Stable Diffusion folder (unet/, and vae/ and text_encoder/ when present) to
one LDM single file (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.*).

    python weights/convert/diffusers_to_ldm.py stable-diffusion-v1-5/ sd15.safetensors [--dtype fp16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.clip_map import WEIGHT_FILES, clip_state_from_diffusers, clip_state_to_ldm
from animatediff_lite.loading.io import CAST_DTYPES, cast_floating, read_state_dict, save_state_dict
from animatediff_lite.loading.unet_map import read_unet_source, unet_state_to_ldm
from animatediff_lite.loading.vae_map import WEIGHT_NAMES, vae_state_to_ldm, vae_state_to_native


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("source", help="diffusers model folder (with unet/config.json)")
    parser.add_argument("output", help="output .safetensors (or .ckpt) single file")
    parser.add_argument("--unet-only", action="store_true", help="convert only the UNet")
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), default="keep", help="cast floating tensors")
    args = parser.parse_args(argv)
    root = Path(args.source)
    unet, cfg, where = read_unet_source(root)
    out = unet_state_to_ldm(unet, cfg)
    parts = [f"UNet ({where})"]
    if not args.unet_only:
        vae_file = _first(root / "vae", WEIGHT_NAMES)
        if vae_file is not None:
            native = vae_state_to_native(read_state_dict(vae_file, "diffusers VAE weights"))
            if native is None:
                raise CheckpointError(f"{vae_file}: no VAE tensors found")
            out |= vae_state_to_ldm(native)
            parts.append(f"VAE ({vae_file})")
        text_file = _first(root / "text_encoder", WEIGHT_FILES)
        if text_file is not None:
            out |= clip_state_to_ldm(clip_state_from_diffusers(read_state_dict(text_file, "a CLIP text encoder")))
            parts.append(f"text encoder ({text_file})")
    out = cast_floating(out, args.dtype)
    save_state_dict(out, args.output)
    print(f"wrote {args.output}: {len(out)} tensors from " + ", ".join(parts))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
