"""Full fine-tuning (the paper's baseline) and the two ablations that add no module.

- full_finetune: every weight of the language model trains (CLIP stays frozen);
- visual_only: only the visual embedding trains;
- visual_ln: the visual embedding and every LayerNorm of the language model train.
"""

from __future__ import annotations

import torch.nn as nn

from vlds.peft.registry import Method, register


@register("full_finetune")
class FullFineTune(Method):
    def inject(self, model: nn.Module) -> None:
        model.lm.requires_grad_(True)


@register("visual_only")
class VisualOnly(Method):
    train_layernorms = False

    def inject(self, model: nn.Module) -> None:
        pass


@register("visual_ln")
class VisualAndLayerNorms(VisualOnly):
    train_layernorms = True
