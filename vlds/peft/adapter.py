"""Adapters (Houlsby-style bottleneck, as VL-Adapter): h + Up(gelu_new(Down(h))).

Placed on every sub-layer output (vlds.peft.inject.sublayer_sites), with biases, no extra
LayerNorm; bottleneck = d_model / reduction_factor (96 for d = 768, r = 8). The Single Adapter
shares one adapter per site across all tasks (the tasks differ by their text prompt).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlds.peft.inject import sublayer_sites, transform_output
from vlds.peft.registry import Method, register


class Adapter(nn.Module):
    def __init__(self, d_model: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        # Near-identity start: small weights, zero biases (the reference's init, std 1e-2).
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=1e-2)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h (B, T, d) -> (B, T, d); gelu_new is the tanh approximation
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))


@register("single_adapter")
class SingleAdapter(Method):
    def inject(self, model: nn.Module) -> None:
        d = model.d_model
        bottleneck = d // self.cfg.reduction_factor
        for site in sublayer_sites(model.lm, model.arch):
            adapter = Adapter(d, bottleneck)
            model.peft[site.key] = adapter
            transform_output(site.module, adapter)


@register("full_finetune")
class FullFineTune(Method):
    """Baseline: every weight of the language model trains (CLIP stays frozen)."""

    def inject(self, model: nn.Module) -> None:
        model.lm.requires_grad_(True)
