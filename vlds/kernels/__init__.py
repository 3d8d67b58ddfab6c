"""Adapter kernels: `adapter_forward` runs the fused Triton kernel or the PyTorch reference.

    from vlds.kernels import adapter_forward
    y = adapter_forward(h, w_down, b_down, w_up, b_up, mode="auto")  # h (..., d) -> (..., d)

Modes (peft.fused_kernel): "auto" = fused on CUDA tensors when triton imports, the reference
otherwise; "on" = fused always, also on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1
set before triton is first imported), an error where it cannot run; "off" = the reference.
triton is imported only when the fused path is taken, so `import vlds` never needs it.

Self-check (peft.fused_check, on by default): the first time the fused path is taken for a
(d, b, dtype, device), the same batch also runs through the PyTorch reference, forward and
backward, and is compared with the bound of tests/test_kernels.py (vlds/kernels/check.py). On a
compile error or a mismatch, "auto" logs once and takes the reference for that shape for the
rest of the process; "on" raises. On CUDA, "auto" first runs the check in a child process
(`check.probe`): a kernel that faults there ends the child, not the run. `report()` says which
path ran for each shape and why; the trainer writes it to metrics.json ("adapter_kernel"). Not
under torch.compile (the check reads values): a compiled model takes its path unchecked and
unrecorded.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

from vlds.config import ConfigError, config_check
from vlds.kernels.reference import adapter_reference

MODES = ("auto", "on", "off")
# The fused kernels hold a (rows, bottleneck) fp32 tile in registers: compiled for sm_90 they are
# spill-free up to 128 (r = 6 at d = 768), spill but run up to 256; "auto" takes the first range.
MAX_BOTTLENECK = 256
AUTO_MAX_BOTTLENECK = 128
__all__ = [
    "MODES",
    "adapter_forward",
    "adapter_reference",
    "check_mode",
    "configure",
    "report",
    "use_fused",
]
log = logging.getLogger(__name__)
SELF_CHECK = True  # peft.fused_check; configure() sets it for the process
# (d, b, dtype, device, mode, autocast) -> {"path", "reason", "checked", ...}
_PATHS: dict[tuple, dict] = {}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"peft.fused_kernel={mode!r}; valid: {', '.join(MODES)}")


@config_check
def check_fused_kernel(cfg) -> None:
    check_mode(cfg.peft.fused_kernel)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_kernels() -> bool:
    """Whether the fused kernels run on CPU tensors: built (or, not yet imported, to be built)
    for the Triton interpreter, which triton decides when the kernels are decorated."""
    built = sys.modules.get("vlds.kernels.fused_adapter")
    if built is not None:
        return built.interpreting()
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def configure(self_check: bool = True) -> None:
    """Process-wide settings from the run's config (peft.fused_check), and a fresh report."""
    global SELF_CHECK
    SELF_CHECK = bool(self_check)
    _PATHS.clear()


def report() -> dict:
    """{"d768_b96_bfloat16_cuda:0_auto": {"path": "fused" | "reference", "reason": ...,
    "checked": bool, ...}} for every shape adapter_forward has seen in this process."""
    return {
        f"d{d}_b{b}_{str(dt).removeprefix('torch.')}_{dev}_{mode}"
        + ("_autocast" if autocast else ""): dict(v)
        for (d, b, dt, dev, mode, autocast), v in _PATHS.items()
    }


def _auto_reason(h: torch.Tensor, bottleneck: int | None) -> str:
    """Why "auto" takes the reference for h; empty when it takes the fused path."""
    if not h.is_cuda:
        return f"{h.device.type} tensors: the fused kernels run on CUDA"
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {h.dtype}"
    if bottleneck is not None and bottleneck > AUTO_MAX_BOTTLENECK:
        return f"bottleneck {bottleneck} > {AUTO_MAX_BOTTLENECK} (spills registers)"
    # under autocast the reference's F.linear runs in the autocast dtype: keep that
    if torch.is_autocast_enabled("cuda"):
        return "under autocast"
    if not triton_available():
        return "triton does not import"
    return ""


def _isolate(h: torch.Tensor) -> bool:
    """Whether "auto" probes the kernels in a child process before running them here: on CUDA,
    where a fault would end this process (vlds.kernels.check.probe)."""
    return h.is_cuda


def use_fused(h: torch.Tensor, mode: str, bottleneck: int | None = None) -> bool:
    """Whether `adapter_forward(h, ..., mode)` takes the fused path (before the self-check);
    raises when mode "on" cannot be honoured."""
    check_mode(mode)
    if mode == "off":
        return False
    if mode == "auto":
        return not _auto_reason(h, bottleneck)
    if not triton_available():
        raise RuntimeError(
            "peft.fused_kernel='on' needs triton, which does not import here; install it or "
            "use peft.fused_kernel=auto (falls back to PyTorch) or off"
        )
    if not h.is_cuda and not _cpu_kernels():
        raise RuntimeError(
            f"peft.fused_kernel='on' with a {h.device.type} tensor: the Triton kernels run on "
            "CUDA, or on CPU only under the interpreter (export TRITON_INTERPRET=1 before "
            "triton is imported); use peft.fused_kernel=auto or off"
        )
    return True


def adapter_forward(
    h: torch.Tensor,  # (..., d)
    w_down: torch.Tensor,  # (b, d)
    b_down: torch.Tensor | None,  # (b,)
    w_up: torch.Tensor,  # (d, b)
    b_up: torch.Tensor | None,  # (d,)
    mode: str = "auto",
) -> torch.Tensor:
    """h + Up(gelu_new(Down(h))), fused when `mode`, the tensor and the self-check allow it."""
    args = (h, w_down, b_down, w_up, b_up)
    if torch.compiler.is_compiling():  # traced: no checks, no bookkeeping
        fused = use_fused(h, mode, w_down.shape[0])
    else:
        # autocast is part of the key: "auto" keeps the reference under it (_auto_reason)
        autocast = torch.is_autocast_enabled(h.device.type)
        key = (h.shape[-1], w_down.shape[0], h.dtype, h.device, mode, autocast)
        state = _PATHS.get(key)
        if state is None:
            state = _PATHS[key] = _decide(args, mode)
        fused = state["path"] == "fused"
    if fused:
        from vlds.kernels.fused_adapter import fused_adapter

        return fused_adapter(*args)
    return adapter_reference(*args)


def _decide(args: tuple, mode: str) -> dict:
    """The path for this shape: the dispatch rule, then (fused, SELF_CHECK) the self-check."""
    h, w_down = args[0], args[1]
    shape = f"d {h.shape[-1]}, b {w_down.shape[0]}, {h.dtype}, {h.device}"
    if not use_fused(h, mode, w_down.shape[0]):
        reason = "peft.fused_kernel=off" if mode == "off" else _auto_reason(h, w_down.shape[0])
        return {"path": "reference", "reason": reason, "checked": False}
    if not SELF_CHECK:
        return {"path": "fused", "reason": "self-check off (peft.fused_check=false)",
                "checked": False}  # fmt: skip
    from vlds.kernels.check import probe, self_check

    result = {"ok": True}
    if mode == "auto" and _isolate(h):
        result = probe(h.shape[-1], w_down.shape[0], h.dtype, h.device)
        if not result["ok"]:
            result["reason"] = f"in a child process: {result['reason']}"
    if result["ok"]:
        from vlds.kernels.fused_adapter import fused_adapter

        result = self_check(fused_adapter, *args)
    checked = {"checked": True, "max_rel_error": result["max_rel_error"]}
    if result["ok"]:
        log.info("fused adapter kernels (%s): %s", shape, result["reason"])
        return {"path": "fused", "reason": result["reason"], **checked}
    if mode == "on":
        raise RuntimeError(
            f"peft.fused_kernel='on': the fused adapter kernels failed their self-check ({shape}): "
            f"{result['reason']}; use peft.fused_kernel=auto (falls back to PyTorch) or off"
        )
    log.warning(
        "fused adapter kernels (%s) failed their self-check, PyTorch reference from now on: %s",
        shape,
        result["reason"],
    )
    return {"path": "reference", "reason": f"self-check failed: {result['reason']}", **checked}
