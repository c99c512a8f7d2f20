"""Convert a diffusers-style Stable Diffusion folder (unet/, and vae/ and text_encoder/ when present) to
one LDM single file (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.*).

    python weights/convert/diffusers_to_ldm.py stable-diffusion-v1-5/ sd15.safetensors [--dtype fp16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.checkpoint import read_checkpoint
from animatediff_lite.loading.clip_map import clip_state_from_diffusers, clip_state_to_ldm
from animatediff_lite.loading.io import CAST_DTYPES, cast_floating, save_state_dict
from animatediff_lite.loading.unet_map import read_unet_source, unet_state_to_ldm
from animatediff_lite.loading.vae_map import vae_state_to_ldm, vae_state_to_native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("source", help="diffusers model folder (with unet/config.json)")
    parser.add_argument("output", help="output .safetensors (or .ckpt) single file")
    parser.add_argument("--unet-only", action="store_true", help="convert only the UNet")
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), default="keep", help="cast floating tensors")
    args = parser.parse_args(argv)
    source = read_checkpoint(Path(args.source), "a diffusers Stable Diffusion folder")  # every file read once
    unet, cfg, where = read_unet_source(source)
    out = unet_state_to_ldm(unet, cfg)
    parts = [f"UNet ({where})"]
    vae, text = source.parts.get("vae"), source.parts.get("text_encoder")
    if not args.unet_only and vae is not None and vae.weights is not None:
        native = vae_state_to_native(vae.state)
        if native is None:
            raise CheckpointError(f"{vae.where}: no VAE tensors found")
        out |= vae_state_to_ldm(native)
        parts.append(f"VAE ({vae.where})")
    if not args.unet_only and text is not None and text.weights is not None:
        out |= clip_state_to_ldm(clip_state_from_diffusers(text.state))
        parts.append(f"text encoder ({text.where})")
    out = cast_floating(out, args.dtype)
    save_state_dict(out, args.output)
    print(f"wrote {args.output}: {len(out)} tensors from " + ", ".join(parts))


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
