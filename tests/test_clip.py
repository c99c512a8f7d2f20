"""CLIP text encoder: parity with transformers' CLIPTextModel and loading from every supported layout.

Tolerance: fp32 last_hidden_state within 1e-5 max abs of the oracle with identical weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.clip import TextEncoder
from animatediff_lite.config import SD15, CLIPConfig
from animatediff_lite.errors import CheckpointError
from animatediff_lite.loading.clip_map import (
    clip_config_from_state,
    clip_config_from_transformers,
    clip_state_from_diffusers,
    clip_state_from_ldm,
    clip_state_to_ldm,
    load_text_encoder,
    load_tokenizer,
)
from animatediff_lite.loading.io import load_strict, save_state_dict
from animatediff_lite.tokenizer import BOS, EOS, Tokenizer, byte_alphabet

transformers = require_oracle("transformers")
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

ATOL = 1e-5
LDM_PREFIXES = ["cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."]

# (hidden, heads, layers, intermediate, activation, vocab, positions)
TINY_CONFIGS = [
    (32, 4, 2, 64, "quick_gelu", 1000, 77),
    (48, 3, 1, 100, "gelu", 500, 20),
    (64, 1, 3, 128, "quick_gelu", 300, 77),
    (96, 8, 2, 72, "gelu", 257, 33),
]


def _reference(hidden, heads, layers, inter, act, vocab, positions, seed=0) -> CLIPTextModel:
    """A transformers CLIPTextModel with every weight random (LayerNorms and biases too), in eval mode."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                         intermediate_size=inter, hidden_act=act, max_position_embeddings=positions,
                         projection_dim=hidden, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.5) + ("norm" in name and "weight" in name))
    return model


def _oracle(model: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _ours_from(model: CLIPTextModel) -> TextEncoder:
    with torch.device("meta"):
        ours = TextEncoder(clip_config_from_transformers(model.config.to_dict()))
    return load_strict(ours, clip_state_from_diffusers(model.state_dict()), "<memory>", "a CLIP text encoder").eval()


def _max_diff(ours: TextEncoder, ref_out: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = ours(ids)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    diff = (out - ref_out).abs()
    print(f"max abs diff {diff.max().item():.3g}, mismatches > {ATOL}: {(diff > ATOL).sum().item()}")
    return diff.max().item()


def _ids(vocab: int, n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", TINY_CONFIGS, ids=lambda s: f"w{s[0]}h{s[1]}l{s[2]}-{s[4]}")
@pytest.mark.parametrize("shape", [(3, None), (1, 7), (2, 1)], ids=["full", "odd", "one"])
def test_parity_with_transformers(spec, shape):
    ref = _reference(*spec)
    n, length = shape
    ids = _ids(spec[5], n, length or spec[6])
    assert _max_diff(_ours_from(ref), _oracle(ref, ids), ids) <= ATOL


KERNEL_ATOL = 1e-4  # the flash kernel's fp32 attention is within 2e-5 per call; two layers + LayerNorms


def test_parity_through_attention_kernel(monkeypatch, kernel_device):
    """The causal path of the Triton attention kernel (interpreted on CPU, compiled on CUDA) inside the encoder."""
    import animatediff_lite.kernels.attention as kernel

    calls = []
    original = kernel.flash_attention_op

    def counting(q, k, v, causal):
        calls.append(causal)
        return original(q, k, v, causal)

    monkeypatch.setattr(kernel, "flash_attention_op", counting)
    monkeypatch.setenv("ANIMATEDIFF_LITE_BACKEND", "triton")
    ref = _reference(40, 2, 2, 80, "quick_gelu", 300, 77, seed=6)
    ids = _ids(300, 1, 77)
    expected = _oracle(ref, ids)
    ours = _ours_from(ref).to(kernel_device)
    with torch.no_grad():
        out = ours(ids.to(kernel_device)).cpu()
    assert calls == [True, True], calls
    err = (out - expected).abs().max().item()
    print(f"through the kernel on {kernel_device}: max abs diff {err:.3g}")
    assert err <= KERNEL_ATOL


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = TextEncoder(SD15.clip)
    assert all(t.is_meta for t in model.state_dict().values())
    assert not list(model.buffers())  # no position_ids buffer


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoder(CLIPConfig(hidden_size=32, num_heads=4, hidden_act="relu"))
    with pytest.raises(ValueError, match="num_heads"):
        TextEncoder(CLIPConfig(hidden_size=30, num_heads=4))
    model = TextEncoder(CLIPConfig(hidden_size=32, intermediate_size=8, num_layers=1, num_heads=2, vocab_size=10,
                                   max_position_embeddings=5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 6, dtype=torch.long))


# ---- loading ----------------------------------------------------------------------------------------------------

LDM_SPEC = (128, 2, 2, 256, "quick_gelu", 400, 77)  # width a multiple of 64, so heads are inferable


@pytest.fixture(scope="module")
def ldm_ref() -> CLIPTextModel:
    return _reference(*LDM_SPEC, seed=3)


def test_load_diffusers_folder_save_pretrained(tmp_path):
    ref = _reference(48, 3, 2, 100, "gelu", 500, 77, seed=2)
    ref.save_pretrained(tmp_path / "model" / "text_encoder")
    ids = _ids(500, 2, 77)
    expected = _oracle(ref, ids)
    for source in (tmp_path / "model", tmp_path / "model" / "text_encoder"):
        ours = load_text_encoder(source)
        assert ours.config.hidden_act == "gelu" and ours.config.num_heads == 3
        assert _max_diff(ours, expected, ids) <= ATOL
    half = load_text_encoder(tmp_path / "model", dtype=torch.float16)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in half.parameters())


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_load_diffusers_folder_text_model_prefix(tmp_path, weights_name):
    """Files written by transformers < 5: keys under text_model., with the position_ids buffer."""
    ref = _reference(32, 4, 2, 64, "quick_gelu", 1000, 77, seed=4)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
    state = {"text_model." + k: v for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if weights_name.endswith(".bin"):
        torch.save(state, folder / weights_name)
    else:
        save_state_dict(state, folder / weights_name)
    ids = _ids(1000, 2, 77)
    assert _max_diff(load_text_encoder(tmp_path), _oracle(ref, ids), ids) <= ATOL


@pytest.mark.parametrize("prefix", LDM_PREFIXES, ids=["text_model", "no_text_model"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_ldm_single_file(tmp_path, ldm_ref, prefix, suffix):
    state = {prefix + k: v for k, v in ldm_ref.state_dict().items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    state["model.diffusion_model.conv_in.weight"] = torch.randn(8, 4, 3, 3)  # the rest of an SD file
    state["first_stage_model.decoder.conv_out.bias"] = torch.randn(3)
    path = tmp_path / f"sd{suffix}"
    save_state_dict(state, path)
    ours = load_text_encoder(path)
    assert ours.config == CLIPConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_layers=2,
                                     num_heads=2, max_position_embeddings=77)
    ids = _ids(400, 3, 77)
    assert _max_diff(ours, _oracle(ldm_ref, ids), ids) <= ATOL


@pytest.mark.parametrize("prefix", ["", "text_model."])
def test_load_bare_transformers_weights_file(tmp_path, ldm_ref, prefix):
    path = tmp_path / "model.safetensors"
    save_state_dict({prefix + k: v for k, v in ldm_ref.state_dict().items()}, path)
    ids = _ids(400, 2, 77)
    assert _max_diff(load_text_encoder(path), _oracle(ldm_ref, ids), ids) <= ATOL


def test_ldm_round_trip_and_config_override(tmp_path):
    ref = _reference(32, 4, 1, 64, "gelu", 100, 77, seed=5)
    native = clip_state_from_diffusers(ref.state_dict())
    ldm = clip_state_to_ldm(native)
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    assert torch.equal(ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    back = clip_state_from_ldm(ldm)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    path = tmp_path / "tiny.safetensors"
    save_state_dict(ldm, path)
    with pytest.raises(CheckpointError, match="tiny.safetensors.*multiple of 64"):
        load_text_encoder(path)  # 32 wide: heads cannot be inferred
    cfg = clip_config_from_transformers(ref.config.to_dict())
    ids = _ids(100, 2, 77)
    assert _max_diff(load_text_encoder(path, config=cfg), _oracle(ref, ids), ids) <= ATOL


def test_wrong_files_raise_checkpoint_error(tmp_path, ldm_ref):
    unet_only = tmp_path / "unet_only.safetensors"
    save_state_dict({"model.diffusion_model.conv_in.weight": torch.zeros(8, 4, 3, 3)}, unet_only)
    assert clip_state_from_ldm({"model.diffusion_model.conv_in.weight": torch.zeros(1)}) is None
    with pytest.raises(CheckpointError, match="unet_only.safetensors.*no text encoder"):
        load_text_encoder(unet_only)

    folder = tmp_path / "model" / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(ldm_ref.config.to_dict()))
    with pytest.raises(CheckpointError, match="text_encoder.*no weights file"):
        load_text_encoder(tmp_path / "model")
    save_state_dict({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, folder / "model.safetensors")  # a VAE
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing keys.*unexpected keys.*encoder\.conv_in"):
        load_text_encoder(tmp_path / "model")
    state = dict(ldm_ref.state_dict())
    del state["encoder.layers.1.mlp.fc2.bias"]
    save_state_dict(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*1 missing keys.*layers\.1\.mlp\.fc2\.bias"):
        load_text_encoder(tmp_path / "model")
    with pytest.raises(CheckpointError, match="neither a diffusers model folder .*expected a CLIP text encoder"):
        load_text_encoder(tmp_path)


def test_load_tokenizer(tmp_path):
    """A folder's own tokenizer files win (checked against transformers on a small vocabulary)."""
    alphabet = byte_alphabet()
    merges = [("c", "o"), ("co", "r"), ("g", "i</w>"), ("cor", "gi</w>"), ("r", "u"), ("n", "n")]
    vocab = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    tok_dir = tmp_path / "model" / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ours = load_tokenizer(tmp_path / "model")
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (len(vocab) - 2, len(vocab) - 1, len(vocab))
    ref = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    texts = ["a Corgi running", "corgi, corgi!", ""]
    expected = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(texts), expected)
    assert ours("corgi")[0, 1].item() == vocab.index("corgi</w>")
    shipped = load_tokenizer(tmp_path)  # no tokenizer files there: the shipped CLIP vocabulary
    assert isinstance(shipped, Tokenizer) and shipped.vocab_size == 49408


# ---- full-size key coverage (meta device, nothing allocated) --------------------------------------------------------

def _sd15_reference_on_meta() -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768)
    with torch.device("meta"):
        return CLIPTextModel(cfg)


def test_full_size_key_coverage():
    ref_state = _sd15_reference_on_meta().state_dict()
    with torch.device("meta"):
        ours = TextEncoder(SD15.clip)
    ours_state = ours.state_dict()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"SD1.5 text encoder: {len(ours_state)} tensors, {n_params:,} parameters")
    assert 122e6 < n_params < 124e6

    def check(native):
        assert sorted(native) == sorted(ours_state), set(native) ^ set(ours_state)
        bad = [k for k in native if native[k].shape != ours_state[k].shape]
        assert not bad, bad
        with torch.device("meta"):
            fresh = TextEncoder(SD15.clip)
        load_strict(fresh, native, "<meta>", "a CLIP text encoder")  # every parameter filled, nothing left over

    # diffusers layouts: transformers >= 5 (no prefix) and < 5 (text_model. + persistent position_ids)
    check(clip_state_from_diffusers(ref_state))
    old = {"text_model." + k: v for k, v in ref_state.items()}
    old["text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long, device="meta")
    check(clip_state_from_diffusers(old))
    # LDM layouts, both prefixes, and the way back
    with_text_model = {"cond_stage_model.transformer." + k: v for k, v in old.items()}
    without_text_model = {"cond_stage_model.transformer." + k.removeprefix("text_model."): v for k, v in old.items()}
    for ldm_state in (with_text_model, without_text_model):
        ldm_state["model.diffusion_model.out.2.bias"] = torch.empty(4, device="meta")  # not text encoder: ignored
        check(clip_state_from_ldm(ldm_state))
    ldm = clip_state_to_ldm(ours_state)
    assert set(ldm) == {"cond_stage_model.transformer." + k for k in old}
    check(clip_state_from_ldm(ldm))
    assert clip_config_from_state(clip_state_from_diffusers(ref_state)) == SD15.clip
