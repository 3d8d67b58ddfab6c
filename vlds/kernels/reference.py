"""The adapter in plain PyTorch: what the fused kernels must reproduce, and the fallback path.

    y = h + Up(gelu_new(Down(h)))  = h + gelu_tanh(h @ W_down^T + b_down) @ W_up^T + b_up

Always importable (no triton). Weights are cast to h's dtype first, as the adapters do when
their parameters are fp32 masters and the activations bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adapter_reference(
    h: torch.Tensor,  # (..., d)
    w_down: torch.Tensor,  # (b, d)  nn.Linear layout: (out, in)
    b_down: torch.Tensor | None,  # (b,)
    w_up: torch.Tensor,  # (d, b)
    b_up: torch.Tensor | None,  # (d,)
) -> torch.Tensor:
    wd, wu = w_down.to(h.dtype), w_up.to(h.dtype)
    bd = None if b_down is None else b_down.to(h.dtype)
    bu = None if b_up is None else b_up.to(h.dtype)
    z = F.linear(h, wd, bd)  # (..., b)
    return h + F.linear(F.gelu(z, approximate="tanh"), wu, bu)  # (..., d)
