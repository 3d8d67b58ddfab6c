"""Parameter-efficient fine-tuning methods: a registry, one file per method, one injector."""

# importing a method's file registers it
from vlds.peft import adapter, compacter, full, hyperformer, lora, prompt  # noqa: F401
from vlds.peft.inject import (
    apply_peft,
    count_parameters,
    summary_line,
    trainable_state_dict,
)
from vlds.peft.registry import METHODS, Method, register

__all__ = [
    "METHODS",
    "Method",
    "apply_peft",
    "count_parameters",
    "register",
    "summary_line",
    "trainable_state_dict",
]
