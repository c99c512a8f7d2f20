"""Text -> video: prompt encoding, the DDIM denoising loop with classifier-free guidance, VAE decoding.

The loop follows diffusers' ``AnimateDiffPipeline`` step for step (same noise draw, same guidance
formula, same scheduler arithmetic), so given the same weights and noise the videos are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from .checks import default_context_overlap, finite_number, warn_untrained
from .context import context_windows, windowed
from .control import Control, ControlUnit, control_for_call
from .free_init import FreeInit
from .kernels._backend import Backend, resolve_backend
from .motion import refresh_fused_projections
from .ops import set_backend
from .prompt_travel import PromptMap, is_prompt_map, travel_embeddings, window_embeddings
from .samplers import SamplerRun, make_sampler
from .scheduler import DDIM, num_steps_check, seeded_noise
from .video_input import (
    VideoInput,
    check_strength,
    check_video_call,
    check_video_size,
    encode_video,
    first_step,
    noised_latents,
    read_video,
)

# fp16 kernels on the CPU are partial and slow (GroupNorm/conv fall back or fail); bf16 is well supported.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

StepCallback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


def check_device_dtype(device: str | torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Validate a (device, dtype) pair for sampling; ValueError naming ``dtype`` or ``device`` if unusable.

    float16 is refused on the CPU (use float32 or bfloat16 there); CUDA must be available for "cuda".
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device: {device!r}") from e
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, float16, bfloat16), got {dtype!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available; pass device='cpu'")
    if device.type == "cpu" and dtype not in CPU_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported on the CPU; use torch.float32 or torch.bfloat16 there, "
                         "or a CUDA device for float16")
    return device, dtype


SAMPLE_DEFAULTS: dict[str, float | int] = {"num_frames": 16, "height": 512, "width": 512, "steps": 25,
                                           "guidance_scale": 7.5}


class Pipeline:
    """AnimateDiff text-to-video sampler over plain components.

    Attributes: ``tokenizer`` (texts -> (n, 77) ids), ``text_encoder`` (ids -> (n, 77, D)), ``vae``
    (``decode(latents (B, 4, F, h, w)) -> (B, 3, F, H, W)``), ``unet`` (``(B, 4, F, h, w), t, (B, 77, D)
    -> (B, 4, F, h, w)``), ``scheduler`` (:class:`DDIM`), ``device``, ``dtype`` and ``decode_chunk_size``
    (frames the VAE decodes at once: memory does not grow with the frame count), ``backend`` (the kernel choice,
    resolved once for ``device``: see :meth:`set_backend`).
    Build it with :func:`animatediff_lite.load_pipeline`.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, vae: torch.nn.Module, unet: torch.nn.Module,
                 scheduler: DDIM | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, decode_chunk_size: int = 8,
                 backend: str | Backend | None = None) -> None:
        self.device, self.dtype = check_device_dtype(device, dtype)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler or DDIM()
        self.decode_chunk_size = decode_chunk_size
        # What __call__ uses for arguments left as None: AnimateDiff's settings, or what a model was trained
        # for (the embedded default model makes 8 frames of 32x32).
        self.sample_defaults: dict[str, float | int] = dict(SAMPLE_DEFAULTS)
        # Sizes the model was trained on, where the model records them ({"num_frames": 8, "height": 32, ...});
        # other sizes are allowed but warned about. None: unknown, never warned.
        self.trained_for: dict[str, int] | None = None
        self.compile_mode: str | None = None  # set by compile()
        self.controlnets: list[ControlUnit] = []  # load_pipeline(controlnets=...); see control.py
        self.sparsectrl: ControlUnit | None = None  # load_pipeline(sparsectrl=...)
        self.set_backend(backend)

    def set_backend(self, backend: str | Backend | None = None) -> Backend:
        """Choose the kernels once for this pipeline: "auto" | "triton" | "torch", or None for the environment
        variable ANIMATEDIFF_LITE_BACKEND (default "auto").

        "auto" runs a Triton kernel only where kernels/verified.toml lists it as verified for this device's compute
        capability, the installed Triton and the dtype, at sizes where it was measured faster; else PyTorch.
        "triton" forces the kernels (RuntimeError where one cannot run); "torch" never uses them. Every model
        module gets the resolved :class:`Backend`; no op reads the environment afterwards. Returns it.
        """
        self._backend_request = backend
        self.backend = resolve_backend(backend, self.device)
        for m in self._models():
            if isinstance(m, torch.nn.Module):
                set_backend(m, self.backend, self.device)
        return self.backend

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           backend: str | Backend | None = None) -> Pipeline:
        """Move every model to ``device`` / cast to ``dtype`` (in place); returns self.

        The kernel backend is resolved again for the new device: ``backend`` if given, else what was asked for
        before (a name, or None for the environment variable).
        """
        self.device, self.dtype = check_device_dtype(device or self.device, dtype or self.dtype)
        for m in self._models():
            m.to(self.device, self.dtype)
        request = backend if backend is not None else self._backend_request
        self.set_backend(request.name if isinstance(request, Backend) else request)
        return self

    def compile(self, mode: str = "default", compiler: str = "inductor") -> Pipeline:
        """Compile the UNet3D in place with ``torch.compile(fullgraph=True)``: one graph, no break (tested).

        ``mode``: a torch.compile mode; "reduce-overhead" also captures the fixed-shape denoising step in CUDA
        graphs on CUDA (unmeasured so far: see benchmarks/results/README.md). The module keeps its state-dict
        keys (``nn.Module.compile``, no ``_orig_mod.`` prefix). The first generation pays the compile time; a
        new shape (frames, size, batch) compiles again. ``compiler``: the torch.compile backend ("inductor"; tests
        use "aot_eager", which needs no C++ toolchain). Returns self.
        """
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        refresh_fused_projections(self.unet)  # the compiled graph reads these caches as they stand
        self.unet.compile(fullgraph=True, dynamic=False, backend=compiler, mode=None if mode == "default" else mode)
        self.compile_mode = mode
        return self

    def channels_last(self, enabled: bool = True) -> Pipeline:
        """Store the UNet and VAE convolution activations/weights channels-last (NHWC), or back; returns self.

        A lever for cuDNN's NHWC convolutions on tensor cores; results are the same up to rounding.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for m in (self.unet, self.vae):
            for conv in m.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.to(memory_format=fmt)  # cuDNN follows the weight's layout, so activations become NHWC
        return self

    def _models(self) -> list[torch.nn.Module]:
        units = [*self.controlnets, *([self.sparsectrl] if self.sparsectrl else [])]
        return [self.text_encoder, self.vae, self.unet, *(u.model for u in units)]

    @property
    def max_frames(self) -> int | None:
        """Frames one UNet call can take (the motion module's PE length), None without a motion module."""
        return getattr(self.unet, "max_frames", None)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for SD1.5)."""
        return int(getattr(self.vae, "downsample_factor", 8))

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """n prompts -> CLIP last hidden states (n, 77, D) on ``device`` in ``dtype``."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def predict_noise(self, x: torch.Tensor, t: int, embeds: torch.Tensor, guidance_scale: float,
                      frames: slice | None = None, control: Control | None = None,
                      step: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Guided model output at x (B, 4, f, h, w); embeds is [uncond; cond] (2B, 77, D) or cond (B, 77, D),
        or per frame (2B or B, F, 77, D) (prompt travel), of which the ``frames`` of x (default all) are used.
        control: the ControlNets' residuals for step ``step`` = (index, count) of the schedule (control.py)."""
        guided = embeds.shape[0] == 2 * x.shape[0]
        if embeds.dim() == 4:
            embeds = window_embeddings(embeds, slice(None) if frames is None else frames)
        inp = torch.cat([x, x]) if guided else x
        timestep = torch.tensor(t, device=x.device)  # int64, or float32 for the Euler samplers (as diffusers)
        extra = {}
        if control is not None:
            down, mid = control.residuals(inp, timestep, embeds, *step, frames)
            extra = {} if mid is None else {"down_residuals": down, "mid_residual": mid}
        if self.compile_mode == "reduce-overhead" and inp.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # one replay per call; its outputs are reused memory
            out = self.unet(inp, timestep, embeds, **extra).clone()
        else:
            out = self.unet(inp, timestep, embeds, **extra)
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, F, h, w) -> float32 CPU video (B, F, 3, H, W) in [0, 1]."""
        video = self.vae.decode(latents, self.decode_chunk_size).float()  # (B, 3, F, H, W) in ~[-1, 1]
        return (video * 0.5 + 0.5).clamp(0, 1).transpose(1, 2).contiguous().cpu()

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str] | PromptMap, negative_prompt: str | list[str] | PromptMap | None = None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, num_videos_per_prompt: int = 1, eta: float = 0.0,
                 context_frames: int | None = None, context_overlap: int | None = None, progress: bool = True,
                 callback: StepCallback | None = None, free_init: FreeInit | None = None,
                 video: VideoInput | None = None, strength: float | None = None,
                 control_frames: Sequence[VideoInput] | None = None,
                 control_start: float | Sequence[float] | None = None,
                 control_end: float | Sequence[float] | None = None, control_images: dict | None = None,
                 control_scale: float | None = None, sampler: str = "ddim") -> torch.Tensor:
        """Generate videos; returns float32 CPU (len(prompts) * num_videos_per_prompt, num_frames, 3, H, W) in [0, 1].

        prompt / negative_prompt: one string or a list (a negative string applies to every prompt; None
        means ""). Videos are ordered prompt-major: p0 v0, p0 v1, p1 v0, ...
        Prompt travel: a {frame: text} map as prompt and/or negative_prompt gives every frame its own
        embedding, interpolated linearly between key frames (see :mod:`animatediff_lite.prompt_travel`).
        Noise: ``seed=s`` draws it from ``torch.Generator("cpu").manual_seed(s)`` exactly as diffusers'
        ``AnimateDiffPipeline`` does with that generator; ``generator`` is used as given (also for eta
        noise); ``latents`` (B, 4, F, H/8, W/8) skips the draw. guidance_scale <= 1 skips the
        unconditional pass. context_frames: denoise in sliding windows of that many frames overlapping by
        context_overlap frames (needed when num_frames exceeds the motion module's PE length; default: 4, at
        most half the window, see :func:`animatediff_lite.checks.default_context_overlap`).
        callback(step_index, timestep, latents) runs after every step; a returned tensor replaces latents.
        sampler: "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras" or "lcm" (see
        :mod:`animatediff_lite.samplers`), each over ``self.scheduler``'s noise table; eta is DDIM's only.
        num_frames, height, width, steps, guidance_scale left as None come from ``self.sample_defaults``
        (16 frames, 512x512, 25 steps, guidance 7.5 unless the model says otherwise).
        free_init: a :class:`~animatediff_lite.free_init.FreeInit` samples ``iterations`` rounds, each
        restarting from the last one's low frequencies (as diffusers' ``enable_free_init``); callback's
        step index restarts every round.
        video: video-to-video from a (frames, 3, H, W) float tensor in [0, 1], a list of PIL images or a
        GIF/MP4 path; num_frames/height/width come from it. strength in (0, 1] (default 0.8): the share of
        the schedule run from the noised input (as diffusers' ``AnimateDiffVideoToVideoPipeline``).
        control_frames: one condition video per ControlNet of ``load_pipeline(controlnets=...)`` ((F, 3, H, W)
        tensor in [0, 1], PIL images or a path; F = num_frames, H x W the video size), applied to every video of
        the batch; control_start / control_end: the share of the schedule each acts in (see control.py).
        control_images: SparseCtrl key frames {frame index: PIL image, (3, H, W) tensor in [0, 1] or path} for
        ``load_pipeline(sparsectrl=...)``, applied to every video and both CFG halves; control_scale: its
        residual scale (default 1.0).
        """
        if video is not None:  # video-to-video: frames and size come from the input (video_input.py)
            frames_in = read_video(video)
            num_frames, height, width = check_video_size(frames_in, num_frames, height, width)
            strength = check_strength(0.8 if strength is None else strength)
            check_video_call(num_frames, self.max_frames, context_frames, latents, free_init)
        elif strength is not None:
            raise ValueError("strength applies to video-to-video only; pass video= as well")
        d = {**SAMPLE_DEFAULTS, **self.sample_defaults}
        num_frames = int(d["num_frames"]) if num_frames is None else num_frames
        height = int(d["height"]) if height is None else height
        width = int(d["width"]) if width is None else width
        steps = int(d["steps"]) if steps is None else steps
        guidance_scale = finite_number("guidance_scale", d["guidance_scale"] if guidance_scale is None
                                       else guidance_scale, minimum=0)
        travel = is_prompt_map(prompt) or is_prompt_map(negative_prompt)
        prompts, negatives = ([prompt], []) if travel else self._check_prompts(prompt, negative_prompt)
        if free_init is not None and not isinstance(free_init, FreeInit):
            raise ValueError(f"free_init must be an animatediff_lite.FreeInit or None, got {type(free_init).__name__}")
        windows = self._check_args(num_frames, height, width, steps, num_videos_per_prompt, eta,
                                   context_frames, context_overlap, seed, generator)
        warn_untrained(self.trained_for, num_frames=context_frames or num_frames, height=height, width=width)
        start = first_step(steps, strength) if video is not None else 0  # video-to-video skips the first steps
        rounds = free_init.round_steps(steps) if free_init else [steps]  # steps per FreeInit round
        run = SamplerRun(make_sampler(sampler, self.scheduler, eta), rounds[0], start)
        control = control_for_call(self, control_frames, control_start, control_end, control_images, control_scale,
                                   num_frames, height, width)  # ControlNet / SparseCtrl (control.py)
        batch = len(prompts) * num_videos_per_prompt
        f = self.latent_factor
        shape = (batch, self.unet_in_channels, num_frames, height // f, width // f)

        if travel:  # (B or 2B, F, 77, D): one embedding per frame
            embeds = travel_embeddings(self.encode_prompt, prompt, negative_prompt, num_frames,
                                       num_videos_per_prompt, guidance_scale > 1)
        else:
            embeds = self.encode_prompt(prompts).repeat_interleave(num_videos_per_prompt, dim=0)  # (B, 77, D)
            if guidance_scale > 1:
                uncond = self.encode_prompt(negatives).repeat_interleave(num_videos_per_prompt, dim=0)
                embeds = torch.cat([uncond, embeds])  # (2B, 77, D), [uncond, cond] like diffusers

        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        if video is not None:  # encode and noise the input to the strength's first step (video_input.py)
            encoded = encode_video(self.vae, frames_in, batch, generator, self.device, self.dtype,
                                   self.decode_chunk_size)
            x = noised_latents(run, encoded, run.timesteps[0], generator)
        else:
            x = run.init(self._initial_latents(shape, generator, latents))

        if isinstance(self.unet, torch.nn.Module):  # weights may have changed since (LoRA merge); cheap otherwise
            refresh_fused_projections(self.unet)
        initial_noise = x
        # FreeInit: several sampling rounds, each restarting from the last one's result (free_init.py) with a
        # fresh sampler run (no multistep state carried over, as diffusers re-sets its timesteps each round)
        for rnd, rnd_steps in enumerate(rounds):
            if rnd:
                x = free_init.reinitialize(x, initial_noise, run, generator)  # run: the last round's schedule
                run = SamplerRun(make_sampler(sampler, self.scheduler, eta), rnd_steps)
            for i, t in enumerate(tqdm(run.timesteps, disable=not progress, desc="sampling")):
                eps_fn = partial(self.predict_noise, t=t, embeds=embeds, guidance_scale=guidance_scale,
                                 control=control, step=(i, len(run.timesteps)))
                x_in = run.scale_input(i, x)
                eps = windowed(eps_fn, x_in, windows, pass_frames=True) if windows else eps_fn(x_in)
                x = run.step(i, eps, x, generator)
                if callback is not None and (replaced := callback(i, t, x)) is not None:
                    x = replaced.to(x.device, x.dtype)
        return self.decode(x)

    @property
    def unet_in_channels(self) -> int:
        """Latent channels the UNet takes (4 for SD1.5)."""
        config = getattr(self.unet, "config", None)
        return int(getattr(config, "in_channels", 4))

    def _initial_latents(self, shape: tuple[int, ...], generator: torch.Generator | None,
                         latents: torch.Tensor | None) -> torch.Tensor:
        # Unit noise: the sampler run scales it by its initial sigma (SamplerRun.init).
        if latents is None:  # drawn in the sampling dtype, as diffusers' prepare_latents
            return seeded_noise(shape, generator, self.device, self.dtype)
        if tuple(latents.shape) != shape:
            f = self.latent_factor
            raise ValueError(f"latents must have shape {shape} (batch, channels, frames, height/{f}, width/{f}), "
                             f"got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def _check_prompts(self, prompt: str | list[str],
                       negative_prompt: str | list[str] | None) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt: got an empty list; pass at least one prompt")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                                 "pass one per prompt, a single string, or None")
        else:
            kind = type(negative_prompt).__name__
            raise ValueError(f"negative_prompt must be a str, a list of str or None, got {kind}")
        return list(prompts), negatives

    def _check_args(self, num_frames: int, height: int, width: int, steps: int, num_videos_per_prompt: int,
                    eta: float, context_frames: int | None, context_overlap: int | None, seed: int | None,
                    generator: torch.Generator | None) -> list[list[int]] | None:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
            if value % self.latent_factor:
                raise ValueError(f"{name} must be a multiple of {self.latent_factor} for this VAE, got {value}")
        for name, value in (("num_frames", num_frames), ("num_videos_per_prompt", num_videos_per_prompt)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        num_steps_check(steps)
        finite_number("eta", eta, minimum=0)
        if seed is not None and generator is not None:
            raise ValueError("seed and generator: pass one of them, not both")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch's seed range), got {seed!r}")
        limit = self.max_frames
        if context_frames is None:
            if limit is not None and num_frames > limit:
                raise ValueError(f"num_frames={num_frames} exceeds the motion module's limit of {limit} frames "
                                 f"(its position encoding length); pass context_frames<={limit} to denoise in "
                                 "sliding windows")
            return None
        if limit is not None and isinstance(context_frames, int) and context_frames > limit:
            raise ValueError(f"context_frames={context_frames} exceeds the motion module's limit of {limit} frames")
        if context_overlap is None and isinstance(context_frames, int):  # else context_windows names the bad value
            context_overlap = default_context_overlap(context_frames)
        return context_windows(num_frames, context_frames, context_overlap)
