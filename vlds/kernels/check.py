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
"""

from __future__ import annotations

import torch

from vlds.kernels.reference import adapter_reference

OUTPUTS = ("y", "dh", "dW_down", "db_down", "dW_up", "db_up")
REL_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CHECK_ROWS = 4096  # of the batch's tokens: enough rows for every tile and split to run


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
