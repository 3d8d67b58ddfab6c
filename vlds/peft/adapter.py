"""Adapters (as VL-Adapter): h + Up(gelu_new(Down(h))) on every sub-layer output.

Bottleneck = d_model / reduction_factor (96 for d = 768, r = 8), biases, no extra LayerNorm.
Init as the reference's: plain nn.Linear layers (adapters/adapter_modeling.py:47-48) that
BART's init_weights re-draws from N(0, 0.02) with zero biases, and T5 leaves at PyTorch's default
(VLModel.backbone_init): an adapter under T5 does not start near the identity.
Three ways to share them across tasks (paper, Table 1):
- single_adapter: one adapter per site for all tasks (tasks differ by their text prompt);
- multiple_adapters: one adapter per task per site;
- half_shared_adapter: the up-projection shared, the down-projection per task.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlds.kernels import adapter_forward, check_mode
from vlds.peft.inject import sublayer_sites, transform_output
from vlds.peft.registry import Method, register


def linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out)  # PyTorch's init; re-drawn under BART by VLModel.backbone_init


def bottleneck_adapter(h: torch.Tensor, down: nn.Module, up: nn.Module, fused: str):
    """h + up(gelu_new(down(h))): h (B, T, d) -> (B, T, d); gelu_new is the tanh approximation.

    nn.Linear projections go through vlds.kernels.adapter_forward, which takes the fused Triton
    kernel when `fused` (peft.fused_kernel), the tensor and its self-check allow, and the same
    F.linear arithmetic otherwise. It reads their weights directly, so under ZeRO-3 these
    modules must be leaves (`zero3_leaf_classes`). PHM layers (Compacter) are called as modules.
    """
    if isinstance(down, nn.Linear) and isinstance(up, nn.Linear):
        return adapter_forward(h, down.weight, down.bias, up.weight, up.bias, mode=fused)
    return h + up(F.gelu(down(h), approximate="tanh"))


class Adapter(nn.Module):
    """`make_linear(d_in, d_out)` builds the projections: nn.Linear here, PHM for Compacter."""

    def __init__(self, d_model: int, bottleneck: int, make_linear=linear, fused_kernel="auto"):
        super().__init__()
        check_mode(fused_kernel)
        self.fused_kernel = fused_kernel
        self.down = make_linear(d_model, bottleneck)
        self.up = make_linear(bottleneck, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return bottleneck_adapter(h, self.down, self.up, self.fused_kernel)


class TaskAdapters(nn.Module):
    """Adapters of one site, one per task (or per-task downs and a shared up), routed by the
    task id of each sample."""

    def __init__(
        self,
        d_model,
        bottleneck,
        n_tasks,
        router,
        share_up=False,
        make_linear=linear,
        fused_kernel="auto",
    ):
        super().__init__()
        check_mode(fused_kernel)
        self.router = router
        self.fused_kernel = fused_kernel
        if share_up:
            self.down = nn.ModuleList(make_linear(d_model, bottleneck) for _ in range(n_tasks))
            self.up = make_linear(bottleneck, d_model)
        else:
            self.adapters = nn.ModuleList(
                Adapter(d_model, bottleneck, make_linear, fused_kernel) for _ in range(n_tasks)
            )

    def _one(self, t: int, h: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "adapters"):
            return self.adapters[t](h)
        return bottleneck_adapter(h, self.down[t], self.up, self.fused_kernel)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.router.route(h, self._one)


@register("single_adapter")
class SingleAdapter(Method):
    uses_bottleneck = True

    def make_linear(self, d_in: int, d_out: int) -> nn.Module:
        return linear(d_in, d_out)

    def inject(self, model: nn.Module) -> None:
        d = model.d_model
        for site in sublayer_sites(model.lm, model.arch):
            model.peft[site.key] = model.backbone_init(
                Adapter(d, self.bottleneck(d), self.make_linear, self.cfg.fused_kernel)
            )
            transform_output(site.module, model.peft[site.key])


@register("multiple_adapters")
class MultipleAdapters(SingleAdapter):
    per_task = True
    share_up = False

    def inject(self, model: nn.Module) -> None:
        d, n = model.d_model, len(self.tasks)
        for site in sublayer_sites(model.lm, model.arch):
            model.peft[site.key] = model.backbone_init(
                TaskAdapters(
                    d,
                    self.bottleneck(d),
                    n,
                    model.router,
                    self.share_up,
                    self.make_linear,
                    self.cfg.fused_kernel,
                )
            )
            transform_output(site.module, model.peft[site.key])


@register("half_shared_adapter")
class HalfSharedAdapter(MultipleAdapters):
    share_up = True


def zero3_leaf_classes() -> list[type[nn.Module]]:
    """Modules whose forward reads child weights directly (the fused kernel path): ZeRO-3 must
    gather all their parameters at the module's own hook, not per child. In vlds/train.py:
    `deepspeed.utils.set_z3_leaf_modules(model, zero3_leaf_classes(), raise_if_not_found=False)`.
    (HyperSite needs nothing: it calls the hypernetwork modules, which ZeRO-3 hooks as usual.)"""
    return [Adapter, TaskAdapters]
