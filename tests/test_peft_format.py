"""LoRA in Hugging Face PEFT's format (vlds.peft.hf_format): the export written next to vlds'
adapter loads with `peft.PeftModel.from_pretrained` and gives vlds' logits; a PEFT-made export
initialises a vlds run through init_from; mismatches fail with the fix named.

Tiny random T5 and BART, both LoRA methods. The round trips need peft (a dev dependency); the
export itself never imports it (tested with the import blocked).
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny
from vlds.checkpoint import CheckpointError, load_adapter, read_adapter, save_adapter

TASKS = ["vqa", "gqa"]
TARGETS = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}
CASES = [(a, m) for a in ("t5", "bart") for m in ("single_lora", "multiple_lora")]


def build(arch, method, **overrides):
    return tiny(arch, method, **{"data.tasks": ",".join(TASKS), **overrides})


def perturb(params, seed=0):
    """Move LoRA B (zero at init, which would make every comparison vacuous), A and the biases
    away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params, key=lambda np: np[0]):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def trained(model, seed=0):
    perturb([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed)
    return model.eval()


def text(tok):
    enc = tok(["what color is the circle?", "two"], return_tensors="pt", padding=True)
    dec = tok(["a red one", "no"], return_tensors="pt", padding=True).input_ids
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "decoder_input_ids": dec,
    }


@torch.no_grad()
def vlds_logits(model, inputs, task=None):
    """The vlds model's language model with its LoRA hooks (routed to `task`), text only."""
    if model.router is not None:
        model.router.set(torch.full((inputs["input_ids"].shape[0],), task))
    return model.lm(**inputs).logits


@torch.no_grad()
def hf_logits(lm, inputs):
    return lm(**inputs).logits


def plain_base(arch, method, tmp_path):
    """The base LM without hooks, as a Hugging Face user has it: the same seed builds the same
    backbone; saved with save_pretrained and loaded back with transformers."""
    from transformers import AutoModelForSeq2SeqLM

    *_, fresh = build(arch, method)
    fresh.lm.save_pretrained(tmp_path / "base")
    return AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base").eval()


def adapter_dirs(method, root):
    return (
        [(None, root)] if method == "single_lora" else [(t, root / n) for t, n in enumerate(TASKS)]
    )


@pytest.mark.parametrize("arch, method", CASES)
def test_export_has_peft_names_and_config_and_needs_no_peft(tmp_path, monkeypatch, arch, method):
    cfg, tok, tower, model = build(arch, method)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails: not needed to export
    save_adapter(trained(model), cfg.to_dict(), tmp_path / "adapter", is_main=True)
    root = tmp_path / "adapter" / "peft"
    subs = sorted(p.name for p in root.iterdir())
    assert subs == (
        ["adapter_config.json", "adapter_model.safetensors"]
        if method == "single_lora"
        else sorted(TASKS)
    )
    q = (
        "encoder.block.0.layer.0.SelfAttention.q"
        if arch == "t5"
        else "model.encoder.layers.0.self_attn.q_proj"
    )
    for t, d in adapter_dirs(method, root):
        config = json.loads((d / "adapter_config.json").read_text())
        assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias")} == {
            "peft_type": "LORA",
            "task_type": "SEQ_2_SEQ_LM",
            "r": 8,
            "lora_alpha": 32,
            "bias": "all" if arch == "bart" else "none",  # T5 has no biases to carry
        }
        assert config["target_modules"] == TARGETS[arch] and config["fan_in_fan_out"] is False
        assert config["base_model_name_or_path"] == "random"
        sd = load_file(d / "adapter_model.safetensors")
        lora = model.peft["enc-0-self-q"]
        lora = lora if t is None else lora.loras[t]
        assert torch.equal(sd[f"base_model.model.{q}.lora_B.weight"], lora.B.weight)
        n_attn = 3 * 2  # tiny: 2 layers; encoder self, decoder self and cross attention
        assert sum(".lora_" in k for k in sd) == n_attn * 2 * 2  # q and v, A and B
        assert not any("visual" in k for k in sd)  # vlds-only tensors stay in vlds' export
        if arch == "bart":
            assert torch.equal(
                sd[f"base_model.model.{q}.base_layer.bias"], model.lm.get_parameter(f"{q}.bias")
            )
            assert all(k.endswith(".bias") for k in sd if ".lora_" not in k)


@pytest.mark.parametrize("arch, method", CASES)
def test_peft_loads_the_export_and_gives_vlds_logits(tmp_path, arch, method):
    import peft

    cfg, tok, tower, model = build(arch, method)
    save_adapter(trained(model), cfg.to_dict(), tmp_path / "adapter", is_main=True)
    inputs = text(tok)
    base_logits = hf_logits(plain_base(arch, method, tmp_path), inputs)
    per_task = []
    for t, d in adapter_dirs(method, tmp_path / "adapter" / "peft"):  # each adapter on its own
        pm = peft.PeftModel.from_pretrained(plain_base(arch, method, tmp_path), d).eval()
        ours, theirs = vlds_logits(model, inputs, t), hf_logits(pm, inputs)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
        assert (ours - base_logits).abs().max() > 1e-2  # LoRA (and biases) are live
        per_task.append(ours)
    if method == "multiple_lora":
        assert (per_task[0] - per_task[1]).abs().max() > 1e-2  # each task its own LoRA
        # docs/peft.md's recipe: every task in one PeftModel (PEFT holds one adapter with biases)
        root = tmp_path / "adapter" / "peft"
        pm = peft.PeftModel.from_pretrained(
            plain_base(arch, method, tmp_path), root / TASKS[0], adapter_name=TASKS[0]
        )
        for task in TASKS[1:]:
            config = peft.LoraConfig.from_pretrained(root / task)
            config.bias = "none"  # the biases are shared: already loaded with the first task
            pm.add_adapter(task, config)
            peft.set_peft_model_state_dict(
                pm, load_file(root / task / "adapter_model.safetensors"), adapter_name=task
            )
        pm.eval()
        for t, task in enumerate(TASKS):
            pm.set_adapter(task)
            torch.testing.assert_close(hf_logits(pm, inputs), per_task[t], rtol=0, atol=1e-6)


def peft_made_export(arch, method, tmp_path):
    """An export made by peft itself: get_peft_model + random init + save_pretrained (per task
    adapters named by task, which save_pretrained puts in <dir>/<task>/)."""
    from peft import LoraConfig, get_peft_model

    def config(bias):
        return LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=0.1,
            target_modules=TARGETS[arch],
            bias=bias,
            task_type="SEQ_2_SEQ_LM",
        )

    base = plain_base(arch, method, tmp_path)
    if method == "single_lora":
        pm = get_peft_model(base, config("all"))
    else:  # PEFT allows biases on one adapter only: the first carries them
        pm = get_peft_model(base, config("all"), adapter_name=TASKS[0])
        for task in TASKS[1:]:
            pm.add_adapter(task, config("none"))
    perturb([(n, p) for n, p in pm.named_parameters() if ".lora_" in n or n.endswith(".bias")])
    pm.save_pretrained(tmp_path / "from_peft")
    return pm.eval(), tmp_path / "from_peft"


@pytest.mark.parametrize("arch, method", CASES)
def test_a_peft_made_export_initialises_a_vlds_run(tmp_path, arch, method):
    pm, d = peft_made_export(arch, method, tmp_path)
    cfg, tok, tower, model = build(arch, method)
    inputs = text(tok)
    before = vlds_logits(model.eval(), inputs, 0)
    load_adapter(model, d, loaded=read_adapter(d))  # what train.py does for --train.init_from
    for t, _ in adapter_dirs(method, d):
        if t is not None:
            pm.set_adapter(TASKS[t])
        ours = vlds_logits(model, inputs, t)
        torch.testing.assert_close(ours, hf_logits(pm, inputs), rtol=0, atol=1e-6)
        assert (ours - before).abs().max() > 1e-2


@pytest.mark.parametrize("arch, method", CASES)
def test_vlds_own_peft_export_round_trips_through_init_from(tmp_path, arch, method):
    cfg, tok, tower, model = build(arch, method)
    save_adapter(trained(model), cfg.to_dict(), tmp_path / "adapter", is_main=True)
    *_, fresh = build(arch, method)
    load_adapter(fresh.eval(), tmp_path / "adapter" / "peft")
    lm = lambda m: {n: p for n, p in m.named_parameters() if not n.startswith("visual")}
    assert all(torch.equal(p, lm(model)[n]) for n, p in lm(fresh).items())


def test_mismatches_fail_with_the_fix_named(tmp_path):
    from safetensors.torch import save_file

    cfg, tok, tower, model = build("t5", "single_lora")
    save_adapter(trained(model), cfg.to_dict(), tmp_path / "t5", is_main=True)
    src = tmp_path / "t5" / "peft"
    cases = [
        (
            build("t5", "single_lora", **{"peft.lora_rank": "4"}),
            "rank r=8, but this run has peft.lora_rank=4; set --peft.lora_rank=8",
        ),
        (
            build("bart", "single_lora"),
            "are t5's attention projections, but this run is model.arch=bart; set --model.arch=t5",
        ),
        (build("t5", "multiple_lora"), "multiple_lora needs one PEFT adapter per task"),
        (build("t5", "single_adapter"), "set --peft.method=single_lora"),
        (build("t5", "single_lora", **{"peft.lora_alpha": "16"}), "set --peft.lora_alpha=32"),
    ]
    for (*_, other), needle in cases:
        with pytest.raises(CheckpointError, match=needle):
            load_adapter(other, src)
    sd = load_file(src / "adapter_model.safetensors")
    del sd["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_A.weight"]
    save_file(sd, src / "adapter_model.safetensors")
    *_, same = build("t5", "single_lora")
    with pytest.raises(CheckpointError, match=r"missing LoRA tensors \['base_model.model.decoder"):
        load_adapter(same, src)


def test_trained_layernorms_have_no_peft_export(tmp_path):
    cfg, tok, tower, model = build("t5", "single_lora", **{"peft.train_layernorms": "true"})
    save_adapter(model, cfg.to_dict(), tmp_path / "a", is_main=True)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "a" / "peft").exists()  # PEFT would load a different model
    cfg, tok, tower, model = build("t5", "single_adapter")
    save_adapter(model, cfg.to_dict(), tmp_path / "b", is_main=True)
    assert not (tmp_path / "b" / "peft").exists()  # not a LoRA method


def train(root, out, *extra):
    from tests.helpers import train_run

    args = [
        f"--data.root={root}",
        f"--train.out_dir={out}",
        "--model.arch=bart",
        "--peft.method=single_lora",
        "--data.tasks=vqa,gqa",
        "--data.batch_size=16",
        "--eval.max_samples=4",
        "--eval.batch_size=4",
        "--data.num_workers=1",
        "--train.max_steps=2",
        *extra,
    ]
    return train_run(args, check=False)


def test_train_py_exports_and_init_from_takes_a_peft_export(shapes_root, tmp_path):
    """The real entry point: a LoRA run writes adapter/peft/; --train.init_from=that folder
    starts a new run from it (lr 0: the LoRA and biases come out unchanged); a rank mismatch
    exits 2 with the fix before training."""
    p = train(shapes_root, tmp_path / "a")
    assert p.returncode == 0, p.stderr[-3000:]
    export = tmp_path / "a" / "adapter" / "peft"
    p = train(shapes_root, tmp_path / "b", f"--train.init_from={export}", "--train.lr=0")
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(export / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p = train(shapes_root, tmp_path / "c", f"--train.init_from={export}", "--peft.lora_rank=4")
    assert p.returncode == 2 and "set --peft.lora_rank=8" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "c" / "metrics.jsonl").exists()  # failed before any step
