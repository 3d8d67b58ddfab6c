"""Step time and peak memory: adapter training vs full fine-tuning on a t5-base-sized CLIP-T5.

    python bench/step_time.py                                  # defaults (what RESULTS.md shows)
    python bench/step_time.py --batch 8 --steps 5 --json runs/bench/step_time.json
    python bench/step_time.py --methods single_adapter,full_finetune --text-len 20 --target-len 5
    python bench/step_time.py --plain --methods single_adapter:fused=off,single_adapter:fused=on
    python bench/step_time.py --plain --zero-stage 2      # the engine under ZeRO-2

One step = DeepSpeed engine forward + backward + step under ds_configs/zero2.json at the stage
vlds/train.py takes on one rank (train.zero_stage=auto: stage 0 in fp32, 1 in bf16;
`--zero-stage` sets another), the engine built by vlds.engine (deepspeed_config +
build_engine: torch AdamW as the client optimizer, the warm-up/decay schedule) exactly as
vlds/train.py builds it, at the precision of
vlds.engine.use_bf16. The run config is the "t5-base-random" preset (build_config), the
language model vlds.model.build.build_lm's with t5-base's vocabulary (32128 embedding rows,
pad 0, eos 1): a CLIP-T5 with random weights at t5-base sizes (d_model 768, 12 + 12 layers, 12
heads, d_ff 3072) and a VQA-like batch: 20 text tokens, 36 visual tokens (random 2048-d
CLIP-RN101-like 6x6 grid features) and a 5-token target. The frozen CLIP tower runs outside the
engine under no_grad in training, so it is not part of the timed step: the batch carries the
visual features directly.

CPU: fp32, default batch 16; CUDA: bf16, default batch 64. Each method runs in its own
subprocess (handed the parent's parsed flags as one JSON, `--args-json`), so one
configuration's allocations cannot leak into another's peak. Memory: CUDA reports
torch.cuda.max_memory_allocated; CPU reports the worker's peak RSS and the peak increase over
the RSS measured after imports (torch, DeepSpeed, transformers: identical for every method),
which is what the adapter/full memory ratio is taken on.

The workers are alive together and step in turn (A, B, then B, A, ...), never at the same
time: on a shared machine the speed of the cores drifts over minutes, and running the methods
one after the other would put that drift into the ratio. On CPU each step also records the
share of the machine's CPU time other processes took meanwhile (from /proc/stat); the script
warns when it exceeds 5%, because such steps run several times slower.

Rows: `--methods` is a comma list of `[plain:|peft:]METHOD[:fused=MODE]`. `fused=MODE` sets that
row's peft.fused_kernel (auto | on | off; default `--fused-kernel`), so one table can hold the
single adapter with the Triton kernel off and on. `plain:` (or `--plain`, which adds a plain
row for every method) runs the same model, batch and precision without DeepSpeed: torch AdamW
over the trainable parameters (vlds.engine.param_groups, the run's lr/betas/eps) and
`loss.backward()`, the run's gradient clipping (`clip_grad_norm_` at train.grad_clip, as the
engine clips), `opt.step(); opt.zero_grad(set_to_none=True)`; no LR schedule. On CUDA its
model is cast to bf16 (`model.to(torch.bfloat16)`, as DeepSpeed's bf16 casts the module; no
autocast) and AdamW updates the bf16 parameters in place (no fp32 master
copy, which DeepSpeed's bf16 optimizer keeps): the plain row is the floor the engine's step is
measured against ("engine / plain": the DeepSpeed row's median step over the plain row's of the
same method and kernel mode). Timing rows set peft.fused_check=false.

A peer: `peft:single_lora` runs that plain loop on the same model with Hugging Face PEFT's LoRA
in place of vlds' (`build_peer_model`: peft.inject_adapter_in_model with vlds' rank, alpha,
dropout and target projections; every other parameter vlds trains trains too, and the
trainable counts must be equal). "engine / peer": the DeepSpeed row of that method over it.
AdapterHub's `adapters` (the bottleneck adapter's peer) pins transformers ~=4.57 and cannot be
installed beside vlds' transformers 5, so it has no row.

Throughput: samples/s = batch / median step. Model FLOPs per sample: `model_flops_per_sample`
(the matmuls of one training step, counted per method; formula there). On CUDA MFU = FLOPs per
sample x samples/s / the device's dense bf16 peak (`PEAK_BF16`, by device name; "-" for a
device not in it and on CPU).
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
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/step_time.py` from a checkout without install

TARGETS = {"time": 0.7, "memory": 0.5}  # adapter / full fine-tuning, at the same batch
BASELINE = "full_finetune"
GRID = 6  # CLIP RN101 layer4 grid max-pooled to 6 x 6 = 36 visual tokens (model.grid_pool)
FEAT_DIM = 2048  # RN101 layer4 channels
BUSY = 0.05  # other processes' share of the CPUs above which a step's time is suspect
PRESET = "t5-base-random"  # t5-base sizes, random weights (vlds.config)
VOCAB, PAD, EOS = 32128, 0, 1  # t5-base: its embedding rows (the tokenizer has 32100 + padding)
FUSED_MODES = ("auto", "on", "off")  # peft.fused_kernel (vlds.kernels.MODES)
# Dense bf16 tensor-core peak FLOP/s by device-name substring, the first match wins (NVIDIA's
# datasheets; torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3" is the SXM part)
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vlds.config import ZERO_STAGES, build_config

    base = build_config(PRESET)  # the defaults of the model sizes
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=0, help="micro-batch (0: 16 on CPU, 64 on GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--methods",
        default=f"single_adapter,{BASELINE}",
        help="comma list of [plain:|peft:]METHOD[:fused=auto|on|off] (plain: no DeepSpeed "
        "engine; peft: Hugging Face PEFT's LoRA in the plain loop)",
    )
    p.add_argument("--plain", action="store_true", help="also a plain-PyTorch row for every method")
    p.add_argument(
        "--fused-kernel",
        choices=FUSED_MODES,
        default="auto",
        help="peft.fused_kernel of the rows that do not name one",
    )
    p.add_argument(
        "--zero-stage",
        choices=ZERO_STAGES,
        default="auto",
        help="train.zero_stage of the engine rows (auto: as vlds/train.py, 0 on one rank)",
    )
    p.add_argument("--text-len", type=int, default=20, help="text tokens per sample")
    p.add_argument("--target-len", type=int, default=5, help="target tokens per sample")
    p.add_argument("--json", default="", help="write the rows to this JSON file")
    hidden = argparse.SUPPRESS
    # Model sizes: the preset's (t5-base) by default; tests shrink them to run in seconds.
    m = base.model
    p.add_argument("--d-model", type=int, default=m.d_model, help=hidden)
    p.add_argument("--layers", type=int, default=m.num_layers, help=hidden)
    p.add_argument("--heads", type=int, default=m.num_heads, help=hidden)
    p.add_argument("--d-ff", type=int, default=m.d_ff, help=hidden)
    p.add_argument("--vocab", type=int, default=VOCAB, help=hidden)
    p.add_argument("--reduction-factor", type=int, default=base.peft.reduction_factor, help=hidden)
    # Internal: the parent re-invokes this script once per method and drives it step by step.
    p.add_argument("--worker", default="", help=hidden)  # the row's PEFT method
    p.add_argument("--worker-fused", default="", help=hidden)  # its peft.fused_kernel
    p.add_argument("--worker-plain", action="store_true", help=hidden)  # no DeepSpeed
    p.add_argument("--worker-peer", action="store_true", help=hidden)  # HF PEFT's LoRA
    p.add_argument("--worker-label", default="", help=hidden)
    p.add_argument("--row-out", default="", help=hidden)
    p.add_argument("--reply-fd", type=int, default=-1, help=hidden)
    # A worker's whole namespace (the parent's parsed flags plus its own above), as JSON.
    p.add_argument("--args-json", default="", help=hidden)
    args = p.parse_args(argv)
    if args.args_json:
        return argparse.Namespace(**json.loads(args.args_json))
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


def cpu_ticks() -> tuple[int, int, int]:
    """(all, busy, this process's) CPU ticks so far, from /proc; zeros elsewhere.

    Other processes on the same cores (a tuning job, a test run) slow a CPU step several-fold;
    busy - own over all, around a step, is the share of the machine they took meanwhile
    (hypervisor steal counts as busy)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return 0, 0, 0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks), sum(ticks) - idle, int(stat[11]) + int(stat[12])  # utime + stime


def cpu_name() -> str:
    from bench.machine import cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores)"


def build_config_for(args, method: str, fused: str = ""):
    """The run Config a training job at these sizes would have (DeepSpeed and PEFT read it);
    `fused`: peft.fused_kernel (default: --fused-kernel)."""
    from vlds.config import build_config

    overrides = {
        "model.d_model": args.d_model,
        "model.num_layers": args.layers,
        "model.num_heads": args.heads,
        "model.d_ff": args.d_ff,
        "model.grid_pool": GRID,
        "peft.method": method,
        "peft.reduction_factor": args.reduction_factor,
        "peft.fused_kernel": fused or args.fused_kernel,
        # per-task methods get modules for the paper's four image tasks; the timed batch
        # is a VQA batch (task 0), as each step of multi-task training is one task's
        "data.tasks": "vqa,gqa,nlvr,caption",
        "data.batch_size": args.batch,
        "data.max_text_len": args.text_len,
        "data.max_target_len": args.target_len,
        "peft.fused_check": False,  # timed steps must not include the kernel's one-off check
    }
    return build_config(PRESET, overrides)


class RowSpec(NamedTuple):
    """One row of the table: a PEFT method, its peft.fused_kernel, with or without DeepSpeed,
    built by vlds or (`peer`) by Hugging Face PEFT."""

    method: str
    fused: str
    plain: bool
    label: str
    peer: bool = False


PEERS = ("single_lora",)  # the methods with a `peft:` row (build_peer_model)


def parse_rows(text: str, fused_default: str, plain_too: bool = False) -> list[RowSpec]:
    """`--methods` ("[plain:|peft:]METHOD[:fused=MODE]", comma-separated) -> rows; `plain_too`
    adds a plain row after every DeepSpeed row that has none."""
    rows = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        loop = parts[0] if parts[0] in ("plain", "peft") and len(parts) > 1 else ""
        method, *options = parts[1:] if loop else parts
        if loop == "peft" and method not in PEERS:
            raise SystemExit(f"row {item!r}: a peft: row exists for {', '.join(PEERS)}")
        fused, named = fused_default, False
        for option in options:
            key, _, value = option.partition("=")
            if key != "fused" or value not in FUSED_MODES:
                raise SystemExit(
                    f"row {item!r}: options are fused=auto|on|off (e.g. single_adapter:fused=on)"
                )
            fused, named = value, True
        label = method + (f" fused={fused}" if named else "")
        suffix = {"plain": " (plain torch)", "peft": " (HF peft, plain torch)"}.get(loop, "")
        rows.append(RowSpec(method, fused, bool(loop), label + suffix, loop == "peft"))
    if plain_too:
        have = {(r.method, r.fused) for r in rows if r.plain and not r.peer}
        out = []
        for r in rows:
            out.append(r)
            if not r.plain and (r.method, r.fused) not in have:
                out.append(r._replace(plain=True, label=f"{r.label} (plain torch)"))
                have.add((r.method, r.fused))
        rows = out
    return rows


# ---- model FLOPs -------------------------------------------------------------------------


def flop_terms(args, method: str) -> list[tuple[str, int, int]]:
    """(name, forward multiply-adds per sample, backward factor) of every matmul of a training
    step; see `model_flops_per_sample`."""
    from vlds.config import build_config, split_method

    peft = build_config(PRESET).peft  # LoRA rank, prompt length: the preset's
    base, prompts = split_method(method)
    d, ff, n_layers, vocab = args.d_model, args.d_ff, args.layers, args.vocab
    n_vis = GRID * GRID
    te = args.text_len + n_vis + (peft.prompt_length if prompts or "prompt" in base else 0)
    td = args.target_len  # decoder tokens (encoder: te)
    w = 2 if base == "full_finetune" else 1  # the LM's weights: trained (dX + dW) or frozen (dX)
    terms = [
        ("visual projection", n_vis * FEAT_DIM * d, 1),  # trained, its input needs no gradient
        ("encoder q,k,v,o", n_layers * 4 * te * d * d, w),
        ("encoder scores + values", n_layers * 2 * te * te * d, 2),
        ("encoder FFN", n_layers * 2 * te * d * ff, w),
        ("decoder self q,k,v,o", n_layers * 4 * td * d * d, w),
        ("decoder self scores + values", n_layers * 2 * td * td * d, 2),
        ("decoder cross q,o", n_layers * 2 * td * d * d, w),
        ("decoder cross k,v", n_layers * 2 * te * d * d, w),
        ("decoder cross scores + values", n_layers * 2 * td * te * d, 2),
        ("decoder FFN", n_layers * 2 * td * d * ff, w),
        ("LM head", td * d * vocab, w),
    ]
    if "adapter" in base or "compacter" in base or base == "hyperformer":
        b = d // args.reduction_factor  # down + up at 2 encoder and 3 decoder sites per layer
        terms.append(("adapters", n_layers * (2 * te + 3 * td) * 2 * d * b, 2))
    if "lora" in base:  # A and B on q and v: encoder self, decoder self, decoder cross (v: te)
        r = peft.lora_rank
        terms.append(("LoRA", n_layers * (2 * te + 2 * td + td + te) * 2 * d * r, 2))
    return terms


def model_flops_per_sample(args, method: str) -> float:
    """Training FLOPs of one sample: 2 x the multiply-adds of every matmul, forward + backward.

    Tokens: encoder te = text_len + 36 visual (+ prompt_length with prompt tuning), decoder td
    = target_len; d = d_model, L = layers (encoder and decoder each), heads x d_kv = d.
    Forward multiply-adds per sample:
      visual projection 36 x 2048 x d;
      encoder, per layer: q,k,v,o 4 te d^2, scores + values 2 te^2 d, FFN 2 te d d_ff;
      decoder, per layer: self q,k,v,o 4 td d^2, self scores + values 2 td^2 d, cross q,o
      2 td d^2, cross k,v 2 te d^2 (over the encoder output), cross scores + values
      2 td te d, FFN 2 td d d_ff; LM head td d vocab;
      adapters (adapter methods, Compacter, Hyperformer): 2 d b at 2 encoder and 3 decoder
      sites per layer, b = d / reduction_factor; LoRA: 2 d r on q and v of every attention.
    Backward = factor x forward: a frozen weight's matmul needs only the input gradient (1x),
    a trained one also the weight gradient (2x: full fine-tuning's LM, adapters, LoRA);
    the weight-free score and value matmuls 2x (both operands); the visual projection 1x (its
    weight gradient; the CLIP features need none). Left out (< 1 % at t5-base): norms,
    softmax, GELU, the box projection (5 -> d), the prompt reparameterisation (per batch),
    Hyperformer's generators, and the backward autograd skips at the bottom of the decoder.
    """
    return 2.0 * sum(macs * (1 + back) for _, macs, back in flop_terms(args, method))


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a device by its name, or None when not in PEAK_BF16."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def build_vl_model(cfg, vocab: int):
    """Random CLIP-T5 of the configured sizes with the PEFT method applied, as
    vlds.model.build.build_model builds it, without a tokenizer (t5-base's pad 0 and eos 1) and
    without a tower (its RN101 grid width, FEAT_DIM, given)."""
    from vlds.model.build import build_lm
    from vlds.model.vl import VLModel
    from vlds.peft import apply_peft

    # dropout on, as in training: the benchmark times training steps
    model = VLModel(build_lm(cfg, vocab, PAD, EOS), cfg.model.arch, FEAT_DIM)
    apply_peft(model, cfg.peft, cfg.task_list)
    return model


def make_batch(args, device, dtype) -> dict:
    """A VQA-like batch with the visual features already extracted (the tower is not timed)."""
    import torch

    from vlds.model.vision import grid_boxes

    g = torch.Generator().manual_seed(0)
    b, n_vis = args.batch, GRID * GRID
    batch = {
        # ids from 2 (0, 1 = pad, eos): no padding, every sample is full length
        "input_ids": torch.randint(2, args.vocab, (b, args.text_len), generator=g),
        "attention_mask": torch.ones(b, args.text_len, dtype=torch.long),
        "labels": torch.randint(2, args.vocab, (b, args.target_len), generator=g),
        # (B, 36, 2048) non-negative like ReLU'd grid activations, in the tower's dtype
        "vis_feats": torch.randn(b, n_vis, FEAT_DIM, generator=g).relu().to(dtype),
        "vis_boxes": grid_boxes(GRID).expand(b, -1, -1).contiguous(),  # (B, 36, 5)
        "vis_order": torch.zeros(b, n_vis, dtype=torch.long),  # one image per sample
        "vis_mask": torch.ones(b, n_vis, dtype=torch.long),
        "task_ids": torch.zeros(b, dtype=torch.long),  # for methods with per-task modules
    }
    return {k: v.to(device) for k, v in batch.items()}


def build_peer_model(cfg, vocab: int):
    """vlds' model for a LoRA method with Hugging Face PEFT's LoRA in place of vlds' own:
    peft.inject_adapter_in_model on the language model with vlds' rank, alpha, dropout and
    target projections (LoraLinear layers instead of vlds' output hooks). Every other parameter
    vlds trains (the visual projection, biases) trains too: the same work, which the equal
    trainable counts check."""
    import peft
    import torch

    from vlds.model.build import build_lm
    from vlds.model.vl import VLModel
    from vlds.peft import count_parameters
    from vlds.peft.lora import TARGET_MODULES

    ours = build_vl_model(cfg, vocab)
    trained = {
        n for n, p in ours.named_parameters() if p.requires_grad and n.split(".")[0] != "peft"
    }
    want = count_parameters(ours)["trainable"]
    del ours
    torch.manual_seed(cfg.train.seed)  # the same base weights as vlds' rows
    model = VLModel(build_lm(cfg, vocab, PAD, EOS), cfg.model.arch, FEAT_DIM)
    c = cfg.peft
    lora = peft.LoraConfig(
        r=c.lora_rank,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=list(TARGET_MODULES[cfg.model.arch]),
    )
    peft.inject_adapter_in_model(lora, model.lm)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or n.replace(".base_layer", "") in trained)
    got = count_parameters(model)["trainable"]
    if got != want:
        raise RuntimeError(f"HF peft's LoRA trains {got:,} parameters, vlds' {want:,}")
    return model


def build_plain(cfg, model, device, bf16: bool):
    """The model on `device` (bf16 on CUDA, as DeepSpeed's bf16 casts it) and a step function:
    torch AdamW over the trainable parameters, the engine's groups and hyperparameters, the
    run's gradient clipping."""
    import torch

    from vlds.engine import param_groups

    t = cfg.train
    model.to(device, torch.bfloat16 if bf16 else torch.float32).train()
    groups = param_groups(model, t.weight_decay, t.decay_exempt)
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    params = [p for g in groups for p in g["params"]]

    def step(batch):
        loss = model(batch)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_worker(args, commands, replies) -> dict:
    """Build the engine (or, for a plain row, the model and its AdamW), then obey `commands`
    ("warmup" | "step" | "done"), one line each, answering each step with its time on
    `replies`; returns this row."""
    import numpy as np
    import torch

    from vlds.distributed import init_distributed, world_info_from_env
    from vlds.engine import DEFAULT_DS_CONFIG, build_engine, deepspeed_config, use_bf16

    method, plain = args.worker, args.worker_plain
    if plain:  # no process group: the plain step never communicates
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        info = world_info_from_env()  # a bare process becomes a world of one on a free port
        device = init_distributed(info)
        import deepspeed  # noqa: F401  (counted in the post-import RSS)
    import transformers.models.t5.modeling_t5  # noqa: F401  (counted in the post-import RSS)

    from vlds.checkpoint import ADAPTER_WEIGHTS, save_adapter
    from vlds.peft import count_parameters

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cuda = device.type == "cuda"
    rss_after_imports = rss_bytes()

    fused = args.worker_fused or args.fused_kernel
    cfg = build_config_for(args, method, fused)
    bf16 = use_bf16(cfg)
    # The same random base weights for every method. (Training seeds in build_tower, which
    # then draws the tower's weights; the benchmark builds no tower.)
    torch.manual_seed(cfg.train.seed)
    model = (build_peer_model if args.worker_peer else build_vl_model)(cfg, args.vocab)
    rss_after_build = rss_bytes()
    counts = count_parameters(model)
    if plain:
        train_step, module = build_plain(cfg, model, device, bf16), model
    else:
        # AdamW over the trainable parameters in two decay groups, linear warm-up then decay
        # over the steps we run, the ZeRO stage of train.zero_stage: what vlds/train.py builds.
        cfg.train.zero_stage = args.zero_stage
        ds_config = deepspeed_config(DEFAULT_DS_CONFIG, cfg, info.world_size, bf16)
        engine = build_engine(cfg, model, ds_config, args.warmup + args.steps)
        engine.train()
        module = engine.module

        def train_step(batch):
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            return loss

    rss_after_engine = rss_bytes()
    batch = make_batch(args, device, torch.bfloat16 if bf16 else torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: time the work, not the launch

    replies.write("ready\n")
    replies.flush()
    times, losses, busy_ticks = [], [], [0, 0]  # busy: (all, other processes') CPU ticks
    for line in commands:
        command = line.strip()
        if command == "done":
            break
        sync()
        ticks0 = cpu_ticks()
        t0 = time.perf_counter()
        loss = train_step(batch)
        sync()
        dt = time.perf_counter() - t0
        ticks = [b - a for a, b in zip(ticks0, cpu_ticks(), strict=True)]  # all, busy, own
        others = max(0, ticks[1] - ticks[2]) / ticks[0] if ticks[0] else 0.0
        if command == "step":  # warm-up absorbs lazy allocation and bucket set-up
            times.append(dt)
            busy_ticks[0] += ticks[0]
            busy_ticks[1] += max(0, ticks[1] - ticks[2])
        losses.append(loss.item())
        replies.write(f"{dt} {others}\n")
        replies.flush()
    if not times or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{method}: no timed steps or a non-finite loss: {losses}")

    # Peaks are read before the export below, which clones the trainable tensors on CPU.
    device_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    step_median = float(np.median(times))
    flops = model_flops_per_sample(args, method)
    peak = peak_bf16(device_name) if cuda and bf16 else None
    row = {
        "method": method,
        "row": args.worker_label or method,
        "engine": "peft" if args.worker_peer else "plain" if plain else "deepspeed",
        "fused_kernel": fused,
        "device": device_name,
        "dtype": "bf16" if bf16 else "fp32",
        "batch": args.batch,
        "text_len": args.text_len,
        "vis_tokens": GRID * GRID,
        "target_len": args.target_len,
        "trainable": counts["trainable"],
        "total": counts["total"],
        "percent": counts["percent"],
        "step_median_s": step_median,
        "step_p90_s": float(np.percentile(times, 90)),
        "step_times_s": times,
        "samples_per_s": args.batch / step_median,
        "model_flops_per_sample": flops,
        # achieved model FLOP/s over the device's dense bf16 peak; None off CUDA or unknown
        "mfu": flops * args.batch / step_median / peak if peak else None,
        "losses": losses,
        # share of all CPU time used by other processes during the timed steps (CPU timings
        # are trustworthy only near 0)
        "others_cpu_share": busy_ticks[1] / busy_ticks[0] if busy_ticks[0] else 0.0,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "peak_rss_increase_gb": (peak_rss_bytes() - rss_after_imports) / 1e9,
        # where the memory went (current RSS; glibc keeps some freed memory, so approximate)
        "rss_gb": {
            "after_imports": rss_after_imports / 1e9,
            "after_build": rss_after_build / 1e9,
            "after_engine": rss_after_engine / 1e9,
            "after_steps": rss_bytes() / 1e9,
        },
    }
    if cuda:
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(module, cfg.to_dict(), Path(tmp) / "adapter", is_main=True)
        row["checkpoint_bytes"] = (Path(tmp) / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    return row


# ---- parent: one subprocess per method, stepped in turn, then the table ------------------


class Worker:
    """A `--worker METHOD` subprocess for one row: commands on its stdin, replies on a pipe of
    their own (its stdout and stderr, DeepSpeed's logging included, go to a log file)."""

    def __init__(self, args, spec: RowSpec, index: int, tmp: Path):
        self.label = spec.label
        self.row_path = tmp / f"row{index}.json"
        self.log_path = tmp / f"row{index}.log"
        read_fd, write_fd = os.pipe()
        # The parent's parsed flags, all of them, with this worker's own set.
        own = {
            "worker": spec.method,
            "worker_fused": spec.fused,
            "worker_plain": spec.plain,
            "worker_peer": spec.peer,
            "worker_label": spec.label,
            "row_out": str(self.row_path),
            "reply_fd": write_fd,
        }
        spec_json = json.dumps({**vars(args), **own})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--args-json", spec_json]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            env.pop(key, None)  # every worker is its own world of one, on its own port
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                pass_fds=(write_fd,),
                env=env,
                cwd=REPO,
            )
        os.close(write_fd)  # the child holds it now: a dead child means end-of-file here
        self.replies = os.fdopen(read_fd)

    def reply(self) -> str:
        line = self.replies.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"worker {self.label} exited ({self.proc.returncode}):\n{tail}")
        return line.strip()

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        if self.proc.wait() != 0 or not self.row_path.is_file():
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"worker {self.label} failed ({self.proc.returncode}):\n{tail}")
        return json.loads(self.row_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_rows(args, specs: list[RowSpec]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        workers = [Worker(args, s, i, Path(tmp)) for i, s in enumerate(specs)]
        try:
            for w in workers:
                if w.reply() != "ready":
                    raise RuntimeError(f"worker {w.label}: unexpected start-up reply")
            print(f"  built {len(workers)} workers; stepping them in turn", flush=True)
            for i in range(args.warmup + args.steps):
                kind = "warmup" if i < args.warmup else "step"
                order = workers if i % 2 == 0 else workers[::-1]  # A B, B A: no position bias
                label = f"warm-up {i + 1}" if kind == "warmup" else f"step {i + 1 - args.warmup}"
                took = []
                for w in order:
                    seconds, others = (float(x) for x in w.ask(kind).split())
                    busy = f" (others {others:.0%} of the CPUs)" if others > BUSY else ""
                    took.append(f"{w.label} {seconds:.3f} s{busy}")
                print(f"  {label}: {', '.join(took)}", flush=True)
            return [w.finish() for w in workers]
        finally:
            for w in workers:
                w.kill()


def memory_gb(row: dict) -> float:
    """The figure the memory ratio uses: CUDA peak allocated, or CPU peak RSS over imports."""
    return row["peak_cuda_gb"] if "peak_cuda_gb" in row else row["peak_rss_increase_gb"]


def add_ratios(rows: list[dict]) -> None:
    """Time and memory of every row over full fine-tuning's with the same engine (DeepSpeed
    rows checked against the targets), and each DeepSpeed row's step over its plain twin's and
    its peer's (HF PEFT)."""
    for engine in ("deepspeed", "plain"):
        same = [r for r in rows if r.get("engine", "deepspeed") == engine]
        base = next((r for r in same if r["method"] == BASELINE), None)
        if base is None:
            continue
        for r in same:
            r["time_vs_full"] = r["step_median_s"] / base["step_median_s"]
            r["memory_vs_full"] = memory_gb(r) / memory_gb(base)
            r["peak_rss_vs_full"] = r["peak_rss_gb"] / base["peak_rss_gb"]
            if r is not base and engine == "deepspeed":
                r["time_pass"] = r["time_vs_full"] <= TARGETS["time"]
                r["memory_pass"] = r["memory_vs_full"] <= TARGETS["memory"]
    plain = {(r["method"], r["fused_kernel"]): r for r in rows if r.get("engine") == "plain"}
    for r in rows:
        twin = plain.get((r["method"], r.get("fused_kernel")))
        if r.get("engine") == "deepspeed" and twin is not None:
            r["engine_vs_plain"] = r["step_median_s"] / twin["step_median_s"]
    peers = {r["method"]: r for r in rows if r.get("engine") == "peft"}
    for r in rows:
        if r.get("engine") == "deepspeed" and r["method"] in peers:
            r["engine_vs_peer"] = r["step_median_s"] / peers[r["method"]]["step_median_s"]


def table(rows: list[dict]) -> str:
    """A Markdown table: aligned in a terminal, pasteable into bench/RESULTS.md."""
    cuda = "peak_cuda_gb" in rows[0]
    head = ["method", "trainable", "% updated", "step median (s)", "step p90 (s)"]
    head += ["samples/s", "GFLOP / sample", "MFU"]
    head += ["peak CUDA alloc (GB)"] if cuda else ["peak RSS (GB)", "peak RSS - imports (GB)"]
    head += ["checkpoint bytes", "time / full", "memory / full", "engine / plain"]
    head += ["engine / peer"]
    body = []
    for r in rows:
        cells = [r.get("row", r["method"]), f"{r['trainable']:,}", f"{r['percent']:.2f}"]
        cells += [f"{r['step_median_s']:.3f}", f"{r['step_p90_s']:.3f}"]
        cells += [f"{r['samples_per_s']:,.1f}", f"{r['model_flops_per_sample'] / 1e9:,.2f}"]
        cells += ["-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
        if cuda:
            cells += [f"{r['peak_cuda_gb']:.2f}"]
        else:
            cells += [f"{r['peak_rss_gb']:.2f}", f"{r['peak_rss_increase_gb']:.2f}"]
        cells += [f"{r['checkpoint_bytes']:,}"]
        for key in ("time", "memory"):
            ratio, verdict = r.get(f"{key}_vs_full"), r.get(f"{key}_pass")
            if ratio is None:
                cells.append("-")
            elif verdict is None:  # a baseline itself, or a plain row (no target)
                cells.append(f"{ratio:.2f}x")
            else:
                passed = "PASS" if verdict else "FAIL"
                cells.append(f"{ratio:.2f}x (<= {TARGETS[key]}x) {passed}")
        for key in ("engine_vs_plain", "engine_vs_peer"):
            cells.append(f"{r[key]:.2f}x" if key in r else "-")
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells):  # first column left-aligned, numbers right-aligned
        padded = [cells[0].ljust(widths[0])]
        padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "-" * (widths[0] + 2) + "|" + "|".join("-" * (w + 1) + ":" for w in widths[1:])
    return "\n".join([line(head), rule + "|"] + [line(c) for c in body])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        # Replies on the parent's pipe; on stdout when a worker is run by hand.
        replies = os.fdopen(args.reply_fd, "w") if args.reply_fd >= 0 else sys.stdout
        row = run_worker(args, sys.stdin, replies)
        Path(args.row_out).write_text(json.dumps(row) + "\n")
        return [row]

    import torch

    from vlds.engine import DEFAULT_DS_CONFIG, use_bf16, zero_stage
    from vlds.peft import METHODS

    cuda = torch.cuda.is_available()
    args.batch = args.batch or (64 if cuda else 16)
    specs = parse_rows(args.methods, args.fused_kernel, args.plain)
    unknown = [s.method for s in specs if s.method not in METHODS]
    if unknown or not specs:
        raise SystemExit(
            f"unknown method(s) {unknown or args.methods!r}; valid: {', '.join(METHODS)}"
        )
    cfg = build_config_for(args, specs[0].method)
    cfg.train.zero_stage = args.zero_stage
    bf16 = use_bf16(cfg)  # the workers' precision
    device = torch.cuda.get_device_name(0) if cuda else cpu_name()
    zero = json.loads(DEFAULT_DS_CONFIG.read_text())["zero_optimization"]
    stage = f"{zero_stage(cfg, 1, zero, bf16=bf16)} (train.zero_stage={args.zero_stage})"
    print(f"device: {device}, {'bf16' if bf16 else 'fp32'}, ZeRO stage {stage}, 1 rank")
    print(
        f"CLIP-T5 (random weights): d_model {args.d_model}, {args.layers}+{args.layers} layers, "
        f"{args.heads} heads, d_ff {args.d_ff}, vocab {args.vocab}; batch {args.batch} x "
        f"({args.text_len} text + {GRID * GRID} visual tokens -> {args.target_len} target "
        f"tokens); {args.warmup} warm-up + {args.steps} timed steps"
    )
    print(
        "timed step = engine forward + backward + step (plain torch rows: forward, backward, "
        "AdamW step, no DeepSpeed); the frozen CLIP tower is outside the engine and not timed "
        "(visual features are given)"
    )
    rows = run_rows(args, specs)
    add_ratios(rows)
    print()
    print(table(rows))
    print()
    if cuda:
        print("memory = torch.cuda.max_memory_allocated of each worker")
    else:
        print(
            "memory ratio = peak RSS increase over the RSS after imports (the imports are the "
            "same for every method)"
        )
    print("checkpoint bytes = adapter-only export (vlds.checkpoint.save_adapter, trainable only)")
    print(
        "samples/s = batch / step median; GFLOP / sample = model_flops_per_sample (training "
        "matmuls); MFU = achieved model FLOP/s / the device's dense bf16 peak (CUDA only)"
    )
    for r in rows:
        if "time_pass" in r:
            ok = "PASS" if r["time_pass"] and r["memory_pass"] else "FAIL"
            total_rss = "" if cuda else f"; total peak RSS {r['peak_rss_vs_full']:.2f}x"
            print(
                f"{r['row']} vs {BASELINE}: time {r['time_vs_full']:.2f}x (target <= "
                f"{TARGETS['time']}x), memory {r['memory_vs_full']:.2f}x (target <= "
                f"{TARGETS['memory']}x{total_rss}): {ok}"
            )
    busy = {r["row"]: r["others_cpu_share"] for r in rows if r["others_cpu_share"] > BUSY}
    if busy:
        shares = ", ".join(f"{m} {v:.0%}" for m, v in busy.items())
        print(
            f"WARNING: other processes used the CPUs during the timed steps ({shares} of all "
            f"CPU time): the step times are inflated; rerun on an idle machine"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
