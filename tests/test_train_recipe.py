"""The trainer's recipe features: LR schedules, EMA (exported, resumed bit for bit), v-prediction recorded in the
files, noisier-half timesteps, time reversal, synthetic clips, the text stage, and the default-model recipe
(examples/train_default_model.toml) run for a few steps through `animatediff-lite train`, then exported."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from animatediff_lite.loading.io import read_state_dict, save_state_dict
from animatediff_lite.toy import synthetic as S
from animatediff_lite.train import checkpoint as ckpt
from animatediff_lite.train.config import load_config
from animatediff_lite.train.data import LatentDataset, SyntheticClips, TimeReversed
from animatediff_lite.train.loop import prepare, train
from animatediff_lite.train.schedule import EMA, lr_factor
from animatediff_lite.train.text_stage import pretrain_text_encoder, word_labels
from tests.toy_files import REVERSED_MOTION

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "train_default_model.toml"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def tiny(out, **over):
    """A tiny-preset run on 8 synthetic clips of 4 frames of 16x16 (8x8 latents)."""
    args = ["--model.preset", "tiny", "--data.synthetic", "all", "--data.synthetic_clips", "8", "--data.frames", "4",
            "--data.size", "16", "--data.num_workers", "0", "--output.dir", str(out), "--output.log_every", "1",
            "--train.batch_size", "2", "--optim.lr", "3e-3"]
    for k, v in over.items():
        args += [f"--{k.replace('__', '.')}", str(v)]
    return load_config(None, args)


def test_lr_schedules():
    const = lr_factor("constant", 0, 100, 0.0)
    assert [const(s) for s in (0, 50, 500)] == [1.0, 1.0, 1.0]
    warm = lr_factor("constant", 4, 100, 0.0)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_factor("cosine", 100, 6000, 0.1)
    for step in (1, 50, 100, 101, 3000, 5999, 6000):  # the formula of the former standalone recipe (1-based step)
        old = min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 6000)))
        assert cos(step - 1) == pytest.approx(old, rel=1e-12), step
    assert cos(6000) == pytest.approx(0.1) and cos(9000) == pytest.approx(0.1)  # held at the floor
    no_warm = lr_factor("cosine", 0, 10, 0.0)
    assert no_warm(0) == 1.0 and no_warm(5) == pytest.approx(0.5) and no_warm(10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_factor("linear", 0, 10, 0.0)
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        load_config(None, ["--model.preset", "tiny", "--data.folder", "x", "--optim.schedule", "step"])


def test_lr_schedule_in_the_log(tmp_path):
    res = train(tiny(tmp_path, train__max_steps=4, optim__schedule="cosine", optim__warmup_steps=2,
                     optim__min_lr_ratio=0.5, output__save_every=4))
    lrs = [json.loads(x)["lr"] for x in open(tmp_path / "log.jsonl")]
    f = lr_factor("cosine", 2, 4, 0.5)
    assert res["steps"] == 4
    assert lrs == pytest.approx([3e-3 * f(s) for s in range(4)], rel=1e-12)  # the lr each step used
    assert lrs[0] == pytest.approx(1.5e-3)


def test_ema_update_and_swap():
    p = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = EMA(p, decay=0.9)
    with torch.no_grad():
        p["w"].fill_(1.0)
    ema.update(p, step=1)  # warm-up decay min(0.9, 2/11)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1 - 2 / 11))
    ema.update(p, step=100)  # decay 0.9
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1 - 0.9 * 2 / 11))
    with ema.applied(p):
        assert torch.equal(p["w"].detach(), ema.shadow["w"])
    assert torch.equal(p["w"].detach(), torch.ones(3))  # the weights come back
    with pytest.raises(ValueError, match="EMA lacks 1 tensors"):
        ema.load_state_dict({}, "ckpt")
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(p, decay=1.0)


def test_ema_and_text_stage_exported_and_resumed_bitwise(tmp_path):
    kw = dict(train__modules="unet", train__ema_decay=0.9, output__save_every=2, text_stage__steps=3,
              text_stage__groups='[["red", "green", "blue"], ["circle", "square", "triangle"]]')
    full = train(tiny(tmp_path / "full", train__max_steps=4, **kw))
    half = train(tiny(tmp_path / "half", train__max_steps=2, **kw))
    resumed = train(tiny(tmp_path / "half", train__max_steps=4, **kw))
    assert half["steps"] == 2 and resumed["losses"] == full["losses"][2:]
    stages = [json.loads(x).get("stage") for x in open(tmp_path / "half" / "log.jsonl")]
    assert stages.count("text") == 1  # the resumed run took the text encoder from the checkpoint
    te = read_state_dict(tmp_path / "half" / "text_encoder.safetensors")
    assert all(torch.equal(v, full["text_encoder"].state_dict()[k]) for k, v in te.items())
    assert all(torch.equal(full["ema"][k], resumed["ema"][k]) for k in full["ema"])
    state = ckpt.load_training_state(tmp_path / "full" / "checkpoints" / "step_00000004")
    assert set(state["ema"]) == set(state["trainable"])
    exported = read_state_dict(tmp_path / "full" / "unet.safetensors")
    assert all(torch.equal(exported[k[len("unet."):]], v) for k, v in state["ema"].items())  # the file is the EMA
    raw = full["unet"].state_dict()
    moved = [not torch.equal(exported[k], raw[k]) for k in exported if f"unet.{k}" in state["ema"]]
    assert sum(moved) > 0.9 * len(moved)  # ... not the raw weights
    assert all(torch.equal(exported[k], v) for k, v in read_state_dict(tmp_path / "half" / "unet.safetensors").items())
    assert _metadata(tmp_path / "full" / "unet.safetensors")["weights"] == "ema"
    train(tiny(tmp_path / "plain", train__max_steps=1, train__modules="unet", output__save_every=1))  # no EMA
    with pytest.raises(ValueError, match="EMA lacks"):  # a checkpoint made without EMA cannot resume with one
        train(tiny(tmp_path / "plain", train__max_steps=2, train__modules="unet", train__ema_decay=0.9))


def test_prediction_type_in_files_and_target(tmp_path):
    eps = train(tiny(tmp_path / "eps", train__max_steps=1, output__save_every=1))
    v = train(tiny(tmp_path / "v", train__max_steps=1, output__save_every=1, noise__prediction_type="v_prediction"))
    for run, kind in (("eps", "epsilon"), ("v", "v_prediction")):
        meta = _metadata(tmp_path / run / "motion_module.safetensors")
        assert meta["prediction_type"] == kind and meta["step"] == "1" and meta["weights"] == "raw"
        assert json.loads(meta["train_config"])["noise"]["prediction_type"] == kind
        assert json.loads(meta["model_config"])["unet"]["block_out_channels"] == [32, 64]
    assert eps["losses"][0] != v["losses"][0]  # same data, timesteps, noise and init: another target
    with pytest.raises(ValueError, match="noise.prediction_type must be one of"):
        tiny(tmp_path, noise__prediction_type="sample")


def test_high_t_share_draws_from_the_noisier_half():
    batch = {"latents": torch.zeros(64, 4, 2, 8, 8), "caption": ["a"] * 64, "sample_seed": torch.arange(64),
             "skipped": torch.zeros(64)}

    def timesteps(share):
        cfg = load_config(None, ["--model.preset", "tiny", "--data.folder", "x", "--noise.high_t_share", str(share)])
        run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"),
                              tokenizer=lambda caps: torch.zeros(len(caps), 77, dtype=torch.long))
        return prepare(batch, run)[1]

    uniform, all_high, half = timesteps(0.0), timesteps(1.0), timesteps(0.5)
    assert uniform.min() < 500 and (all_high >= 500).all() and all_high.max() < 1000
    assert 5 < int((half < 500).sum()) < 30  # a quarter expected


def test_time_reversal_swaps_words_only_into_known_captions():
    class Clips:
        captions = ["a red circle moving left", "a red circle moving right", "a blue square moving up",
                    "a blue square rotating"]

        def __getitem__(self, i):
            return {"latents": torch.arange(4.0).reshape(1, 4, 1, 1).expand(4, 4, 2, 2), "caption": self.captions[i]}

        def __len__(self):
            return 4

        def set_epoch(self, epoch):
            self.epoch = epoch

    ds = TimeReversed(Clips(), 1.0, ["moving left:moving right", "moving up:moving down"])
    assert ds.swapped("a red circle moving left") == "a red circle moving right"
    assert ds.swapped("a blue square moving down") == "a blue square moving up"
    left, up, rot = ds[0], ds[2], ds[3]
    assert left["caption"] == "a red circle moving right" and left["latents"][0, :, 0, 0].tolist() == [3, 2, 1, 0]
    assert up["caption"] == "a blue square moving up" and up["latents"][0, :, 0, 0].tolist() == [0, 1, 2, 3]
    assert rot["caption"] == "a blue square rotating" and rot["latents"][0, :, 0, 0].tolist() == [3, 2, 1, 0]
    never = TimeReversed(Clips(), 0.0, ["moving left:moving right"])
    assert never[0]["caption"] == "a red circle moving left"
    half = TimeReversed(Clips(), 0.5, ["moving left:moving right"], seed=3)
    flips = []
    for epoch in range(40):
        half.set_epoch(epoch)
        flips.append(half[0]["caption"].endswith("right"))
    assert 8 < sum(flips) < 32


def test_synthetic_clips_pool():
    held_out = {s.caption for s in S.split_specs()[1]}
    ds = SyntheticClips("train", 40, frames=4, size=16, direction_share=0.75, seed=1)
    assert len(ds) == 40 and not held_out & set(ds.captions)
    assert all(ds.specs[i].motion in S.DIRECTIONS for i in range(30))
    assert not any(ds.specs[i].motion in S.DIRECTIONS for i in range(30, 40))
    s = ds[5]
    assert s["video"].shape == (3, 4, 16, 16) and -1 <= s["video"].min() < s["video"].max() <= 1
    ds.set_epoch(1)
    again = ds[5]
    assert torch.equal(s["video"], again["video"]) and s["sample_seed"] != again["sample_seed"]  # fixed pool
    assert SyntheticClips("all", 40, 4, 16, seed=1).captions != SyntheticClips("all", 40, 4, 16, seed=2).captions
    with pytest.raises(ValueError, match="one of data.csv, data.folder and data.synthetic"):
        load_config(None, ["--model.preset", "tiny", "--data.folder", "x", "--data.synthetic", "train"])


def test_text_stage_learns_the_caption_words():
    from animatediff_lite.clip import TextEncoder
    from animatediff_lite.config import TINY
    from animatediff_lite.tokenizer import Tokenizer

    groups = [list(S.SHAPES), list(S.COLOURS), list(S.MOTIONS)]
    captions = [s.caption for s in S.all_specs()]
    labels = word_labels(["an orange square moving up", "a red blob"], groups)
    assert labels.tolist() == [[1, 5, 2], [-1, 0, -1]]
    torch.manual_seed(0)
    te = TextEncoder(TINY.clip)
    records = pretrain_text_encoder(te, Tokenizer(), captions, groups, steps=60, lr=3e-3, batch_size=16, seed=0,
                                    log_every=20)
    print("text stage:", records)
    assert [r["step"] for r in records] == [20, 40, 60]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert not te.training and not any(p.requires_grad for p in te.parameters())
    with pytest.raises(ValueError, match="no caption contains"):
        pretrain_text_encoder(te, Tokenizer(), ["a dog"], [["cat", "cow"]], 1, 1e-3, 2, 0)


def test_recipe_config_matches_the_synthetic_data():
    cfg = load_config(RECIPE, ["--train.max_steps", "10"])
    assert cfg.train.max_steps == 10 and cfg.model.preset == "default" and cfg.train.modules == "unet"
    assert cfg.noise.prediction_type == "v_prediction" and cfg.train.ema_decay == 0.998
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio) == ("cosine", 100, 0.1)
    assert (cfg.data.frames, cfg.data.size, cfg.data.synthetic, cfg.data.latent_std) == (8, 32, "train", 1.0)
    # the probes tell apart exactly the generator's words; reversal swaps exactly its reversible motions
    assert [sorted(g) for g in cfg.text_stage.groups] == [sorted(S.SHAPES), sorted(S.COLOURS), sorted(S.MOTIONS)]
    pairs = {tuple(p.split(":")) for p in cfg.data.reverse_words}
    swaps = {(a, b) for a, b in REVERSED_MOTION.items() if a != b}
    assert pairs | {(b, a) for a, b in pairs} == swaps
    with pytest.raises(ValueError, match="needs text_stage.groups"):
        load_config(RECIPE, ["--text_stage.groups", "[]"])
    with pytest.raises(ValueError, match="use train.modules 'unet' or 'motion'"):
        load_config(RECIPE, ["--train.modules", "all"])


def test_recipe_runs_through_the_cli_and_exports(tmp_path):
    """examples/train_default_model.toml for 3 steps via `python -m animatediff_lite train`, then the script's
    VAE stage and export at toy lengths: a loadable v-prediction default-model file."""
    from animatediff_lite.loading.default_model import DEFAULT_CONFIG, load_default_pipeline
    from animatediff_lite.vae import AutoencoderKL

    torch.manual_seed(0)
    vae_path = tmp_path / "vae.safetensors"
    save_state_dict(AutoencoderKL(DEFAULT_CONFIG.vae).state_dict(), vae_path)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "animatediff_lite", "train", str(RECIPE), "--model.vae", str(vae_path),
           "--output.dir", str(out), "--data.latent_cache", str(tmp_path / "latents"), "--data.synthetic_clips", "24",
           "--text_stage.steps", "3", "--train.max_steps", "3", "--train.batch_size", "2", "--output.log_every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r.get("stage", "unet") for r in log] == ["text", "unet", "unet", "unet"]
    assert all(math.isfinite(r["loss"]) for r in log)

    meta = _metadata(out / "unet.safetensors")
    assert meta["prediction_type"] == "v_prediction" and meta["weights"] == "ema"
    cached = LatentDataset(tmp_path / "latents")
    scale = json.loads(meta["model_config"])["vae"]["scaling_factor"]
    assert float((cached.all_latents() * scale).std()) == pytest.approx(1.0, rel=1e-3)  # data.latent_std = 1
    te = read_state_dict(out / "text_encoder.safetensors")
    base_te = read_state_dict(out / "base" / "text_encoder.safetensors")
    assert all(torch.equal(te[k], v) for k, v in base_te.items())  # pretrained by the text stage, then frozen
    assert all(torch.equal(v, read_state_dict(vae_path)[k]) for k, v in read_state_dict(out / "base" /
                                                                                        "vae.safetensors").items())
    state = ckpt.load_training_state(out / "checkpoints" / "step_00000003")
    assert any(k.startswith("unet.conv_in.") for k in state["trainable"])  # the whole UNet trains
    assert not any(k.startswith("text_encoder.") for k in state["trainable"])

    script = ROOT / "examples" / "train_tiny_default.py"
    proc = subprocess.run([sys.executable, str(script), "vae", "--work", str(tmp_path / "vae"), "--steps", "2",
                           "--batch", "2", "--threads", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(read_state_dict(tmp_path / "vae" / "vae.safetensors")) == set(read_state_dict(vae_path))
    model = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, str(script), "export", str(out), "--out", str(model), "--eval-steps", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_default_pipeline(path=model)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor == pytest.approx(scale)
    video = pipe("a red circle moving up", seed=0, steps=2, progress=False, num_frames=8, height=32, width=32)
    assert video.shape == (1, 8, 3, 32, 32)


def test_loss_weight_cap(tmp_path):
    from animatediff_lite.train.models import Trainee

    class Zero(torch.nn.Module):
        def forward(self, x, *args):
            return torch.zeros_like(x)

    trainee = Trainee(Zero(), Zero(), None)
    target = torch.stack([torch.full((4, 2, 2, 2), 1.0), torch.full((4, 2, 2, 2), 2.0)])  # per-sample MSE 1 and 4
    x, t, ids = torch.zeros_like(target), torch.tensor([10, 900]), torch.zeros(2, 77)
    assert trainee(x, t, ids, target).item() == pytest.approx(2.5)
    assert trainee(x, t, ids, target, torch.tensor([1.0, 3.0])).item() == pytest.approx((1 + 12) / 2)
    plain = train(tiny(tmp_path / "plain", train__max_steps=1, output__save_every=1))
    weighted = train(tiny(tmp_path / "w", train__max_steps=1, output__save_every=1, noise__loss_weight_cap=25))
    assert math.isfinite(weighted["losses"][0]) and weighted["losses"][0] > plain["losses"][0]  # weights >= 1
    with pytest.raises(ValueError, match="loss_weight_cap"):
        tiny(tmp_path, noise__loss_weight_cap=25, noise__prediction_type="v_prediction")
    with pytest.raises(ValueError, match="loss_weight_cap"):
        tiny(tmp_path, noise__loss_weight_cap=0.5)
