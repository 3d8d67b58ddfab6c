"""One injection and freezing mechanism for every PEFT method.

Sites: the sub-layer outputs an adapter-like module transforms, before the LM's own dropout and
residual add: encoder self-attention and FFN (2 per layer), decoder self-attention,
cross-attention and FFN (3 per layer): 60 sites for t5-base, 30 for bart-base. Modules attach
with forward hooks, so the language model's own state-dict keys never change (pretrained
weights load before or after injection) and the added weights live under `model.peft`.

Freezing is by module type (LayerNorm / T5LayerNorm), never by name matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vlds.config import PeftConfig
from vlds.peft.registry import method_class


@dataclass
class Site:
    key: str  # unique, usable as a ModuleDict key: "enc-0-self"
    module: nn.Module  # the sub-layer whose (first) output is transformed
    kind: str  # "enc_self" | "enc_ffn" | "dec_self" | "dec_cross" | "dec_ffn"
    layer: int


def sublayer_sites(lm: nn.Module, arch: str) -> list[Site]:
    sites = []
    if arch == "t5":
        for i, block in enumerate(lm.encoder.block):
            sites.append(Site(f"enc-{i}-self", block.layer[0].SelfAttention, "enc_self", i))
            sites.append(Site(f"enc-{i}-ffn", block.layer[1].DenseReluDense, "enc_ffn", i))
        for i, block in enumerate(lm.decoder.block):
            sites.append(Site(f"dec-{i}-self", block.layer[0].SelfAttention, "dec_self", i))
            sites.append(Site(f"dec-{i}-cross", block.layer[1].EncDecAttention, "dec_cross", i))
            sites.append(Site(f"dec-{i}-ffn", block.layer[2].DenseReluDense, "dec_ffn", i))
    else:  # bart: fc2 is the FFN's last op before dropout + residual
        enc, dec = lm.model.encoder, lm.model.decoder
        for i, layer in enumerate(enc.layers):
            sites.append(Site(f"enc-{i}-self", layer.self_attn, "enc_self", i))
            sites.append(Site(f"enc-{i}-ffn", layer.fc2, "enc_ffn", i))
        for i, layer in enumerate(dec.layers):
            sites.append(Site(f"dec-{i}-self", layer.self_attn, "dec_self", i))
            sites.append(Site(f"dec-{i}-cross", layer.encoder_attn, "dec_cross", i))
            sites.append(Site(f"dec-{i}-ffn", layer.fc2, "dec_ffn", i))
    return sites


def transform_output(module: nn.Module, fn) -> torch.utils.hooks.RemovableHandle:
    """Hook `module` so its output (or the first element of a tuple output) becomes fn(output)."""

    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + out[1:]
        return fn(out)

    return module.register_forward_hook(hook)


class TaskRouter:
    """Per-sample task ids for methods with per-task modules, set once per forward.

    Beam search repeats each sample num_beams times along the batch; `ids_for(rows)` expands the
    ids to match (samples stay contiguous: repeat_interleave). `single`: the batch's one task
    when the caller knows it on the host (the collator's batches are single-task: "task_id"),
    so `route` never reads the device tensor back (no host synchronisation per adapter site).
    """

    def __init__(self, tasks: list[str]):
        self.tasks = list(tasks)
        self.task_ids: torch.Tensor | None = None
        self.single: int | None = None

    def set(self, task_ids: torch.Tensor, single: int | None = None) -> None:
        if single is not None:
            bad = not 0 <= single < len(self.tasks)
        else:
            bad = bool(task_ids.numel()) and bool(
                (task_ids.min() < 0) | (task_ids.max() >= len(self.tasks))
            )
        if bad:
            got = single if single is not None else task_ids.max().item()
            raise ValueError(
                f"task id {got} has no modules: this model was built for "
                f"tasks {self.tasks}; rebuild it with the task in data.tasks"
            )
        self.task_ids, self.single = task_ids, single

    def route(self, h: torch.Tensor, fn) -> torch.Tensor:
        """fn(t, rows of task t) over h's rows (`per_task`); a known single task directly."""
        if self.single is not None:
            return fn(self.single, h)
        return per_task(h, self.ids_for(h.shape[0]), fn)

    def ids_for(self, rows: int) -> torch.Tensor:
        ids = self.task_ids
        if ids is None:
            raise RuntimeError(
                "no task ids routed: call the VL model with a batch holding task_ids"
            )
        if rows != ids.shape[0]:
            if rows % ids.shape[0]:
                raise RuntimeError(f"cannot route {ids.shape[0]} task ids to {rows} rows")
            ids = ids.repeat_interleave(rows // ids.shape[0])
        return ids


def per_task(h: torch.Tensor, ids: torch.Tensor, fn) -> torch.Tensor:
    """fn(t, rows of h whose task is t) for each task present, reassembled in order.

    A single-task batch (the training schedule's normal case) takes the whole tensor without
    gathering; a mixed batch is split by task and put back with index_copy (autograd-safe).
    """
    first = int(ids[0])
    if bool((ids == first).all()):
        return fn(first, h)
    out = None
    for t in ids.unique().tolist():
        idx = (ids == t).nonzero(as_tuple=True)[0]
        part = fn(t, h.index_select(0, idx))
        if out is None:
            out = part.new_zeros((h.shape[0],) + part.shape[1:])
        out = out.index_copy(0, idx, part)
    return out


def norm_types() -> tuple[type, ...]:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return (nn.LayerNorm, T5LayerNorm)


def apply_peft(model: nn.Module, cfg: PeftConfig, tasks: list[str]):
    """Freeze `model` (a VLModel), inject the configured method, unfreeze what it trains."""
    import vlds.kernels

    vlds.kernels.configure(self_check=cfg.fused_check)  # the adapters' kernel self-check
    method = method_class(cfg.method)(cfg, tasks)
    method.check(model.d_model, model.arch)
    model.requires_grad_(False)
    if method.per_task:
        model.router = TaskRouter(tasks)
    method.inject(model)  # new modules are created trainable
    model.visual_embed.requires_grad_(True)
    train_norms = method.train_layernorms if cfg.train_layernorms is None else cfg.train_layernorms
    if train_norms:
        for m in model.lm.modules():
            if isinstance(m, norm_types()):
                m.requires_grad_(True)
    model.peft_method = method
    return method


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions: count the full tensor


def count_parameters(model: nn.Module) -> dict:
    """Trainable and all parameters of the VL model (tied weights once, buffers not counted)."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    total = sum(_numel(p) for p in params)
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / total, 4)}


def summary_line(model: nn.Module, method: str) -> str:
    c = count_parameters(model)
    return (
        f"[{method}] trainable {c['trainable']:,} / all {c['total']:,} parameters "
        f"= {c['percent']:.2f}% updated"
    )


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the trainable tensors, by their names in the VL model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
