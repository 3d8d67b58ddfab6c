"""Checkpoints: DeepSpeed state without frozen weights, plus an adapter-only export.

    {out_dir}/checkpoints/latest                     DeepSpeed's pointer to the newest tag
    {out_dir}/checkpoints/step{N}/                   DeepSpeed engine/optimizer state (trainable
                                                     parameters only) + trainer_state.json
    {out_dir}/checkpoints/step{N}/adapter/           adapter_model.safetensors + adapter_config.json

The adapter export holds exactly the trainable tensors (PEFT modules, visual embedding, the
LayerNorms the method trains) and the resolved config, so it loads onto a freshly built
backbone with `load_adapter`. Tensors are gathered whole under ZeRO-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _gathered_trainable(model) -> dict[str, torch.Tensor]:
    """Full copies of the trainable tensors (ZeRO-3 partitions gathered), on CPU."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def save_adapter(model, cfg_dict: dict, out: Path, is_main: bool) -> None:
    """Write the adapter-only export (every rank must call: ZeRO-3 gathering is collective)."""
    from safetensors.torch import save_file

    tensors = _gathered_trainable(model)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS))
        meta = {
            "method": cfg_dict["peft"]["method"],
            "config": cfg_dict,
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
        }
        (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_adapter(model, path: str | Path) -> dict:
    """Load an adapter export into a model built with the same config; returns its metadata.

    Every tensor the model trains must be in the file and vice versa: a checkpoint of another
    method, task set or size fails with the names that differ.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}; pass a checkpoint folder")
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(
            f"adapter at {path} (method {meta.get('method')}) does not fit this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)}); build the "
            f"model with the config stored in {path / ADAPTER_CONFIG}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise ValueError(
                    f"{n}: shape {tuple(tensors[n].shape)} in {path}, {tuple(p.shape)} in the model"
                )
            p.copy_(tensors[n].to(p.dtype))
    return meta


def save_checkpoint(
    engine, ckpt_dir: Path, tag: str, state: dict, cfg_dict: dict, is_main: bool, keep_last: int
) -> Path:
    """DeepSpeed state (frozen parameters excluded) + adapter export + trainer state."""
    # DeepSpeed's exclude_frozen_parameters drops frozen names from named_parameters(), which
    # lists a tied tensor once: the aliases (T5/BART embed_tokens, lm_head) would still be saved,
    # three copies of the frozen vocabulary matrix. Drop every alias of a frozen tensor.
    frozen = {
        n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad
    }
    full_state_dict = engine.module_state_dict

    def trainable_state_dict(*args, **kwargs):
        sd = full_state_dict(*args, **kwargs)
        return type(sd)((k, v) for k, v in sd.items() if k not in frozen)

    engine.module_state_dict = trainable_state_dict
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=state, exclude_frozen_parameters=True
        )
    finally:
        del engine.module_state_dict  # back to the class's method
    save_adapter(engine.module, cfg_dict, ckpt_dir / tag / "adapter", is_main)
    if is_main:
        (ckpt_dir / tag / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        tags = sorted(
            (p for p in ckpt_dir.glob("step*") if p.is_dir()),
            key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1,
        )
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def resolve_resume(resume: str, out_dir: Path) -> tuple[Path, str] | None:
    """`latest` -> the newest checkpoint of this run (None when there is none yet); a folder
    -> that checkpoint. Returns (checkpoint root, tag)."""
    if not resume:
        return None
    if resume == "latest":
        root = out_dir / "checkpoints"
        latest = root / "latest"
        if not latest.is_file():
            return None
        return root, latest.read_text().strip()
    p = Path(resume)
    if not p.is_dir():
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a checkpoint folder; use 'latest' or a "
            f"{out_dir}/checkpoints/step<N> folder"
        )
    return p.parent, p.name
