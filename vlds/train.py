"""Train CLIP-T5 / CLIP-BART with a PEFT method on a mix of vision-and-language tasks.

    deepspeed vlds/train.py --deepspeed ds_configs/zero2.json            # embedded default (tiny)
    deepspeed --num_gpus 8 vlds/train.py --deepspeed ds_configs/zero2.json \\
        --preset bart-base --data.root=/data/vl-shards                  # the paper's setting
    torchrun --nproc_per_node 2 vlds/train.py --preset tiny --train.max_steps=20
    python vlds/train.py --preset tiny --peft.method=full_finetune       # one process, CPU ok

Options: `--preset NAME`, `--config FILE.json`, any `--section.key=value` from vlds/config.py,
`--deepspeed FILE` (default ds_configs/zero2.json). `--train.resume=latest` continues a run.

One DeepSpeed engine holds the VL model (language model + visual embedding + PEFT modules); its
optimizer sees only the trainable parameters, and checkpoints exclude the frozen ones. The
frozen CLIP tower runs outside the engine under no_grad; with model.vision_train (full, ln,
adapter) the VL model holds it, inside the engine (vlds.model.vision). Everything a run
produces lands in train.out_dir: config.json, metrics.jsonl, tb/ (TensorBoard), curves.png,
metrics.json, predictions_<task>.{json,csv,jsonl} (official formats) and checkpoints/.

Exit codes: 0 done (or preempted by SIGTERM/SIGUSR1, in any phase, after saving a checkpoint),
2 bad config/data/checkpoint (before any training), 3 too many non-finite steps in a row.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

# Run as a script, a preemption signal that lands while the imports below load (seconds) is
# kept and acted on before the first step (vlds.guard.Preemption), not fatal: `scancel` or
# SLURM's warning signal at start-up still ends in a checkpoint and exit 0.
EARLY_SIGNALS: list[int] = []
AS_SCRIPT = False  # set by catch_early_signals: the process is this command, not an importer


def catch_early_signals() -> None:
    """From here until vlds.guard.Preemption takes over, SIGTERM / SIGUSR1 are remembered."""
    global AS_SCRIPT
    AS_SCRIPT = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: EARLY_SIGNALS.append(signum))


if __name__ == "__main__":
    catch_early_signals()

import torch  # noqa: E402

from vlds.config import ConfigError, parse_cli, validate  # noqa: E402
from vlds.engine import (  # noqa: E402
    DEFAULT_DS_CONFIG,
    build_engine,
    deepspeed_config,
    is_zero3,
    stage_of,
    use_bf16,
)

log = logging.getLogger("vlds")
USAGE = (
    "usage: vlds/train.py [--preset NAME] [--config FILE.json] [--section.key=value ...] "
    "[--deepspeed FILE]"
)


def parse_launcher_args(rest: list[str]) -> str:
    """The launcher's own flags: --deepspeed FILE and --local_rank N (ignored: env has it)."""
    ds_config, it = str(DEFAULT_DS_CONFIG), iter(rest)
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


def main(argv: list[str] | None = None, on_eval=None) -> dict:
    """The command line: `--preset`, `--config`, `--section.key=value`, `--deepspeed FILE`."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n\n" + __doc__.strip())
        raise SystemExit(0)
    cfg, rest = parse_cli(argv)
    return run(cfg, parse_launcher_args(rest), on_eval=on_eval)


def run(cfg, deepspeed_config_path: str | None = None, on_eval=None) -> dict:
    """Train `cfg` (a vlds.config.Config); returns the final metrics (tests, the tuner).

    deepspeed_config_path: a DeepSpeed JSON (default ds_configs/zero2.json). on_eval(step, metrics,
    cfg) is called on every rank after each evaluation (Ray Tune reports from it); metrics are
    identical on all ranks.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    # ---- everything that can be checked without work is checked first ------------------
    validate(cfg)
    from vlds.distributed import init_distributed, world_info_from_env
    from vlds.guard import Preemption

    # from here on a preemption signal is a flag (acted on before the first step), not a kill
    if cfg.train.handle_signals:
        preemption = Preemption()
        preemption.received = EARLY_SIGNALS[-1] if EARLY_SIGNALS else None
    else:
        preemption = Preemption(())
        if AS_SCRIPT:  # the signals' default action again
            for sig in Preemption.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    info = world_info_from_env()
    bf16 = use_bf16(cfg)
    ds_path = deepspeed_config_path or DEFAULT_DS_CONFIG
    ds_config = deepspeed_config(ds_path, cfg, info.world_size, bf16)
    if cfg.data.root:
        from vlds.data.shardio import load_index

        for t in cfg.task_list:  # a missing shard folder fails here, before any model is built
            for split in (cfg.data.train_split, cfg.data.val_split):
                load_index(cfg.data.root, t, split)
    device = init_distributed(info)
    import torch.distributed as dist

    from vlds.checkpoint import load_adapter, read_adapter
    from vlds.data import build
    from vlds.model.build import build_model, build_tokenizer, build_tower
    from vlds.model.vision import tower_image_size
    from vlds.peft import summary_line
    from vlds.trainer import Trainer, find_resume

    found = find_resume(cfg, info.world_size, info.is_main)
    if found is not None:  # a resume keeps the ZeRO stage its checkpoint was written under
        resumed = json.loads((found[0] / found[1] / "trainer_state.json").read_text())
        ds_config = deepspeed_config(ds_path, cfg, info.world_size, bf16, resumed)
    if info.is_main:
        log.info("ZeRO stage %d (train.zero_stage=%s)", stage_of(ds_config), cfg.train.zero_stage)
    init = read_adapter(cfg.train.init_from) if cfg.train.init_from else None
    out_dir = Path(cfg.train.out_dir)
    if info.is_main:
        if not cfg.train.resume and out_dir.exists() and any(out_dir.iterdir()):
            # A fresh run never overwrites or mixes with an earlier one: move it aside.
            aside = out_dir.with_name(f"{out_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            out_dir.rename(aside)
            log.info(
                "moved the earlier run in %s to %s (continue a run with --train.resume=latest)",
                out_dir,
                aside,
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    dist.barrier()

    # ---- data, model, engine ------------------------------------------------------------
    data_root = build.data_root(cfg, info.is_main)
    local = build.local_side(cfg, data_root, info.local_rank == 0)
    tokenizer = build_tokenizer(cfg, local)
    # The loaders first: a /dev/shm too small for them fails before any model is built.
    image_size = tower_image_size(cfg.model.vision)
    data = build.DataBuilder(cfg, data_root, tokenizer, image_size, info, device=device)
    tower = build_tower(cfg).to(device)  # seeds torch: random weights follow train.seed
    model = build_model(cfg, tokenizer, tower, local)
    if init is not None:  # a new run (fresh optimizer) from another run's trained weights
        load_adapter(model, cfg.train.init_from, loaded=init)
    if info.is_main:
        log.info(summary_line(model, cfg.peft.method))
    plan = data.batch_plan()
    total_steps = cfg.train.epochs * plan["steps_per_epoch"]
    if info.is_main:
        log.info(plan_line(plan))
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    engine = build_engine(cfg, model, ds_config, total_steps)
    if bf16 and not tower.in_model:  # a tower inside the engine is cast (and placed) by it
        tower.to(torch.bfloat16)

    trainer = Trainer(
        cfg,
        engine,
        tower,
        data,
        tokenizer,
        info,
        device,
        total_steps,
        zero3=is_zero3(ds_config),
        on_eval=on_eval,
        preemption=preemption,
    )
    trainer.load(found)
    result = trainer.fit()
    if cfg.train.stage == "pretrain" and not result.get("preempted") and info.is_main:
        from vlds.pretrain import write_backbone

        result["backbone"] = str(write_backbone(cfg, out_dir, tokenizer, local))
    return result


def plan_line(plan: dict) -> str:
    """ "global batch 504 (asked 500) = 63 x 1 accumulation x 8 ranks; steps/epoch 4386: vqa 27.6
    % (batch 63), ..." """
    asked = plan["global_batch_asked"]
    note = f" (asked {asked}, not a multiple of the world)" if asked != plan["global_batch"] else ""
    shares = ", ".join(
        f"{t} {pct:.1f} % (batch {plan['task_batch'][t]})"
        for t, pct in plan["task_share_pct"].items()
    )
    return (
        f"global batch {plan['global_batch']}{note} = {plan['micro_batch']} x "
        f"{plan['accumulation']} accumulation x {plan['world']} rank(s); steps per epoch "
        f"{plan['steps_per_epoch']}: {shares}"
    )


def cli(argv: list[str] | None = None) -> None:
    """The command: main(), its errors turned into the exit codes of the module docstring."""
    from vlds.checkpoint import CheckpointError
    from vlds.data.shardio import DataError
    from vlds.guard import NonFiniteError

    try:
        main(argv)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        # The run is over (finished, preempted or failed, its files written): a preemption
        # signal during the interpreter's teardown, which restores the default actions, would
        # kill the process and turn its exit code into a signal's (a finished job would look
        # failed to its batch script). Ignored from here on.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    cli()
