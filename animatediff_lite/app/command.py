"""``animatediff-lite app``: the subcommand's flags and start-up (Gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Add the ``app`` subcommand to the CLI's subparsers."""
    a = sub.add_parser("app", help="web app (needs the [app] extra)", description="Serve a web page to generate "
                       "videos: model pickers, presets, progress, gallery. Results go to --output-dir as NAME.gif + "
                       "NAME.json (generate --from NAME.json remakes one). See docs/app.md.")
    a.add_argument("--models-dir", help="upstream-style models folder (StableDiffusion/, Motion_Module/, "
                   "DreamBooth_LoRA/, MotionLoRA/); default: the embedded model only")
    a.add_argument("--output-dir", default="outputs", help="where results are saved (default ./outputs)")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    a.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    a.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: float16 on cuda, float32 on cpu")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the server and serve until interrupted."""
    try:
        from . import ui  # Gradio: the optional [app] extra
    except ImportError as e:
        raise ValueError(f"the web app needs the [app] extra: pip install 'animatediff-lite[app]' ({e})") from e
    import torch

    from .models import scan  # with the page, once the extra is known to be there
    from .studio import Studio  # torch and the batch engine: only when the app runs, not for --help

    choices = scan(args.models_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else None)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    studio = Studio(args.models_dir, args.output_dir, device, dtype)
    print(f"animatediff-lite app: http://{args.host}:{args.port} (results in {studio.output_dir})", flush=True)
    ui.launch(studio, choices, args.host, args.port)
    return 0
