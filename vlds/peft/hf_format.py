"""LoRA in Hugging Face PEFT's format: exported next to vlds' own adapter, imported by init_from.

Why: users of the Hugging Face stack load LoRA with `peft.PeftModel.from_pretrained(base, dir)`.
vlds' own export names tensors by the VL model and also holds the visual embedding, which PEFT
has no place for; this one holds the language model's part only, with PEFT's names. It is
written with safetensors + json: exporting never needs `peft` installed.

    adapter/peft/                 single_lora: one PEFT adapter
    adapter/peft/<task>/          multiple_lora: one per task (PEFT's own save_pretrained layout
                                  for adapters not named "default")

Each folder: adapter_model.safetensors + adapter_config.json (peft_type LORA, r, lora_alpha,
lora_dropout, target_modules, bias, task_type SEQ_2_SEQ_LM, base_model_name_or_path = model.lm).
Keys: vlds `peft.<site>-<q|v>.A.weight` (multiple_lora: `peft.<site>-<q|v>.loras.<t>.A.weight`)
<-> `base_model.model.<the projection's path in the LM>.lora_A.weight` (B <-> lora_B), e.g.
`base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight` (T5) and
`base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight` (BART). The LM's
biases (`peft.lora_train_biases`; BART has them, T5 none) travel as `bias: "all"`: `lm.<n>.bias`
<-> `base_model.model.<n>.bias`, where PEFT keeps an adapted projection's bias under its wrapped
layer (`...q_proj.base_layer.bias`; the older `...q_proj.bias` is read too). The biases are
shared by every task, so each task's folder carries them and loads on its own (PEFT holds at
most one adapter with biases per model; docs/peft.md shows how to hold every task in one).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from vlds.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError
from vlds.peft.lora import TARGET_MODULES, lora_targets

log = logging.getLogger("vlds")

PEFT_DIR = "peft"  # the export's folder inside vlds' adapter folder
PEFT_FORMAT = "peft-lora"  # read_peft's metadata["format"]
LORA_METHODS = ("single_lora", "multiple_lora")
PREFIX = "base_model.model."
# PEFT options with no counterpart in vlds' LoRA (refused on import unless off / empty)
UNSUPPORTED = (
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "modules_to_save",
)


def _method(model):
    method = getattr(model, "peft_method", None)
    return method if getattr(method, "name", None) in LORA_METHODS else None


def _lora_keys(model) -> dict[str, tuple[str, str]]:
    """{PEFT key: (vlds module key, "A" | "B")} of every LoRA matrix of the model."""
    targets = lora_targets(model.lm, model.arch)
    return {f"{PREFIX}{path}.lora_{m}.weight": (key, m) for key, path, _ in targets for m in "AB"}


def _vlds_name(key: str, task: int | None, m: str) -> str:
    """The VL-model name of a LoRA matrix: one shared (single_lora) or one task's."""
    return f"peft.{key}." + (f"loras.{task}." if task is not None else "") + f"{m}.weight"


def peft_config(pcfg, arch: str, base: str, biases: bool) -> dict:
    """PEFT's adapter_config.json for vlds' LoRA; only long-standing fields, so older PEFT
    versions read it too (the rest take PEFT's defaults, which are vlds' behaviour)."""
    alpha = float(pcfg.lora_alpha)
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": int(pcfg.lora_rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(pcfg.lora_dropout),
        "target_modules": list(TARGET_MODULES[arch]),
        "bias": "all" if biases else "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_adapters(model, tensors: dict[str, torch.Tensor], base: str) -> dict | None:
    """{sub-folder ("" = the export root): (adapter_config, PEFT tensors)} of a LoRA model, from
    `tensors` (its trainable tensors by VL-model name, as save_adapter gathers them); None for
    other methods, or when vlds trains an LM tensor PEFT's LoRA cannot hold (LayerNorm weights
    with peft.train_layernorms=true): then PEFT would load a different model."""
    method = _method(model)
    if method is None:
        return None
    lm = [n for n in tensors if n.startswith("lm.")]
    other = [n for n in lm if not n.endswith(".bias")]
    if other:
        log.warning(
            f"no PEFT-format export: this run also trains {_sample(other)} (LM tensors besides "
            f"LoRA and biases), which PEFT's LoRA cannot hold; see peft.train_layernorms"
        )
        return None
    adapted = {path for _, path, _ in lora_targets(model.lm, model.arch)}
    biases = {}
    for n in lm:
        name = n[len("lm.") :]
        module = name.rsplit(".", 1)[0]
        biases[PREFIX + (f"{module}.base_layer.bias" if module in adapted else name)] = tensors[n]
    config = peft_config(method.cfg, model.arch, base, bool(biases))
    slots = list(enumerate(method.tasks)) if method.per_task else [(None, "")]
    out = {}
    for t, sub in slots:
        sd = dict(biases)
        for pkey, (key, m) in _lora_keys(model).items():
            sd[pkey] = tensors[_vlds_name(key, t, m)]
        out[sub] = (config, sd)
    return out


def write_peft(model, tensors: dict[str, torch.Tensor], cfg_dict: dict, out: Path) -> Path | None:
    """Write the PEFT-format export into out/peft (LoRA methods only; rank 0 calls it)."""
    from safetensors.torch import save_file

    adapters = export_adapters(model, tensors, cfg_dict["model"]["lm"])
    if adapters is None:
        return None
    root = Path(out) / PEFT_DIR
    if root.exists():  # never mix with the folders of an earlier export
        shutil.rmtree(root)
    for sub, (config, sd) in adapters.items():
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return root


# ---- import: --train.init_from=DIR where DIR is a PEFT LoRA export ---------------------------


def _peft_config_in(d: Path) -> dict | None:
    f = d / ADAPTER_CONFIG
    if not f.is_file():
        return None
    config = json.loads(f.read_text())
    return config if isinstance(config, dict) and "peft_type" in config else None


def read_peft(path: Path):
    """(metadata, tensors "<adapter>/<key>", path) of a PEFT export at `path`: one adapter in
    it ("default") or one per sub-folder (named by the folder); None when it is none."""
    from safetensors.torch import load_file

    path = Path(path)
    root = _peft_config_in(path)
    if root is None and (path / ADAPTER_CONFIG).is_file():
        return None  # vlds' own export
    subs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    dirs = {"default": path} if root else {}
    dirs |= {p.name: p for p in subs if _peft_config_in(p)}
    if not dirs:
        return None
    adapters, tensors = {}, {}
    for name, d in dirs.items():
        config = _peft_config_in(d)
        if config["peft_type"] != "LORA":
            raise CheckpointError(
                f"{d} is a PEFT {config['peft_type']} adapter; vlds imports LoRA (peft_type "
                f"LORA) only: train a LoRA adapter, or start without --train.init_from"
            )
        if not (d / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"no {ADAPTER_WEIGHTS} in {d}; vlds reads safetensors only")
        adapters[name] = {"dir": str(d), "config": config}
        tensors.update({f"{name}/{k}": v for k, v in load_file(str(d / ADAPTER_WEIGHTS)).items()})
    return {"format": PEFT_FORMAT, "method": "peft LoRA", "adapters": adapters}, tensors, path


def _choose(model, adapters: dict, path: Path) -> list[tuple[int | None, str]]:
    """[(task index or None, adapter name)] to load, by the run's method."""
    method, names = _method(model), sorted(adapters)
    if method is None:
        raise CheckpointError(
            f"{path} is a PEFT LoRA export, but this run's peft.method="
            f"{getattr(model.peft_method, 'name', '?')}; set --peft.method=single_lora (one "
            f"adapter) or multiple_lora (one adapter per task, {path}/<task>/)"
        )
    if not method.per_task:
        if "default" in adapters or len(adapters) == 1:
            return [(None, "default" if "default" in adapters else names[0])]
        raise CheckpointError(
            f"{path} holds {len(names)} PEFT adapters {names}; single_lora takes one: pass "
            f"--train.init_from={path}/<name>, or set --peft.method=multiple_lora"
        )
    missing = [t for t in method.tasks if t not in adapters]
    if missing:
        raise CheckpointError(
            f"multiple_lora needs one PEFT adapter per task, {path}/<task>/, for tasks "
            f"{method.tasks}; missing {missing} (found {names}): export one per task, or set "
            f"--peft.method=single_lora to start from a single adapter"
        )
    unused = sorted(set(names) - set(method.tasks))
    if unused:
        log.warning("init_from %s: adapters %s match no task of this run, not loaded", path, unused)
    return list(enumerate(method.tasks))


def _check_config(model, config: dict, d: str) -> None:
    pcfg, arch = model.peft_method.cfg, model.arch
    want, targets = list(TARGET_MODULES[arch]), config.get("target_modules")
    base = config.get("base_model_name_or_path")
    if isinstance(targets, list) and sorted(targets) != sorted(want):
        other = [a for a, t in TARGET_MODULES.items() if sorted(t) == sorted(targets)]
        if other:
            raise CheckpointError(
                f"{d}: target_modules {targets} are {other[0]}'s attention projections, but this "
                f"run is model.arch={arch}; set --model.arch={other[0]} and --model.lm to the "
                f"adapter's base model ({base})"
            )
        raise CheckpointError(
            f"{d}: target_modules {targets}; vlds' LoRA adapts exactly {want} of every "
            f"attention: train the PEFT adapter with target_modules={want}"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if r != pcfg.lora_rank:
        raise CheckpointError(
            f"{d}: rank r={r}, but this run has peft.lora_rank={pcfg.lora_rank}; set "
            f"--peft.lora_rank={r}"
        )
    if alpha is None or float(alpha) != float(pcfg.lora_alpha):
        raise CheckpointError(
            f"{d}: lora_alpha={alpha}, but this run has peft.lora_alpha={pcfg.lora_alpha} (the "
            f"update is scaled by alpha / r); set --peft.lora_alpha={alpha}"
        )
    for option in UNSUPPORTED:
        if config.get(option) not in (None, False, [], {}):
            raise CheckpointError(
                f"{d}: {option}={config[option]!r} has no counterpart in vlds' LoRA; export "
                f"the adapter without it"
            )


def _lm_name(key: str) -> str | None:
    """The LM tensor a PEFT bias key names (`...q_proj.base_layer.bias` -> `...q_proj.bias`)."""
    if not key.startswith(PREFIX):
        return None
    return key[len(PREFIX) :].replace(".base_layer.bias", ".bias")


def _sample(names) -> str:
    names = sorted(names)
    return f"{names[:3]}{'...' if len(names) > 3 else ''} ({len(names)})"


def load_peft(model, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Initialise the LoRA modules (and the LM's biases, when the export has them) of a vlds
    LoRA model from a PEFT export; every mismatch raises CheckpointError before anything is
    copied."""
    chosen = _choose(model, meta["adapters"], path)
    lora_keys = _lora_keys(model)
    lm_tensors = dict(model.lm.named_parameters()) | dict(model.lm.named_buffers())
    copies, biases = [], {}
    for t, name in chosen:
        d = meta["adapters"][name]["dir"]
        _check_config(model, meta["adapters"][name]["config"], d)
        sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + "/")}
        found = {k for k in sd if ".lora_" in k}
        missing, extra = set(lora_keys) - found, found - set(lora_keys)
        if missing:
            raise CheckpointError(
                f"{d}: missing LoRA tensors {_sample(missing)} of this model: the adapter was "
                f"trained on another base (layers or naming differ); build the run on its base "
                f"model ({meta['adapters'][name]['config'].get('base_model_name_or_path')})"
            )
        rest = {k: _lm_name(k) for k in sd if k not in found}
        extra |= {k for k, n in rest.items() if "bias" not in k or n not in lm_tensors}
        if extra:
            raise CheckpointError(
                f"{d}: unexpected tensors {_sample(extra)}; vlds imports the LoRA matrices of "
                f"{list(TARGET_MODULES[model.arch])} and the language model's biases only"
            )
        for k, v in sd.items():
            if k in found:
                key, m = lora_keys[k]
                copies.append((k, model.get_parameter(_vlds_name(key, t, m)), v, d))
            elif rest[k] in biases and not torch.equal(biases[rest[k]][0], v):
                raise CheckpointError(
                    f"{d}: {k} differs between the task adapters; vlds shares the language "
                    f"model's biases across tasks: export the adapters with bias='none' or equal "
                    f"biases"
                )
            else:
                biases[rest[k]] = (v, d)
    copies += [(n, lm_tensors[n], v, d) for n, (v, d) in biases.items()]
    for k, target, v, d in copies:
        if tuple(v.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{d}: {k} has shape {tuple(v.shape)}, this model {tuple(target.shape)}; build "
                f"the run with the adapter's base model and sizes"
            )
    frozen = []
    with torch.no_grad():
        for k, target, v, _ in copies:
            if not target.requires_grad and not torch.equal(target, v.to(target.dtype)):
                frozen.append(k)
            target.copy_(v.to(target.dtype))
    if frozen:
        log.warning(
            f"init_from {path}: {_sample(frozen)} loaded, but frozen in this run "
            f"(peft.lora_train_biases=false?)"
        )
