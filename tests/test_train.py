"""Training end to end on the tiny model and synthetic .mp4/.gif clips: loss falls, frozen weights stay
bit-identical, the motion module loads back, resume is exact, 2 gloo ranks == 1 rank with the doubled
batch, MotionLoRA files have the original layout, config overrides and bad configs."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from animatediff_lite.loading.io import read_state_dict
from animatediff_lite.loading.motion_load import load_motion_module
from animatediff_lite.toy import synthetic as S
from animatediff_lite.train.config import load_config
from animatediff_lite.train.loop import build_preset, train
from tests.toy_files import write_dataset

FRAMES, SIZE = 4, 16  # the tiny VAE downsamples by 2: 8x8 latents


def config(tmp, csv_path, **over):
    args = ["--model.preset", "tiny", "--data.csv", str(csv_path), "--data.frames", str(FRAMES), "--data.stride", "1",
            "--data.size", str(SIZE), "--data.num_workers", "0", "--output.dir", str(tmp), "--output.log_every", "1",
            "--train.batch_size", "2", "--optim.lr", "3e-3"]
    for k, v in over.items():
        args += [f"--{k.replace('__', '.')}", str(v)]
    return load_config(None, args)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    specs = [S.ClipSpec("square", "red", "moving right"), S.ClipSpec("circle", "blue", "moving up")]
    csv_path = write_dataset(root, specs, n_clips=4, frames=8, size=SIZE, fmt="mp4")
    gif_csv = write_dataset(root / "gif", specs, n_clips=2, frames=8, size=SIZE, fmt="gif")
    return csv_path, gif_csv


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, clips):
    """40 steps on 2 GIF clips plus a CSV row whose file is missing (skipped and counted)."""
    out = tmp_path_factory.mktemp("overfit")
    gif_csv = clips[1]
    with open(gif_csv, "a") as f:
        f.write("999999,a green triangle moving left,000\n")
    cfg = config(out, gif_csv, train__max_steps=40, output__save_every=20, data__suffix=".gif",
                 train__caption_dropout=0.0)
    return cfg, train(cfg)


def test_loss_falls_and_logs(overfit):
    cfg, summary = overfit
    losses = summary["losses"]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"overfit loss: first 8 steps {first:.4f}, last 8 steps {last:.4f}")
    assert len(losses) == 40 and last < 0.85 * first
    records = [json.loads(line) for line in open(os.path.join(cfg.output.dir, "log.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[-1]["skipped_videos"] > 0  # the missing row
    saved = json.load(open(os.path.join(cfg.output.dir, "config.json")))
    assert saved["optim"]["lr"] == 3e-3 and saved["train"]["max_steps"] == 40
    ckpts = sorted(os.listdir(os.path.join(cfg.output.dir, "checkpoints")))
    assert ckpts == ["step_00000020", "step_00000040"]


def test_frozen_weights_bit_identical_and_motion_module_loads(overfit):
    cfg, summary = overfit
    _, te0, vae0, unet0, _ = build_preset(cfg)  # the same seeded init, untrained
    unet, te, vae = summary["unet"], summary["text_encoder"], summary["vae"]
    changed = []
    for name, a in unet0.state_dict().items():
        b = unet.state_dict()[name]
        if ".motion_modules." in name:
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), name
    assert all(torch.equal(a, te.state_dict()[k]) for k, a in te0.state_dict().items())
    assert all(torch.equal(a, vae.state_dict()[k]) for k, a in vae0.state_dict().items())
    assert sum(changed) > 0.5 * len(changed)

    path = os.path.join(cfg.output.dir, "motion_module.safetensors")
    state = read_state_dict(path)
    assert any(k.endswith("attention_blocks.0.pos_encoder.pe") for k in state)  # original layout, with PE
    assert all(".motion_modules." in f".{k}" and ".temporal_transformer." in k for k in state)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, FRAMES, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    unet.eval()
    with torch.no_grad():
        before = unet0.eval()(x, t, text)
        load_motion_module(unet0, path)
        after = unet0(x, t, text)
        trained = unet(x, t, text)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, trained, atol=0, rtol=0)


def _weights(folder):
    return read_state_dict(os.path.join(folder, "motion_module.safetensors"))


def test_resume_is_bitwise(tmp_path, clips):
    csv_path = clips[0]
    full = train(config(tmp_path / "full", csv_path, train__max_steps=4, output__save_every=2))
    half = train(config(tmp_path / "half", csv_path, train__max_steps=2, output__save_every=2))
    resumed = train(config(tmp_path / "half", csv_path, train__max_steps=4, output__save_every=2))
    assert half["steps"] == 2 and resumed["steps"] == 4 and len(resumed["losses"]) == 2
    assert resumed["losses"] == full["losses"][2:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_gloo_ranks_match_one_rank_with_double_batch(tmp_path, clips):
    # Adam divides by sqrt(v) + eps: with the default eps, elements whose gradient is ~1e-9 (float noise
    # around zero, different in the two summation orders) get updates of ~lr with a random sign. A larger
    # eps keeps the comparison about the gradients, which must agree to float precision.
    csv_path = clips[0]
    # The recipe features ride along: v-prediction, noisier-half timesteps, cosine LR, EMA (the exported file).
    recipe = {"noise.prediction_type": "v_prediction", "noise.high_t_share": "0.5", "optim.schedule": "cosine",
              "optim.warmup_steps": "1", "train.ema_decay": "0.5"}
    train(config(tmp_path / "one", csv_path, train__max_steps=3, output__save_every=3, optim__eps=1e-4,
                 **{k.replace(".", "__"): v for k, v in recipe.items()}))
    script = tmp_path / "run.py"
    script.write_text("import sys, torch\ntorch.set_num_threads(1)\nfrom animatediff_lite.train import main\n"
                      "main(sys.argv[1:])\n")
    args = ["--model.preset", "tiny", "--data.csv", str(csv_path), "--data.frames", str(FRAMES), "--data.stride", "1",
            "--data.size", str(SIZE), "--data.num_workers", "0", "--output.dir", str(tmp_path / "two"),
            "--train.batch_size", "1", "--optim.lr", "3e-3", "--train.max_steps", "3", "--output.save_every", "3",
            "--train.device", "cpu", "--optim.eps", "1e-4", "--output.log_every", "1"]
    args += [x for k, v in recipe.items() for x in (f"--{k}", v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    init = build_preset(load_config(None, ["--model.preset", "tiny"]))[3].state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k in init)
    print(f"DDP 2x1 vs 1x2: max abs weight difference {worst:.2e} (training moved weights by up to {moved:.2e})")
    assert moved > 1e-3
    assert worst < 1e-5
    for key in ("loss", "grad_norm"):
        log1 = [json.loads(x)[key] for x in open(tmp_path / "one" / "log.jsonl")]
        log2 = [json.loads(x)[key] for x in open(tmp_path / "two" / "log.jsonl")]
        torch.testing.assert_close(torch.tensor(log1), torch.tensor(log2), atol=1e-6, rtol=1e-5)


def test_motion_lora_original_layout(tmp_path, overfit, clips):
    from animatediff_lite.lora import merge_lora

    cfg, summary = overfit
    mm = os.path.join(cfg.output.dir, "motion_module.safetensors")
    res = train(config(tmp_path, clips[0], train__modules="motion_lora", train__lora_rank=2, model__motion_module=mm,
                       train__max_steps=2, output__save_every=2))
    state = read_state_dict(tmp_path / "motion_lora.safetensors")
    pattern = re.compile(r"^(down_blocks|up_blocks)\.\d+\.motion_modules\.\d+\.temporal_transformer\."
                         r"transformer_blocks\.0\.attention_blocks\.[01]\.processor\.(to_q|to_k|to_v|to_out)_lora\."
                         r"(down|up)\.weight$")
    bad = [k for k in state if not (pattern.match(k) or k.startswith("mid_block."))]
    assert not bad, bad[:3]
    unet = res["unet"]
    n_attn = sum(1 for n, _ in unet.named_modules() if re.search(r"attention_blocks\.\d+$", n))
    assert len(state) == n_attn * 4 * 2
    for k, v in state.items():
        channels = 32 if re.match(r"^(down_blocks\.0|up_blocks\.1)\.", k) else 64
        assert tuple(v.shape) == ((2, channels) if ".down." in k else (channels, 2)), (k, v.shape)
    assert all(v.abs().max() > 0 for k, v in state.items() if ".up." in k)  # trained (up starts at zero)
    original = read_state_dict(mm)
    trained_unet = res["unet"].state_dict()
    assert all(torch.equal(trained_unet[k], v) for k, v in original.items() if k in trained_unet)  # frozen
    # lora.py merges it with delta = up @ down on the named projection
    _, _, _, fresh, _ = build_preset(cfg)
    load_motion_module(fresh, mm)
    key = next(k for k in state if "to_out_lora.down" in k)
    target = key.replace("processor.to_out_lora.down.weight", "to_out.0.weight")
    w0 = fresh.state_dict()[target].clone()
    merge_lora(fresh, state, 1.0, "motion", "motion_lora.safetensors")
    expected = w0 + state[key.replace(".down.", ".up.")] @ state[key]
    torch.testing.assert_close(fresh.state_dict()[target], expected, atol=1e-6, rtol=0)


def test_config_overrides_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\npreset = "tiny"\n[data]\nfolder = "x"\n[optim]\nlr = 1e-4\n'
                    '[validation]\nprompts = ["a red circle moving up"]\n')
    cfg = load_config(toml, ["--optim.lr", "3e-4", "--train.gradient_checkpointing=true", "--data.frames", "8",
                             "--validation.prompts", "a,b"])
    assert cfg.optim.lr == 3e-4 and cfg.train.gradient_checkpointing is True and cfg.data.frames == 8
    assert cfg.validation.prompts == ["a", "b"] and cfg.model.preset == "tiny"
    with pytest.raises(ValueError, match=r"unknown key optim\.lrr"):
        load_config(toml, ["--optim.lrr", "1"])
    with pytest.raises(ValueError, match=r"train\.max_steps must be a int"):
        load_config(toml, ["--train.max_steps", "ten"])
    with pytest.raises(ValueError, match="train.modules must be one of"):
        load_config(toml, ["--train.modules", "everything"])
    with pytest.raises(ValueError, match="needs model.motion_module"):
        load_config(toml, ["--train.modules", "motion_lora"])
    with pytest.raises(ValueError, match="exactly one of model.preset"):
        load_config(toml, ["--model.base", "/x"])


def test_grad_accumulation_matches_the_larger_batch(tmp_path, clips):
    big = train(config(tmp_path / "big", clips[0], train__max_steps=2, output__save_every=2, optim__eps=1e-4))
    acc = train(config(tmp_path / "acc", clips[0], train__max_steps=2, output__save_every=2, optim__eps=1e-4,
                       train__batch_size=1, train__grad_accum=2))
    torch.testing.assert_close(torch.tensor(big["losses"]), torch.tensor(acc["losses"]), atol=1e-6, rtol=1e-5)
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_whole_model_bf16_checkpointing_latent_cache_validation(tmp_path, clips):
    cfg = config(tmp_path, clips[0], train__modules="all", train__precision="bf16", train__gradient_checkpointing=True,
                 train__max_steps=2, output__save_every=1, output__keep_last=1, data__latent_cache=tmp_path / "cache",
                 validation__every=2, validation__prompts="a red square moving right", validation__frames=FRAMES,
                 validation__steps=2)
    res = train(cfg)
    assert res["steps"] == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]  # keep_last = 1
    for name in ("unet.safetensors", "text_encoder.safetensors", "motion_module.safetensors"):
        assert (tmp_path / name).is_file()
    unet_file = read_state_dict(tmp_path / "unet.safetensors")
    _, te0, vae0, unet0, _ = build_preset(cfg)
    assert not torch.equal(unet_file["conv_in.weight"], unet0.state_dict()["conv_in.weight"])  # spatial trained
    te_file = read_state_dict(tmp_path / "text_encoder.safetensors")
    assert any(not torch.equal(te_file[k], v) for k, v in te0.state_dict().items())
    assert all(torch.equal(res["vae"].state_dict()[k], v) for k, v in vae0.state_dict().items())  # VAE frozen
    assert (tmp_path / "cache" / "index.json").is_file()
    assert (tmp_path / "validation" / "step_00000002.gif").stat().st_size > 0


def test_example_config_parses():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_config.toml")
    cfg = load_config(path, ["--train.max_steps", "10"])
    assert cfg.train.max_steps == 10 and cfg.data.frames == 16 and cfg.data.stride == 4 and cfg.data.size == 256
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 1e-2 and cfg.train.caption_dropout == 0.1
