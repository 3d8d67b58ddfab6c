"""The PEFT method registry: one file per method family registers `Method` subclasses by name,
and `method_class` also builds compositions, a method plus prompt tuning in one run
(`peft.method=single_adapter+multiple_prompts`: vlds.config.split_method), as the paper's
analysis of adapters with task-specific prompts trains them."""

from __future__ import annotations

import torch.nn as nn

from vlds.config import ConfigError, PeftConfig, config_check, split_method

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


class Composite(Method):
    """A method and prompt tuning together (`parts`: its two Method instances). Both inject
    their modules (disjoint keys under `model.peft`; the prompts also add an input transform);
    samples are routed when either part keeps modules per task; LayerNorms train when either
    part trains them (an adapter's do, a prompt's do not: the reference sets
    --unfreeze_layer_norms with --use_adapter, and the flags combine)."""

    part_names: tuple[str, str] = ("", "")

    def __init__(self, cfg: PeftConfig, tasks: list[str]):
        super().__init__(cfg, tasks)
        self.parts = [METHODS[n](cfg, tasks) for n in self.part_names]
        self.uses_bottleneck = any(p.uses_bottleneck for p in self.parts)
        self.train_layernorms = any(p.train_layernorms for p in self.parts)
        self.per_task = any(p.per_task for p in self.parts)

    def check(self, d_model: int, arch: str) -> None:
        for part in self.parts:
            part.check(d_model, arch)

    def inject(self, model: nn.Module) -> None:
        for part in self.parts:
            before = dict(model.peft.items())
            part.inject(model)
            replaced = [k for k, m in before.items() if model.peft[k] is not m]
            if replaced:  # a method written later that reuses another's keys
                raise RuntimeError(f"{self.name}: {part.name} replaced the modules {replaced}")


def method_class(name: str) -> type[Method]:
    """The Method class of a peft.method value: a registered method, or METHOD+PROMPTS built
    as a `Composite`. Raises ConfigError naming the valid values."""
    base, prompts = split_method(name)
    for part in (base, prompts):
        if part is not None and part not in METHODS:
            where = f" in peft.method={name!r}" if prompts else ""
            raise ConfigError(
                f"unknown PEFT method {part!r}{where}; valid methods: {', '.join(METHODS)}, "
                f"or METHOD+PROMPTS (e.g. single_adapter+multiple_prompts)"
            )
    if prompts is None:
        return METHODS[base]
    return type(f"Composite[{name}]", (Composite,), {"name": name, "part_names": (base, prompts)})


@config_check
def check_method(cfg) -> None:
    """peft.method is registered (or a method plus prompts) and can be built on the configured
    backbone."""
    method_class(cfg.peft.method)(cfg.peft, cfg.task_list).check(cfg.model.d_model, cfg.model.arch)
