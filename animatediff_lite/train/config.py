"""Training configuration: one TOML (or YAML) file of sections, every value overridable from the command line.

``animatediff-lite train run.toml --optim.lr 3e-4 --train.max_steps=200`` reads ``run.toml``, then sets
``optim.lr`` and ``train.max_steps``. Unknown sections or keys are errors naming them. See
``examples/train_config.toml`` for every key with its meaning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli backport
    import tomli as tomllib

# What TrainConfig.validate checks value by value: allowed values ("": not set), lower bounds, shares in [0, 1].
CHOICES = {"train.modules": ("motion", "motion_lora", "unet", "all"), "train.precision": ("fp32", "fp16", "bf16"),
           "model.preset": ("", "tiny", "sd15", "default"), "data.synthetic": ("", "train", "all"),
           "optim.schedule": ("constant", "cosine"), "noise.prediction_type": ("epsilon", "v_prediction")}
AT_LEAST = {"train.lora_rank": 1, "train.max_steps": 1, "train.batch_size": 1, "train.grad_accum": 1,
            "output.save_every": 1, "output.keep_last": 1, "output.log_every": 1, "data.frames": 1, "data.stride": 1,
            "data.size": 8, "data.synthetic_clips": 1, "data.latent_std": 0, "optim.warmup_steps": 0,
            "optim.decay_steps": 0, "text_stage.steps": 0, "text_stage.batch_size": 1, "train.max_grad_norm": 0}
SHARES = ("train.caption_dropout", "data.synthetic_direction_share", "data.reverse_share", "optim.min_lr_ratio",
          "noise.high_t_share")
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass
class DataSection:
    csv: str = ""  # WebVid-style CSV (videoid,name,page_dir); videos at {root}/{page_dir}/{videoid}{suffix}
    root: str = ""  # video root for the CSV (default: the CSV's folder)
    suffix: str = ".mp4"
    folder: str = ""  # or: a folder of videos with same-name .txt captions
    frames: int = 16
    stride: int = 4
    size: int = 256
    num_workers: int = 2
    latent_cache: str = ""  # folder for precomputed VAE latents (made on first use; fixed frame windows)
    latent_std: float = 0.0  # > 0: rescale the cached latents to this std and store the factor in the VAE config
    reverse_share: float = 0.0  # share of samples played backwards with the words of reverse_words swapped
    reverse_words: list = field(default_factory=list)  # "moving left:moving right" pairs, swapped both ways
    synthetic: str = ""  # or: procedural clips (toy.synthetic): "train" (held-out combos left out), "all"
    synthetic_clips: int = 3000  # clips in the synthetic pool (fixed renders)
    synthetic_direction_share: float = 0.0  # > 0: this share of the pool moves left/right/up/down; 0: uniform


@dataclass
class ModelSection:
    preset: str = ""  # "tiny", "sd15" or "default" (the embedded model's sizes): random init
    init_seed: int = 0  # seed of the random init for a preset
    base: str = ""  # or: SD1.5 weights, a diffusers folder or a single LDM file (through load_pipeline)
    motion_module: str = ""  # start from this motion module (fine-tune); empty: zero-init proj_out
    motion_version: str = "v2"  # "v1", "v2" or "v3" layout for a fresh motion module
    vae: str = ""  # a preset's VAE weights (native keys, e.g. the default-model recipe's VAE stage); frozen


@dataclass
class TrainSection:
    modules: str = "motion"  # "motion", "motion_lora" (adapters on a frozen motion module), "unet" or "all"
    lora_rank: int = 4
    max_steps: int = 1000
    batch_size: int = 1  # per rank and micro-step
    grad_accum: int = 1
    seed: int = 42
    precision: str = "fp32"  # "fp32", "fp16" (CUDA, with a GradScaler) or "bf16"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # > 0: keep an EMA of the trained weights (exported, resumed); 0: none
    device: str = ""  # default: cuda:{LOCAL_RANK} when available, else cpu


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "constant"  # "constant" or "cosine" (after warm-up, down to lr * min_lr_ratio)
    decay_steps: int = 0  # length of the cosine; 0: train.max_steps (set it to stop early on a longer schedule)
    min_lr_ratio: float = 0.0  # the cosine's floor as a fraction of lr


@dataclass
class NoiseSection:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"  # AnimateDiff trains with plain linear betas
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction" (recorded in the saved files' metadata)
    high_t_share: float = 0.0  # share of timesteps drawn from the noisier half instead of uniformly
    loss_weight_cap: float = 0.0  # > 0 (epsilon only): weight each sample's MSE by min(1 / alpha_bar_t, cap)


@dataclass
class TextStageSection:
    steps: int = 0  # > 0: pretrain the text encoder on caption-word probes first, then freeze it
    lr: float = 2e-3
    batch_size: int = 32
    groups: list = field(default_factory=list)  # word groups, e.g. [["circle", "square"], ["red", "blue"]]


@dataclass
class OutputSection:
    dir: str = "runs/train"
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    resume: str = "auto"  # "auto" (latest checkpoint in dir, if any), "none", or a checkpoint folder


@dataclass
class ValidationSection:
    every: int = 0  # 0: no validation
    prompts: list = field(default_factory=list)
    frames: int = 16
    size: int = 0  # 0: data.size
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 42
    fps: int = 8


@dataclass
class TrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    text_stage: TextStageSection = field(default_factory=TextStageSection)
    output: OutputSection = field(default_factory=OutputSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for section in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, section.name)):
                name, value = f"{section.name}.{f.name}", getattr(getattr(self, section.name), f.name)
                if isinstance(value, float) and not math.isfinite(value):  # a NaN lr would train silently
                    raise ValueError(f"{name} must be a finite number, got {value}")
                if name in CHOICES and value not in CHOICES[name]:
                    raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")
                if name in AT_LEAST and value < AT_LEAST[name]:
                    raise ValueError(f"{name} must be >= {AT_LEAST[name]}, got {value}")
                if name in SHARES and not 0 <= value <= 1:
                    raise ValueError(f"{name} must be in [0, 1], got {value}")
        checks = [  # what depends on more than one value
            (bool(self.model.preset) != bool(self.model.base),
             "set exactly one of model.preset ('tiny', 'sd15') and model.base (a weights path)"),
            (not self.model.vae or bool(self.model.preset), "model.vae is for a preset (model.base has its VAE)"),
            (self.train.modules != "motion_lora" or bool(self.model.motion_module),
             "train.modules = 'motion_lora' needs model.motion_module (the motion module the LoRA adapts)"),
            (not (self.data.synthetic and (self.data.csv or self.data.folder)),
             "set one of data.csv, data.folder and data.synthetic"),
            (all(isinstance(w, str) and w.count(":") == 1 for w in self.data.reverse_words),
             'data.reverse_words must be "word:opposite" strings, e.g. "moving left:moving right"'),
            (not self.data.latent_std or bool(self.data.latent_cache),
             "data.latent_std needs data.latent_cache (the std is measured on the cached latents)"),
            (0 <= self.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
            (self.noise.loss_weight_cap == 0 or (self.noise.loss_weight_cap >= 1
                                                 and self.noise.prediction_type == "epsilon"),
             "noise.loss_weight_cap must be 0 (off) or >= 1, with noise.prediction_type = 'epsilon' "
             "(v-prediction already weights every noise level)"),
            (not self.text_stage.steps or bool(self.text_stage.groups),
             "text_stage.steps > 0 needs text_stage.groups (the caption words each probe tells apart)"),
            (all(isinstance(g, list) and len(g) >= 2 and all(isinstance(w, str) for w in g)
                 for g in self.text_stage.groups), "text_stage.groups must be lists of >= 2 words each"),
            (not self.text_stage.steps or self.train.modules not in ("all",),
             "text_stage pretrains then freezes the text encoder: use train.modules 'unet' or 'motion', not 'all'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML/YAML file (or start from defaults when None) and apply ``--section.key value`` overrides."""
    raw = _read_file(Path(path)) if path is not None else {}
    config = TrainConfig()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top-level key {section!r} must be a section like [{section}]")
        for key, value in values.items():
            _set(config, section, key, value, source=str(path))
    for key, value in _pairs(overrides or []):
        section, _, name = key.partition(".")
        _set(config, section, name, _parse_value(value), source="command line")
    config.validate()
    return config


def to_json(config: TrainConfig) -> str:
    """The resolved config as indented JSON (what a run saves as ``config.json``)."""
    return json.dumps(dataclasses.asdict(config), indent=2)


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # lazy: PyYAML is optional, needed only for YAML configs
        except ImportError as e:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from e
        return yaml.safe_load(text) or {}
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from e


def _pairs(args: list[str]) -> Iterator[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=2"]`` -> ("a.b", "1"), ("c.d", "2")."""
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"override {arg!r} must look like --section.key VALUE (e.g. --optim.lr 3e-4)")
        key, eq, value = arg[2:].partition("=")
        value = value if eq else next(rest, None)  # "--a.b=1" or "--a.b 1"
        if value is None:
            raise ValueError(f"override {arg} needs a value")
        yield key, value


def _parse_value(text: str) -> Any:
    """A command-line value as TOML ("3e-4", "true", "[1, 2]", '"x"'), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(config: TrainConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(config)}
    if section not in sections:
        raise ValueError(f"{source}: unknown config section {section!r} (sections: {', '.join(sorted(sections))})")
    part = getattr(config, section)
    names = {f.name for f in dataclasses.fields(part)}
    if key not in names:
        raise ValueError(f"{source}: unknown key {section}.{key} (keys of [{section}]: {', '.join(sorted(names))})")
    setattr(part, key, _coerce(value, getattr(part, key), f"{section}.{key}", source))


def _coerce(value: Any, current: Any, name: str, source: str) -> Any:
    """Convert ``value`` to the type of the default ``current`` (int -> float allowed, not the reverse)."""
    kind = type(current)
    if kind is bool and isinstance(value, str) and value.lower() in BOOL_WORDS:
        return BOOL_WORDS[value.lower()]
    if kind is float and type(value) is int:
        return float(value)
    if kind is int and type(value) is float and value.is_integer():
        return int(value)
    if kind is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if kind is str:
        return str(value)
    if type(value) is kind:
        return value
    raise ValueError(f"{source}: {name} must be a {kind.__name__}, got {value!r}")
