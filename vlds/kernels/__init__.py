"""Adapter kernels: `adapter_forward` runs the fused Triton kernel or the PyTorch reference.

    from vlds.kernels import adapter_forward
    y = adapter_forward(h, w_down, b_down, w_up, b_up, mode="auto")  # h (..., d) -> (..., d)

Modes (peft.fused_kernel): "auto" = fused on CUDA tensors when triton imports, the reference
otherwise; "on" = fused always, also on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1
set before triton is first imported), an error where it cannot run; "off" = the reference.
triton is imported only when the fused path is taken, so `import vlds` never needs it.
"""

from __future__ import annotations

import functools
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
__all__ = ["MODES", "adapter_forward", "adapter_reference", "check_mode", "use_fused"]


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


def use_fused(h: torch.Tensor, mode: str, bottleneck: int | None = None) -> bool:
    """Whether `adapter_forward(h, ..., mode)` takes the fused path; raises when mode "on"
    cannot be honoured."""
    check_mode(mode)
    if mode == "off":
        return False
    if mode == "auto":
        return (
            h.is_cuda
            and h.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (bottleneck is None or bottleneck <= AUTO_MAX_BOTTLENECK)
            # under autocast the reference's F.linear runs in the autocast dtype: keep that
            and not torch.is_autocast_enabled("cuda")
            and triton_available()
        )
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
    """h + Up(gelu_new(Down(h))), fused when `mode` and the tensor allow it."""
    if use_fused(h, mode, w_down.shape[0]):
        from vlds.kernels.fused_adapter import fused_adapter

        return fused_adapter(h, w_down, b_down, w_up, b_up)
    return adapter_reference(h, w_down, b_down, w_up, b_up)
