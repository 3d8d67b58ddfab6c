"""The fused kernels checked against the PyTorch reference: the bound, and the run's self-check.

The bound (`failures`) is the one tests/test_kernels.py holds the kernels to: every output and
gradient is measured against an fp64 reference, and its max abs error must stay within 2x eager
PyTorch's own error in the same dtype, or a small floor relative to the largest reference value
(`REL_FLOOR`: fp32 sums over ~1k rows; 16-bit storage rounding).

`self_check` runs it on a live batch: the first time the fused path is taken for a (d, b, dtype,
device), vlds.kernels.adapter_forward runs the fused kernels and the reference forward and
backward on the first CHECK_ROWS rows of that batch, with a fixed random output gradient, and
keeps the fused path only if every output is within the bound. A compile error, a launch error
or a mismatch sends that shape to the reference for the rest of the process.

`probe` runs the same check first in a child process (`python -m vlds.kernels.check D B DTYPE
DEVICE`), on random inputs of the shape: a kernel that faults on a GPU (an illegal memory
access) leaves the CUDA context unusable for the rest of its process, so no fallback inside the
training process could survive it, and the autotuner runs every candidate config before the
in-process check sees one. That happened on the first H200 run (bench/RESULTS.md). The child's
exit status is the verdict; its compiled kernels stay in triton's on-disk cache for the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys

import torch

from vlds.kernels.reference import adapter_reference

OUTPUTS = ("y", "dh", "dW_down", "db_down", "dW_up", "db_up")
REL_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CHECK_ROWS = 4096  # of the batch's tokens: enough rows for every tile and split to run
PROBE_TIMEOUT_S = 300  # the child's imports, every autotune config's compile, the check


def forward_backward(fn, args: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[y, dh, dW_down, db_down, dW_up, db_up] of fn(*args) for output gradient dy."""
    y = fn(*args)
    return [y, *torch.autograd.grad(y, args, dy)]


def errors(args: list[torch.Tensor], dy: torch.Tensor, fused_out: list[torch.Tensor]) -> dict:
    """{name: (fused max abs err, eager max abs err, max |ref|)}, all against fp64."""
    f64 = [a.detach().double().requires_grad_() for a in args]
    ref = forward_backward(adapter_reference, f64, dy.double())
    eager = forward_backward(adapter_reference, [a.detach().requires_grad_() for a in args], dy)
    out = {}
    for name, f, e, r in zip(OUTPUTS, fused_out, eager, ref, strict=True):
        if f.shape != r.shape or f.dtype != e.dtype:
            raise AssertionError(f"{name}: fused {f.dtype} {tuple(f.shape)}, eager {e.dtype}")
        out[name] = (
            (f.double() - r).abs().max().item(),
            (e.double() - r).abs().max().item(),
            r.abs().max().item(),
        )
    return out


def failures(errs: dict, dtype: torch.dtype) -> list[str]:
    """The outputs outside the bound, described; empty when all pass (NaN never passes)."""
    floor = REL_FLOOR[dtype]
    bad = []
    for name, (err, eager_err, scale) in errs.items():
        if not err <= max(2 * eager_err, floor * scale):
            bad.append(
                f"{name}: max abs error {err:.3e} vs eager {eager_err:.3e}, max |ref| {scale:.3e}"
            )
    return bad


def self_check(fused, h, w_down, b_down, w_up, b_up) -> dict:
    """Run `fused` and the reference on (up to CHECK_ROWS rows of) this batch, forward and
    backward. Returns {"ok": bool, "reason": str, "max_rel_error": {name: err / max |ref|}}."""
    d, b = h.shape[-1], w_down.shape[0]
    x = h.detach().reshape(-1, d)[:CHECK_ROWS]
    bd = torch.zeros(b, dtype=w_down.dtype, device=h.device) if b_down is None else b_down
    bu = torch.zeros(d, dtype=w_up.dtype, device=h.device) if b_up is None else b_up
    args = [t.detach().clone().requires_grad_() for t in (x, w_down, bd, w_up, bu)]
    g = torch.Generator(device=h.device).manual_seed(0)
    dy = torch.randn(x.shape, generator=g, device=h.device, dtype=torch.float32).to(x.dtype)
    with torch.enable_grad():
        try:
            out = forward_backward(fused, args, dy)
        except Exception as e:  # a compile error, out of resources, a launch failure
            first = (str(e).strip().splitlines() or [""])[0][:300]
            return {"ok": False, "reason": f"{type(e).__name__}: {first}", "max_rel_error": {}}
        errs = errors(args, dy, out)
    rel = {n: (err / scale if scale else err) for n, (err, _, scale) in errs.items()}
    bad = failures(errs, x.dtype)
    reason = "; ".join(bad) if bad else f"matches the reference on {x.shape[0]} rows"
    return {"ok": not bad, "reason": reason, "max_rel_error": rel}


def probe_command(d: int, b: int, dtype: torch.dtype, device: torch.device) -> list[str]:
    name = str(dtype).removeprefix("torch.")
    return [sys.executable, "-m", "vlds.kernels.check", str(d), str(b), name, str(device)]


def probe(d: int, b: int, dtype: torch.dtype, device: torch.device) -> dict:
    """`self_check` of the fused kernels on random (CHECK_ROWS, d) inputs with bottleneck b, run
    in a child process; {"ok", "reason", "max_rel_error"} as self_check's. A child that crashes,
    is killed or hangs is a failed check that names what happened."""
    env = dict(os.environ)
    if device.type == "cpu":  # CPU tensors run only in the interpreter
        env["TRITON_INTERPRET"] = "1"
    failed = {"ok": False, "max_rel_error": {}}
    try:
        proc = subprocess.run(
            probe_command(d, b, dtype, device),
            capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**failed, "reason": f"the probe process did not finish in {PROBE_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {**failed, "reason": f"the probe process {exit_reason(proc)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exit_reason(proc: subprocess.CompletedProcess) -> str:
    """How a child process ended, and the exception it raised: "was killed by SIGABRT: ..." or
    "exited with status 1: ...". A CUDA fault is followed by pages of destructor warnings, so
    the detail is the last line that names an exception."""
    rc = proc.returncode
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
    lines = [x.strip() for x in (proc.stderr or "").splitlines() if x.strip()]
    raised = [x for x in lines if re.match(r"[\w.]+(Error|Exception): ", x)]
    return f"{how}: {(raised or lines or ['no output'])[-1][:300]}"


def _probe_main(argv: list[str] | None = None) -> None:
    """The child of `probe`: prints self_check's result as one JSON line."""
    parser = argparse.ArgumentParser(description=probe.__doc__)
    parser.add_argument("d", type=int)
    parser.add_argument("b", type=int)
    parser.add_argument("dtype", choices=[str(t).removeprefix("torch.") for t in REL_FLOOR])
    parser.add_argument("device")
    args = parser.parse_args(argv)
    from vlds.kernels.fused_adapter import fused_adapter

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):  # scaled as the kernel tests: z ~ N(0, 1), gelu non-linear
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    d, b = args.d, args.b
    weights = rand(b, d, scale=d**-0.5), rand(b, scale=0.5), rand(d, b, scale=b**-0.5)
    result = self_check(fused_adapter, rand(CHECK_ROWS, d), *weights, rand(d, scale=0.5))
    print(json.dumps(result))


if __name__ == "__main__":
    _probe_main()
