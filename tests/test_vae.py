"""AutoencoderKL vs diffusers' AutoencoderKL (oracle) and the VAE loaders (diffusers, LDM, errors).

fp32 tolerance: 1e-4 max abs difference on tiny random models (outputs are O(1)).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from animatediff_lite.config import SD15, VAEConfig
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.io import load_strict, save_state_dict
from animatediff_lite.loading.vae_map import (
    load_vae,
    vae_config_from_diffusers,
    vae_config_from_state,
    vae_state_from_ldm,
    vae_state_to_ldm,
    vae_state_to_native,
)
from animatediff_lite.vae import AutoencoderKL

ATOL = 1e-4
# (block_out_channels, layers_per_block, norm_num_groups, (H, W))
CONFIGS = [((32, 64), 1, 8, (24, 40)), ((16, 32, 32), 2, 16, (24, 40))]
IDS = ["2lvl-l1-g8", "3lvl-l2-g16"]


def _ref_kwargs(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return dict(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, latent_channels=cfg.latent_channels,
                scaling_factor=cfg.scaling_factor, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n)


def _ref_vae(cfg: VAEConfig, seed: int = 0) -> RefVAE:
    torch.manual_seed(seed)
    ref = RefVAE(**_ref_kwargs(cfg)).eval()
    with torch.no_grad():  # perturb the default init so norms and biases are not trivial
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def _ours(ref: RefVAE, cfg: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return load_strict(model, ref.state_dict(), "<diffusers>", "test VAE").eval()


def _check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs()
    bad = (diff > atol).nonzero()
    print(f"{name}: max abs diff {diff.max().item():.2e} (ref max {want.abs().max().item():.2f})")
    assert bad.numel() == 0, f"{name}: {bad.shape[0]} mismatches, first at {bad[:5].tolist()}"


@pytest.fixture(params=CONFIGS, ids=IDS)
def pair(request):
    channels, layers, groups, size = request.param
    cfg = VAEConfig(block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups)
    ref = _ref_vae(cfg)
    return ref, _ours(ref, cfg), cfg, size


@torch.no_grad()
def test_encode_frames_matches_diffusers(pair):
    ref, ours, cfg, (h, w) = pair
    x = torch.rand(3, 3, h, w) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode_frames(x)
    f = 2 ** (len(cfg.block_out_channels) - 1)
    assert mean.shape == (3, cfg.latent_channels, h // f, w // f)
    _check("mean", mean, dist.mean)
    _check("logvar", logvar, dist.logvar)


@torch.no_grad()
def test_decode_frames_matches_diffusers(pair):
    ref, ours, cfg, (h, w) = pair
    f = 2 ** (len(cfg.block_out_channels) - 1)
    z = torch.randn(3, cfg.latent_channels, h // f, w // f)
    _check("decode", ours.decode_frames(z), ref.decode(z).sample)


@torch.no_grad()
def test_video_encode_matches_framewise_diffusers(pair):
    ref, ours, cfg, (h, w) = pair
    b, f = 2, 3
    video = torch.rand(b, 3, f, h, w) * 2 - 1
    frames = video.transpose(1, 2).reshape(b * f, 3, h, w)  # (b f) order, as AnimateDiff training
    dist = ref.encode(frames).latent_dist
    want = dist.sample(generator=torch.Generator("cpu").manual_seed(7)) * cfg.scaling_factor
    want = want.reshape(b, f, *want.shape[1:]).transpose(1, 2)
    mean = (dist.mean * cfg.scaling_factor).reshape(b, f, *dist.mean.shape[1:]).transpose(1, 2)
    for chunk_size in (1, 4):  # 6 frames: one per chunk, and an uneven split
        got = ours.encode(video, generator=torch.Generator("cpu").manual_seed(7), chunk_size=chunk_size)
        _check(f"encode sampled, chunk {chunk_size}", got, want)
        _check(f"encode mean, chunk {chunk_size}", ours.encode(video, sample=False, chunk_size=chunk_size), mean)
    assert (got - mean).abs().max() > 1e-3, "sampling added no noise"


@torch.no_grad()
def test_video_decode_matches_framewise_diffusers_and_chunking(pair):
    ref, ours, cfg, (h, w) = pair
    b, f = 2, 3
    fac = 2 ** (len(cfg.block_out_channels) - 1)
    latents = torch.randn(b, cfg.latent_channels, f, h // fac, w // fac)
    z = latents.transpose(1, 2).reshape(b * f, cfg.latent_channels, h // fac, w // fac)
    want = ref.decode(z / cfg.scaling_factor).sample
    want = want.reshape(b, f, *want.shape[1:]).transpose(1, 2)
    full = ours.decode(latents, chunk_size=b * f)
    _check("decode video", full, want)
    for chunk in (1, 4):
        _check(f"decode chunk {chunk} vs unchunked", ours.decode(latents, chunk_size=chunk), full, atol=5e-5)


def test_bad_arguments_raise():
    cfg = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    model = AutoencoderKL(cfg)
    with pytest.raises(ValueError, match="height.*multiple of 4.*30"):
        model.encode_frames(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="width.*multiple of 4.*34"):
        model.encode(torch.zeros(1, 3, 2, 32, 34))
    with pytest.raises(ValueError, match="chunk_size"):
        model.decode(torch.zeros(1, 4, 2, 4, 4), chunk_size=0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(VAEConfig(block_out_channels=(24, 32), norm_num_groups=16))


def test_sd15_key_coverage_on_meta():
    """Full-size SD1.5 VAE on the meta device: same keys/shapes as diffusers; LDM map both ways."""
    cfg = SD15.vae
    with torch.device("meta"):
        ref = RefVAE(**_ref_kwargs(cfg))
        ours = AutoencoderKL(cfg)
    assert all(p.is_meta for p in ours.parameters())
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"SD1.5 VAE: {len(our_sd)} tensors, {n_params / 1e6:.2f}M parameters")
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert 83.6e6 < n_params < 83.7e6
    assert sorted(ref_sd) == sorted(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape for k in ref_sd)

    ldm = vae_state_to_ldm(our_sd)
    assert len(ldm) == len(our_sd)
    # diffusers' own LDM converter, as an independent oracle of the LDM layout.
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert sorted(converted) == sorted(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    back = vae_state_from_ldm(ldm)
    assert sorted(back) == sorted(our_sd)
    assert all(back[k].shape == our_sd[k].shape for k in our_sd)
    assert vae_config_from_state(our_sd) == cfg

    p = "first_stage_model."
    real = {  # hand-written from the SD1.5 single file (v1-5-pruned-emaonly)
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.block_1.norm1.weight": (512,),
        "encoder.mid.attn_1.norm.weight": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.v.bias": (512,),
        "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in real.items():
        assert tuple(ldm[p + key].shape) == shape, key
    for absent in ("decoder.up.0.upsample.conv.weight", "encoder.down.3.downsample.conv.weight",
                   "decoder.up.3.block.0.nin_shortcut.weight"):
        assert p + absent not in ldm
    assert sum(k.startswith(p + "decoder.up.") for k in ldm) == 4 * 3 * 8 + 3 * 2 + 2 * 2


@torch.no_grad()
@pytest.mark.parametrize("prefix,suffix,channels,groups,size", [
    ("first_stage_model.", ".safetensors", (32, 64), 32, (16, 24)),  # SD single file
    ("", ".ckpt", (16, 32, 32), 16, (24, 40)),  # standalone LDM VAE (vae-ft-mse-840000 style)
])
def test_ldm_file_round_trip(tmp_path, prefix, suffix, channels, groups, size):
    cfg = VAEConfig(block_out_channels=channels, layers_per_block=2, norm_num_groups=groups)
    ref = _ref_vae(cfg, seed=1)
    state = vae_state_to_ldm(ref.state_dict(), prefix=prefix)
    assert state[prefix + "encoder.mid.attn_1.q.weight"].ndim == 4
    if prefix:  # other parts of an SD single file are ignored
        state["model.diffusion_model.conv_in.weight"] = torch.zeros(2, 2)
        state["cond_stage_model.transformer.text_model.x"] = torch.zeros(1)
    else:  # training leftovers of standalone LDM VAE files are dropped
        state["loss.logvar"] = torch.zeros(())
    path = tmp_path / f"model{suffix}"
    save_state_dict(state, path)
    model = load_vae(path)  # groups inferred from the widths, equal to cfg's here
    assert model.config == cfg
    h, w = size
    x = torch.rand(2, 3, h, w) * 2 - 1
    _check("ldm encode", model.encode_frames(x)[0], ref.encode(x).latent_dist.mean)
    z = torch.randn(2, 4, h // model.downsample_factor, w // model.downsample_factor)
    _check("ldm decode", model.decode_frames(z), ref.decode(z).sample)


@torch.no_grad()
def test_ldm_file_with_explicit_config(tmp_path):
    cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, scaling_factor=0.5)
    ref = _ref_vae(cfg)
    path = tmp_path / "vae.safetensors"
    save_file(vae_state_to_ldm(ref.state_dict(), prefix=""), path)
    assert load_vae(path).config.norm_num_groups == 32  # shapes cannot tell; the default applies
    model = load_vae(path, config=cfg, dtype=torch.float64)
    assert model.quant_conv.weight.dtype == torch.float64
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    _check("explicit config", model.encode_frames(x.double())[0].float(), ref.encode(x).latent_dist.mean)


@torch.no_grad()
def test_diffusers_folder_and_old_attention_names(tmp_path):
    cfg = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.13025)
    ref = _ref_vae(cfg)
    ref.save_pretrained(tmp_path / "vae")
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    want = ref.encode(x).latent_dist.mean
    for source in (tmp_path, tmp_path / "vae"):
        model = load_vae(source)
        assert model.config == cfg  # norm groups and scaling factor from config.json
        _check(f"folder {source.name}", model.encode_frames(x)[0], want)

    old = {}
    for k, v in ref.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[k] = v
    assert any(".query." in k for k in old)
    path = tmp_path / "old.bin"
    torch.save(old, path)
    _check("old names", load_vae(path, config=cfg).encode_frames(x)[0], want)
    assert sorted(vae_state_to_native(old)) == sorted(ref.state_dict())


def test_config_from_diffusers_rejects_unsupported():
    base = dict(_ref_kwargs(SD15.vae), block_out_channels=[128, 256, 512, 512])
    assert vae_config_from_diffusers(base) == SD15.vae
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_config_from_diffusers({**base, "use_quant_conv": False})
    with pytest.raises(ValueError, match="shift_factor"):
        vae_config_from_diffusers({**base, "shift_factor": 0.1159})


def test_bad_files_raise_checkpoint_error(tmp_path):
    cfg = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    ref = _ref_vae(cfg)
    good = tmp_path / "good.safetensors"
    save_file(vae_state_to_ldm(ref.state_dict()), good)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_vae(truncated)

    not_vae = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, not_vae)
    with pytest.raises(CheckpointError, match="unet.safetensors.*no VAE weights"):
        load_vae(not_vae)

    state = vae_state_to_ldm(ref.state_dict())
    del state["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    state["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial)
    with pytest.raises(CheckpointError, match=r"partial.safetensors.*missing.*decoder\.up_blocks\.1\.resnets\.1"
                                              r"\.conv2\.weight.*unexpected.*encoder\.extra\.weight"):
        load_vae(partial, config=cfg)

    empty_dir = tmp_path / "empty"
    (empty_dir / "vae").mkdir(parents=True)
    (empty_dir / "vae" / "config.json").write_text(json.dumps(_ref_kwargs(cfg)))
    with pytest.raises(CheckpointError, match=r"empty/vae: no weights file, expected one of diffusion_pytorch_model"):
        load_vae(empty_dir)
    with pytest.raises(CheckpointError, match="missing.txt"):
        load_vae(tmp_path / "missing.txt")


@torch.no_grad()
def test_mid_block_attention_goes_through_entry_point(monkeypatch):
    import animatediff_lite.vae as vae_module

    calls = []

    def spy(q, k, v, causal=False, backend=None):
        calls.append(tuple(q.shape))
        return vae_module.F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(vae_module, "attention", spy)
    model = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8))
    model.decode_frames(model.encode_frames(torch.zeros(2, 3, 8, 12))[0])
    assert calls == [(2, 1, 4 * 6, 32)] * 2  # (N, 1 head, h*w tokens, C) in encoder and decoder


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_error_within_2x_pytorch(monkeypatch, dtype):
    """Kernels on the GPU (GroupNorm+SiLU, attention) vs the fp32 CPU model: error <= 2x PyTorch's own."""
    cfg = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)
    ref = _ref_vae(cfg)
    ours32 = _ours(ref, cfg)
    x = torch.rand(2, 3, 128, 192) * 2 - 1
    z = torch.randn(2, 4, 32, 48)
    want = (ours32.encode_frames(x)[0], ours32.decode_frames(z))
    half = _ours(ref, cfg).to("cuda", dtype)
    errs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ANIMATEDIFF_LITE_BACKEND", backend)
        got = (half.encode_frames(x.to("cuda", dtype))[0], half.decode_frames(z.to("cuda", dtype)))
        errs[backend] = [(g.float().cpu() - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    print(f"{dtype} max abs err (encode, decode): {errs}")
    for ours_err, torch_err in zip(errs["triton"], errs["torch"], strict=True):
        assert ours_err <= 2 * torch_err + 1e-3


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_encode_with_cpu_generator_matches_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    ref = _ref_vae(cfg)
    cpu, gpu = _ours(ref, cfg), _ours(ref, cfg).to("cuda")
    video = torch.rand(1, 3, 4, 32, 48) * 2 - 1
    want = cpu.encode(video, generator=torch.Generator("cpu").manual_seed(3), chunk_size=3)
    got = gpu.encode(video.cuda(), generator=torch.Generator("cpu").manual_seed(3), chunk_size=3)
    _check("cuda vs cpu sampled encode", got.cpu(), want, atol=1e-3)
