"""Compacter (Karimi Mahabadi et al., 2021) as in VL-Adapter: adapters whose projections are
parameterised hypercomplex multiplication (PHM) layers, W = sum_i kron(A_i, B_i), i < n.

n = 2, a rule tensor A per layer (not shared across layers), B not factorised; same placement
and activation as the Adapter. single_compacter shares one per site across tasks,
multiple_compacters has one per task per site. Init as the reference's PHMLinear (the scripts'
CompactorConfig: hypercomplex_nonlinearity "glorot-uniform", phm_c_init "normal",
--phm_init_range 0.01): each B_i xavier-uniform with gain sqrt(2), A N(0, 0.01), bias zero
(adapters/hypercomplex/layers.py:98-147, inits.py); BART's init_weights does not touch it (not an
nn.Linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vlds.config import ConfigError
from vlds.peft.adapter import MultipleAdapters, SingleAdapter
from vlds.peft.registry import register


class PHMLinear(nn.Module):
    """y = x @ (sum_i kron(A_i, B_i)) + b with A (n, n, n), B (n, d_in/n, d_out/n).

    The reference names these phm_rule, W and b: its weight decay (by name) decays the bias
    (`reference_param_names`, read by vlds.engine.param_groups)."""

    reference_param_names = {"rule": "phm_rule", "weight": "W", "bias": "b"}

    def __init__(self, d_in: int, d_out: int, n: int):
        super().__init__()
        self.n = n
        self.rule = nn.Parameter(torch.empty(n, n, n))  # A_i: (n, n)
        self.weight = nn.Parameter(torch.empty(n, d_in // n, d_out // n))  # B_i
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.normal_(self.rule, std=0.01)
        for i in range(n):  # per (d_in/n, d_out/n) slice, as the reference
            nn.init.xavier_uniform_(self.weight.data[i], gain=math.sqrt(2))

    def full_weight(self) -> torch.Tensor:
        # sum_i kron(A_i, B_i): (n, n) x (d_in/n, d_out/n) -> (d_in, d_out)
        return sum(torch.kron(self.rule[i], self.weight[i]) for i in range(self.n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.full_weight().to(x.dtype) + self.bias


class _PHM:
    def check(self, d_model: int, arch: str) -> None:
        super().check(d_model, arch)
        n, b = self.cfg.phm_n, self.bottleneck(d_model)
        if n < 1 or d_model % n or b % n:
            raise ConfigError(
                f"{self.name}: PHM with n={n} needs d_model ({d_model}) and the bottleneck "
                f"({b}) divisible by n; change peft.phm_n or peft.reduction_factor"
            )

    def make_linear(self, d_in: int, d_out: int) -> nn.Module:
        return PHMLinear(d_in, d_out, self.cfg.phm_n)


@register("single_compacter")
class SingleCompacter(_PHM, SingleAdapter):
    pass


@register("multiple_compacters")
class MultipleCompacters(_PHM, MultipleAdapters):
    pass
