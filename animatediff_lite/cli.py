"""``animatediff-lite`` / ``python -m animatediff_lite``: generate, info, convert, train.

A thin layer over the library: argument parsing, then one call per step. User errors (a bad argument, a
missing, empty or unreadable file: argparse errors, CheckpointError, ValueError, OSError) print one line to
stderr naming the argument or file and exit with status 2; warnings print as one line each, once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from pathlib import Path

from . import batch_cli, preset_cli
from . import control_options as control
from .app import command as app_command
from .checks import finite_number
from .errors import CheckpointError
from .generate_options import add_arguments as add_travel_video_arguments
from .generate_options import pipeline_options, prompt_map
from .presets import get_preset, load_presets

# Function-level imports below load torch and the model code (about 1 s on a small CPU): only the commands that
# run a model pay for it, never --help, `presets` or an argument error (tests/test_startup.py).

DTYPES = ("float32", "float16", "bfloat16")


TRAIN_EPILOG = """\
A config is a TOML file with [data], [model], [train], [optim], [output] ... sections; start from
examples/train_config.toml (every key is documented there). Any key can be overridden after the config
file as --section.key VALUE or --section.key=VALUE, for example:
  animatediff-lite train examples/train_config.toml --optim.lr 3e-4 --output.dir runs/mm
Values are read as TOML (3e-4, true, [1, 2], "text"), else taken as a string; overrides win over the file.
The resolved config is saved as {output.dir}/config.json. Multi-GPU:
  torchrun --nproc_per_node 4 -m animatediff_lite train my_config.toml"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (status 2): the message names the argument; --help has the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); scale defaults to 1.0 (a colon in the path is kept if no number follows)."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0
        try:
            return path, finite_number("scale", value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text}: the scale must be a finite number, got {scale!r}") from e
    return text, 1.0


def number(minimum: float | None = None, exclusive: bool = False):
    """argparse type: a finite float (>= minimum, or > with exclusive); NaN and inf are refused."""

    def parse(text: str) -> float:
        try:
            return finite_number("value", float(text), minimum, exclusive)
        except ValueError:
            bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None

    parse.__name__ = "number"
    return parse


def count(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="animatediff-lite", description="AnimateDiff text-to-video in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="text -> video file", description="Generate videos from prompts. Without "
                       "weights the embedded default model is used; with --preset the reference AnimateDiff configs.")
    g.add_argument("prompt", nargs="*", help="prompt(s); several prompts are sampled as one batch, written as a grid")
    g.add_argument("--prompts", metavar="FILE", help="text file with one prompt per line (blank lines skipped)")
    g.add_argument("--negative", default=None, help="negative prompt for every prompt (default: empty)")
    g.add_argument("--base", help="Stable Diffusion 1.5: diffusers folder or LDM single file")
    g.add_argument("--motion-module", help="motion module: original .ckpt/.safetensors or diffusers MotionAdapter")
    g.add_argument("--motion-module-version", choices=("v1", "v2", "v3"), help="override the detected generation")
    g.add_argument("--dreambooth", help="personalised single-file model (civitai/LDM) replacing the base weights")
    g.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                   help="kohya LoRA or the v3 adapter, W += scale*alpha/rank*up@down (repeatable, scale 1.0)")
    g.add_argument("--motion-lora", action="append", default=[], type=lora_spec, metavar="PATH[:SCALE]",
                   help="MotionLoRA, W += scale*up@down (repeatable, default scale 1.0)")
    g.add_argument("--frames", type=int, help="number of frames (default: the model's, 16 for SD1.5)")
    g.add_argument("--height", type=int, help="pixels, multiple of 8 (default: the model's, 512 for SD1.5)")
    g.add_argument("--width", type=int, help="pixels, multiple of 8 (default: the model's, 512 for SD1.5)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the model's, 25 for SD1.5)")
    g.add_argument("--guidance", type=number(0), help="guidance scale >= 0 (default: the model's, 7.5 for SD1.5)")
    g.add_argument("--sampler", help="ddim (default), euler, euler_a, dpmpp_2m, dpmpp_2m_karras or lcm "
                   "(AnimateLCM: lcm, 4-8 steps, guidance 1-2); see docs/sampling.md")
    g.add_argument("--seed", type=int, help="noise seed (CPU generator, like diffusers); default: random, printed")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=DTYPES, help="default: float16 on cuda, float32 on cpu")
    g.add_argument("--threads", type=count, help="CPU threads (default 1 unless OMP_NUM_THREADS is set: more threads "
                   "were 3-20x slower when other work shares the cores; N > 1 also sets OMP_WAIT_POLICY=PASSIVE "
                   "unless set, see docs/threads.md)")
    g.add_argument("-o", "--out", help="output: .gif/.mp4/.webp, or a folder of PNG frames (no suffix); default "
                   "out.gif; with --preset the output folder (default samples/NAME-TIME), with --per-prompt the "
                   "folder of the files (default samples)")
    g.add_argument("--fps", type=number(0, exclusive=True), default=8,
                   help="frames per second of the output (default 8)")
    g.add_argument("--preset", help="a reference config: ToonYou, Lyriel, RcnzCartoon, MajicMix, RealisticVision, "
                   "RealisticVision_v2, ... (see `animatediff-lite presets`)")
    g.add_argument("--models-dir", default="models", help="with --preset: folder holding StableDiffusion/, "
                   "Motion_Module/, DreamBooth_LoRA/, MotionLoRA/ (default ./models)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="kernels: auto = verified Triton kernels only (kernels/verified.toml), else PyTorch "
                        "(default: $ANIMATEDIFF_LITE_BACKEND, else auto)")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the UNet (fullgraph); MODE e.g. reduce-overhead for CUDA graphs")
    g.add_argument("--per-prompt", action="store_true",
                   help="one file per prompt in the folder -o (prompt i uses seed+i), instead of one grid; "
                        "implied under torchrun, where the prompts are split over the ranks")
    add_travel_video_arguments(g)  # context windows, prompt travel, FreeInit, video-to-video (generate_options.py)
    control.add_arguments(g)  # ControlNet, SparseCtrl (control_options.py)
    batch_cli.add_arguments(g)  # --batch JOBS, --from NAME.json (batch_cli.py)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("presets", help="list the reference configs, or show one",
                       description="List the shipped presets, or show one preset's prompts, negative prompts, "
                       "seeds, sampling settings and model files.")
    p.add_argument("name", nargs="?", help="a preset to show in full (e.g. ToonYou)")
    p.set_defaults(func=cmd_presets)

    i = sub.add_parser("info", help="what a weights file or folder is", description="Describe a checkpoint: layout, "
                       "motion-module generation (and why), parameter count, dtypes.")
    i.add_argument("file", help="weights file or folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert weights between layouts", description="Convert weights.")
    csub = c.add_subparsers(dest="what", required=True, metavar="WHAT")
    cm = csub.add_parser("motion", help="motion module: original <-> diffusers MotionAdapter names",
                         description="Convert a motion module (any supported layout) to original or diffusers keys.")
    cm.add_argument("input")
    cm.add_argument("output", help=".safetensors or .ckpt")
    cm.add_argument("--to", choices=("original", "diffusers", "native"), required=True,
                    help="original AnimateDiff keys (with PE tables), diffusers MotionAdapter keys, or native "
                         "safetensors with the motion config in its metadata")
    cm.add_argument("--motion-module-version", choices=("v1", "v2", "v3"))
    cm.set_defaults(func=cmd_convert_motion)
    cu = csub.add_parser("unet", help="SD UNet: LDM <-> diffusers key names",
                         description="Convert the UNet of a diffusers folder / LDM file to diffusers or LDM keys.")
    cu.add_argument("input")
    cu.add_argument("output", help=".safetensors or .ckpt")
    cu.add_argument("--to", choices=("diffusers", "ldm"), required=True)
    cu.set_defaults(func=cmd_convert_unet)

    t = sub.add_parser("train", help="train a motion module, MotionLoRA, UNet or the default model",
                       description="Train from a TOML config (every key: examples/train_config.toml; the default "
                                   "model's recipe: examples/train_default_model.toml; docs/training.md).",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="training config file (TOML; see examples/train_config.toml)")
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs overriding the config")
    t.set_defaults(func=cmd_train)

    app_command.add_parser(sub)  # `animatediff-lite app` (app/command.py; Gradio only when it runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a user error, 130 when interrupted, 141 when the reader
    of stdout went away, as a command killed by SIGPIPE reports)."""
    try:
        return _run(argv)
    except BrokenPipeError:  # `animatediff-lite presets NAME | head -1`: the reader is gone, say nothing
        try:  # the interpreter flushes stdout again at exit: into /dev/null, not the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout replaced by something without a file descriptor
            pass
        return 141


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"animatediff-lite {args.command}"
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # shown once each by _one_line_warnings
        warnings.showwarning = _one_line_warnings(prefix)
        try:
            status = args.func(args) or 0
            sys.stdout.flush()  # a closed pipe fails here, inside main, not in the interpreter's exit
            return status
        except BrokenPipeError:
            raise  # an OSError, but about stdout, not a user's file: main() ends quietly
        except (CheckpointError, ValueError) as e:
            print(f"{prefix}: error: {e}", file=sys.stderr)
        except OSError as e:  # reading or writing a user's path: permissions, a folder in the way, disk full
            where = f"{e.filename}: " if e.filename else ""
            print(f"{prefix}: error: {where}{e.strerror or e}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
    return 2


def _one_line_warnings(prefix: str):
    """A ``warnings.showwarning`` that prints each distinct message once, on one line, without source lines."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"{prefix}: warning: {text}", file=sys.stderr)

    return show


def user_file(path: str | Path, argument: str, expected: str, text: bool = False) -> Path:
    """``path`` if it is a non-empty file (UTF-8 text with ``text``); else ValueError naming ``argument``, the
    path, what it is and ``expected``."""
    p = Path(path)
    problem = None
    if not p.exists():
        problem = "no such file"
    elif p.is_dir():
        problem = "is a folder"
    elif p.stat().st_size == 0:
        problem = "is empty"
    elif text:
        data = p.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            problem = "is not UTF-8 text (a binary file?)"
        else:
            problem = "is not text (it holds NUL bytes)" if b"\0" in data else None
    if problem:
        raise ValueError(f"{argument} {path}: {problem}; expected {expected}")
    return p


def _check_weight_paths(args: argparse.Namespace) -> None:
    """Fail before any loading when a weights path given on the command line does not exist."""
    given = [("--base", args.base, "a diffusers SD1.5 folder or an LDM .safetensors/.ckpt file"),
             ("--motion-module", args.motion_module, "a motion module .ckpt/.safetensors or MotionAdapter folder"),
             ("--dreambooth", args.dreambooth, "a personalised SD1.5 single file (.safetensors/.ckpt)")]
    given += [("--lora", path, "a kohya LoRA / v3 adapter file") for path, _ in args.lora]
    given += [("--motion-lora", path, "a MotionLoRA file") for path, _ in args.motion_lora]
    for argument, path, expected in given:
        if path is not None and not Path(path).exists():
            raise ValueError(f"{argument} {path}: no such file or folder; expected {expected}")


def _device_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def _pick(value, preset_value, default):
    return value if value is not None else (preset_value if preset_value is not None else default)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads > 1:
        # Idle OpenMP workers sleep instead of spinning: spinning made 2 threads 3-20x slower than 1 on a busy
        # 2-core machine, sleeping ones 0.3-1.6x (docs/threads.md). Read when torch starts: below, in a CLI run.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if batch_cli.wanted(args):  # --batch / --from: every setting comes from the file (batch_cli.py)
        return batch_cli.run(args, build_parser)
    from .loading.pipeline_load import load_pipeline  # torch: see the note at the top
    from .video import save_video, video_format  # torch, numpy, imageio: see the note at the top

    prompts = list(args.prompt)
    if args.prompts:
        expected = "a UTF-8 text file with one prompt per line"
        lines = user_file(args.prompts, "--prompts", expected, text=True).read_text(encoding="utf-8").splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f"--prompts {args.prompts}: only blank lines; expected {expected}")
        prompts += [line.strip() for line in lines if line.strip()]
    travel, travel_negative = prompt_map(args, prompts)
    preset = None
    if args.preset:
        preset = get_preset(args.preset)
        if not Path(args.models_dir).is_dir():
            raise ValueError(f"--models-dir {args.models_dir}: not a folder; expected the folder holding "
                             "StableDiffusion/, Motion_Module/, DreamBooth_LoRA/ (and MotionLoRA/)")
    elif not prompts and travel is None:
        raise ValueError("give a prompt (positional), --prompts FILE, --prompt-at/--prompt-map or --preset NAME")
    _check_weight_paths(args)
    device, dtype = _device_dtype(args)
    sized = preset if args.video is None else None  # video-to-video: frames and size come from the input
    sampling = dict(num_frames=_pick(args.frames, sized and sized.frames, None),
                    height=_pick(args.height, sized and sized.height, None),
                    width=_pick(args.width, sized and sized.width, None),
                    steps=_pick(args.steps, preset and preset.steps, None),
                    guidance_scale=_pick(args.guidance, preset and preset.guidance_scale, None),
                    sampler=_pick(args.sampler, preset and preset.sampler, "ddim"),
                    progress=not args.no_progress, **pipeline_options(args), **control.call_options(args, preset))
    weights = dict(base=args.base, dreambooth=args.dreambooth, loras=args.lora, motion_loras=args.motion_lora,
                   motion_module_version=args.motion_module_version, device=device, dtype=dtype,
                   backend=args.backend, compile=args.compile or False, threads=args.threads,
                   **control.load_options(args))
    rank, world = preset_cli.ranks()
    if world > 1 and device.startswith("cuda"):  # one GPU per rank
        weights["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if preset is not None:
        return preset_cli.run(args, preset, prompts, weights, sampling)
    if args.per_prompt or world > 1:
        if args.seed is None:
            raise ValueError("--seed is required with --per-prompt / torchrun, so every rank draws the same seeds")
        pipe = load_pipeline(motion_module=args.motion_module, **weights)
        out_dir = Path(args.out or "samples")
        for i in range(rank, len(prompts), world):  # rank r takes prompts r, r+world, ...
            video = pipe(prompts[i], negative_prompt=args.negative or "", seed=args.seed + i, **sampling)
            name = "-".join(prompts[i].replace("/", "").split(" ")[:10])
            print(save_video(video, out_dir / f"{i:04d}-{name}.gif", fps=args.fps))
        return 0
    try:
        video_format(args.out or "out.gif")  # before sampling, not after it
    except ValueError as e:
        raise ValueError(f"-o/--out: {e}") from None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    pipe = load_pipeline(motion_module=args.motion_module, **weights)
    negative = travel_negative if travel_negative is not None and args.negative is None else args.negative or ""
    video = pipe(travel or prompts, negative_prompt=negative, seed=seed, callback=_print_seed(seed), **sampling)
    print(save_video(video, args.out or "out.gif", fps=args.fps))
    return 0


def _print_seed(seed: int):
    """A step callback that prints the seed once the first step ran: after every argument was checked.

    Once per run: the step index restarts with every FreeInit round."""
    printed = []

    def callback(step: int, t: int, latents) -> None:
        if not printed:
            printed.append(True)
            from tqdm.auto import tqdm

            tqdm.write(f"seed: {seed}", file=sys.stderr)  # above the progress bar, not through it

    return callback


def cmd_presets(args: argparse.Namespace) -> int:
    if args.name is not None:
        print(preset_cli.describe_preset(get_preset(args.name)))
        return 0
    for name, p in load_presets().items():
        print(f"{name:22s} {len(p.prompts)} prompts  motion: {', '.join(Path(m).name for m in p.motion_modules)}  "
              f"dreambooth: {Path(p.dreambooth).name if p.dreambooth else '-'}")
    print("\n`animatediff-lite presets NAME` shows one in full; `generate --preset NAME --models-dir DIR` runs it.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .loading.describe import describe  # torch: see the note at the top

    if not Path(args.file).exists():
        raise ValueError(f"{args.file}: no such file or folder; expected a weights file or model folder")
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:17s} {value:,}" if isinstance(value, int) and not isinstance(value, bool) else
                  f"{key:17s} {value}")
    return 0


def cmd_convert_motion(args: argparse.Namespace) -> int:
    from .loading.io import save_state_dict  # torch: see the note at the top
    from .loading.motion_load import read_motion_module, save_motion_module, save_motion_module_original  # torch
    from .loading.motion_map import motion_state_to_diffusers  # torch

    state, info = read_motion_module(args.input, args.motion_module_version)
    if args.to == "diffusers":
        save_state_dict(motion_state_to_diffusers(state, max_seq_length=info.max_position_len), args.output)
    elif args.to == "native":
        save_motion_module(state, args.output, info.motion_config())
    else:
        save_motion_module_original(state, args.output, max_len=info.max_position_len)
    print(f"{args.output}: motion module {info.version} ({info.reason}), {args.to} layout")
    return 0


def cmd_convert_unet(args: argparse.Namespace) -> int:
    from .loading.io import save_state_dict  # torch: see the note at the top
    from .loading.unet_map import read_unet_source, unet_state_to_ldm  # torch

    state, cfg, what = read_unet_source(args.input)
    if args.to == "ldm":
        state = unet_state_to_ldm(state, cfg)
    save_state_dict(state, args.output)
    print(f"{args.output}: {len(state)} tensors from {what}, {args.to} layout")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from .train import main as train_main  # torch; may be left out of an installation (ImportError below)
    except ImportError as e:
        raise ValueError(f"training is not available in this installation ({e})") from e
    user_file(args.config, "config", "a TOML training config like examples/train_config.toml", text=True)
    train_main([args.config, *args.overrides])
    return 0


if __name__ == "__main__":
    sys.exit(main())
