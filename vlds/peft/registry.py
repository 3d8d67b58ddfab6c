"""The PEFT method registry: one file per method family registers `Method` subclasses by name."""

from __future__ import annotations

import torch.nn as nn

from vlds.config import ConfigError, PeftConfig

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls):
        if name in METHODS:
            raise ValueError(f"PEFT method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


class Method:
    """A PEFT method: adds its modules to `model.peft` and says which base weights train.

    Subclasses implement `inject`; the shared mechanism in vlds.peft.inject freezes the model
    first, then unfreezes the visual embedding, the method's modules and, when the method (or
    `peft.train_layernorms`) says so, every LayerNorm of the language model.
    """

    name = "?"
    train_layernorms = True  # the paper trains LayerNorms with adapters, not with LoRA/prompts
    per_task = False  # True: modules per task, samples routed by their task id

    def __init__(self, cfg: PeftConfig, tasks: list[str]):
        self.cfg = cfg
        self.tasks = list(tasks)

    def check(self, d_model: int, arch: str) -> None:
        """Raise ConfigError when the method cannot be built on this backbone."""
        bottleneck_methods = ("adapter", "compacter", "hyperformer")
        if any(k in self.name for k in bottleneck_methods) and (
            self.cfg.reduction_factor < 1 or d_model % self.cfg.reduction_factor
        ):
            raise ConfigError(
                f"peft.reduction_factor={self.cfg.reduction_factor} does not divide "
                f"d_model={d_model}; {self.name} needs an integer bottleneck"
            )

    def bottleneck(self, d_model: int) -> int:
        return d_model // self.cfg.reduction_factor

    def inject(self, model: nn.Module) -> None:
        raise NotImplementedError
