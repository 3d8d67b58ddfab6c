"""Step time and peak memory: adapter training vs full fine-tuning on a t5-base-sized CLIP-T5.

    python bench/step_time.py                                  # defaults (what RESULTS.md shows)
    python bench/step_time.py --batch 8 --steps 5 --json runs/bench/step_time.json
    python bench/step_time.py --methods single_adapter,full_finetune --text-len 20 --target-len 5

One step = DeepSpeed engine forward + backward + step under ZeRO-2 (ds_configs/zero2.json filled
by vlds.train.deepspeed_config), with torch AdamW as the client optimizer and the warm-up/decay
schedule exactly as vlds/train.py builds them. The model is a CLIP-T5 with random weights at
t5-base sizes (d_model 768, 12 + 12 layers, 12 heads, d_ff 3072, vocab 32128) and a VQA-like
batch: 20 text tokens, 36 visual tokens (random 2048-d CLIP-RN101-like 6x6 grid features) and a
5-token target. The frozen CLIP tower runs outside the engine under no_grad in training, so it
is not part of the timed step: the batch carries the visual features directly.

CPU: fp32, default batch 16; CUDA: bf16, default batch 64. Each method runs in its own
subprocess (`--worker METHOD`), so one configuration's allocations cannot leak into another's
peak. Memory: CUDA reports torch.cuda.max_memory_allocated; CPU reports the worker's peak RSS
and the peak increase over the RSS measured after imports (torch, DeepSpeed, transformers:
identical for every method), which is what the adapter/full memory ratio is taken on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/step_time.py` from a checkout without install

TARGETS = {"time": 0.7, "memory": 0.5}  # adapter / full fine-tuning, at the same batch
BASELINE = "full_finetune"
GRID = 6  # CLIP RN101 layer4 grid max-pooled to 6 x 6 = 36 visual tokens (model.grid_pool)
FEAT_DIM = 2048  # RN101 layer4 channels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=0, help="micro-batch (0: 16 on CPU, 64 on GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--methods", default=f"single_adapter,{BASELINE}", help="comma list")
    p.add_argument("--text-len", type=int, default=20, help="text tokens per sample")
    p.add_argument("--target-len", type=int, default=5, help="target tokens per sample")
    p.add_argument("--json", default="", help="write the rows to this JSON file")
    hidden = argparse.SUPPRESS
    # Model sizes: t5-base by default; tests shrink them to run in seconds.
    p.add_argument("--d-model", type=int, default=768, help=hidden)
    p.add_argument("--layers", type=int, default=12, help=hidden)
    p.add_argument("--heads", type=int, default=12, help=hidden)
    p.add_argument("--d-ff", type=int, default=3072, help=hidden)
    p.add_argument("--vocab", type=int, default=32128, help=hidden)
    p.add_argument("--reduction-factor", type=int, default=8, help=hidden)
    # Internal: the parent re-invokes this script once per method.
    p.add_argument("--worker", default="", help=hidden)
    p.add_argument("--row-out", default="", help=hidden)
    args = p.parse_args(argv)
    if min(args.steps, args.text_len, args.target_len) < 1 or args.warmup < 0:
        p.error("--steps, --text-len and --target-len must be >= 1, --warmup >= 0")
    return args


# ---- worker: one method, one process -----------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far, the closest we have)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def build_config_for(args, method: str):
    """The run Config a training job at these sizes would have (DeepSpeed and PEFT read it)."""
    from vlds.config import build_config

    return build_config(
        "t5-base-random",
        {
            "model.d_model": args.d_model,
            "model.num_layers": args.layers,
            "model.num_heads": args.heads,
            "model.d_ff": args.d_ff,
            "peft.method": method,
            "peft.reduction_factor": args.reduction_factor,
            "data.tasks": "vqa",
            "data.batch_size": args.batch,
            "data.max_text_len": args.text_len,
            "data.max_target_len": args.target_len,
            "model.grid_pool": GRID,
        },
    )


def build_vl_model(cfg, vocab: int):
    """Random CLIP-T5 of the configured sizes with the PEFT method applied."""
    from transformers import T5Config, T5ForConditionalGeneration

    from vlds.model.vl import VLModel
    from vlds.peft import apply_peft

    m = cfg.model
    # Built from T5Config directly (not build_lm): no tokenizer is needed for a vocabulary size.
    # t5-base: relu FFN, tied input/output embeddings, pad 0 = decoder start, eos 1.
    t5 = T5Config(
        vocab_size=vocab,
        d_model=m.d_model,
        d_ff=m.d_ff,
        d_kv=m.d_model // m.num_heads,
        num_layers=m.num_layers,
        num_decoder_layers=m.num_layers,
        num_heads=m.num_heads,
        dropout_rate=m.dropout,  # training keeps dropout on; the benchmark times training
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = VLModel(T5ForConditionalGeneration(t5), "t5", feat_dim=FEAT_DIM)
    apply_peft(model, cfg.peft, cfg.task_list)
    return model


def make_batch(args, device, dtype):
    """A VQA-like batch with visual features already extracted (the tower is not timed)."""
    import torch

    from vlds.model.vision import grid_boxes

    g = torch.Generator().manual_seed(0)
    b, n_vis = args.batch, GRID * GRID
    batch = {
        # ids from 2: 0 and 1 are pad and eos, and padding would only shorten the real work
        "input_ids": torch.randint(2, args.vocab, (b, args.text_len), generator=g),
        "attention_mask": torch.ones(b, args.text_len, dtype=torch.long),
        "labels": torch.randint(2, args.vocab, (b, args.target_len), generator=g),
        # (B, 36, 2048): post-ReLU grid activations are non-negative, like these
        "vis_feats": torch.randn(b, n_vis, FEAT_DIM, generator=g).relu().to(dtype),
        "vis_boxes": grid_boxes(GRID).expand(b, -1, -1).contiguous(),  # (B, 36, 5)
        "vis_order": torch.zeros(b, n_vis, dtype=torch.long),  # one image per sample
        "vis_mask": torch.ones(b, n_vis, dtype=torch.long),
        "task_ids": torch.zeros(b, dtype=torch.long),  # for methods with per-task modules
    }
    return {k: v.to(device) for k, v in batch.items()}


def run_worker(args) -> dict:
    """Build, train warmup + steps, measure; returns one row. Runs in its own process."""
    import numpy as np
    import torch

    from vlds.distributed import init_distributed, world_info_from_env
    from vlds.train import deepspeed_config, lr_lambda, param_groups

    method = args.worker
    info = world_info_from_env()  # a bare process becomes a world of one on a free port
    device = init_distributed(info)
    import deepspeed
    import transformers.models.t5.modeling_t5  # noqa: F401  (counted in the post-import RSS)

    from vlds.checkpoint import ADAPTER_WEIGHTS, save_adapter
    from vlds.peft import count_parameters

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cuda = device.type == "cuda"
    rss_after_imports = rss_bytes()

    cfg = build_config_for(args, method)
    torch.manual_seed(cfg.train.seed)  # same random base weights for every method
    model = build_vl_model(cfg, args.vocab)
    counts = count_parameters(model)
    ds_config = deepspeed_config(str(REPO / "ds_configs" / "zero2.json"), cfg, info.world_size,
                                 bf16=cuda)
    # Client optimizer and schedule exactly as vlds/train.py: AdamW over the trainable
    # parameters in two decay groups, linear warm-up then decay, over the steps we run.
    total = args.warmup + args.steps
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay),
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, int(cfg.train.warmup_ratio * total))
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.train()
    batch = make_batch(args, device, torch.bfloat16 if cuda else torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: time the work, not the launch

    times, losses = [], []
    for i in range(total):
        sync()
        t0 = time.perf_counter()
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        sync()
        if i >= args.warmup:  # warm-up absorbs lazy allocation, bucket set-up, autotuning
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{method}: non-finite loss during the benchmark: {losses}")

    # Peaks are read before the export below, which clones the trainable tensors on CPU.
    row = {
        "method": method,
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "dtype": "bf16" if cuda else "fp32",
        "batch": args.batch,
        "text_len": args.text_len,
        "vis_tokens": GRID * GRID,
        "target_len": args.target_len,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "percent": counts["percent"],
        "step_median_s": float(np.median(times)),
        "step_p90_s": float(np.percentile(times, 90)),
        "step_times_s": times,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "peak_rss_increase_gb": (peak_rss_bytes() - rss_after_imports) / 1e9,
    }
    if cuda:
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(engine.module, cfg.to_dict(), Path(tmp) / "adapter", is_main=True)
        row["checkpoint_bytes"] = (Path(tmp) / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ---- parent: one subprocess per method, then the table -----------------------------------


def memory_gb(row: dict) -> float:
    """The figure the memory ratio uses: CUDA peak allocated, or CPU peak RSS over imports."""
    return row["peak_cuda_gb"] if "peak_cuda_gb" in row else row["peak_rss_increase_gb"]


def run_method(args, method: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
               "--row-out", str(out)]
        for key in ("batch", "steps", "warmup", "text_len", "target_len", "d_model", "layers",
                    "heads", "d_ff", "vocab", "reduction_factor"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            env.pop(key, None)  # every worker is its own world of one, on its own port
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"worker {method} failed (exit {proc.returncode}):\n{tail}")
        print(f"  {method}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(out.read_text())


def add_ratios(rows: list[dict]) -> None:
    """time/memory ratios of every method against full fine-tuning, with the targets."""
    base = next((r for r in rows if r["method"] == BASELINE), None)
    if base is None:
        return
    for r in rows:
        r["time_vs_full"] = r["step_median_s"] / base["step_median_s"]
        r["memory_vs_full"] = memory_gb(r) / memory_gb(base)
        r["peak_rss_vs_full"] = r["peak_rss_gb"] / base["peak_rss_gb"]
        if r is not base:
            r["time_pass"] = r["time_vs_full"] <= TARGETS["time"]
            r["memory_pass"] = r["memory_vs_full"] <= TARGETS["memory"]


def table(rows: list[dict]) -> str:
    """A Markdown table: aligned in a terminal, pasteable into bench/RESULTS.md."""
    cuda = "peak_cuda_gb" in rows[0]
    head = ["method", "trainable", "% updated", "step median (s)", "step p90 (s)"]
    head += ["peak CUDA alloc (GB)"] if cuda else ["peak RSS (GB)", "peak RSS - imports (GB)"]
    head += ["checkpoint bytes", "time / full", "memory / full"]
    body = []
    for r in rows:
        cells = [r["method"], f"{r['trainable']:,}", f"{r['percent']:.2f}",
                 f"{r['step_median_s']:.3f}", f"{r['step_p90_s']:.3f}"]
        if cuda:
            cells += [f"{r['peak_cuda_gb']:.2f}"]
        else:
            cells += [f"{r['peak_rss_gb']:.2f}", f"{r['peak_rss_increase_gb']:.2f}"]
        cells += [f"{r['checkpoint_bytes']:,}"]
        for key, target in (("time", TARGETS["time"]), ("memory", TARGETS["memory"])):
            ratio = r.get(f"{key}_vs_full")
            verdict = r.get(f"{key}_pass")
            if ratio is None:
                cells.append("-")
            elif verdict is None:  # the baseline itself
                cells.append(f"{ratio:.2f}x")
            else:
                cells.append(f"{ratio:.2f}x (<= {target}x) {'PASS' if verdict else 'FAIL'}")
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    right = [False] + [True] * (len(head) - 1)

    def line(cells):
        return "| " + " | ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)
        ) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                         for w, r in zip(widths, right)) + "|"
    return "\n".join([line(head), sep] + [line(c) for c in body])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        row = run_worker(args)
        Path(args.row_out).write_text(json.dumps(row) + "\n")
        return [row]

    import torch

    cuda = torch.cuda.is_available()
    args.batch = args.batch or (64 if cuda else 16)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from vlds.peft import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    device = torch.cuda.get_device_name(0) if cuda else cpu_name()
    print(f"device: {device}, {'bf16' if cuda else 'fp32'}, ZeRO-2, 1 rank")
    print(f"CLIP-T5 (random weights): d_model {args.d_model}, {args.layers}+{args.layers} "
          f"layers, {args.heads} heads, d_ff {args.d_ff}, vocab {args.vocab}; batch "
          f"{args.batch} x ({args.text_len} text + {GRID * GRID} visual tokens -> "
          f"{args.target_len} target tokens); {args.warmup} warm-up + {args.steps} timed steps")
    print("timed step = engine forward + backward + step; the frozen CLIP tower is outside the "
          "engine and not timed (visual features are given)")
    # Host load skews CPU timings (other jobs on the same cores): print it with the figures.
    load_before = os.getloadavg()[0]
    rows = [run_method(args, m) for m in methods]
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    add_ratios(rows)
    print()
    print(table(rows))
    memory_note = (
        "memory = torch.cuda.max_memory_allocated"
        if cuda
        else "memory ratio on the peak RSS increase over the post-import RSS (imports are the "
        "same ~GB for every method); checkpoint = adapter-only safetensors (trainable tensors)"
    )
    print(f"\n{memory_note}")
    for r in rows:
        if "time_pass" in r:
            ok = r["time_pass"] and r["memory_pass"]
            print(f"{r['method']} vs {BASELINE}: time {r['time_vs_full']:.2f}x (target <= "
                  f"{TARGETS['time']}x), memory {r['memory_vs_full']:.2f}x (target <= "
                  f"{TARGETS['memory']}x; total peak RSS {r['peak_rss_vs_full']:.2f}x): "
                  f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
