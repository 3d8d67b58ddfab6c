"""The PEFT method registry: one file per method registers a `Method` subclass by name."""

from __future__ import annotations

import torch.nn as nn

from vlds.config import PeftConfig

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
    supported_archs = ("t5", "bart")

    def __init__(self, cfg: PeftConfig, tasks: list[str]):
        self.cfg = cfg
        self.tasks = list(tasks)

    def inject(self, model: nn.Module) -> None:
        raise NotImplementedError
