"""LoRA (Hu et al., 2021) as in VL-Adapter: q and v projections of every attention (encoder
self, decoder self, decoder cross) get W x + (alpha / r) B A dropout(x).

Rank 128, alpha 32, dropout 0.1; A kaiming-uniform, B zero (the model starts unchanged). The
reference also trains every bias of the language model (`peft.lora_train_biases`), but not the
LayerNorm weights. single_lora shares one per projection across tasks, multiple_lora has one per
task.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vlds.peft.inject import per_task, sublayer_sites
from vlds.peft.registry import Method, register

ATTENTION_KINDS = ("enc_self", "dec_self", "dec_cross")


class LoRA(nn.Module):
    """The low-rank update only: x (B, T, d_in) -> (alpha / r) B A dropout(x) (B, T, d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x))) * self.scale


class TaskLoRA(nn.Module):
    def __init__(self, make, n_tasks: int, router):
        super().__init__()
        self.loras = nn.ModuleList(make() for _ in range(n_tasks))
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_task(x, self.router.ids_for(x.shape[0]), lambda t, xs: self.loras[t](xs))


def q_v(attn: nn.Module, arch: str) -> tuple[nn.Linear, nn.Linear]:
    return (attn.q, attn.v) if arch == "t5" else (attn.q_proj, attn.v_proj)


def add_to_output(linear: nn.Module, delta: nn.Module):
    """Hook: linear(x) + delta(x)."""
    return linear.register_forward_hook(lambda _m, args, out: out + delta(args[0]).to(out.dtype))


@register("single_lora")
class SingleLoRA(Method):
    train_layernorms = False

    def make(self, d: int):
        c = self.cfg
        return lambda: LoRA(d, d, c.lora_rank, c.lora_alpha, c.lora_dropout)

    def wrap(self, make, model):
        return make()

    def inject(self, model: nn.Module) -> None:
        d = model.d_model
        for site in sublayer_sites(model.lm, model.arch):
            if site.kind not in ATTENTION_KINDS:
                continue
            for name, proj in zip(("q", "v"), q_v(site.module, model.arch), strict=True):
                key = f"{site.key}-{name}"
                model.peft[key] = self.wrap(self.make(d), model)
                add_to_output(proj, model.peft[key])
        if self.cfg.lora_train_biases:
            for pname, p in model.lm.named_parameters():
                if pname.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)


@register("multiple_lora")
class MultipleLoRA(SingleLoRA):
    per_task = True

    def wrap(self, make, model):
        return TaskLoRA(make, len(self.tasks), model.router)
