"""Adapter kernels: eager PyTorch vs torch.compile vs the fused Triton kernels, bf16 on CUDA.

    python bench/adapter_kernel.py                       # M = 65,536 tokens, d 768, b 96/48/24
    python bench/adapter_kernel.py --bottlenecks 96 --reps 50 --no-e2e
    python bench/adapter_kernel.py --check               # CPU: interpreter correctness only

Per bottleneck and implementation: the median (over --reps, after warm-up; CUDA events) of the
forward and of forward + backward (dh and every weight and bias gradient), the bytes the fused
kernels must move (DRAM, per pass: see BYTES below), the achieved GB/s = those bytes / time
(the same numerator for every implementation, so GB/s ratios are speed ratios) and its share of
a measured device-to-device copy bandwidth (copy_ of a 1 GiB buffer: read + write bytes / time).
Eager PyTorch moves more (~8.4 KB per token forward at d 768, b 96, bf16, vs 3.3 KB fused).

End to end: the training step (forward, backward, AdamW) of a t5-base-sized CLIP-T5 (random
weights, d 768, 12 + 12 layers, 60 adapters, bottleneck 96, bf16 parameters, plain PyTorch,
no DeepSpeed) on a VQA-like batch (20 text + 36 visual tokens, 5 target tokens), with
peft.fused_kernel "off" and "on", stepped alternately so drift in clock speed hits both.

Targets (bench/RESULTS.md): fused fwd + bwd >= 80 % of copy bandwidth, >= 1.8x eager, and faster
than torch.compile. Without CUDA there is nothing to time: the script says so and exits 0 (with
--check it also checks the kernels against PyTorch in the Triton CPU interpreter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/adapter_kernel.py` from a checkout

TARGETS = {"copy_fraction": 0.8, "speedup_vs_eager": 1.8}
VOCAB, PAD, EOS = 32128, 0, 1  # t5-base: its embedding rows (the tokenizer has 32100 + padding)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65_536, help="M: rows of the adapter input")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--bottlenecks", default="96,48,24", help="comma list")
    p.add_argument("--reps", type=int, default=100, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end step time")
    p.add_argument("--e2e-batch", type=int, default=64, help="samples per end-to-end step")
    p.add_argument("--e2e-steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--check", action="store_true", help="CPU: run the interpreter check")
    return p.parse_args(argv)


def kernel_bytes(m: int, d: int, b: int, elem: int = 2, splits: int = 0) -> dict[str, int]:
    """DRAM bytes the fused kernels move per pass (fused_adapter.py docstring), activations in
    elements of `elem` bytes.

    fwd (timed under no_grad, as inference runs it): read x, write y: 2d per token; no z is
    saved. fwd+bwd: the training forward also writes z (2d + b); backward kernel 1 reads dy and
    z and writes dx and dz (2d + 2b); kernel 2 reads x, dy, z, dz (2d + 2b) and writes `splits`
    fp32 partials of the four gradients, which torch then reads back and sums (2 x 4 bytes x
    splits x (2bd + b + d)). Left out: the weights (read from L2 by every row block).
    """
    fwd = m * elem * 2 * d
    train_fwd = m * elem * (2 * d + b)
    bwd = 2 * m * elem * (2 * d + 2 * b) + 2 * 4 * splits * (2 * b * d + b + d)
    return {"fwd": fwd, "fwd+bwd": train_fwd + bwd}


def grad_splits(m: int, d: int, dtype) -> int:
    """The weight-gradient kernel's row splits for m rows on this GPU (vlds.kernels)."""
    import torch
    import triton

    from vlds.kernels import fused_adapter as fa

    d_blocks = triton.cdiv(d, fa._grad_block_d(dtype))
    return fa._splits(m, d_blocks, torch.device("cuda", torch.cuda.current_device()))


def cuda_median_ms(fn, reps: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth_gbs(reps: int) -> float:
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), reps, 3)
    return 2 * src.numel() / ms / 1e6  # read + write


def time_passes(fn, inputs: list, dy, args) -> dict[str, float]:
    """Median ms of fn's forward (no grad) and forward + backward (every gradient)."""
    import torch

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(dy)

    return {
        "fwd": cuda_median_ms(forward, args.reps, args.warmup),
        "fwd+bwd": cuda_median_ms(forward_backward, args.reps, args.warmup),
    }


def kernel_rows(args, copy_gbs: float) -> list[dict]:
    import torch

    from vlds.kernels.fused_adapter import fused_adapter
    from vlds.kernels.reference import adapter_reference

    impls = {"eager": adapter_reference, "fused": fused_adapter}
    if not args.no_compile:
        impls["compile"] = torch.compile(adapter_reference, dynamic=False)
    m, d = args.tokens, args.d_model
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for b in (int(x) for x in args.bottlenecks.split(",")):
        shapes = [((m, d), 1.0), ((b, d), d**-0.5), ((b,), 1.0), ((d, b), b**-0.5), ((d,), 1.0)]
        inputs = [
            (torch.randn(shape, generator=g, device="cuda") * scale).to(torch.bfloat16)
            for shape, scale in shapes
        ]  # h (M, d), W_down, b_down, W_up, b_up
        inputs = [t.requires_grad_() for t in inputs]
        dy = torch.randn(m, d, generator=g, device="cuda").to(torch.bfloat16)
        nbytes = kernel_bytes(m, d, b, splits=grad_splits(m, d, torch.bfloat16))
        for name, fn in impls.items():
            for phase, ms in time_passes(fn, inputs, dy, args).items():
                gbs = nbytes[phase] / ms / 1e6
                rows.append(
                    {
                        "b": b,
                        "impl": name,
                        "pass": phase,
                        "ms": ms,
                        "GB/s": gbs,
                        "copy": gbs / copy_gbs,
                    }
                )
    return rows


def e2e_setup(n: int, device: str, dtype):
    """A t5-base-sized CLIP-T5 (random weights) with single adapters, its AdamW and a batch of
    n VQA-like samples (visual features given: the frozen tower is not part of the step)."""
    import torch

    from vlds.config import build_config
    from vlds.model.build import build_lm
    from vlds.model.vision import grid_boxes
    from vlds.model.vl import VLModel
    from vlds.peft import apply_peft

    cfg = build_config("t5-base-random", {"peft.method": "single_adapter", "data.tasks": "vqa"})
    torch.manual_seed(cfg.train.seed)  # no tower here: build_tower would seed
    model = VLModel(build_lm(cfg, VOCAB, PAD, EOS), cfg.model.arch, feat_dim=2048)
    apply_peft(model, cfg.peft, cfg.task_list)
    model.to(device, dtype).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tt, tv, tl = 20, 36, 5
    batch = {
        "input_ids": torch.randint(2, VOCAB, (n, tt)),
        "attention_mask": torch.ones(n, tt, dtype=torch.long),
        "labels": torch.randint(2, VOCAB, (n, tl)),
        "vis_feats": torch.randn(n, tv, 2048).relu().to(dtype),  # CLIP RN101 grid-like
        "vis_boxes": grid_boxes(6).expand(n, -1, -1).contiguous(),  # (n, 36, 5)
        "vis_order": torch.zeros(n, tv, dtype=torch.long),
        "vis_mask": torch.ones(n, tv, dtype=torch.long),
        "task_ids": torch.zeros(n, dtype=torch.long),
    }
    return model, opt, {k: v.to(device) for k, v in batch.items()}


def e2e_step_ms(args) -> dict[str, float]:
    """Median training-step ms with peft.fused_kernel "off" and "on", stepped alternately."""
    import torch

    model, opt, batch = e2e_setup(args.e2e_batch, "cuda", torch.bfloat16)
    adapters = [m for m in model.modules() if hasattr(m, "fused_kernel")]

    def step():
        opt.zero_grad(set_to_none=True)
        model(batch).backward()
        opt.step()

    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(2 * (args.e2e_steps + 3)):
        mode = ("off", "on")[i % 2]
        for a in adapters:
            a.fused_kernel = mode
        ms = cuda_median_ms(step, 1, 0)
        if i >= 6:  # 3 warm-up steps per mode (allocator, kernel compilation)
            times[mode].append(ms)
    return {mode: statistics.median(t) for mode, t in times.items()}


def interpreter_check() -> None:
    """Tiny fp32 check of the kernels on CPU in the Triton interpreter (no timing)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before vlds.kernels.fused_adapter is imported
    import torch

    from vlds.kernels.fused_adapter import fused_adapter, interpreting
    from vlds.kernels.reference import adapter_reference

    assert interpreting(), "triton was built for CUDA in this process"
    torch.manual_seed(0)
    m, d, b = 257, 128, 16
    args = [torch.randn(m, d), torch.randn(b, d) / d**0.5, torch.randn(b)]
    args = [t.requires_grad_() for t in args + [torch.randn(d, b) / b**0.5, torch.randn(d)]]
    dy = torch.randn(m, d)
    got = [fused_adapter(*args)] + list(torch.autograd.grad(fused_adapter(*args), args, dy))
    ref = [adapter_reference(*args)]
    ref += list(torch.autograd.grad(adapter_reference(*args), args, dy))
    names = ("y", "dh", "dW_down", "db_down", "dW_up", "db_up")
    errs = {n: (g - r).abs().max().item() for n, g, r in zip(names, got, ref, strict=True)}
    print(f"interpreter check M={m} d={d} b={b} fp32, max abs error vs PyTorch:")
    print("  " + "  ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    if not all(e < 1e-3 for e in errs.values()):
        raise SystemExit("interpreter check FAILED")


def print_rows(rows: list[dict], copy_gbs: float) -> None:
    print(f"\ndevice-to-device copy: {copy_gbs:,.0f} GB/s")
    print(f"{'b':>4} {'pass':<8} {'impl':<8} {'ms':>8} {'GB/s':>8} {'% copy':>7} {'x eager':>8}")
    eager = {(r["b"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        speedup = eager[r["b"], r["pass"]] / r["ms"]
        print(
            f"{r['b']:>4} {r['pass']:<8} {r['impl']:<8} {r['ms']:>8.3f} {r['GB/s']:>8.0f} "
            f"{100 * r['copy']:>6.1f}% {speedup:>7.2f}x"
        )
    for b in sorted({r["b"] for r in rows}, reverse=True):
        by = {r["impl"]: r for r in rows if r["b"] == b and r["pass"] == "fwd+bwd"}
        f = by["fused"]
        checks = [
            f["copy"] >= TARGETS["copy_fraction"],
            by["eager"]["ms"] / f["ms"] >= TARGETS["speedup_vs_eager"],
            "compile" not in by or f["ms"] < by["compile"]["ms"],
        ]
        print(
            f"b={b} fwd+bwd targets (>=80% copy, >=1.8x eager, < compile): "
            f"{' '.join('PASS' if c else 'FAIL' for c in checks)}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time (the kernels' GPU numbers need one).")
        if args.check:
            interpreter_check()
        return 0
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, M={args.tokens} d={args.d_model} bf16")
    copy_gbs = copy_bandwidth_gbs(args.reps)
    print_rows(kernel_rows(args, copy_gbs), copy_gbs)
    if not args.no_e2e:
        t = e2e_step_ms(args)
        print(
            f"\nend to end, t5-base-sized single_adapter step, batch {args.e2e_batch}: "
            f"fused off {t['off']:.1f} ms, on {t['on']:.1f} ms "
            f"({t['off'] / t['on']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
