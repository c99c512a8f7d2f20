"""End-to-end parity with diffusers' AnimateDiffPipeline on a tiny random model saved as a diffusers folder.

The oracle is diffusers' pipeline with the same weights, DDIM configured as AnimateDiff, output_type "pt".
One documented difference is patched in the oracle: diffusers' motion-module GroupNorm normalises jointly over
all frames, the original AnimateDiff (and ours) per frame (see tests/test_motion.py).
Also: motion module from an original-format checkpoint, a DreamBooth LDM single file, context windows,
callbacks, argument errors, layout detection.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.checkpoint import detect_layout
from animatediff_lite.loading.clip_map import clip_state_to_ldm
from animatediff_lite.loading.detect import decide_layout
from animatediff_lite.loading.io import save_state_dict
from animatediff_lite.loading.motion_load import read_motion_module, save_motion_module
from animatediff_lite.loading.motion_map import motion_key_to_diffusers, motion_state_from_diffusers
from animatediff_lite.loading.pipeline_load import load_pipeline
from animatediff_lite.loading.unet_map import unet_config_from_diffusers, unet_state_to_ldm
from animatediff_lite.loading.vae_map import vae_state_to_ldm
from animatediff_lite.pipeline import Pipeline
from animatediff_lite.scheduler import DDIMConfig
from animatediff_lite.tokenizer import NUM_MERGES, VOCAB_ASSET, _read_asset, parse_merges, vocab_from_merges

diffusers = require_oracle("diffusers")
transformers = require_oracle("transformers")
from diffusers.models.unets import unet_motion_model  # noqa: E402

H = W = 16  # the tiny VAE has two levels (factor 2): 8x8 latents
FRAMES, STEPS, ATOL = 4, 2, 2e-4
PROMPTS = ["a corgi running on the beach", "a red car, cinematic"]
NEGATIVES = ["", "blurry, low quality"]


# ------------------------------------------------------------------------------------------ tiny model

def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.15) -> None:
    # Perturb every parameter: the zero-init motion proj_out and all norms/biases then matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _components(seed: int, sd_conventions: bool = False) -> SimpleNamespace:
    """Tiny random parts. ``sd_conventions``: the settings an LDM single file cannot store and readers assume
    (SD1.5's 8 UNet heads, 32 GroupNorm groups, 64-wide CLIP heads), so the file alone describes the model."""
    torch.manual_seed(seed)
    groups, heads, width = (32, 8, 64) if sd_conventions else (8, 2, 32)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=width, attention_head_dim=heads, norm_num_groups=groups)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=groups, latent_channels=4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=width // 64 if sd_conventions else 4, vocab_size=49408, max_position_embeddings=77))
    for m in (unet, vae, text):
        _randomize(m, seed, 0.02)
    return SimpleNamespace(unet=unet.eval(), vae=vae.eval(), text=text.eval())


def _adapter(seed: int, groups: int = 8):
    torch.manual_seed(seed)
    # 8 heads: the original format stores no head count and AnimateDiff always uses 8.
    adapter = diffusers.MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=8, motion_norm_num_groups=groups, motion_max_seq_length=32,
        use_motion_mid_block=True)
    _randomize(adapter, seed)
    return adapter.eval()


def _native_clip(text) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if "position_ids" not in k}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tiny_animatediff")
    base, db, adapter = _components(0), _components(1), _adapter(2)
    sd = root / "sd"
    base.unet.save_pretrained(str(sd / "unet"))
    base.vae.save_pretrained(str(sd / "vae"))
    base.text.save_pretrained(str(sd / "text_encoder"))
    tok_dir = sd / "tokenizer"
    tok_dir.mkdir(parents=True)
    merges = parse_merges(_read_asset(VOCAB_ASSET), limit=NUM_MERGES)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # What SD1.5 folders ship (PNDM, scaled_linear): load_pipeline must ignore it in favour of AnimateDiff's DDIM.
    diffusers.PNDMScheduler(beta_schedule="scaled_linear").save_pretrained(str(sd / "scheduler"))
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    adapter.save_pretrained(str(root / "mm_diffusers"))
    original = motion_state_from_diffusers(adapter.state_dict(), keep_pe=True)  # original keys, with PE tables
    torch.save({"state_dict": original}, root / "mm_sd_v15_v2.ckpt")

    ldm = {**unet_state_to_ldm(db.unet.state_dict(), unet_config_from_diffusers(dict(db.unet.config))),
           **vae_state_to_ldm(db.vae.state_dict()), **clip_state_to_ldm(_native_clip(db.text))}
    save_state_dict(ldm, root / "dreambooth.safetensors")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    return SimpleNamespace(root=root, sd=sd, mm=root / "mm_diffusers", mm_original=root / "mm_sd_v15_v2.ckpt",
                           dreambooth=root / "dreambooth.safetensors", base=base, db=db, adapter=adapter,
                           tokenizer=tokenizer)


class _PerFrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm of each frame of (B, C, F, H, W) separately, as the original AnimateDiff motion module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def per_frame_motion_norms(modules) -> None:
    """Patch diffusers' motion-module GroupNorm (joint over frames) to per frame, as the original AnimateDiff."""
    for m in modules:
        if isinstance(m, unet_motion_model.AnimateDiffTransformer3D):
            norm = _PerFrameGroupNorm(m.norm.num_groups, m.norm.num_channels, eps=m.norm.eps)
            norm.load_state_dict(m.norm.state_dict())
            m.norm = norm


def _oracle(parts: SimpleNamespace, models: SimpleNamespace):
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                        steps_offset=1, clip_sample=False)
    pipe = diffusers.AnimateDiffPipeline(vae=parts.vae, text_encoder=parts.text, tokenizer=models.tokenizer,
                                         unet=parts.unet, motion_adapter=models.adapter, scheduler=scheduler)
    per_frame_motion_norms(pipe.unet.modules())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_oracle(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(num_frames=kwargs.pop("num_frames", FRAMES), height=H, width=W, num_inference_steps=STEPS,
                   output_type="pt", **kwargs).frames
    return out.float()


@pytest.fixture(scope="module")
def oracle(models):
    return _oracle(models.base, models)


@pytest.fixture(scope="module")
def ours(models) -> Pipeline:
    return load_pipeline(models.sd, motion_module=models.mm)


@pytest.fixture(scope="module")
def seeded_reference(oracle) -> torch.Tensor:
    # diffusers' AnimateDiffPipeline fixes num_videos_per_prompt to 1: repeat each prompt instead (same order).
    return _run_oracle(oracle, prompt=[p for p in PROMPTS for _ in range(2)],
                       negative_prompt=[n for n in NEGATIVES for _ in range(2)], guidance_scale=7.5,
                       generator=torch.Generator("cpu").manual_seed(0))


def _sample(pipe: Pipeline, prompt=PROMPTS[0], **kwargs) -> torch.Tensor:
    kwargs = {"num_frames": FRAMES, "height": H, "width": W, "steps": STEPS, "progress": False, **kwargs}
    return pipe(prompt, **kwargs)


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs diff {err:.2e}")
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol}"
    assert 0 <= got.min() and got.max() <= 1


# ------------------------------------------------------------------------------------------ parity

def test_seeded_batch_with_guidance_matches_diffusers(ours, seeded_reference) -> None:
    got = _sample(ours, PROMPTS, negative_prompt=NEGATIVES, num_videos_per_prompt=2, guidance_scale=7.5, seed=0)
    _check("2 prompts x 2 videos, seed 0, guidance 7.5", got, seeded_reference)
    assert (got[0] - got[1]).abs().max() > 1e-3  # the two videos of a prompt got different noise


def test_motion_module_from_original_checkpoint(models, ours) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm_original)
    assert pipe.unet.motion == ours.unet.motion and pipe.unet.motion.version == "v2" and pipe.max_frames == 32
    # Same tensors as the diffusers-format load (whose output matches diffusers above), so the same videos.
    state, reference = pipe.unet.state_dict(), ours.unet.state_dict()
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    kwargs = dict(guidance_scale=7.5, seed=0, num_frames=2, steps=1)
    assert torch.equal(_sample(pipe, **kwargs), _sample(ours, **kwargs))


def test_given_latents_without_guidance_match_diffusers(ours, oracle) -> None:
    latents = torch.randn(1, 4, FRAMES, H // 2, W // 2, generator=torch.Generator().manual_seed(5))
    expected = _run_oracle(oracle, prompt=PROMPTS[1], guidance_scale=1.0, latents=latents.clone())
    got = _sample(ours, PROMPTS[1], guidance_scale=1.0, latents=latents)
    _check("latents given, guidance 1.0", got, expected)


def test_eta_noise_shares_the_generator_like_diffusers(ours, oracle) -> None:
    expected = _run_oracle(oracle, prompt=PROMPTS[0], guidance_scale=7.5, eta=1.0,
                           generator=torch.Generator("cpu").manual_seed(3))
    got = _sample(ours, PROMPTS[0], guidance_scale=7.5, eta=1.0, generator=torch.Generator("cpu").manual_seed(3))
    _check("eta 1.0 with a CPU generator", got, expected)


def test_dreambooth_single_file_replaces_base_weights(models) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm, dreambooth=models.dreambooth)
    expected = _run_oracle(_oracle(models.db, models), prompt=PROMPTS[0], guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(1))
    got = _sample(pipe, PROMPTS[0], guidance_scale=7.5, seed=1)
    _check("DreamBooth LDM single file", got, expected)


def test_kohya_lora_and_motion_lora_match_hand_merged_diffusers(models, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    unet_key, rank = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2  # (32, 32) cross-attn key
    te_key = "encoder.layers.1.self_attn.out_proj"
    mm_key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v"
    d = {name: (torch.randn(rank, 32, generator=g) * 0.3, torch.randn(32, rank, generator=g) * 0.3)
         for name in ("unet", "te", "mm")}
    kohya = {}
    for prefix, key, name in (("lora_unet_", unet_key, "unet"), ("lora_te_text_model_", te_key, "te")):
        flat = prefix + key.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = d[name]
        kohya[f"{flat}.alpha"] = torch.tensor(1.0)  # alpha / rank = 0.5
    mm_lora = {f"{mm_key.rsplit('.', 1)[0]}.processor.to_v_lora.down.weight": d["mm"][0],
               f"{mm_key.rsplit('.', 1)[0]}.processor.to_v_lora.up.weight": d["mm"][1]}
    save_state_dict(kohya, tmp_path / "style.safetensors")
    save_state_dict(mm_lora, tmp_path / "v2_lora_ZoomIn.ckpt")
    pipe = load_pipeline(models.sd, motion_module=models.mm, loras=[(tmp_path / "style.safetensors", 0.8)],
                         motion_loras=[(tmp_path / "v2_lora_ZoomIn.ckpt", 0.6)])

    # oracle: copies of the diffusers modules with W += scale * (alpha / rank) * up @ down applied by hand
    parts = SimpleNamespace(unet=copy.deepcopy(models.base.unet), vae=models.base.vae,
                            text=copy.deepcopy(models.base.text))
    oracle = _oracle(parts, models)
    with torch.no_grad():
        # transformers 5 keeps CLIP under text_model. or not, depending on the version: find the layer by suffix
        te_name = next(n for n, _ in oracle.text_encoder.named_modules() if n.endswith(te_key))
        updates = ((oracle.unet, unet_key, 0.8 * 0.5, "unet"), (oracle.text_encoder, te_name, 0.8 * 0.5, "te"),
                   (oracle.unet, motion_key_to_diffusers(mm_key), 0.6, "mm"))
        for module, key, factor, name in updates:
            down, up = d[name]
            module.get_submodule(key).weight += factor * (up @ down)
    expected = _run_oracle(oracle, prompt=PROMPTS[0], guidance_scale=7.5, generator=torch.Generator().manual_seed(6))
    got = _sample(pipe, PROMPTS[0], guidance_scale=7.5, seed=6)
    _check("kohya LoRA 0.8 + MotionLoRA 0.6", got, expected)
    plain = _sample(load_pipeline(models.sd, motion_module=models.mm), PROMPTS[0], guidance_scale=7.5, seed=6)
    assert (got - plain).abs().max() > 1e-4  # the LoRAs did change the video


def test_ldm_single_file_as_base(models, tmp_path: Path) -> None:
    parts, adapter = _components(3, sd_conventions=True), _adapter(4, groups=32)
    ldm = {**unet_state_to_ldm(parts.unet.state_dict(), unet_config_from_diffusers(dict(parts.unet.config))),
           **vae_state_to_ldm(parts.vae.state_dict()), **clip_state_to_ldm(_native_clip(parts.text))}
    save_state_dict(ldm, tmp_path / "model.safetensors")
    adapter.save_pretrained(str(tmp_path / "mm"))
    pipe = load_pipeline(tmp_path / "model.safetensors", motion_module=tmp_path / "mm")
    expected = _run_oracle(_oracle(parts, SimpleNamespace(tokenizer=models.tokenizer, adapter=adapter)),
                           prompt=PROMPTS[1], guidance_scale=7.5, generator=torch.Generator().manual_seed(8))
    _check("LDM single file as base", _sample(pipe, PROMPTS[1], guidance_scale=7.5, seed=8), expected)


def test_scheduler_is_animatediff_ddim_not_the_folders(ours) -> None:
    assert ours.scheduler.config == DDIMConfig()
    assert ours.scheduler.timesteps(25)[0].item() == 961


# ------------------------------------------------------------------------------------------ loop features

def test_context_window_over_all_frames_equals_plain_path(ours) -> None:
    plain = _sample(ours, guidance_scale=7.5, seed=4)
    windowed = _sample(ours, guidance_scale=7.5, seed=4, context_frames=FRAMES, context_overlap=1)
    assert torch.equal(plain, windowed)


def test_smaller_context_windows_cover_every_frame_deterministically(ours) -> None:
    kwargs = dict(num_frames=6, guidance_scale=1.0, seed=2, steps=1)
    first, second = (_sample(ours, context_frames=4, context_overlap=2, **kwargs) for _ in range(2))
    plain = _sample(ours, **kwargs)
    assert first.shape == (1, 6, 3, H, W) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert (first - plain).abs().max() > 1e-4  # windows of 4 frames do change the motion module's view


def test_a_left_out_context_overlap_is_4_at_most_half_the_window(ours) -> None:
    kwargs = dict(num_frames=10, guidance_scale=1.0, seed=2, steps=1)
    default = _sample(ours, context_frames=4, **kwargs)  # windows [0-3], [2-5], [4-7], [6-9]
    assert torch.equal(default, _sample(ours, context_frames=4, context_overlap=2, **kwargs))
    assert not torch.equal(default, _sample(ours, context_frames=4, context_overlap=1, **kwargs))
    assert torch.equal(_sample(ours, context_frames=9, **kwargs), _sample(ours, context_frames=9, context_overlap=4,
                                                                          **kwargs))


def test_arguments_left_out_come_from_sample_defaults(ours) -> None:
    steps: list[int] = []
    saved = ours.sample_defaults
    ours.sample_defaults = {"num_frames": 3, "height": H, "width": W, "steps": 2, "guidance_scale": 1.0}
    try:
        got = ours("a cat", seed=1, progress=False, callback=lambda i, t, x: steps.append(i))
    finally:
        ours.sample_defaults = saved
    assert got.shape == (1, 3, 3, H, W) and steps == [0, 1]
    assert torch.equal(got, _sample(ours, "a cat", num_frames=3, steps=2, guidance_scale=1.0, seed=1))


def test_callback_sees_every_step_and_can_replace_latents(ours) -> None:
    seen: list[tuple[int, int, tuple[int, ...]]] = []

    def callback(i: int, t: int, latents: torch.Tensor) -> torch.Tensor | None:
        seen.append((i, t, tuple(latents.shape)))
        return torch.zeros_like(latents) if i == STEPS - 1 else None

    got = _sample(ours, guidance_scale=7.5, seed=0, callback=callback)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ours.scheduler.timesteps(STEPS).tolist()))
    assert seen[0][2] == (1, 4, FRAMES, H // 2, W // 2)
    assert torch.equal(got, ours.decode(torch.zeros(1, 4, FRAMES, H // 2, W // 2)))


def test_bfloat16_on_cpu_follows_float32(models, ours) -> None:
    pipe = load_pipeline(models.sd, motion_module=models.mm, dtype=torch.bfloat16)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16 and pipe.vae.post_quant_conv.weight.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a loose bound (measured 0.05 on this random model)
    _check("bf16 on CPU vs fp32", _sample(pipe, guidance_scale=7.5, seed=0), _sample(ours, guidance_scale=7.5, seed=0),
           atol=0.1)


# ------------------------------------------------------------------------------------------ errors

BAD_ARGS = [
    ({"height": 20}, "height"), ({"width": 12}, "width"), ({"height": 0}, "height"),
    ({"num_frames": 0}, "num_frames"), ({"steps": 0}, "steps"), ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 3]}, "prompt"), ({"negative_prompt": ["x", "y"]}, "negative_prompt"),
    ({"num_videos_per_prompt": 0}, "num_videos_per_prompt"), ({"latents": torch.zeros(1, 4, 2, 8, 8)}, "latents"),
    ({"seed": 1, "generator": torch.Generator()}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": "7"}, "seed"),
    ({"eta": -0.5}, "eta"), ({"eta": float("nan")}, "eta"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": -3.0}, "guidance_scale"),
    ({"num_frames": 40}, "context_frames"), ({"context_frames": 4, "context_overlap": 4}, "context_overlap"),
    ({"context_frames": 33, "num_frames": 40}, "context_frames"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_ARGS)])
def test_bad_arguments_raise_value_error_naming_them(ours, kwargs: dict, name: str) -> None:
    # Counted, not timed (a wall-clock bound is flaky on a busy machine): no denoising step runs before the error.
    # (The text encoder may: latents= is checked against the batch, known once the prompts are encoded.)
    calls = []
    hook = ours.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        with pytest.raises(ValueError, match=name) as info:
            _sample(ours, **kwargs)
    finally:
        hook.remove()
    assert calls == []
    if kwargs.get("num_frames") == 40 and "context_frames" not in kwargs:
        assert "32" in str(info.value)  # names the limit


def test_fp16_on_cpu_is_refused(models, ours) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(models.sd, motion_module=models.mm, device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        Pipeline(ours.tokenizer, ours.text_encoder, ours.vae, ours.unet, dtype=torch.float16)


def test_bad_weights_are_checkpoint_errors(models, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="motion module"):
        load_pipeline(models.mm_original)  # a motion module passed as the base model
    with pytest.raises(CheckpointError, match="dreambooth"):
        load_pipeline(models.sd, motion_module=models.mm, dreambooth=models.mm_original)
    with pytest.raises(ValueError, match="motion_module given without base"):
        load_pipeline(motion_module=models.mm)
    torch.manual_seed(0)
    narrow = diffusers.MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1,
                                     motion_norm_num_groups=8, use_motion_mid_block=True)
    narrow.save_pretrained(str(tmp_path / "narrow_mm"))
    with pytest.raises(CheckpointError, match="channels"):  # a motion module for another base model
        load_pipeline(models.sd, motion_module=tmp_path / "narrow_mm")


# ------------------------------------------------------------------------------------------ layouts

def test_detect_layout(models, tmp_path: Path) -> None:
    assert detect_layout(models.sd) == "diffusers_folder"
    assert detect_layout(models.mm) == "diffusers_motion_adapter"
    assert detect_layout(models.mm / "diffusion_pytorch_model.safetensors") == "diffusers_motion_adapter"
    assert detect_layout(models.mm_original) == "original_motion_module"
    assert detect_layout(models.dreambooth) == "ldm_single_file"
    assert detect_layout(models.sd / "unet" / "diffusion_pytorch_model.safetensors") == "diffusers_unet"
    assert detect_layout(models.sd / "vae" / "diffusion_pytorch_model.safetensors") == "diffusers_vae"
    native, info = read_motion_module(models.mm_original)
    save_motion_module(native, tmp_path / "native_mm.safetensors", info.motion_config(8))
    assert detect_layout(tmp_path / "native_mm.safetensors") == "native_motion_module"
    w = torch.zeros(2, 2)
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": w,
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    motion_lora = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
                   "processor.to_q_lora.down.weight": w}
    adapter_lora = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": w}
    for state, layout in ((kohya, "kohya_lora"), (motion_lora, "motion_lora"), (adapter_lora, "adapter_lora")):
        save_state_dict(state, tmp_path / f"{layout}.safetensors")
        assert detect_layout(tmp_path / f"{layout}.safetensors") == layout
        assert decide_layout(state)[0] == layout
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    save_state_dict({"foo.bar": w}, tmp_path / "unknown.safetensors")
    (tmp_path / "empty_folder").mkdir()
    for bad in ("garbage.safetensors", "unknown.safetensors", "empty_folder", "missing.ckpt"):
        with pytest.raises(CheckpointError, match=bad.split(".")[0]):
            detect_layout(tmp_path / bad)


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_cuda_half_follows_fp32_and_seeds_are_device_independent(models, ours, monkeypatch) -> None:
    # fp32 on the GPU means fp32: cuDNN convolutions default to TF32 (1.5e-3 off the CPU video, seen on an H200).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = _sample(ours, PROMPTS, guidance_scale=7.5, seed=0)
    gpu32 = load_pipeline(models.sd, motion_module=models.mm, device="cuda", dtype=torch.float32)
    _check("cuda fp32 vs cpu fp32", _sample(gpu32, PROMPTS, guidance_scale=7.5, seed=0), cpu, atol=1e-3)
    gpu16 = load_pipeline(models.sd, motion_module=models.mm, device="cuda", dtype=torch.float16)
    _check("cuda fp16 vs cpu fp32", _sample(gpu16, PROMPTS, guidance_scale=7.5, seed=0), cpu, atol=3e-2)
