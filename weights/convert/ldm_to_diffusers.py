"""Convert an LDM single file (SD1.5 .safetensors/.ckpt) to a diffusers-style folder: unet/, vae/ and
text_encoder/ (config.json + weights each; the tokenizer and scheduler are not part of the file).

    python weights/convert/ldm_to_diffusers.py v1-5-pruned-emaonly.safetensors stable-diffusion-v1-5/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from animatediff_lite.atomic import atomic_write
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.clip_map import clip_config_from_state, clip_state_from_ldm
from animatediff_lite.loading.io import CAST_DTYPES, cast_floating, read_state_dict, save_state_dict
from animatediff_lite.loading.unet_map import unet_config_from_state, unet_config_to_diffusers, unet_state_from_ldm
from animatediff_lite.loading.vae_map import vae_config_from_state, vae_state_from_ldm


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("source", help="LDM single file (.safetensors or .ckpt)")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--unet-only", action="store_true", help="convert only the UNet")
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), default="keep", help="cast floating tensors")
    args = parser.parse_args(argv)
    out, dtype = Path(args.output), args.dtype
    raw = read_state_dict(args.source, "a Stable Diffusion LDM single file")
    cfg = unet_config_from_state(raw)
    _write_json(out / "unet" / "config.json", unet_config_to_diffusers(cfg))
    save_state_dict(cast_floating(unet_state_from_ldm(raw, cfg, args.source), dtype),
                    out / "unet" / "diffusion_pytorch_model.safetensors")
    written = ["unet"]
    vae = None if args.unet_only else vae_state_from_ldm(raw)
    if vae is not None:
        v = vae_config_from_state(vae, args.source)
        n = len(v.block_out_channels)
        _write_json(out / "vae" / "config.json", {
            "_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.out_channels,
            "latent_channels": v.latent_channels, "block_out_channels": list(v.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": v.layers_per_block, "norm_num_groups": v.norm_num_groups, "act_fn": "silu",
            "scaling_factor": v.scaling_factor})
        save_state_dict(cast_floating(vae, dtype), out / "vae" / "diffusion_pytorch_model.safetensors")
        written.append("vae")
    text = None if args.unet_only else clip_state_from_ldm(raw)
    if text is not None:
        c = clip_config_from_state(text)
        # SD1.5's text_encoder/config.json values for the fields the weights do not determine.
        _write_json(out / "text_encoder" / "config.json", {
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.hidden_size,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
        save_state_dict(cast_floating({"text_model." + k: v for k, v in text.items()}, dtype),
                        out / "text_encoder" / "model.safetensors")
        written.append("text_encoder")
    print(f"wrote {out}: {', '.join(written)} (UNet {cfg.block_out_channels}, "
          f"{'linear' if cfg.use_linear_projection else 'conv'} projections)")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError) as e:  # a bad input file or option: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
