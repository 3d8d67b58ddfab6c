"""The PEFT method registry: one file per method family registers `Method` subclasses by name."""

from __future__ import annotations

import torch.nn as nn

from vlds.config import ConfigError, PeftConfig, config_check

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
    uses_bottleneck = False  # True: modules of width d_model / peft.reduction_factor
    train_layernorms = True  # the paper trains LayerNorms with adapters, not with LoRA/prompts
    per_task = False  # True: modules per task, samples routed by their task id

    def __init__(self, cfg: PeftConfig, tasks: list[str]):
        self.cfg = cfg
        self.tasks = list(tasks)

    def check(self, d_model: int, arch: str) -> None:
        """Raise ConfigError when the method cannot be built on this backbone."""
        r = self.cfg.reduction_factor
        if self.uses_bottleneck and (r < 1 or d_model % r):
            divisors = [k for k in (1, 2, 4, 8, 16, 32, 64) if d_model % k == 0]
            raise ConfigError(
                f"peft.reduction_factor={r} does not divide d_model={d_model} (the bottleneck "
                f"of {self.name} is d_model / r); choose one of {divisors}"
            )

    def bottleneck(self, d_model: int) -> int:
        return d_model // self.cfg.reduction_factor

    def inject(self, model: nn.Module) -> None:
        raise NotImplementedError


@config_check
def check_method(cfg) -> None:
    """peft.method is registered and can be built on the configured backbone."""
    if cfg.peft.method not in METHODS:
        raise ConfigError(
            f"unknown PEFT method {cfg.peft.method!r}; valid methods: {', '.join(METHODS)}"
        )
    METHODS[cfg.peft.method](cfg.peft, cfg.task_list).check(cfg.model.d_model, cfg.model.arch)
