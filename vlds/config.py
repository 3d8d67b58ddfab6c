"""Run configuration: one dataclass tree, named presets, and one override path.

The same `Config` is built by the CLI (`--section.key=value`), by Ray Tune trials and by tests
(`build_config(preset, overrides)`); every value is type-checked against the dataclass field and
an unknown section, key or preset fails at once with the valid choices. The resolved config is
written as JSON into every run folder and checkpoint, and a JSON file can be read back with
`--config FILE` (parsed, never executed).

A leaf: it imports nothing from vlds but vlds.recipe (the reference's recipe table, a leaf
too). Each field carries its role ("match": a resume must keep it; "run": where and how a run
executes, not what it trains; "resume": free to change on resume); the owners of a section's meaning
(tasks, mixing, decoding, PEFT, kernels) register their checks with `@config_check`. Longer than
~400 lines for a reason: every key is defined, commented, typed, preset and checked here, in one
place a user reads to learn the run's knobs.

    python -c "from vlds.config import build_config; print(build_config('tiny'))"
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


# ---- field roles ----------------------------------------------------------------------------
# A field's role is kept beside it, not in hand-kept key lists elsewhere:
# - MATCH: part of what a checkpoint trains or the order it reads its data in; a resume must use
#   the same value (vlds.checkpoint.check_compatible compares every such field);
# - RUN: where and how a run executes or is scored, not what it trains (a tuned winner's
#   best_config.json leaves these out);
# - RESUME: part of the run's recipe, yet free to change on resume (logged when it does): the
#   schedule's length (a run continued for longer), where the data lies, what is scored and
#   how, the guards' limits, the kernel choice (the same maths).
# Every field has a role (tests/test_config.py checks), so a new one is compared on resume
# unless it says otherwise.


# train.zero_stage's values (the rule: vlds.engine.zero_stage)
ZERO_STAGES = ("auto", "0", "1", "2", "3")


def _match(default):
    return field(default=default, metadata={"role": "match"})


def _run(default):
    return field(default=default, metadata={"role": "run"})


def _resume(default):
    return field(default=default, metadata={"role": "resume"})


def keys_with_role(role: str) -> list[str]:
    """Every "section.key" whose field is marked `role` ("match", "run" or "resume")."""
    return [
        f"{section}.{f.name}"
        for section in SECTIONS
        for f in fields(_SECTION_TYPES[section])
        if f.metadata.get("role") == role
    ]


@dataclass
class ModelConfig:
    arch: str = _match("t5")  # "t5" | "bart": how the language model is built when lm == "random"
    # "random": a randomly initialised encoder-decoder of the sizes below (tests, benchmarks,
    # the embedded default); otherwise a hub name ("t5-base", "facebook/bart-base") or a local
    # directory written by save_pretrained.
    lm: str = _match("random")
    d_model: int = _match(64)
    num_layers: int = _match(2)  # encoder layers; the decoder gets the same number
    num_heads: int = _match(4)
    d_ff: int = _match(128)
    dropout: float = _match(0.1)
    # "" = the tokenizer that belongs to `lm` (hub name or local dir); "synthetic" = the
    # shapes-world sentencepiece model written next to the embedded data; or a directory.
    tokenizer: str = _match("synthetic")
    # Tokens added to the vocabulary: the reference adds 200 to bart-base and 100
    # <vis_extra_id_k> to t5-base (32,200 rows); its object-order rows are the last rows.
    extra_tokens: int = _match(0)
    # open_clip model name ("RN101", "ViT-B-32", or the embedded "vlds-tiny-rn") and weights:
    # "" = random (tests), "openai" (hub), or a path to a checkpoint file.
    vision: str = _match("vlds-tiny-rn")
    vision_pretrained: str = _match("")
    # ResNet layer4 grid is adaptively max-pooled to grid_pool x grid_pool
    grid_pool: int = _match(6)
    # What of the tower trains: frozen (the paper's choice, outside the engine), full, ln (its
    # normalisation layers) or adapter (adapters in its blocks); vlds.model.vision.train_tower
    vision_train: str = _match("frozen")
    # video: frames resampled to this many (max-pool down, zero-pad up)
    max_frames: int = _match(64)
    # Visual tokens: "reference" = zero boxes + an object-order term (row N - k - 1 of the LM's
    # token table, k the token's index in its image), and under BART no learned positions and no
    # layernorm_embedding on them (the paper's code); "grid" = grid-cell / time-slice boxes, no
    # object order, BART's positions and LayerNorm over [visual ; text] (vlds' earlier input).
    visual_input: str = _match("reference")


# peft.method may be a method plus prompt tuning: "single_adapter+multiple_prompts"
PROMPT_METHODS = ("single_prompt", "multiple_prompts")


def split_method(method: str) -> tuple[str, str | None]:
    """peft.method "METHOD+PROMPTS" -> (METHOD, PROMPTS), PROMPTS one of PROMPT_METHODS and
    METHOD any other method (vlds.peft.registry.method_class builds them); a single method ->
    (method, None). The names themselves are checked against the registry there."""
    base, plus, prompts = method.partition("+")
    if not plus:
        return method, None
    if prompts not in PROMPT_METHODS or base in PROMPT_METHODS:
        raise ConfigError(
            f"peft.method={method!r}: a composition is METHOD+PROMPTS, PROMPTS one of "
            f"{', '.join(PROMPT_METHODS)} and METHOD another method "
            f"(e.g. single_adapter+multiple_prompts)"
        )
    return base, prompts


@dataclass
class PeftConfig:
    # a registered method (vlds.peft.METHODS) or METHOD+PROMPTS (split_method)
    method: str = _match("single_adapter")
    reduction_factor: int = _match(8)  # bottleneck = d_model // reduction_factor
    # None = the method's default (the paper trains LayerNorms with adapters, not with LoRA)
    train_layernorms: bool | None = _match(None)
    phm_n: int = _match(2)  # Compacter: W = sum_i kron(A_i, B_i), i < n
    hyper_task_dim: int = _match(512)  # Hyperformer task embedding
    hyper_layer_dim: int = _match(512)  # Hyperformer layer embedding
    hyper_hidden: int = _match(128)  # hypernetwork Linear(task + layer -> hidden) -> ReLU -> ...
    # ... -> Linear(hidden -> p) -> LayerNorm(p), p feeds the generators
    hyper_proj: int = _match(8)
    lora_rank: int = _match(128)
    lora_alpha: float = _match(32.0)
    lora_dropout: float = _match(0.1)
    lora_train_biases: bool = _match(True)  # the reference also trains every bias of the model
    prompt_length: int = _match(40)  # encoder prompt vectors
    # reparameterisation Linear(d -> hidden) -> tanh -> Linear(-> d)
    prompt_hidden: int = _match(800)
    # Fused Triton adapter kernels: "auto" = on CUDA tensors when triton imports, "on", "off"
    fused_kernel: str = _resume("auto")
    # The first fused call per (d, b, dtype, device) is checked against PyTorch (falls back on a
    # mismatch, recorded in metrics.json); false skips the check (benchmarks)
    fused_check: bool = _resume(True)


@dataclass
class DataConfig:
    # "" = the embedded synthetic shapes world (generated on first use into the cache);
    # otherwise a folder with {task}/{split}.index.json and the shards it names.
    root: str = _resume("")
    tasks: str = _match("vqa,gqa,nlvr,caption")
    train_split: str = _match("train")
    val_split: str = _resume("val")
    batch_size: int = _match(32)  # micro-batch per rank (every task; see task_batch_scale)
    # Per-task multipliers of batch_size, e.g. "gqa=1.67,nlvr=0.33" (the reference's per-task
    # batch sizes); empty = all tasks use batch_size.
    task_batch_scale: str = _match("")
    num_workers: int = _run(1)
    # Batches each data worker prepares ahead (torch's prefetch_factor), for training and
    # evaluation alike. They wait in shared memory (/dev/shm): the start-up check sizes
    # workers x prefetch x batch against it (vlds.data.shm). 2 (torch's default) keeps
    # 2 x num_workers batches ready, half the memory of the training loader's earlier 4.
    prefetch_factor: int = _run(2)
    shuffle_buffer: int = _match(256)
    # Token limits (special tokens included) of the encoder text and of the training target:
    # 0 = each task's reference length (vlds.data.tasks.Task.max_text_len / max_target_len:
    # VQA/GQA text 20, VQA answers 10, caption targets 40, video text 600 / targets 20, the
    # rest untruncated); a positive value is the limit of every task.
    max_text_len: int = _match(0)
    max_target_len: int = _match(0)
    # Images to the tower's square input: "squash" = resize to size x size ignoring the aspect
    # ratio, bicubic (the reference's Resize((224, 224))); "crop" = shorter side to size, then
    # the centre square. Cached feature shards record the mode they were extracted with.
    image_resize: str = _match("squash")
    # VQA training target: "soft" = each visit draws one normalised human answer in proportion
    # to its soft score min(1, 0.3 x count) and weights the sample's loss by that score (the
    # reference); "majority" = the most frequent raw answer, weight 1.
    vqa_target: str = _match("soft")
    # TVQA / How2QA training target: "tag" = the right choice's tag "a3" (the reference);
    # "text" = the right choice's words, generated words mapped back to the choice they name
    # at evaluation (vlds.data.tasks.tag_of_text): the same metric and predictions files.
    choice_target: str = _match("tag")
    # Steps per task in an epoch: "proportional" to its batch count (the reference),
    # "weights" (data.mixing_weights, e.g. "vqa=2,gqa=1,nlvr=1,caption=1": every task), or
    # "temperature" (batch counts ^ (1 / data.mixing_temperature); 1 = proportional, large =
    # uniform). The epoch keeps the proportional number of steps; small tasks repeat.
    mixing: str = _match("proportional")
    mixing_weights: str = _match("")
    mixing_temperature: float = _match(2.0)
    # "shard": each rank/worker reads its own shards (least I/O); "global": all read the same
    # stream and slice each global batch, so results do not depend on the number of ranks
    split: str = _match("shard")
    # Training samples of a caption task (caption, tvc, yc2c): "sentence" = one per reference
    # sentence, an image with 5 captions is 5 samples and 5x the steps (the reference);
    # "image" = one per image, each visit training on one of its captions drawn at random.
    # Evaluation is one sample per image either way.
    caption_samples: str = _match("sentence")
    # Task prompts ("vqa: ", ...) in the encoder text: "auto" = for the methods whose reference
    # script passes --use_tasks_prompts (vlds.data.tasks.uses_task_prompts), "true", "false".
    task_prompts: str = _match("auto")
    # Cached CLIP features (python -m vlds.data.prep.extract): "auto" = use feats.npy where the
    # shards have it, "true" = require feature shards, "false" = pixels only.
    features: str = _match("auto")
    # JPEG decoding in PIL's draft mode (DCT-domain downscale, 2-3x faster); false = full decode
    jpeg_draft: bool = _match(True)
    # Bad samples (undecodable, missing fields, truncated tars) are skipped and counted; above
    # this fraction of a reader's samples the run stops naming the shards (1.0 = never stop).
    max_bad_fraction: float = _resume(0.01)
    # Train and evaluate with every image one constant (all-zero visual features): the run
    # that measures what a model learns from the text alone (vlds.eval.grounding).
    blind: bool = _match(False)


@dataclass
class TrainConfig:
    epochs: int = _resume(20)
    max_steps: int = _resume(0)  # > 0 stops early (and sizes the LR schedule)
    lr: float = _match(1e-3)
    weight_decay: float = _match(0.01)
    # Which parameters weight decay skips: "reference" = those whose name in the paper's code
    # contains "bias" or "LayerNorm.weight" (its LM's LayerNorm gains are decayed); "norms" =
    # every 1-D tensor (biases and all norm gains). vlds.engine.param_groups lists both.
    decay_exempt: str = _match("reference")
    adam_beta1: float = _match(0.9)
    adam_beta2: float = _match(0.999)
    adam_eps: float = _match(1e-6)
    warmup_ratio: float = _match(0.1)
    grad_clip: float = _match(5.0)
    grad_accum: int = _match(1)
    # Loss reduction of COCO caption batches: "token" = the mean over every target token of the
    # micro-batch (the reference's caption_model.py; it depends on how a batch is split over
    # ranks); "sample" = each sample's token mean, then the mean over samples, as every other
    # task (the video captions tvc / yc2c too: the reference's video_model.py) always uses.
    caption_loss: str = _match("token")
    # 0 = batch_size x grad_accum x world; else this global batch whatever the world size (the
    # nearest multiple of it), data.batch_size the largest micro-batch per rank (global_batch)
    global_batch_size: int = _match(0)
    seed: int = _match(0)
    # "adapt" (PEFT on a backbone) or "pretrain": VL-T5-style objectives on the whole backbone,
    # which is written to out_dir/backbone at the end (vlds.pretrain)
    stage: str = _match("adapt")
    precision: str = _match("auto")  # "auto" = bf16 on GPU, fp32 on CPU; or "bf16" | "fp32"
    # ZeRO stage: "auto" = the DeepSpeed JSON's, but 0 on one rank (nothing to partition) unless
    # the JSON offloads; or 0 | 1 | 2 | 3. A resume keeps the checkpoint's (vlds.engine.zero_stage)
    zero_stage: str = _resume("auto")  # one of ZERO_STAGES
    out_dir: str = _run("runs/{preset}")  # a fresh run moves an earlier one aside
    resume: str = _run("")  # "" | "latest" | a checkpoint folder
    init_from: str = _resume("")  # start a new run from an adapter export (fresh optimizer)
    max_bad_steps: int = _resume(5)  # non-finite steps in a row before the run stops
    log_every: int = _run(10)
    save_every: int = _run(0)  # steps; 0 = at the end of each epoch
    # Also a checkpoint once this many minutes have passed since the last one (rank 0's clock,
    # agreed in the step's bookkeeping all-reduce); 0 = off. The real presets save every 30:
    # a node failure then loses at most that, not an epoch (vlds.guard)
    save_every_minutes: float = _run(0.0)
    keep_last: int = _run(2)
    # SIGTERM/SIGUSR1 save a checkpoint and stop; false where the host handles preemption
    # itself (Ray Tune runs trials in a worker thread, where handlers cannot be installed)
    handle_signals: bool = _run(True)
    # Experiment trackers, comma list of tensorboard | wandb | mlflow (JSONL + curves.png always)
    report_to: str = _run("tensorboard")


@dataclass
class EvalConfig:
    every: int = _run(0)  # steps; 0 = at the end of each epoch
    max_samples: int = _run(0)  # per task; 0 = the whole validation split
    batch_size: int = _run(64)
    qa_beams: int = _resume(1)  # greedy for QA (reference)
    caption_beams: int = _run(5)  # beam 5 for captions (reference)
    # tokens generated per answer or caption; 0 = each task's reference length (captions 40,
    # the rest 20: vlds.data.tasks.Task.max_new_tokens)
    max_new_tokens: int = _resume(0)
    # NLVR2: "first_token" = "true" vs "false" logit at the first decoding position (the
    # reference); "sequence" = the larger summed log-probability of the whole target
    nlvr_predict: str = _run("first_token")
    # TVQA / How2QA: "generate" = greedy decoding, scored when it names the right choice (the
    # reference); "rank" = the choice whose target (its tag, or its words with
    # data.choice_target=text) has the largest summed log-probability, EOS included: always one
    # of the choices, one teacher-forced decoder pass over the five per batch
    choice_predict: str = _run("generate")
    # none = the backbone's generation config (bart-base: 3), as the reference's generate;
    # 0 = off; n = no n-gram repeats in generated text
    no_repeat_ngram_size: int | None = _run(None)
    # PTBTokenizer + METEOR start two JVMs per caption evaluation (~10 s on 2 cores); false =
    # basic tokenisation, no METEOR (CIDEr, the caption score, needs neither)
    java_metrics: bool = _run(True)
    # Also score every evaluation with the images shuffled across the batch (each sample sees
    # another's visual tokens): the gap to the real score is what the images contribute.
    # Doubles the evaluation time; on in the embedded presets (vlds.eval.grounding).
    shuffled_images: bool = _run(False)
    # Also the validation loss: each sample's teacher-forced cross-entropy over its target
    # tokens, averaged per task and over tasks (metrics "loss"), one forward per batch
    loss: bool = _run(True)


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
_SECTION_TYPES = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


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
    "eval.batch_size": 256,
    # an epoch of VQAv2 + GQA + NLVR2 + COCO is hours on 8 GPUs: a crash or an unannounced
    # node loss costs at most 30 minutes, not the epoch (signals save at once: vlds.guard)
    "train.save_every_minutes": 30.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: a tiny CLIP-T5 on the shapes world, 2 CPU cores, minutes. Its
    # tower and language model are pretrained on the shapes world on first use and cached
    # (vlds.model.embedded_tower / embedded_lm): adapters adapt a model that already knows
    # the world in words, and must learn to see, as the paper's do.
    "tiny": {
        "model.lm": "synthetic",
        "model.vision_pretrained": "synthetic",
        "model.dropout": 0.0,  # the LM was pretrained without; 0.1 cost 6 VQA points here
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
        # captions need fewer steps than the rest (the epoch keeps the proportional step
        # count; bench/RESULTS.md, "Grounding of the embedded default")
        "data.mixing": "weights",
        "data.mixing_weights": "vqa=3,gqa=3,nlvr=3,caption=1",
        # one caption sample per image: per sentence (the reference) would make the shapes
        # world's 5 captions per image 5x the caption steps and double the epoch
        "data.caption_samples": "image",
        # the majority answer: the shapes world's ten human answers include deliberately wrong
        # ones (to exercise the official scorer), so soft-score draws train on a wrong answer
        # 13 % of the time; it cost 5-10 VQA points here (bench/RESULTS.md)
        "data.vqa_target": "majority",
        "train.epochs": 3,
        "train.lr": 3e-3,
        "train.log_every": 10,
        "eval.max_samples": 150,
        "eval.batch_size": 64,
        "eval.caption_beams": 3,
        "eval.shuffled_images": True,
    },
    "tiny-bart": {"base": "tiny", "model.arch": "bart"},
    "tiny-video": {
        "base": "tiny",
        "data.tasks": "tvqa,how2qa,tvc,yc2c",
        "data.mixing": "proportional",
        "data.mixing_weights": "",
        "data.max_text_len": 96,
        "train.epochs": 8,  # 600 clips per task (the image tasks' 8,000 make 3 enough)
        # the choice's words as target, ranked at evaluation: the embedded language model,
        # pretrained on four image tasks, never learns to point at a tag "a3" (chance on
        # every seed); with its words it answers from the clip (bench/RESULTS.md)
        "data.choice_target": "text",
        "eval.choice_predict": "rank",
    },
    # The real presets: the backbone here, the training recipe (learning rate per method, global
    # batch, per-task batches, epochs, ...) from vlds.recipe, applied for the run's method.
    "t5-base": {
        **_REAL_IMAGE,
        "recipe": "t5-base",
        "model.arch": "t5",
        "model.lm": "t5-base",
        "model.d_model": 768,
        "model.extra_tokens": 100,  # <vis_extra_id_k> rows: the object-order rows (reference)
    },
    "bart-base": {
        **_REAL_IMAGE,
        "recipe": "bart-base",
        "model.arch": "bart",
        "model.lm": "facebook/bart-base",
        "model.d_model": 768,
        "model.extra_tokens": 200,
    },
    "bart-base-video": {
        "base": "bart-base",
        "recipe": "bart-base-video",
        "model.vision": "ViT-B-32",
        "model.max_frames": 64,
        "data.tasks": "tvqa,how2qa,tvc,yc2c",
    },
    # t5-base sizes with random weights: step-time benchmarks without a download.
    "t5-base-random": {
        "base": "tiny",
        "model.lm": "random",
        "model.vision_pretrained": "",
        "model.dropout": 0.1,
        "model.d_model": 768,
        "model.num_layers": 12,
        "model.num_heads": 12,
        "model.d_ff": 3072,
        **{f"peft.{f.name}": f.default for f in fields(PeftConfig) if f.name != "method"},
    },
}


def _preset_overrides(name: str) -> dict[str, Any]:
    """A preset's overrides, its bases' first; "recipe" (the last one named) kept as a key."""
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


def resolve_config(
    preset: str = "tiny", overrides: dict[str, Any] | None = None
) -> tuple[Config, dict[str, str]]:
    """`build_config` and, for every "section.key", where its value comes from: "default",
    "preset NAME", "recipe: <the reference's file and line>" (vlds.recipe, for presets that name
    a recipe; applied for the run's peft.method between the preset and the overrides) or
    "override"."""
    from vlds.recipe import BEHAVIOUR, recipe_values

    overrides = dict(overrides or {})
    spec = _preset_overrides(preset)
    recipe = spec.pop("recipe", None)
    sources = {
        key: f"default: {BEHAVIOUR[key]}" if key in BEHAVIOUR else "default"
        for key in (f"{s}.{f.name}" for s in SECTIONS for f in fields(_SECTION_TYPES[s]))
    }
    cfg = apply_overrides(Config(preset=preset), spec)
    sources.update({k: f"preset {preset}" for k in spec})
    if recipe:
        method = str(overrides.get("peft.method", cfg.peft.method))
        try:
            values = recipe_values(recipe, method)
        except KeyError as e:
            raise ConfigError(f"preset {preset}: {e.args[0]}; choose another peft.method") from None
        cfg = apply_overrides(cfg, {k: v for k, (v, _) in values.items()})
        sources.update({k: f"recipe: {src}" for k, (_, src) in values.items()})
    cfg = apply_overrides(cfg, overrides)
    sources.update({k: "override" for k in overrides if k != "preset"})
    if "{preset}" in cfg.train.out_dir:
        cfg.train.out_dir = cfg.train.out_dir.format(preset=preset)
    return cfg, sources


def build_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """Preset defaults, its recipe (vlds.recipe), then `overrides` ({"train.lr": "3e-4", ...});
    strings are parsed."""
    return resolve_config(preset, overrides)[0]


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


def _is_override(arg: str) -> bool:
    return arg.startswith("--") and "." in arg.split("=", 1)[0]


def take_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--section.key=value` and `--section.key value` -> ({key: value}, the other args in
    order). A key with no value (the last argument, or followed by another --flag) is an
    error that shows both forms."""
    overrides, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not _is_override(arg):
            rest.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i == len(argv) or argv[i].startswith("--"):
                raise ConfigError(f"override {arg!r} needs a value: --{key}=VALUE or --{key} VALUE")
            value, i = argv[i], i + 1
        overrides[key] = value
    return overrides, rest


def parse_cli(argv: list[str]) -> tuple[Config, list[str]]:
    """`--preset NAME`, `--config FILE` and `--section.key=value` (or `--section.key value`)
    -> (Config, leftover args).

    Leftovers are the launcher's own flags (`--deepspeed FILE`, `--local_rank N`), which the
    caller handles; anything else that looks like an override but is not one is an error.
    """
    preset, file_overrides, rest = "tiny", {}, []
    overrides, others = take_overrides(argv)
    it = iter(others)
    for arg in it:
        if arg.startswith("--preset"):
            preset = arg.split("=", 1)[1] if "=" in arg else next(it, "")
        elif arg.startswith("--config"):
            file_overrides = load_config_file(arg.split("=", 1)[1] if "=" in arg else next(it))
        else:
            rest.append(arg)
    preset = file_overrides.pop("preset", preset) if preset == "tiny" else preset
    return build_config(preset, {**file_overrides, **overrides}), rest


# ---- validation -----------------------------------------------------------------------------
# The config checks what needs no other module; each owner of a section's meaning (the task
# registry, the mixing schedule, the PEFT registry, the kernels) registers its own check with
# `@config_check`, and `validate` calls them all. Importing vlds.engine (the construction path)
# imports every owner, so every entry point that builds a run validates it fully.
CHECKS: dict[str, Callable[[Config], None]] = {}


def config_check(fn: Callable[[Config], None]) -> Callable[[Config], None]:
    """Register `fn(cfg)` (raises ConfigError) to run in `validate`; keyed by its qualname."""
    CHECKS[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def validate(cfg: Config) -> None:
    """Semantic checks that need no model, data or process group: fail before any work."""
    if not CHECKS:
        raise RuntimeError(
            "no section checks are registered: import vlds.engine (it imports every owner of "
            "a config section) before calling vlds.config.validate"
        )
    if not cfg.task_list:
        raise ConfigError("data.tasks is empty; give e.g. --data.tasks=vqa,gqa,nlvr,caption")
    if cfg.model.arch not in ("t5", "bart"):
        raise ConfigError(f"model.arch={cfg.model.arch!r}; valid: t5, bart")
    if cfg.data.batch_size < 1 or cfg.eval.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("data.batch_size, eval.batch_size and train.grad_accum must be >= 1")
    if cfg.train.global_batch_size > 0 and cfg.train.grad_accum != 1:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} and train.grad_accum="
            f"{cfg.train.grad_accum} are both set; give one: the accumulation steps follow from "
            f"the global batch (global = data.batch_size x grad_accum x world size)"
        )
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision={cfg.train.precision!r}; valid: auto, bf16, fp32")
    if cfg.data.split not in ("shard", "global"):
        raise ConfigError(f"data.split={cfg.data.split!r}; valid: shard, global")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor={cfg.data.prefetch_factor} must be >= 1")
    if cfg.eval.max_new_tokens < 0:
        raise ConfigError(
            f"eval.max_new_tokens={cfg.eval.max_new_tokens}; give 0 (each task's reference "
            f"length) or a positive number of tokens"
        )
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError("train.warmup_ratio must be in [0, 1)")
    if cfg.train.save_every < 0 or cfg.train.save_every_minutes < 0:
        raise ConfigError(
            "train.save_every (steps) and train.save_every_minutes must be >= 0 (0 = off: a "
            "checkpoint at each epoch's end, and on a preemption signal)"
        )
    for check in CHECKS.values():
        check(cfg)


def global_batch(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(global batch, accumulation steps, micro-batch per rank): global = micro x accum x world.

    Without train.global_batch_size: data.batch_size x train.grad_accum x world. With it (the
    real presets set the paper's batch whatever the world size), data.batch_size is the largest
    micro-batch a rank takes: accumulation makes up what the ranks cannot hold, and a batch the
    world does not divide becomes the nearest one it does (printed at start-up and stored in
    metrics.json as the effective global batch)."""
    micro = cfg.data.batch_size
    target = cfg.train.global_batch_size
    if target <= 0:
        return micro * cfg.train.grad_accum * world_size, cfg.train.grad_accum, micro
    accum = max(1, math.ceil(target / (micro * world_size)))
    micro = max(1, min(micro, round(target / (world_size * accum))))
    return micro * accum * world_size, accum, micro
