"""One construction path for the DeepSpeed engine: the precision rule, the DeepSpeed JSON with
its "auto" entries filled, AdamW parameter groups, the LR schedule and `build_engine`.

Used by vlds/train.py, vlds/evaluate.py (the precision rule) and every benchmark script, so a
benchmark measures the engine a run trains with. Importing this module also imports every owner
of a config section's check (tasks, mixing, decoding, PEFT methods, kernels): an entry point
that imports it validates a config fully with `vlds.config.validate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import vlds.data.decode  # noqa: F401  (registers the data.features check)
import vlds.data.mixing  # noqa: F401  (registers the data.mixing checks)
import vlds.data.tasks  # noqa: F401  (registers the data.tasks check)
import vlds.kernels  # noqa: F401  (registers the peft.fused_kernel check)
import vlds.model.vl  # noqa: F401  (registers the model.visual_input / eval.nlvr_predict checks)
import vlds.peft  # noqa: F401  (registers the peft.method check)
import vlds.pretrain  # noqa: F401  (registers the train.stage check)
import vlds.trackers  # noqa: F401  (registers the train.report_to check)
from vlds.config import ZERO_STAGES, Config, ConfigError, config_check, global_batch

# vlds/ds_configs/ ships inside the package (an installed copy has it too); the repository's
# top-level ds_configs/ is a link to it, so `--deepspeed ds_configs/zero2.json` works in a checkout
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent / "ds_configs" / "zero2.json"


def use_bf16(cfg: Config) -> bool:
    """The precision rule: bf16 when asked, or "auto" on a GPU; fp32 otherwise (T5 overflows in
    fp16, so fp16 is never used)."""
    return cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and torch.cuda.is_available()
    )


def deepspeed_config(
    path: str | Path, cfg: Config, world: int, bf16: bool, resumed: dict | None = None
) -> dict:
    """Read the JSON and fill its "auto" entries; a number that contradicts the run fails. The
    ZeRO stage is `zero_stage`'s (`resumed`: the trainer state of the checkpoint resumed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"DeepSpeed config {p} does not exist; pass --deepspeed "
            f"ds_configs/zero2.json or ds_configs/zero3.json"
        )
    ds = json.loads(p.read_text())
    train_batch, accum, micro = global_batch(cfg, world)
    want = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f"{p}: {key}={ds[key]} but the run needs {value} (from data."
                f"batch_size, train.grad_accum and {world} rank(s)); set it to "
                f'"auto" in the JSON'
            )
        ds[key] = value
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)  # T5 overflows in fp16 (reference); bf16 or fp32 only
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = zero_stage(cfg, world, zero, resumed, bf16)
    if bf16 and zero["stage"] == 1:
        # bf16 weights, fp32 gradient accumulation: DeepSpeed's BF16_Optimizer (flat fp32
        # master weights and gradients, one norm and overflow check per step)
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return ds


def zero_stage(
    cfg: Config, world: int, zero: dict, resumed: dict | None = None, bf16: bool = False
) -> int:
    """The ZeRO stage of a run. `train.zero_stage` 0-3 sets it. "auto" (default) keeps the
    JSON's stage on several ranks. One rank has nothing to partition, so there, unless the JSON
    offloads to CPU or NVMe, "auto" takes
    - in fp32, stage 0: ZeRO-2's flat fp32 partition and gradient buckets cost full fine-tuning
      1.83x a plain PyTorch loop's time and 1.77x its memory, stage 0 1.09x and the same memory
      (bench/RESULTS.md, "The engine's own cost", t5-base size on CPU);
    - in bf16, stage 1 with fp32 gradient accumulation (`deepspeed_config`), which is DeepSpeed's
      BF16_Optimizer. Stage 0 in bf16 is DeepSpeed's unfused fp16 optimizer, which checks each
      gradient for overflow with its own read back to the host: 2 per trainable tensor per step
      (about 620 for the single adapter at t5-base size), each a GPU synchronisation; on an H200
      the engine took 1.61x a plain loop's step there. BF16_Optimizer reads back 6 values
      (bench/RESULTS.md, "First run on a GPU").
    A resumed run keeps its checkpoint's stage (checkpoints older than this rule: the JSON's)."""
    json_stage = int(zero.get("stage", 0))
    was = None if resumed is None else int(resumed.get("zero_stage", json_stage))
    if cfg.train.zero_stage != "auto":
        stage = int(cfg.train.zero_stage)
        if was is not None and was != stage:
            raise ConfigError(
                f"cannot resume: the checkpoint was written under ZeRO stage {was}, and "
                f"train.zero_stage={stage}; resume with --train.zero_stage={was} (or auto)"
            )
        return stage
    if was is not None:
        return was
    offload = any(
        str(zero.get(k, {}).get("device", "none")).lower() != "none"
        for k in ("offload_optimizer", "offload_param")
    )
    if world > 1 or offload:
        return json_stage
    return 1 if bf16 else 0


@config_check
def check_zero_stage(cfg: Config) -> None:
    if str(cfg.train.zero_stage) not in ZERO_STAGES:
        raise ConfigError(
            f"train.zero_stage={cfg.train.zero_stage!r}; valid: auto (the DeepSpeed JSON's "
            f"stage; on one rank 0 in fp32, 1 in bf16) or 0, 1, 2, 3"
        )


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


DECAY_EXEMPT = ("reference", "norms")
# The reference's rule (trainer_base.py:420-483): no decay where the name contains one of these
_REFERENCE_NO_DECAY = ("bias", "LayerNorm.weight")


def reference_names(model) -> dict[int, str]:
    """id(parameter) -> the name the reference's rule is applied to: vlds' own name, except
    where a module declares what the reference calls its tensor (`reference_param_names`:
    Compacter's PHM bias is `b`, Hyperformer's bias generators and LayerNorm are
    `bias_generator` and `LayerNorm`). Shared tensors (tied embeddings) keep their first name."""
    names: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        alias = getattr(mod, "reference_param_names", {})
        for p_name, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), f"{mod_name}.{alias.get(p_name, p_name)}")
    return names


def is_decay_exempt(name: str, p, mode: str) -> bool:
    """Mode "reference": the name (`reference_names`) holds "bias" or "LayerNorm.weight". On the
    LM's names that exempts every bias and T5's relative_attention_bias tables but decays every
    LayerNorm / T5LayerNorm gain (none is called "LayerNorm"), the visual embedding's norm
    gains and image-order table, Compacter's PHM bias; it exempts Hyperformer's LayerNorm and
    its bias generators (weights too). "norms": every 1-D tensor (all biases and norm gains,
    Compacter's bias; Hyperformer's bias-generator weights and relative_attention_bias are
    decayed)."""
    if mode == "norms":
        return p.ndim < 2
    return any(k in name for k in _REFERENCE_NO_DECAY)


def param_groups(model, weight_decay: float, mode: str = "reference") -> list[dict]:
    """AdamW groups of the trainable parameters: decayed, and exempt by `is_decay_exempt`."""
    if mode not in DECAY_EXEMPT:
        raise ValueError(f"decay exemption {mode!r}; valid: {', '.join(DECAY_EXEMPT)}")
    names = reference_names(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if is_decay_exempt(names[id(p)], p, mode) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@config_check
def check_decay_exempt(cfg: Config) -> None:
    if cfg.train.decay_exempt not in DECAY_EXEMPT:
        raise ConfigError(
            f"train.decay_exempt={cfg.train.decay_exempt!r}; valid: reference (no decay where "
            f"the reference's parameter name holds 'bias' or 'LayerNorm.weight') or norms (no "
            f"decay on any 1-D tensor)"
        )


def stage_of(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def is_zero3(ds_config: dict) -> bool:
    return stage_of(ds_config) == 3


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in `overflow`,
    the attribute DeepSpeed's engine reads to count a skipped step, hold the LR schedule and
    answer `was_step_applied()`. ZeRO and DeepSpeed's bf16 optimizer check the gradients
    themselves; at stage 0 in fp32 the client optimizer is the only place to do it."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []  # one pass; inf / nan propagate
        self.overflow = bool(norms) and not bool(torch.stack(norms).sum().isfinite())
        return None if self.overflow else super().step(closure)


def build_engine(cfg: Config, model, ds_config: dict, total_steps: int):
    """The DeepSpeed engine over `model`: AdamW on its trainable parameters only (client torch
    optimizer: no JIT build), the warm-up/decay schedule over the optimizer steps of
    `total_steps` micro-steps, and under ZeRO-3 whole adapter modules gathered at once. At
    stage 0 on one rank the engine's gradient all-reduce (a flatten, a no-op reduce and a copy
    back of every gradient) is turned off."""
    from vlds.distributed import import_deepspeed

    deepspeed = import_deepspeed()
    t = cfg.train
    # the LR schedule counts optimizer steps, one per grad_accum micro-steps
    opt_steps = math.ceil(total_steps / ds_config["gradient_accumulation_steps"])
    stage = stage_of(ds_config)
    checked = stage == 0 and not ds_config["bf16"]["enabled"]
    optimizer = (CheckedAdamW if checked else torch.optim.AdamW)(
        param_groups(model, t.weight_decay, t.decay_exempt),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt_steps, int(t.warmup_ratio * opt_steps))
    )
    if is_zero3(ds_config):
        # ds_configs/zero3.json sets stage3_param_persistence_threshold to 0. DeepSpeed (0.19)
        # releases every parameter at each optimizer step, persistent ones too, frozen ones
        # too, then re-gathers each persistent tensor with its own collective: at t5-base size
        # its default 10,000 made 198 collectives a step, 0 makes 8 (every parameter fetched in
        # coalesced buckets at use; the same bytes: bench/collectives.py, bench/RESULTS.md).
        # No setting keeps a frozen backbone whole under ZeRO-3: for PEFT prefer ZeRO-2.
        # The fused adapter path reads its modules' weights directly: ZeRO-3 must gather a
        # whole adapter module at once (no-op for methods without adapters).
        from deepspeed.utils import set_z3_leaf_modules

        from vlds.peft.adapter import zero3_leaf_classes

        set_z3_leaf_modules(model, zero3_leaf_classes(), raise_if_not_found=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if stage == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine
