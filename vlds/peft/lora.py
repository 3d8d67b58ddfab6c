"""LoRA (Hu et al., 2021) as in VL-Adapter: q and v projections of every attention (encoder
self, decoder self, decoder cross) get W x + (alpha / r) B A dropout(x).

Rank 128, alpha 32, dropout 0.1; A kaiming-uniform, B zero (the model starts unchanged). The
reference also trains every bias of the language model (`peft.lora_train_biases`), but not the
LayerNorm weights. single_lora shares one per projection across tasks, multiple_lora has one per
task.

`lora_targets` names every adapted projection once, by its vlds key and its path in the language
model; vlds.peft.hf_format maps both to Hugging Face PEFT's key names from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vlds.peft.inject import sublayer_sites
from vlds.peft.registry import Method, register

ATTENTION_KINDS = ("enc_self", "dec_self", "dec_cross")
# the projections LoRA adapts, by their attribute names (PEFT's `target_modules`)
TARGET_MODULES = {"t5": ("q", "v"), "bart": ("q_proj", "v_proj")}


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
        return self.router.route(x, lambda t, xs: self.loras[t](xs))


def q_v(attn: nn.Module, arch: str) -> tuple[nn.Linear, nn.Linear]:
    return tuple(getattr(attn, name) for name in TARGET_MODULES[arch])


def lora_targets(lm: nn.Module, arch: str) -> list[tuple[str, str, nn.Linear]]:
    """(key under model.peft, qualified name in `lm`, the Linear) of every adapted projection:
    q and v of every attention, e.g. ("enc-0-self-q", "encoder.block.0.layer.0.SelfAttention.q",
    Linear) for T5."""
    names = {id(m): n for n, m in lm.named_modules()}
    out = []
    for site in sublayer_sites(lm, arch):
        if site.kind in ATTENTION_KINDS:
            for name, proj in zip(("q", "v"), q_v(site.module, arch), strict=True):
                out.append((f"{site.key}-{name}", names[id(proj)], proj))
    return out


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
        for key, _, proj in lora_targets(model.lm, model.arch):
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
