"""Full AnimateDiff generation, animatediff-lite against diffusers' AnimateDiffPipeline on the same random weights.

Random weights of a chosen size (cost does not depend on weight values, so nothing is downloaded) are saved once
as a diffusers folder + MotionAdapter in a cache directory; both pipelines load that folder: ours through
``load_pipeline``, diffusers' ``AnimateDiffPipeline`` with DDIM configured as AnimateDiff (linear betas
0.00085-0.012, steps_offset 1, clip_sample False, set_alpha_to_one True). Both get the same prompt and the same
initial latents; a warm-up run, then timed runs (CUDA synchronised): median seconds of the whole call, denoising
it/s (from per-step callbacks), peak memory. Each variant runs in a fresh subprocess by default so the peak memory
of one does not hide in the other's (CUDA: ``max_memory_allocated``; CPU: growth of the peak resident set,
``VmHWM``, over the runs, plus the weights).

Sizes: ``sd15`` = SD1.5 UNet + v2 motion module + kl-f8 VAE + CLIP ViT-L text (16 frames 512x512, 25 steps, CFG 7.5,
fp16 on CUDA); ``tiny`` = SD1.5-shaped blocks at small widths for the CPU (8 frames 64x64, 5 steps, fp32); ``micro``
= the smallest model, for the smoke test.

Agreement: diffusers normalises the motion-module GroupNorm jointly over frames, the original AnimateDiff (and ours)
per frame; after timing, the diffusers process patches that norm to per frame and generates once more, and the
report gives the max abs difference of our video against that (and against unpatched diffusers, for information).

    python examples/bench_pipeline.py --size tiny                    # CPU
    python examples/bench_pipeline.py --size sd15 --compile          # CUDA, eager and torch.compile'd UNets
    python examples/bench_pipeline.py --size sd15 --profile          # + where the time goes (profile-*.txt)
    python examples/bench_pipeline.py --size sd15 --variants ours ours+triton ours+nofuse ours+cl --profile

Levers of our pipeline, each switched on by a "+name" suffix of a variant (combinable: ours+triton+compile):
compile (Pipeline.compile, fullgraph; diffusers: torch.compile of its UNet), cudagraphs (compile mode
"reduce-overhead"), triton / torch (backend forced; plain "ours" is backend "auto", the verified kernels only),
nofuse (q/k/v concatenated per call instead of fused once at load), cl (channels-last convolutions). Every row
also reports the VAE decode's time and share of the whole call (``decode_s``, ``decode_share``).

Writes benchmarks/results/bench_pipeline-<device>-<size>[-<label>].json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_common import RESULTS, device_slug, print_table

PROMPT = "a corgi running on the beach, golden hour"
NEGATIVE = ""
EAGER, COMPILED = ("diffusers", "ours"), ("diffusers+compile", "ours+compile")
LEVERS = {"compile": "torch.compile'd UNet", "cudagraphs": "compile mode reduce-overhead (CUDA graphs)",
          "triton": "backend='triton'", "torch": "backend='torch'", "nofuse": "q/k/v concatenated per call",
          "cl": "channels-last convolutions"}


def parse_variant(name: str) -> tuple[str, frozenset[str]]:
    """"ours+triton+compile" -> ("ours", {"triton", "compile"}); ValueError naming the variant otherwise."""
    side, *flags = name.split("+")
    allowed = set(LEVERS) if side == "ours" else {"compile"}
    bad = [f for f in flags if f not in allowed]
    if side not in EAGER or bad or len(set(flags)) != len(flags) or {"triton", "torch"} <= set(flags):
        raise ValueError(f"--variants: {name!r} is not diffusers[+compile] or ours[+lever...] with levers from "
                         f"{sorted(LEVERS)} (each once; not both triton and torch)")
    return side, frozenset(flags)


@dataclass(frozen=True)
class Size:
    """Model configs (diffusers / transformers constructor arguments) and the default sampling settings."""

    unet: dict
    vae: dict
    clip: dict
    adapter: dict
    frames: int
    height: int
    width: int
    steps: int
    runs: int
    guidance: float = 7.5
    extra: dict = field(default_factory=dict)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


_VAE4 = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
_VAE2 = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
SIZES = {
    # The published SD1.5 / mm_sd_v15_v2 configs (UNet2DConditionModel's defaults are SD1.5's but for the text width).
    "sd15": Size(
        unet=dict(sample_size=64, cross_attention_dim=768),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, **_VAE4),
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768),
        adapter=dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                     motion_mid_block_layers_per_block=1, use_motion_mid_block=True),
        frames=16, height=512, width=512, steps=25, runs=3),
    # SD1.5's block structure (4 levels, 2 layers, cross-attention on 3, v2 mid motion module) at small widths.
    "tiny": Size(
        unet=dict(sample_size=8, block_out_channels=(64, 128, 256, 256), cross_attention_dim=64),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, sample_size=64, **_VAE4),
        clip=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        adapter=dict(block_out_channels=(64, 128, 256, 256), motion_layers_per_block=2,
                     motion_mid_block_layers_per_block=1, use_motion_mid_block=True),
        frames=8, height=64, width=64, steps=5, runs=5),
    # The smoke test's model: two levels, a factor-2 VAE.
    "micro": Size(
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=8),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16, **_VAE2),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        adapter=dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_mid_block_layers_per_block=1,
                     use_motion_mid_block=True, motion_norm_num_groups=8),
        frames=4, height=16, width=16, steps=2, runs=1),
}


# ------------------------------------------------------------------------------------------ weights folder

def build_folder(size: str, root: Path, dtype: torch.dtype, device: str) -> Path:
    """Random weights of ``size`` saved once under root/<size>-<dtype>/ as ``sd/`` + ``motion_adapter/``.

    A ``COMPLETE`` marker is written last, so an interrupted save is redone. Returns that directory.
    """
    import diffusers
    import transformers

    from animatediff_lite.tokenizer import NUM_MERGES, VOCAB_ASSET, _read_asset, parse_merges, vocab_from_merges

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    out = root / f"{size}-{str(dtype).removeprefix('torch.')}"
    if (out / "COMPLETE").is_file():
        print(f"weights: reusing {out}")
        return out
    spec = SIZES[size]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sd = out / "sd"
    # Built on the target device: random init of ~1.3e9 SD1.5 parameters is slow on a few CPU cores.
    with torch.device(device):
        parts = {
            "unet": diffusers.UNet2DConditionModel(**spec.unet),
            "vae": diffusers.AutoencoderKL(**spec.vae),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **spec.clip)),
        }
        adapter = diffusers.MotionAdapter(motion_num_attention_heads=8, motion_max_seq_length=32, **spec.adapter)
    for name, model in parts.items():
        model.to(dtype).save_pretrained(str(sd / name))
    adapter.to(dtype).save_pretrained(str(out / "motion_adapter"))
    tok = sd / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    merges = parse_merges(_read_asset(VOCAB_ASSET), limit=NUM_MERGES)
    (tok / "vocab.json").write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False), encoding="utf-8")
    (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (out / "COMPLETE").write_text(json.dumps({"size": size, "dtype": str(dtype)}))
    del parts, adapter
    print(f"weights: built and saved {out} in {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------------------------------ the two pipelines

class PerFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm of every frame of (B, C, F, H, W) on its own (the original AnimateDiff motion-module norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * f, c, h, w))  # (B*F, C, H, W)
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def load_diffusers(folder: Path, device: str, dtype: torch.dtype):
    """diffusers' AnimateDiffPipeline over the saved folder, DDIM as AnimateDiff, progress bar off."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    sd = folder / "sd"
    # transformers >= 4.56 names it dtype (torch_dtype is deprecated there); older versions know torch_dtype only.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                                        clip_sample=False, set_alpha_to_one=True)
    pipe = diffusers.AnimateDiffPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(str(sd / "vae"), torch_dtype=dtype),
        text_encoder=transformers.CLIPTextModel.from_pretrained(str(sd / "text_encoder"), **{dtype_kw: dtype}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(sd / "tokenizer"), model_max_length=77),
        unet=diffusers.UNet2DConditionModel.from_pretrained(str(sd / "unet"), torch_dtype=dtype),
        motion_adapter=diffusers.MotionAdapter.from_pretrained(str(folder / "motion_adapter"), torch_dtype=dtype),
        scheduler=scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_frame_motion_norms(pipe) -> None:
    """Swap diffusers' joint-over-frames motion GroupNorms for per-frame ones (same weights), in place."""
    from diffusers.models.unets import unet_motion_model

    for m in pipe.unet.modules():
        if isinstance(m, unet_motion_model.AnimateDiffTransformer3D):
            norm = PerFrameGroupNorm(m.norm.num_groups, m.norm.num_channels, eps=m.norm.eps, affine=m.norm.affine)
            norm.load_state_dict(m.norm.state_dict())
            m.norm = norm.to(m.norm.weight.device, m.norm.weight.dtype)


def load_ours(folder: Path, device: str, dtype: torch.dtype, levers: frozenset[str] = frozenset()):
    """Our pipeline with the given levers (see LEVERS) switched on."""
    from animatediff_lite.loading.pipeline_load import load_pipeline
    from animatediff_lite.motion import set_fused_projections

    backend = "triton" if "triton" in levers else "torch" if "torch" in levers else "auto"
    pipe = load_pipeline(base=folder / "sd", motion_module=folder / "motion_adapter", device=device, dtype=dtype,
                         backend=backend)
    if "nofuse" in levers:
        set_fused_projections(pipe.unet, False)
    if "cl" in levers:
        pipe.channels_last()
    if "compile" in levers or "cudagraphs" in levers:
        pipe.compile("reduce-overhead" if "cudagraphs" in levers else "default")
    return pipe


def _import_side(side: str) -> None:
    if side == "ours":
        import animatediff_lite.loading.pipeline_load  # noqa: F401
    else:
        import diffusers
        import transformers

        _ = diffusers.AnimateDiffPipeline, diffusers.MotionAdapter, transformers.CLIPTextModel  # lazy imports


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate(side: str, pipe, latents: torch.Tensor, spec: Size, device: str) -> tuple[torch.Tensor, list[float]]:
    """One generation from the given latents; returns the video (B, F, 3, H, W) float32 CPU and the step end times
    followed by the end time of the call (the last gap is the VAE decode and the output conversion)."""
    stamps: list[float] = []

    def stamp() -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    b, _, f, h, w = latents.shape
    height, width = h * spec.latent_factor, w * spec.latent_factor
    if side == "ours":
        video = pipe(PROMPT, negative_prompt=NEGATIVE, num_frames=f, height=height, width=width, steps=spec.steps,
                     guidance_scale=spec.guidance, latents=latents.clone(), progress=False,
                     callback=lambda i, t, x: stamp())
    else:
        def on_step_end(pipeline, i, t, kwargs):
            stamp()
            return {}

        with torch.no_grad():
            video = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=f, height=height, width=width,
                         num_inference_steps=spec.steps, guidance_scale=spec.guidance, latents=latents.clone(),
                         output_type="pt", callback_on_step_end=on_step_end).frames
    video = video.float().cpu()
    _sync(device)
    stamps.append(time.perf_counter())
    return video, stamps


# ------------------------------------------------------------------------------------------ memory

def _proc_status(field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes, None where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _collect() -> None:
    """Free garbage and hand freed heap pages back to the OS (glibc), so a later RSS rise is new memory.

    Without the trim a long-lived process (--in-process, a test run) reuses pages it already holds and a
    pipeline's growth over the baseline can read as zero or less.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS stays the cruder measure
        pass


class Memory:
    """Memory of one pipeline in this process, over the bytes in use before it was loaded (the baseline).

    CUDA: ``memory_allocated`` / ``max_memory_allocated``. CPU: the resident set (``VmRSS``), its peak
    (``VmHWM``) reset once the pipeline is loaded, so the peak is the generation's, weights included. Resident
    rather than allocated bytes on purpose: weights mapped from a safetensors file count once touched, like
    weights copied into the heap.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.proc = not self.cuda and _proc_status("VmRSS") is not None and _reset_peak_rss()
        self.method = ("cuda max_memory_allocated" if self.cuda else
                       "VmHWM (peak RSS, reset after loading)" if self.proc else "ru_maxrss (process-wide peak)")
        _collect()
        self.base = self._now()

    def _now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        if self.proc:
            return _proc_status("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def loaded(self) -> None:
        """Call once the pipeline is loaded: records its resident bytes and starts the peak."""
        _collect()
        self.after_load = self._now() - self.base
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.proc:
            _reset_peak_rss()

    def peak(self) -> dict[str, int]:
        """peak_bytes (over the baseline, weights included) and the bytes resident after loading."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            extra = {"peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        else:
            peak = _proc_status("VmHWM") if self.proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            extra = {}
        return {"peak_bytes": peak - self.base, "after_load_bytes": self.after_load, **extra}


def _weights_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------ one variant

def run_variant(variant: str, folder: Path, latents: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict]:
    """Load, warm up and time one variant; returns (result row, videos by name)."""
    spec, device, dtype = SIZES[args.size], args.device, _dtype(args)
    side, levers = parse_variant(variant)
    _import_side(side)  # load_s counts loading, not the first import of a library
    mem = Memory(device)
    t0 = time.perf_counter()
    pipe = load_ours(folder, device, dtype, levers) if side == "ours" else load_diffusers(folder, device, dtype)
    _sync(device)
    load_s = time.perf_counter() - t0
    # Every model the pipeline holds (diffusers also keeps the MotionAdapter it copied into its UNet).
    modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    if side == "diffusers":
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    weights = _weights_bytes(modules)
    if side == "diffusers" and "compile" in levers:
        pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
    latents = latents.to(device, dtype)

    times, step_times, decode_times = [], [], []
    mem.loaded()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        video, _ = generate(side, pipe, latents, spec, device)
    warmup_s = time.perf_counter() - t0
    for _ in range(spec.runs):
        t0 = time.perf_counter()
        video, stamps = generate(side, pipe, latents, spec, device)
        times.append(time.perf_counter() - t0)
        stamps, end = stamps[:-1], stamps[-1]
        if stamps:
            decode_times.append(end - stamps[-1])
        if len(stamps) > 1:  # steps 1..n-1: the first one would include text encoding
            step_times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    memory = mem.peak()
    if args.profile:
        write_profile(variant, pipe, latents, spec, args)
    videos = {variant: video}
    if variant == "diffusers":  # the agreement oracle: same run with per-frame motion GroupNorm (untimed)
        per_frame_motion_norms(pipe)
        videos["diffusers_per_frame_norm"], _ = generate(side, pipe, latents, spec, device)

    row = {"variant": variant, "levers": sorted(levers), "runs_s": times, "step_runs_s": step_times,
           "decode_runs_s": decode_times, "warmup_s": warmup_s,
           "load_s": load_s, "weights_bytes": weights, "memory_method": mem.method, **memory}
    del pipe, modules
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return summarise([row]), videos


def write_profile(variant: str, pipe, latents: torch.Tensor, spec: Size, args: argparse.Namespace) -> Path:
    """One more (untimed) generation under torch.profiler: the ops and kernels that took the most device time
    (CPU time without CUDA), as a table in <out-dir>/profile-<variant>-<device>-<size>.txt."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        generate(variant.split("+")[0], pipe, latents, spec, args.device)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    slug = device_slug(str(_device_info(args.device)["device"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"profile-{variant.replace('+', '-')}-{slug}-{args.size}.txt"
    path.write_text(f"{variant}, {args.size}, sorted by {sort}\n{table}\n")
    print(f"wrote {path}")
    return path


def summarise(rounds: list[dict]) -> dict:
    """One row from the rows of one variant's rounds: all timed runs pooled, the largest peak."""
    times = [t for r in rounds for t in r["runs_s"]]
    steps = [t for r in rounds for t in r["step_runs_s"]]
    decodes = [t for r in rounds for t in r.get("decode_runs_s", [])]
    step_s = statistics.median(steps) if steps else None
    decode_s = statistics.median(decodes) if decodes else None
    row = {**rounds[-1], "runs_s": times, "step_runs_s": steps, "decode_runs_s": decodes, "rounds": len(rounds)}
    row.update(decode_s=decode_s, decode_share=decode_s / statistics.median(times) if decode_s else None)
    row.update(total_s=statistics.median(times), min_s=min(times), max_s=max(times), step_s=step_s,
               it_per_s=1 / step_s if step_s else None, load_s=statistics.median(r["load_s"] for r in rounds),
               peak_bytes=max(r["peak_bytes"] for r in rounds),
               after_load_bytes=max(r["after_load_bytes"] for r in rounds))
    return row


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if args.device.startswith("cuda") else torch.float32


def _latents(spec: Size) -> torch.Tensor:
    """The shared initial noise (1, 4, F, H/f, W/f), float32 from a seeded CPU generator."""
    f = spec.latent_factor
    shape = (1, 4, spec.frames, spec.height // f, spec.width // f)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ report

def _versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("diffusers", "transformers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    import animatediff_lite

    out["animatediff_lite"] = getattr(animatediff_lite, "__version__", None)
    return out


def _device_info(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                "capability": list(torch.cuda.get_device_capability(0)),
                "memory_GiB": round(props.total_memory / 2**30, 1)}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": name, "cpu_count": os.cpu_count()}


def _diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return (a - b).abs().max().item()


def _ratios(rows: dict[str, dict]) -> dict:
    """Speed-up (their time / ours) and memory ratio (ours / theirs) of our variants against diffusers'."""
    out = {}
    for ours in (v for v in rows if v.startswith("ours")):
        for theirs in ("diffusers", "diffusers+compile"):
            if ours in rows and theirs in rows:
                key = f"{ours} vs {theirs}"
                out[key] = {"speedup": rows[theirs]["total_s"] / rows[ours]["total_s"],
                            "speedup_min": rows[theirs]["min_s"] / rows[ours]["min_s"],
                            "memory_ratio": rows[ours]["peak_bytes"] / rows[theirs]["peak_bytes"]}
                if rows[ours]["step_s"] and rows[theirs]["step_s"]:
                    out[key]["step_speedup"] = rows[theirs]["step_s"] / rows[ours]["step_s"]
    return out


def _video_stats(video: torch.Tensor) -> dict:
    """Spread of a video in [0, 1]: an agreement check on a saturated (all 0 / all 1) video would prove little."""
    saturated = ((video <= 0) | (video >= 1)).float().mean().item()
    return {"mean": video.mean().item(), "std": video.std().item(), "saturated_fraction": saturated}


# ------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="sd15" if torch.cuda.is_available() else "tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--frames", type=int, default=None, help="default: the size's (sd15 16, tiny 8)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs (default: the size's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="repeat all variants this many times, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time both pipelines with torch.compile'd UNets")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"diffusers[+compile], ours[+lever...] with levers {sorted(LEVERS)} (default: {EAGER})")
    p.add_argument("--in-process", action="store_true",
                   help="run all variants in this process (faster start; CPU peak RSS then less honest)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the random weights are saved once (default: ~/.cache/animatediff_lite_bench)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--profile", action="store_true",
                   help="also profile one generation per variant (top ops/kernels to profile-*.txt)")
    p.add_argument("--build-only", action="store_true", help="only build and save the random weights, then exit")
    p.add_argument("--label", default=None, help="appended to the result file's name (e.g. compile)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for v in args.variants or ():
        parse_variant(v)
    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {args.size!r}")
    return args


def _spec(args: argparse.Namespace) -> Size:
    """The size's settings with the command-line overrides applied (also stored back into SIZES for children)."""
    base = SIZES[args.size]
    over = {k: getattr(args, k) for k in ("frames", "height", "width", "steps", "runs", "guidance")
            if getattr(args, k) is not None}
    spec = Size(**{**base.__dict__, **over})
    step = max(8, spec.latent_factor)
    for name in ("height", "width"):
        if getattr(spec, name) % step:
            raise ValueError(f"--{name} must be a multiple of {step} for this VAE")
    SIZES[args.size] = spec
    return spec


def _child_main(args: argparse.Namespace) -> None:
    latents = torch.load(args.work / "latents.pt")
    row, videos = run_variant(args.child, args.folder, latents, args)
    torch.save(videos, args.work / f"{args.child}.pt")
    (args.work / f"{args.child}.json").write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the result written to the JSON file (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = _spec(args)
    if args.child:
        _child_main(args)
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    dtype = _dtype(args)
    variants = args.variants or (list(EAGER) + (list(COMPILED) if args.compile else []))
    if "ours" in variants and "diffusers" in variants:
        variants = ["diffusers", "ours"] + [v for v in variants if v not in EAGER]

    cache = args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "animatediff_lite_bench"
    folder = build_folder(args.size, cache, dtype, args.device)
    if args.build_only:
        return {}
    gc.collect()
    latents = _latents(spec)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    videos: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as work:
        work = Path(work)
        torch.save(latents, work / "latents.pt")
        # Rounds alternate the variants, so a burst of load from other processes does not land on one of them.
        for r in range(args.rounds):
            for variant in variants:
                print(f"running {variant} (round {r + 1}/{args.rounds}) ...", flush=True)
                if args.in_process:
                    row, vids = run_variant(variant, folder, latents, args)
                else:
                    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant, "--folder",
                           str(folder), "--work", str(work)]
                    subprocess.run(cmd, check=True)
                    row = json.loads((work / f"{variant}.json").read_text())
                    vids = torch.load(work / f"{variant}.pt")
                rounds[variant].append(row)
                videos.update(vids)
                print(f"  {variant}: median {row['total_s']:.3f} s, min {row['min_s']:.3f} s, "
                      f"peak {row['peak_bytes'] / 2**20:.1f} MiB", flush=True)
    rows = {v: summarise(rs) for v, rs in rounds.items()}
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    ours = videos.get("ours")
    agreement = {
        "ours vs diffusers (per-frame motion norm)": _diff(ours, videos.get("diffusers_per_frame_norm")),
        "ours vs diffusers (unpatched, joint motion norm)": _diff(ours, videos.get("diffusers")),
        "diffusers+compile vs diffusers": _diff(videos.get("diffusers+compile"), videos.get("diffusers")),
        **{f"{v} vs ours": _diff(videos.get(v), ours) for v in variants if v.startswith("ours+")},
    }
    agreement = {k: v for k, v in agreement.items() if v is not None}
    ratios = _ratios(rows)

    table = [{"variant": v, "median_s": r["total_s"], "min_s": r["min_s"], "it/s": r["it_per_s"] or "",
              "decode_s": r["decode_s"] or "", "decode_%": 100 * r["decode_share"] if r["decode_share"] else "",
              "load_s": r["load_s"], "peak_MiB": r["peak_bytes"] / 2**20, "loaded_MiB": r["after_load_bytes"] / 2**20,
              "weights_MiB": r["weights_bytes"] / 2**20} for v, r in rows.items()]
    print(f"\n{args.size}: {spec.frames} frames {spec.height}x{spec.width}, {spec.steps} DDIM steps, "
          f"guidance {spec.guidance}, {dtype}, {args.device}, {spec.runs} timed runs x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print_table(table, ["variant", "median_s", "min_s", "it/s", "decode_s", "decode_%", "load_s", "peak_MiB",
                        "loaded_MiB", "weights_MiB"])
    for key, r in ratios.items():
        print(f"{key}: speed-up {r['speedup']:.3f}x median, {r['speedup_min']:.3f}x best run, denoising steps "
              f"{r.get('step_speedup', float('nan')):.3f}x; peak memory ratio {r['memory_ratio']:.3f}")
    for key, d in agreement.items():
        print(f"max abs diff {key}: {d:.3g}")

    f = spec.latent_factor
    result = {
        "benchmark": "bench_pipeline", **_device_info(args.device), **_versions(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "size": args.size, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load_after,
        "isolated_processes": not args.in_process, "compile_mode": args.compile_mode,
        "shapes": {"frames": spec.frames, "height": spec.height, "width": spec.width, "steps": spec.steps,
                   "guidance_scale": spec.guidance, "cfg_batch": 2 if spec.guidance > 1 else 1,
                   "latents": [1, 4, spec.frames, spec.height // f, spec.width // f]},
        "models": {"unet": spec.unet, "vae": spec.vae, "clip": spec.clip, "adapter": spec.adapter},
        "runs": spec.runs, "rounds": args.rounds, "warmup": args.warmup,
        "notes": "total_s / min_s: whole call (text encoding, denoising loop, VAE decode), median / best of the "
                 "timed runs of all rounds; it_per_s: denoising steps per second (median step time from per-step "
                 "callbacks); peak_bytes: peak over warm-up and timed runs above the bytes in use before loading, "
                 "weights included (CUDA max_memory_allocated; CPU peak resident set, VmHWM); after_load_bytes: "
                 "resident after loading (our safetensors weights are memory-mapped and become resident when first "
                 "used); weights_bytes: parameters + buffers the pipeline holds (diffusers keeps the MotionAdapter "
                 "beside the UNet it copied it into); VAE decode chunk: diffusers 16 frames (its default), ours 8; "
                 "decode_s / decode_share: from the last step's end to the video on the CPU (VAE decode, "
                 "post-processing, copy), median, and its share of total_s; levers: see LEVERS in the script.",
        "results": list(rows.values()), "ratios": ratios, "max_abs_diff": agreement,
        "video_stats": _video_stats(ours) if ours is not None else None,
    }
    slug = device_slug(str(result["device"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    path = args.out_dir / f"bench_pipeline-{slug}-{args.size}{label}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
