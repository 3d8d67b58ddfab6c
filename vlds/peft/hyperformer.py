"""Hyperformer (Karimi Mahabadi et al., 2021) as in VL-Adapter: a hypernetwork generates each
adapter's weights from a task embedding and a layer embedding.

    h = ReLU(Linear(task_dim + layer_dim -> hidden)([e_task; e_layer]))
    z = LayerNorm(Linear(hidden -> p)(h))
    W_down = Linear(p -> d*b)(z),  b_down = Linear(p -> b)(z),
    W_up   = Linear(p -> b*d)(z),  b_up   = Linear(p -> d)(z)

with one generator set per sub-layer type (self-attention, cross-attention, FFN). Encoder and
decoder each have their own hypernetwork, layer embeddings and generators; the task embeddings
are shared. With bart-base, r = 8, 4 tasks this updates 5.79 % of the parameters (paper).

Init as the reference's (adapters/adapter_utils.py:16-26, adapter_hypernetwork.py:62-72): every
Linear of the hypernetwork and the generators N(0, 0.01) with zero biases, the LayerNorm's eps
1e-6; under BART its init_weights then re-draws those Linear weights and the layer embeddings
from N(0, 0.02) (VLModel.backbone_init). The task embeddings are N(0, 1) under both (the
reference's TaskEmbeddingController: torch.randn parameters that no init_weights touches).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlds.kernels import adapter_forward, check_mode
from vlds.peft.inject import sublayer_sites, transform_output
from vlds.peft.registry import Method, register


def _small(lin: nn.Linear) -> nn.Linear:
    # The reference's linear_layer: N(0, 0.01) weights, zero biases
    nn.init.normal_(lin.weight, std=1e-2)
    nn.init.zeros_(lin.bias)
    return lin


def _bias_generator(lin: nn.Linear) -> nn.Linear:
    # named "bias_generator" in the reference, so its weight decay (by name) skips both tensors
    lin.reference_param_names = {"weight": "bias_generator.weight", "bias": "bias_generator.bias"}
    return _small(lin)


class Generators(nn.Module):
    """p -> the four tensors of one adapter."""

    def __init__(self, p: int, d: int, b: int):
        super().__init__()
        self.d, self.b = d, b
        self.down_w = _small(nn.Linear(p, d * b))
        self.down_b = _bias_generator(nn.Linear(p, b))
        self.up_w = _small(nn.Linear(p, b * d))
        self.up_b = _bias_generator(nn.Linear(p, d))

    def forward(self, z: torch.Tensor):
        d, b = self.d, self.b
        return (
            self.down_w(z).view(b, d),
            self.down_b(z).view(b),
            self.up_w(z).view(d, b),
            self.up_b(z).view(d),
        )


class HyperNet(nn.Module):
    """One side's (encoder or decoder) layer embeddings, hypernetwork and generators."""

    def __init__(self, cfg, n_layers: int, kinds: list[str], d: int, b: int):
        super().__init__()
        self.layer_embed = nn.Embedding(n_layers, cfg.hyper_layer_dim)
        norm = nn.LayerNorm(cfg.hyper_proj, eps=1e-6)
        # named "LayerNorm" in the reference: its weight decay (by name) skips the gain too
        norm.reference_param_names = {"weight": "LayerNorm.weight"}
        self.net = nn.Sequential(
            _small(nn.Linear(cfg.hyper_task_dim + cfg.hyper_layer_dim, cfg.hyper_hidden)),
            nn.ReLU(),
            _small(nn.Linear(cfg.hyper_hidden, cfg.hyper_proj)),
            norm,
        )
        self.generators = nn.ModuleDict({k: Generators(cfg.hyper_proj, d, b) for k in kinds})

    def forward(self, task_vec: torch.Tensor, layer: int, kind: str):
        layer_vec = self.layer_embed(torch.tensor([layer], device=task_vec.device))  # (1, L)
        z = self.net(torch.cat([task_vec, layer_vec], dim=-1))  # (1, p)
        return self.generators[kind](z[0])


class HyperSite(nn.Module):
    """Applies the generated adapter of (task, layer, kind) at one site. Holds no parameters:
    the shared modules are referenced, not registered, so they are saved once."""

    def __init__(
        self,
        hyper: HyperNet,
        task_embed: nn.Embedding,
        router,
        layer: int,
        kind: str,
        fused_kernel: str = "auto",
    ):
        super().__init__()
        check_mode(fused_kernel)
        object.__setattr__(self, "_refs", (hyper, task_embed, router))
        self.layer, self.kind, self.fused_kernel = layer, kind, fused_kernel

    def _one(self, t: int, h: torch.Tensor) -> torch.Tensor:
        hyper, task_embed, _ = self._refs
        task_vec = task_embed(torch.tensor([t], device=h.device))  # (1, task_dim)
        wd, bd, wu, bu = hyper(task_vec, self.layer, self.kind)  # (b, d), (b,), (d, b), (d,)
        # cast to h's dtype inside (both paths); h (B, T, d) -> (B, T, d)
        return adapter_forward(h, wd, bd, wu, bu, mode=self.fused_kernel)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._refs[2].route(h, self._one)


@register("hyperformer")
class Hyperformer(Method):
    per_task = True
    uses_bottleneck = True

    def inject(self, model: nn.Module) -> None:
        d, b = model.d_model, self.bottleneck(model.d_model)
        sites = sublayer_sites(model.lm, model.arch)
        model.peft["task_embed"] = nn.Embedding(len(self.tasks), self.cfg.hyper_task_dim)
        for side in ("enc", "dec"):
            mine = [s for s in sites if s.key.startswith(side)]
            kinds = sorted({s.kind for s in mine})
            n_layers = max(s.layer for s in mine) + 1
            model.peft[f"hyper_{side}"] = model.backbone_init(
                HyperNet(self.cfg, n_layers, kinds, d, b)
            )
            for s in mine:
                model.peft[s.key] = HyperSite(
                    model.peft[f"hyper_{side}"],
                    model.peft["task_embed"],
                    model.router,
                    s.layer,
                    s.kind,
                    self.cfg.fused_kernel,
                )
                transform_output(s.module, model.peft[s.key])
