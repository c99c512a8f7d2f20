"""Peak memory the control branch adds (ControlNet / SparseCtrl), ours against diffusers' pipelines.

Builds small random-weight models with diffusers (SD1.5 block layout at reduced widths), saves them, then runs
each variant in a fresh subprocess: {ours, diffusers} x {plain, +controlnet, +sparsectrl}. On the CPU it reports
the peak resident set size during sampling (polled every millisecond) above the size just before; on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before. The control branch's cost is the variant's
peak minus the plain peak of the same library.

    python examples/bench_control_memory.py --size 128 --frames 8 [--device cuda] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPT = "a corgi running on the beach"


def build(root: Path, width: int) -> None:
    """Random diffusers parts (UNet, VAE, CLIP, MotionAdapter, ControlNet, SparseCtrl) saved under root."""
    import diffusers
    import transformers

    from animatediff_lite.tokenizer import NUM_MERGES, VOCAB_ASSET, _read_asset, parse_merges, vocab_from_merges

    torch.manual_seed(0)
    ch = (width, 2 * width, 4 * width, 4 * width)
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    common = dict(block_out_channels=ch, layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
                  norm_num_groups=32)
    diffusers.UNet2DConditionModel(down_block_types=down, up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                   **common).save_pretrained(str(root / "sd" / "unet"))
    diffusers.AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                            latent_channels=4).save_pretrained(str(root / "sd" / "vae"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=1)).save_pretrained(
        str(root / "sd" / "text_encoder"))
    tok = root / "sd" / "tokenizer"
    tok.mkdir(parents=True)
    merges = parse_merges(_read_asset(VOCAB_ASSET), limit=NUM_MERGES)
    (tok / "vocab.json").write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False), encoding="utf-8")
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (root / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    diffusers.MotionAdapter(block_out_channels=ch, motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, use_motion_mid_block=False).save_pretrained(str(root / "mm"))
    diffusers.ControlNetModel(down_block_types=down, **common).save_pretrained(str(root / "cn"))
    diffusers.SparseControlNetModel(down_block_types=("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",),
                                    conditioning_channels=4, **common).save_pretrained(str(root / "sc"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _rss_peak_during(fn) -> int:
    """Peak resident set size while ``fn`` runs, above the size just before (sampled every millisecond: the
    loading peak that ru_maxrss keeps would hide a smaller sampling peak)."""
    before, peak, done = _rss(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - before


def run(root: Path, lib: str, variant: str, frames: int, size: int, steps: int, device: str) -> dict:
    """One sampling call in this process; returns the peak bytes above the memory in use before it."""
    images = [torch.rand(3, size, size) for _ in range(frames)]
    if lib == "ours":
        from animatediff_lite.loading.pipeline_load import load_pipeline

        extra = {"controlnets": [(root / "cn", 1.0)]} if variant == "controlnet" else \
            {"sparsectrl": root / "sc"} if variant == "sparsectrl" else {}
        pipe = load_pipeline(root / "sd", motion_module=root / "mm", device=device, **extra)
        call = {"controlnet": {"control_frames": [torch.stack(images)]},
                "sparsectrl": {"control_images": {0: images[0]}}}.get(variant, {})
        fn = lambda: pipe(PROMPT, num_frames=frames, height=size, width=size, steps=steps, seed=0,  # noqa: E731
                          progress=False, **call)
    else:
        import diffusers
        import transformers

        kw = dict(vae=diffusers.AutoencoderKL.from_pretrained(str(root / "sd" / "vae")),
                  text_encoder=transformers.CLIPTextModel.from_pretrained(str(root / "sd" / "text_encoder")),
                  tokenizer=transformers.CLIPTokenizer.from_pretrained(str(root / "sd" / "tokenizer"),
                                                                       model_max_length=77),
                  unet=diffusers.UNet2DConditionModel.from_pretrained(str(root / "sd" / "unet")),
                  motion_adapter=diffusers.MotionAdapter.from_pretrained(str(root / "mm")),
                  scheduler=diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False))
        call = {}
        if variant == "controlnet":
            pipe = diffusers.AnimateDiffControlNetPipeline(
                controlnet=diffusers.ControlNetModel.from_pretrained(str(root / "cn")), **kw)
            call = {"conditioning_frames": images}
        elif variant == "sparsectrl":
            pipe = diffusers.AnimateDiffSparseControlNetPipeline(
                controlnet=diffusers.SparseControlNetModel.from_pretrained(str(root / "sc")), **kw)
            from PIL import Image  # diffusers reads a lone (3, H, W) tensor as a batch of 3 images

            key = Image.fromarray((images[0].permute(1, 2, 0) * 255).byte().numpy())
            call = {"conditioning_frames": [key], "controlnet_frame_indices": [0]}
        else:
            pipe = diffusers.AnimateDiffPipeline(**kw)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        fn = lambda: pipe(PROMPT, num_frames=frames, height=size, width=size, num_inference_steps=steps,  # noqa: E731
                          generator=torch.Generator("cpu").manual_seed(0), output_type="pt", **call)
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = _rss_peak_during(fn)
    return {"lib": lib, "variant": variant, "peak_bytes": int(peak)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=int, default=32, help="UNet width of the first level (SD1.5: 320)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    parser.add_argument("--one", nargs=3, metavar=("ROOT", "LIB", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        root, lib, variant = args.one
        print(json.dumps(run(Path(root), lib, variant, args.frames, args.size, args.steps, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.width)
        rows = []
        for lib in ("ours", "diffusers"):
            for variant in ("plain", "controlnet", "sparsectrl"):
                cmd = [sys.executable, __file__, "--one", tmp, lib, variant, "--size", str(args.size), "--frames",
                       str(args.frames), "--steps", str(args.steps), "--device", args.device]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    base = {r["lib"]: r["peak_bytes"] for r in rows if r["variant"] == "plain"}
    for r in rows:
        r["control_branch_bytes"] = r["peak_bytes"] - base[r["lib"]]
        print(f"{r['lib']:>9} {r['variant']:>10}: peak {r['peak_bytes'] / 2**20:8.1f} MiB, "
              f"control branch {r['control_branch_bytes'] / 2**20:+8.1f} MiB")
    result = {"device": args.device, "platform": platform.platform(), "torch": torch.__version__,
              "size": args.size, "frames": args.frames, "steps": args.steps, "width": args.width, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
