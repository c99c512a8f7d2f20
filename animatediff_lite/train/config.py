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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_MODULES = ("motion", "motion_lora", "all")
PRECISIONS = ("fp32", "fp16", "bf16")


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


@dataclass
class ModelSection:
    preset: str = ""  # "tiny" or "sd15": random init from animatediff_lite.config (tests, the default model)
    init_seed: int = 0  # seed of the random init for a preset
    base: str = ""  # or: SD1.5 weights, a diffusers folder or a single LDM file (through load_pipeline)
    motion_module: str = ""  # start from this motion module (fine-tune); empty: zero-init proj_out
    motion_version: str = "v2"  # "v1", "v2" or "v3" layout for a fresh motion module


@dataclass
class TrainSection:
    modules: str = "motion"  # "motion", "motion_lora" (rank-r adapters on a frozen motion module) or "all"
    lora_rank: int = 4
    max_steps: int = 1000
    batch_size: int = 1  # per rank and micro-step
    grad_accum: int = 1
    seed: int = 42
    precision: str = "fp32"  # "fp32", "fp16" (CUDA, with a GradScaler) or "bf16"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    device: str = ""  # default: cuda:{LOCAL_RANK} when available, else cpu


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr


@dataclass
class NoiseSection:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"  # AnimateDiff trains with plain linear betas


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
    output: OutputSection = field(default_factory=OutputSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for section in dataclasses.fields(self):  # NaN/inf never make sense here (a NaN lr trains silently)
            for f in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{section.name}.{f.name} must be a finite number, got {value}")
        checks = [
            (self.train.modules in TRAIN_MODULES, f"train.modules must be one of {TRAIN_MODULES}"),
            (self.train.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}"),
            (bool(self.model.preset) != bool(self.model.base),
             "set exactly one of model.preset ('tiny', 'sd15') and model.base (a weights path)"),
            (self.model.preset in ("", "tiny", "sd15"), "model.preset must be 'tiny' or 'sd15'"),
            (self.train.lora_rank >= 1, "train.lora_rank must be >= 1"),
            (self.train.modules != "motion_lora" or bool(self.model.motion_module),
             "train.modules = 'motion_lora' needs model.motion_module (the motion module the LoRA adapts)"),
            (self.train.max_steps >= 1 and self.train.batch_size >= 1 and self.train.grad_accum >= 1,
             "train.max_steps, train.batch_size and train.grad_accum must be >= 1"),
            (0 <= self.train.caption_dropout <= 1, "train.caption_dropout must be in [0, 1]"),
            (self.output.save_every >= 1 and self.output.keep_last >= 1 and self.output.log_every >= 1,
             "output.save_every, output.keep_last and output.log_every must be >= 1"),
            (self.data.frames >= 1 and self.data.stride >= 1 and self.data.size >= 8, "bad data.frames/stride/size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML/YAML file (or start from defaults when None) and apply ``--section.key value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_file(Path(path))
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
            import yaml
        except ImportError as e:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from e
        return yaml.safe_load(text) or {}
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from e


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c.d=2"]`` -> [("a.b", "1"), ("c.d", "2")]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"override {arg!r} must look like --section.key VALUE (e.g. --optim.lr 3e-4)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out.append((key, value))
    return out


def _parse_value(text: str) -> Any:
    """A command-line value as TOML ("3e-4", "true", "[1, 2]", '"x"'), else the raw string."""
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
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
    current = getattr(part, key)
    setattr(part, key, _coerce(value, current, f"{section}.{key}", source))


def _coerce(value: Any, current: Any, name: str, source: str) -> Any:
    """Convert ``value`` to the type of the default ``current`` (int -> float allowed, not the reverse)."""
    kind = type(current)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        return str(value)
    elif kind is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    raise ValueError(f"{source}: {name} must be a {kind.__name__}, got {value!r}")
