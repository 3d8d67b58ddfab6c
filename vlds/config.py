"""Run configuration: one dataclass tree, named presets, and one override path.

The same `Config` is built by the CLI (`--section.key=value`), by Ray Tune trials and by tests
(`build_config(preset, overrides)`); every value is type-checked against the dataclass field and
an unknown section, key or preset fails at once with the valid choices. The resolved config is
written as JSON into every run folder and checkpoint, and a JSON file can be read back with
`--config FILE` (parsed, never executed).

    python -c "from vlds.config import build_config; print(build_config('tiny'))"
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


@dataclass
class ModelConfig:
    arch: str = "t5"  # "t5" | "bart": how the language model is built when lm == "random"
    # "random": a randomly initialised encoder-decoder of the sizes below (tests, benchmarks,
    # the embedded default); otherwise a hub name ("t5-base", "facebook/bart-base") or a local
    # directory written by save_pretrained.
    lm: str = "random"
    d_model: int = 64
    num_layers: int = 2  # encoder layers; the decoder gets the same number
    num_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    # "" = the tokenizer that belongs to `lm` (hub name or local dir); "synthetic" = the
    # shapes-world sentencepiece model written next to the embedded data; or a directory.
    tokenizer: str = "synthetic"
    extra_tokens: int = 0  # the reference adds 200 special tokens to bart-base's vocabulary
    # open_clip model name ("RN101", "ViT-B-32", or the embedded "vlds-tiny-rn") and weights:
    # "" = random (tests), "openai" (hub), or a path to a checkpoint file.
    vision: str = "vlds-tiny-rn"
    vision_pretrained: str = ""
    grid_pool: int = 6  # ResNet layer4 grid is adaptively max-pooled to grid_pool x grid_pool
    max_frames: int = 64  # video: frames resampled to this many (max-pool down, zero-pad up)


@dataclass
class PeftConfig:
    method: str = "single_adapter"
    reduction_factor: int = 8  # bottleneck = d_model // reduction_factor
    # None = the method's default (the paper trains LayerNorms with adapters, not with LoRA)
    train_layernorms: bool | None = None
    phm_n: int = 2  # Compacter: W = sum_i kron(A_i, B_i), i < n
    hyper_task_dim: int = 512  # Hyperformer task embedding
    hyper_layer_dim: int = 512  # Hyperformer layer embedding
    hyper_hidden: int = 128  # hypernetwork Linear(task + layer -> hidden) -> ReLU -> ...
    hyper_proj: int = 8  # ... -> Linear(hidden -> p) -> LayerNorm(p), p feeds the generators
    lora_rank: int = 128
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_train_biases: bool = True  # the reference also trains every bias of the model
    prompt_length: int = 40  # encoder prompt vectors
    prompt_hidden: int = 800  # reparameterisation Linear(d -> hidden) -> tanh -> Linear(-> d)
    # Fused Triton adapter kernels: "auto" = on CUDA tensors when triton imports, "on", "off"
    fused_kernel: str = "auto"


@dataclass
class DataConfig:
    # "" = the embedded synthetic shapes world (generated on first use into the cache);
    # otherwise a folder with {task}/{split}.index.json and the shards it names.
    root: str = ""
    tasks: str = "vqa,gqa,nlvr,caption"
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 32  # micro-batch per rank (every task; see task_batch_scale)
    # Per-task multipliers of batch_size, e.g. "gqa=1.67,nlvr=0.33" (the reference's per-task
    # batch sizes); empty = all tasks use batch_size.
    task_batch_scale: str = ""
    num_workers: int = 1
    shuffle_buffer: int = 256
    max_text_len: int = 40  # encoder text tokens (video tasks use up to 600 in the reference)
    max_target_len: int = 20
    # Steps per task in an epoch: "proportional" to its batch count (the reference),
    # "weights" (data.mixing_weights, e.g. "vqa=2,gqa=1,nlvr=1,caption=1": every task), or
    # "temperature" (batch counts ^ (1 / data.mixing_temperature); 1 = proportional, large =
    # uniform). The epoch keeps the proportional number of steps; small tasks repeat.
    mixing: str = "proportional"
    mixing_weights: str = ""
    mixing_temperature: float = 2.0
    # "shard": each rank/worker reads its own shards (least I/O); "global": all read the same
    # stream and slice each global batch, so results do not depend on the number of ranks
    split: str = "shard"
    # Cached CLIP features (python -m vlds.data.extract): "auto" = use feats.npy where the
    # shards have it, "true" = require feature shards, "false" = pixels only.
    features: str = "auto"
    # JPEG decoding in PIL's draft mode (DCT-domain downscale, 2-3x faster); false = full decode
    jpeg_draft: bool = True
    # Bad samples (undecodable, missing fields, truncated tars) are skipped and counted; above
    # this fraction of a reader's samples the run stops naming the shards (1.0 = never stop).
    max_bad_fraction: float = 0.01


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0  # > 0 stops early (and sizes the LR schedule)
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    warmup_ratio: float = 0.1
    grad_clip: float = 5.0
    grad_accum: int = 1
    global_batch_size: int = 0  # 0 = batch_size x grad_accum x world; else must divide
    seed: int = 0
    precision: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU; or "bf16" | "fp32"
    out_dir: str = "runs/{preset}"  # a fresh run moves an earlier one aside
    resume: str = ""  # "" | "latest" | a checkpoint folder
    init_from: str = ""  # start a new run from an adapter export (fresh optimizer)
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    log_every: int = 10
    save_every: int = 0  # steps; 0 = at the end of each epoch
    keep_last: int = 2


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = at the end of each epoch
    max_samples: int = 0  # per task; 0 = the whole validation split
    batch_size: int = 64
    qa_beams: int = 1  # greedy for QA (reference)
    caption_beams: int = 5  # beam 5 for captions (reference)
    max_new_tokens: int = 20


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.data.tasks.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS = ("model", "peft", "data", "train", "eval")


# ---- presets --------------------------------------------------------------------------------
# Each preset is a set of overrides on the defaults, so every preset is one readable block.

_REAL_IMAGE = {
    "model.tokenizer": "",
    "model.vision": "RN101",
    "model.vision_pretrained": "openai",
    "model.grid_pool": 6,
    "data.tasks": "vqa,gqa,nlvr,caption",
    "data.num_workers": 8,
    "data.shuffle_buffer": 2000,
    "train.epochs": 20,
    "train.lr": 1e-3,
    "eval.batch_size": 256,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: random tiny CLIP-T5 on the shapes world, 2 CPU cores, minutes.
    "tiny": {
        "model.max_frames": 8,
        "model.grid_pool": 3,
        "peft.reduction_factor": 2,
        "peft.hyper_task_dim": 32,
        "peft.hyper_layer_dim": 32,
        "peft.hyper_hidden": 32,
        "peft.lora_rank": 8,
        "peft.prompt_length": 8,
        "peft.prompt_hidden": 64,
        "data.batch_size": 32,
        "train.epochs": 6,
        "train.lr": 3e-3,
        "train.log_every": 10,
        "eval.max_samples": 150,
        "eval.batch_size": 64,
        "eval.caption_beams": 3,
    },
    "tiny-bart": {"base": "tiny", "model.arch": "bart"},
    "tiny-video": {
        "base": "tiny",
        "data.tasks": "tvqa,how2qa,tvc,yc2c",
        "data.max_text_len": 96,
    },
    "t5-base": {
        **_REAL_IMAGE,
        "model.arch": "t5",
        "model.lm": "t5-base",
        "model.d_model": 768,
        "data.batch_size": 300,
    },
    "bart-base": {
        **_REAL_IMAGE,
        "model.arch": "bart",
        "model.lm": "facebook/bart-base",
        "model.d_model": 768,
        "model.extra_tokens": 200,
        "data.batch_size": 500,
    },
    "bart-base-video": {
        "base": "bart-base",
        "model.vision": "ViT-B-32",
        "model.max_frames": 64,
        "data.tasks": "tvqa,how2qa,tvc,yc2c",
        "data.max_text_len": 600,
        "data.batch_size": 32,
        "train.epochs": 7,
        "train.lr": 3e-4,
    },
    # t5-base sizes with random weights: step-time benchmarks without a download.
    "t5-base-random": {
        "base": "tiny",
        "model.d_model": 768,
        "model.num_layers": 12,
        "model.num_heads": 12,
        "model.d_ff": 3072,
        **{f"peft.{f.name}": f.default for f in fields(PeftConfig) if f.name != "method"},
    },
}


def _preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    base = spec.pop("base", None)
    merged = _preset_overrides(base) if base else {}
    merged.update(spec)
    return merged


# ---- typed overrides ------------------------------------------------------------------------


def _field_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert `value` (a CLI string or a JSON value) to the field type, or fail naming the key."""
    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional, typ = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty (expected {typ.__name__})")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(
            f"{key}={value!r} is not a valid {typ.__name__}; fix the value "
            f"(e.g. {key}={_example(typ)})"
        ) from None
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _example(typ) -> str:
    return {bool: "true", int: "8", float: "1e-3", str: "text"}.get(typ, "?")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of `cfg` with dotted-key overrides applied and type-checked."""
    sections = {s: replace(getattr(cfg, s)) for s in SECTIONS}
    preset = cfg.preset
    for key, value in overrides.items():
        if key == "preset":
            preset = value
            continue
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(
                f"unknown config key {key!r}; keys look like section.key with section one of "
                f"{', '.join(SECTIONS)}"
            )
        types_ = _field_types(type(sections[section]))
        if name not in types_:
            raise ConfigError(
                f"unknown key {key!r}; valid keys in [{section}]: {', '.join(sorted(types_))}"
            )
        setattr(sections[section], name, _coerce(value, types_[name], key))
    return Config(preset=preset, **sections)


def build_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """Preset defaults, then `overrides` ({"train.lr": "3e-4", ...}); strings are parsed."""
    cfg = apply_overrides(Config(preset=preset), _preset_overrides(preset))
    cfg = apply_overrides(cfg, overrides or {})
    if "{preset}" in cfg.train.out_dir:
        cfg.train.out_dir = cfg.train.out_dir.format(preset=preset)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its JSON form (a run folder's config.json, a tune result)."""
    flat: dict[str, Any] = {}
    for section, values in d.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(SECTIONS)}")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return apply_overrides(Config(preset=d.get("preset", "tiny")), flat)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON file of either nested sections or flat dotted keys -> flat overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing JSON file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON ({e}); fix or regenerate it") from e
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def parse_cli(argv: list[str]) -> tuple[Config, list[str]]:
    """`--preset NAME`, `--config FILE` and `--section.key=value` -> (Config, leftover args).

    Leftovers are the launcher's own flags (`--deepspeed FILE`, `--local_rank N`), which the
    caller handles; anything else that looks like an override but is not one is an error.
    """
    preset, file_overrides, overrides, rest = "tiny", {}, {}, []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--preset"):
            preset = arg.split("=", 1)[1] if "=" in arg else next(it, "")
        elif arg.startswith("--config"):
            file_overrides = load_config_file(arg.split("=", 1)[1] if "=" in arg else next(it))
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override {arg!r} needs a value: --{key}=VALUE")
            overrides[key] = value
        else:
            rest.append(arg)
    preset = file_overrides.pop("preset", preset) if preset == "tiny" else preset
    return build_config(preset, {**file_overrides, **overrides}), rest


def validate(cfg: Config) -> None:
    """Semantic checks that need no model, data or process group: fail before any work."""
    from vlds.data.tasks import IMAGE_TASKS, TASKS, VIDEO_TASKS
    from vlds.peft import METHODS

    tasks = cfg.task_list
    if not tasks:
        raise ConfigError("data.tasks is empty; give e.g. --data.tasks=vqa,gqa,nlvr,caption")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown} in data.tasks; valid: {', '.join(TASKS)}")
    if any(t in IMAGE_TASKS for t in tasks) and any(t in VIDEO_TASKS for t in tasks):
        raise ConfigError(
            "data.tasks mixes image and video tasks, whose visual features differ (grid tokens "
            "vs frame embeddings); train them in separate runs, as the paper does"
        )
    if cfg.model.arch not in ("t5", "bart"):
        raise ConfigError(f"model.arch={cfg.model.arch!r}; valid: t5, bart")
    if cfg.peft.method not in METHODS:
        raise ConfigError(
            f"unknown PEFT method {cfg.peft.method!r}; valid methods: {', '.join(METHODS)}"
        )
    check_reduction_factor(cfg.peft.reduction_factor, cfg.model.d_model)
    METHODS[cfg.peft.method](cfg.peft, tasks).check(cfg.model.d_model, cfg.model.arch)
    from vlds.kernels import check_mode

    check_mode(cfg.peft.fused_kernel)
    if cfg.data.batch_size < 1 or cfg.eval.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("data.batch_size, eval.batch_size and train.grad_accum must be >= 1")
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={cfg.train.precision!r}; valid: auto, bf16, fp32")
    if cfg.data.split not in ("shard", "global"):
        raise ConfigError(f"data.split={cfg.data.split!r}; valid: shard, global")
    check_data(cfg)
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError("train.warmup_ratio must be in [0, 1)")


def check_data(cfg: Config) -> None:
    """The data section's values: mixing, its weights, feature mode, bad-data threshold."""
    from vlds.data.stream import FEATURE_MODES, MIXING, DataError, parse_mixing_weights

    d = cfg.data
    if d.mixing not in MIXING:
        raise ConfigError(f"data.mixing={d.mixing!r}; valid: {', '.join(MIXING)}")
    if d.mixing == "weights":
        try:
            parse_mixing_weights(d.mixing_weights, cfg.task_list)
        except DataError as e:
            raise ConfigError(str(e)) from None
    elif d.mixing_weights:
        raise ConfigError(
            f"data.mixing_weights is set but data.mixing={d.mixing!r}; add --data.mixing=weights"
        )
    if d.mixing == "temperature" and not d.mixing_temperature > 0:
        raise ConfigError(f"data.mixing_temperature={d.mixing_temperature} must be > 0 (e.g. 2)")
    if d.features not in FEATURE_MODES:
        raise ConfigError(f"data.features={d.features!r}; valid: {', '.join(FEATURE_MODES)}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")


def check_reduction_factor(r: int, d_model: int) -> None:
    if r < 1 or d_model % r:
        divisors = [k for k in (1, 2, 4, 8, 16, 32, 64) if d_model % k == 0]
        raise ConfigError(
            f"peft.reduction_factor={r} does not divide d_model={d_model} (the bottleneck is "
            f"d_model / r); choose one of {divisors}"
        )


def global_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(train_batch, grad_accum) with train_batch = micro x accum x world, or a clear error."""
    micro = cfg.data.batch_size
    if cfg.train.global_batch_size <= 0:
        return micro * cfg.train.grad_accum * world_size, cfg.train.grad_accum
    per_step = micro * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"data.batch_size x world size = {micro} x {world_size} = {per_step}; set it to a "
            f"multiple of {per_step} or change data.batch_size"
        )
    return cfg.train.global_batch_size, cfg.train.global_batch_size // per_step
