"""Prompt tuning (encoder only) as in VL-Adapter: 40 trainable vectors, reparameterised as
Linear(hidden -> d)(tanh(Linear(d -> hidden)(Embedding(40, d)))) with hidden = 800, prepended to
the encoder input. single_prompt shares one prompt across tasks, multiple_prompts has one per
task. The language model's LayerNorms stay frozen (paper). Init as the reference's InputPrompts
(prompt/prompt_modeling.py:13-18, plain layers): BART's init_weights re-draws the embedding and
both Linear weights from N(0, 0.02), biases zero; under T5 they keep PyTorch's default (the
embedding N(0, 1)) (VLModel.backbone_init).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlds.peft.registry import Method, register


class PromptEncoder(nn.Module):
    def __init__(self, length: int, d: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(length, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embed.weight)  # (L, d)


class Prompts(nn.Module):
    """Prepends each sample's prompt to the encoder input: (B, T, d) -> (B, L + T, d)."""

    def __init__(self, n: int, length: int, d: int, hidden: int, router=None):
        super().__init__()
        self.prompts = nn.ModuleList(PromptEncoder(length, d, hidden) for _ in range(n))
        self.router = router

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor):
        b = embeds.shape[0]
        if self.router is None:
            p = self.prompts[0]().unsqueeze(0).expand(b, -1, -1)  # (B, L, d)
        else:  # every task's prompt is computed (L x d each: cheap), each sample takes its own
            table = torch.stack([enc() for enc in self.prompts])  # (n_tasks, L, d)
            p = table[self.router.ids_for(b)]  # (B, L, d)
        p = p.to(embeds.dtype)
        ones = torch.ones(b, p.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat([p, embeds], dim=1), torch.cat([ones, mask], dim=1)


@register("single_prompt")
class SinglePrompt(Method):
    train_layernorms = False

    def inject(self, model: nn.Module) -> None:
        c = self.cfg
        n = len(self.tasks) if self.per_task else 1
        model.peft["prompt"] = model.backbone_init(
            Prompts(
                n,
                c.prompt_length,
                model.d_model,
                c.prompt_hidden,
                model.router if self.per_task else None,
            )
        )
        model.input_transforms.append(model.peft["prompt"])


@register("multiple_prompts")
class MultiplePrompts(SinglePrompt):
    per_task = True
