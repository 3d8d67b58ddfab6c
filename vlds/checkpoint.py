"""Checkpoints: DeepSpeed state without frozen weights, plus an adapter-only export.

    {out_dir}/checkpoints/latest                     DeepSpeed's pointer to the newest tag
    {out_dir}/checkpoints/step{N}/                   DeepSpeed engine/optimizer state (trainable
                                                     parameters only) + trainer_state.json
    {out_dir}/checkpoints/step{N}/adapter/           adapter_model.safetensors + adapter_config.json
    {out_dir}/checkpoints/step{N}/adapter/peft/      LoRA methods: the same LoRA in Hugging Face
                                                     PEFT's format (vlds.peft.hf_format)

The adapter export holds exactly the trainable tensors (PEFT modules, visual embedding, the
LayerNorms the method trains) and the resolved config, so it loads onto a freshly built
backbone with `load_adapter`. Tensors are gathered whole under ZeRO-3. `load_adapter` also
takes a PEFT LoRA export (its adapter_config.json has `peft_type`), for `--train.init_from`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from vlds import faults
from vlds.config import keys_with_role

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
    """Write the adapter-only export (every rank must call: ZeRO-3 gathering is collective);
    for LoRA methods also out/peft/, the LoRA in PEFT's format, from the same gathered tensors.
    Returns once the export is complete on disk, on every rank (a rank may read it next)."""
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
        from vlds.peft.hf_format import write_peft

        write_peft(model, tensors, cfg_dict, out)
    if dist.is_initialized():
        dist.barrier()


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(metadata, tensors, folder) of an adapter export (a run, checkpoint or adapter folder),
    or of a PEFT LoRA export (metadata["format"] == "peft-lora"; see vlds.peft.hf_format)."""
    from safetensors.torch import load_file

    from vlds.peft.hf_format import read_peft

    path = Path(path)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    peft = read_peft(path)
    if peft is not None:
        return peft
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"no {ADAPTER_WEIGHTS} in {path}; pass a checkpoint folder or a PEFT LoRA export"
        )
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    return meta, load_file(str(path / ADAPTER_WEIGHTS)), path


def load_adapter(model, path: str | Path, loaded=None) -> dict:
    """Load an adapter export into a model built with the same config; returns its metadata.

    Every tensor the model trains must be in the file and vice versa: a checkpoint of another
    method, task set or size fails with the names that differ. `loaded` = a `read_adapter`
    result read earlier (train.py reads before it may move the run folder aside). A PEFT LoRA
    export initialises the LoRA modules (and biases) only; see vlds.peft.hf_format.load_peft.
    """
    meta, tensors, path = loaded or read_adapter(path)
    if meta.get("format") == "peft-lora":
        from vlds.peft.hf_format import load_peft

        load_peft(model, meta, tensors, path)
        return meta
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"adapter at {path} (method {meta.get('method')}) does not fit this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)}); build the "
            f"model with the config stored in {path / ADAPTER_CONFIG}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{n}: shape {tuple(tensors[n].shape)} in {path}, {tuple(p.shape)} in the model"
                )
            p.copy_(tensors[n].to(p.dtype))
    return meta


def rng_state() -> dict:
    """The RNGs a training step draws from (dropout); the data order is seeded separately.
    Plain tensors and ints only, so the checkpoint passes the weights-only check."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def owner_rank(name: str) -> int:
    """The rank that writes (and verifies) a checkpoint file: DeepSpeed's per-rank partitions
    (zero_pp_rank_<r>_...) and rng_rank<r>.pt are rank r's; every other file is rank 0's."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m else 0


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_owned(folder: Path, rank: int) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and owner_rank(f.name) == rank:
            _fsync(f)


def latest_tag(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / "latest"
    return p.read_text().strip() if p.is_file() else None


def _write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a temp file beside it, fsync, rename,
    fsync of the folder (a crash leaves the old or the new contents, never a mix or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _point_latest(ckpt_dir: Path, tag: str) -> None:
    """`latest` := tag, atomically and durably."""
    _write_durably(ckpt_dir / "latest", tag)


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    tag: str,
    state: dict,
    cfg_dict: dict,
    is_main: bool,
    keep_last: int,
    rank_state: dict | None = None,
) -> Path:
    """Atomically and durably write DeepSpeed state (frozen parameters excluded) + adapter
    export + trainer state as {ckpt_dir}/{tag}, then point `latest` at it. `rank_state`: this
    rank's own entries (plain types: its stream cursors), saved with its RNG state in
    rng_rank<r>.pt.

    Everything is written into `.tmp-{tag}`; each rank fsyncs the files it wrote (`owner_rank`),
    and after every rank has, rank 0 fsyncs the rest and the folders, renames it into place and
    only then rewrites `latest` (temp file + fsync + rename + fsync of the folder). A crash at
    any point leaves a complete checkpoint behind `latest`: the previous one, or the new one.
    Nothing `latest` names is ever removed: saving a step that already has a folder (a run
    resumed from an earlier checkpoint reaching it again) first points `latest` at the complete
    `.tmp-{tag}`, then replaces the folder; stale `.tmp-*` folders are removed by the next save
    unless `latest` names one. (Assumes the checkpoint folder is on a filesystem every rank
    shares, as DeepSpeed does.)
    """
    tmp_tag = f".tmp-{tag}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_main:
        keep = latest_tag(ckpt_dir)
        for stale in ckpt_dir.glob(".tmp-*"):
            if stale.name != keep:
                shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    # DeepSpeed's exclude_frozen_parameters drops frozen names from named_parameters(), which
    # lists a tied tensor once: the aliases (T5/BART embed_tokens, lm_head) would still be saved,
    # three copies of the frozen vocabulary matrix. Drop every alias of a frozen tensor.
    frozen = frozen_names(engine.module)
    full_state_dict = engine.module_state_dict

    def trainable_state_dict(*args, **kwargs):
        sd = full_state_dict(*args, **kwargs)
        return type(sd)((k, v) for k, v in sd.items() if k not in frozen)

    engine.module_state_dict = trainable_state_dict
    try:
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tmp_tag,
            client_state=state,
            exclude_frozen_parameters=True,
            save_latest=False,
        )
    finally:
        del engine.module_state_dict  # back to the class's method
    tmp = ckpt_dir / tmp_tag
    # each rank's dropout RNG, so a resumed run draws the same masks (exact resume)
    torch.save({**rng_state(), **(rank_state or {})}, tmp / f"rng_rank{rank}.pt")
    faults.maybe_sleep("save", 3.0)  # tests: a signal that lands during a save
    _fsync_owned(tmp, rank)
    # save_adapter ends with a barrier: every rank's shards and RNG state are on disk after it
    save_adapter(engine.module, cfg_dict, tmp / "adapter", is_main)
    final = ckpt_dir / tag
    if is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(_jsonable(state), indent=2) + "\n")
        _fsync_owned(tmp, 0)
        for folder in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            _fsync(folder)
        faults.maybe_kill("save")  # tests: a crash after writing, before publishing
        if final.exists():  # the same step saved again: `latest` never names a removed folder
            if latest_tag(ckpt_dir) == tag:
                _point_latest(ckpt_dir, tmp_tag)
            shutil.rmtree(final)
            faults.maybe_kill("replace")  # tests: a crash while the step is being replaced
        os.rename(tmp, final)
        _fsync(ckpt_dir)
        _point_latest(ckpt_dir, tag)
        others = sorted(  # keep_last counts the one just published, whatever its step
            (p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name != tag),
            key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1,
        )
        kept = len(others) if keep_last <= 0 else keep_last - 1
        for old in others[: len(others) - kept]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def mark_eval_pending(path: Path) -> None:
    """Record in a published checkpoint's trainer_state.json that its step's evaluation was
    cut short by a preemption (the resumed run evaluates it first); atomic and durable."""
    f = path / "trainer_state.json"
    state = json.loads(f.read_text())
    _write_durably(f, json.dumps({**state, "eval_pending": True}, indent=2) + "\n")


def checkpoint_bytes(path: Path) -> int:
    return _dir_bytes(path)


def _jsonable(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "rng"}


# DeepSpeed pickles a few plain-data classes into its state files; these (and only these) are
# allowed when a checkpoint is checked with torch's weights-only unpickler.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint(path: Path, rank: int | None = None) -> None:
    """Refuse a checkpoint any of whose pickled files needs more than tensors and plain data.

    DeepSpeed loads its state with torch.load(weights_only=False); before it does, every .pt
    file must pass torch's weights-only unpickler (with DeepSpeed's plain-data classes
    allow-listed), which refuses arbitrary code. Adapter exports are safetensors. `rank`: only
    the files that rank wrote (`owner_rank`; each rank checks its own, `verify_everywhere`).
    """
    every = sorted(Path(path).glob("*.pt"))
    if not every:
        raise CheckpointError(f"{path} holds no DeepSpeed state files (*.pt); is it a checkpoint?")
    files = [f for f in every if rank is None or owner_rank(f.name) == rank]
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # an unsafe or corrupt file: never hand it to DeepSpeed
                raise CheckpointError(
                    f"{f} is not a plain tensor checkpoint ({str(e).splitlines()[0][:200]}); "
                    f"refusing to load it. Resume from another checkpoint or start fresh."
                ) from None


def verify_everywhere(path: Path) -> None:
    """`verify_checkpoint` split across the ranks (each reads only its own files, not the
    world's), with the verdict agreed: every rank raises the first refusal's message."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify_checkpoint(path)
    try:
        verify_checkpoint(path, dist.get_rank())
        mine = None
    except CheckpointError as e:
        mine = str(e)
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, mine)
    refused = [v for v in verdicts if v]
    if refused:
        raise CheckpointError(refused[0])


def check_loaded_keys(saved: list[str], model, path) -> None:
    """The module state a checkpoint holds is exactly the trainable set of this model (the
    frozen weights are never saved); anything else fails with the names that differ."""
    want = trainable_state_keys(model)
    missing, extra = sorted(want - set(saved)), sorted(set(saved) - want)
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not hold this run's trainable tensors: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)}). It belongs to "
            f"another model or method: resume with the config stored in it, or start a new run "
            f"with --train.init_from=<checkpoint>/adapter"
        )


def frozen_names(model) -> set[str]:
    """Every name of a frozen parameter, aliases included (tied embeddings have three)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state_keys(model) -> set[str]:
    """The module state keys a checkpoint saves: state_dict minus the frozen names."""
    frozen = frozen_names(model)
    return {k for k in model.state_dict() if k not in frozen}


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded, with what to do instead."""


def resolve_resume(resume: str, out_dir: Path) -> tuple[Path, str] | None:
    """`latest` -> the newest published checkpoint of this run (None when there is none yet);
    a folder -> that checkpoint. Returns (checkpoint root, tag)."""
    if not resume:
        return None
    if resume == "latest":
        root = out_dir / "checkpoints"
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"{latest} points at {tag}, which is missing; pass --train.resume="
                f"{root}/step<N> with one of {sorted(p.name for p in root.glob('step*'))}"
            )
        return root, tag
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(
            f"train.resume={resume!r} is not a checkpoint folder; use 'latest' or a "
            f"{out_dir}/checkpoints/step<N> folder"
        )
    return p.parent, p.name


def check_compatible(state: dict, cfg, world_size: int) -> list[str]:
    """A resume must keep what the run means: every config field marked "match" in
    vlds/config.py (every field that is neither "run" nor "resume": the model, the method, the
    tasks, the data order, the batches, the optimizer, the seed) and the world size. Returns the
    "resume" fields that changed (the caller logs them)."""
    old = state.get("config", {})
    problems, changed = [], []
    for role, found in (("match", problems), ("resume", changed)):
        for key in keys_with_role(role):
            section, _, name = key.partition(".")
            if name not in old.get(section, {}):  # a field newer than the checkpoint
                continue
            was, now = old[section][name], getattr(getattr(cfg, section), name)
            if was != now:
                found.append(f"{key} was {was!r}, now {now!r}")
    if state.get("world_size", world_size) != world_size:
        problems.append(f"world size was {state['world_size']}, now {world_size}")
    if problems:
        raise CheckpointError(
            "cannot resume: " + "; ".join(problems) + ". Resume with the checkpoint's settings, "
            "or start a new run from its weights with --train.init_from=<checkpoint>/adapter "
            "(fresh optimizer and schedule)"
        )
    return changed
