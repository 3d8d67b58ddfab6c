"""Train CLIP-T5 / CLIP-BART with a PEFT method on a mix of vision-and-language tasks.

    deepspeed vlds/train.py --deepspeed ds_configs/zero2.json            # embedded default (tiny)
    deepspeed --num_gpus 8 vlds/train.py --deepspeed ds_configs/zero2.json \
        --preset bart-base --data.root /data/vl-shards                  # the paper's setting
    torchrun --nproc_per_node 2 vlds/train.py --preset tiny --train.max_steps=20
    python vlds/train.py --preset tiny --peft.method=full_finetune       # one process, CPU ok

Options: `--preset NAME`, `--config FILE.json`, any `--section.key=value` from vlds/config.py,
`--deepspeed FILE` (default ds_configs/zero2.json). `--train.resume=latest` continues a run.

One DeepSpeed engine holds the VL model (language model + visual embedding + PEFT modules); its
optimizer sees only the trainable parameters, and checkpoints exclude the frozen ones. The
frozen CLIP tower runs outside the engine under no_grad. Everything a run produces lands in
train.out_dir: config.json, metrics.jsonl, tb/ (TensorBoard), curves.png, metrics.json,
predictions_<task>.{json,csv,jsonl} (official formats) and checkpoints/.

Exit codes: 0 done (or preempted by SIGTERM/SIGUSR1 after saving a checkpoint), 2 bad
config/data/checkpoint (before any training), 3 too many non-finite steps in a row.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from vlds.config import ConfigError, global_batch, parse_cli, validate

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("vlds")


def parse_launcher_args(rest: list[str]) -> str:
    """The launcher's own flags: --deepspeed FILE and --local_rank N (ignored: env has it)."""
    ds_config, it = str(REPO / "ds_configs" / "zero2.json"), iter(rest)
    for arg in it:
        if arg.startswith("--deepspeed_config") or arg.startswith("--deepspeed"):
            ds_config = arg.split("=", 1)[1] if "=" in arg else next(it, "")
        elif arg.startswith("--local_rank"):
            if "=" not in arg:
                next(it, None)
        else:
            raise ConfigError(
                f"unrecognised argument {arg!r}; overrides look like --section.key=value "
                f"(see vlds/config.py), plus --preset, --config and --deepspeed"
            )
    return ds_config


def deepspeed_config(path: str, cfg, world: int, bf16: bool) -> dict:
    """Read the JSON and fill its "auto" entries; a number that contradicts the run fails."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"DeepSpeed config {p} does not exist; pass --deepspeed "
            f"ds_configs/zero2.json or ds_configs/zero3.json"
        )
    ds = json.loads(p.read_text())
    train_batch, accum = global_batch(cfg, world)
    want = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
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
    return ds


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norm weights (every 1-D tensor)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def main(argv: list[str] | None = None, on_eval=None) -> dict:
    """Run training; returns the final metrics (used by tests and the tuner).

    on_eval(step, metrics, cfg) is called on every rank after each evaluation (Ray Tune reports
    from it); metrics are identical on all ranks.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    # ---- everything that can be checked without work is checked first ------------------
    cfg, rest = parse_cli(argv)
    ds_path = parse_launcher_args(rest)
    validate(cfg)
    from vlds.distributed import init_distributed, world_info_from_env

    info = world_info_from_env()
    use_cuda = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda)
    ds_config = deepspeed_config(ds_path, cfg, info.world_size, bf16)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if cfg.data.root:
        from vlds.data.stream import load_index

        for t in cfg.task_list:  # a missing shard folder fails here, before any model is built
            for split in (cfg.data.train_split, cfg.data.val_split):
                load_index(cfg.data.root, t, split)
    device = init_distributed(info)
    import deepspeed
    import torch.distributed as dist

    from vlds.checkpoint import load_adapter, read_adapter
    from vlds.data import build
    from vlds.model.build import build_model, build_tokenizer, build_tower
    from vlds.peft import summary_line
    from vlds.trainer import Trainer, find_resume

    found = find_resume(cfg, info.world_size, info.is_main)
    init = read_adapter(cfg.train.init_from) if cfg.train.init_from else None
    out_dir = Path(cfg.train.out_dir)
    if info.is_main:
        if not cfg.train.resume and out_dir.exists() and any(out_dir.iterdir()):
            # A fresh run never overwrites or mixes with an earlier one: move it aside.
            aside = out_dir.with_name(f"{out_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            out_dir.rename(aside)
            log.info("moved the earlier run in %s to %s (continue a run with "
                     "--train.resume=latest)", out_dir, aside)  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    dist.barrier()
    torch.manual_seed(cfg.train.seed)  # frozen random weights are a function of the seed

    # ---- data, model, engine ------------------------------------------------------------
    data_root = build.data_root(cfg, info.is_main)
    tokenizer = build_tokenizer(cfg, data_root)
    tower = build_tower(cfg).to(device)
    model = build_model(cfg, tokenizer, tower)
    if init is not None:  # a new run (fresh optimizer) from another run's trained weights
        load_adapter(model, cfg.train.init_from, loaded=init)
    if info.is_main:
        log.info(summary_line(model, cfg.peft.method))
    data = build.DataBuilder(cfg, data_root, tokenizer, tower.image_size, info)
    total_steps = cfg.train.epochs * data.steps_per_epoch()
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    # the LR schedule counts optimizer steps, one per grad_accum micro-steps
    opt_steps = math.ceil(total_steps / ds_config["gradient_accumulation_steps"])
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt_steps, int(cfg.train.warmup_ratio * opt_steps))
    )
    if zero3:
        # The fused adapter path reads its modules' weights directly: ZeRO-3 must gather a
        # whole adapter module at once (no-op for methods without adapters).
        from deepspeed.utils import set_z3_leaf_modules

        from vlds.peft.adapter import zero3_leaf_classes

        set_z3_leaf_modules(model, zero3_leaf_classes(), raise_if_not_found=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if bf16:
        tower.to(torch.bfloat16)

    trainer = Trainer(cfg, engine, tower, data, tokenizer, info, device, total_steps,
                      zero3=zero3, on_eval=on_eval)  # fmt: skip
    trainer.load(found)
    return trainer.fit()


if __name__ == "__main__":
    from vlds.checkpoint import CheckpointError
    from vlds.data.stream import DataError
    from vlds.guard import NonFiniteError

    try:
        main()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
