import pytest
import torch

from tests.helpers import image_batch, tiny
from vlds.checkpoint import load_adapter, save_adapter
from vlds.config import ConfigError, PeftConfig
from vlds.peft import apply_peft, count_parameters
from vlds.peft.inject import norm_types, sublayer_sites


def _expected_trainable(model, method):
    names = {n for n, _ in model.named_parameters() if n.startswith(("peft.", "visual_embed."))}
    if method == "full_finetune":
        names |= {f"lm.{n}" for n, _ in model.lm.named_parameters()}
    else:
        for mname, m in model.lm.named_modules():
            if isinstance(m, norm_types()):
                names |= {f"lm.{mname}.{n}" for n, _ in m.named_parameters()}
    return names


@pytest.mark.parametrize("method", ["single_adapter", "full_finetune"])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_exactly_the_intended_parameters_train(arch, method):
    cfg, tok, tower, model = tiny(arch, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model, method)
    assert not any(p.requires_grad for p in tower.parameters())
    if method == "single_adapter":
        layers = cfg.model.num_layers
        assert len(model.peft) == 2 * layers + 3 * layers  # enc: self+ffn, dec: self+cross+ffn
        bottleneck = cfg.model.d_model // cfg.peft.reduction_factor
        assert all(
            a.down.weight.shape == (bottleneck, cfg.model.d_model) for a in model.peft.values()
        )


@pytest.mark.parametrize("method", ["single_adapter", "full_finetune"])
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_step_moves_every_trainable_weight_and_no_frozen_one(arch, method):
    cfg, tok, tower, model = tiny(arch, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tower_before = {n: p.clone() for n, p in tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = image_batch(tok, tower, b=3, n_img=2)
    model(b).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert all(torch.equal(v, tower.state_dict()[n]) for n, v in tower_before.items())


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_zero_up_projection_reproduces_the_base_model(arch):
    *_, base = tiny(arch, "full_finetune", seed=3)  # same seed -> same backbone, no modules
    cfg, tok, tower, model = tiny(arch, "single_adapter", seed=3)
    with torch.no_grad():
        for a in model.peft.values():
            a.up.weight.zero_()
            a.up.bias.zero_()
    base.eval(), model.eval()
    b = image_batch(tok, tower)
    assert torch.equal(base(b), model(b))
    # ... and a non-zero adapter changes it: the hooks are live
    with torch.no_grad():
        next(iter(model.peft.values())).up.bias.normal_()  # not constant: LN removes that
    assert not torch.equal(base(b), model(b))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_adapter_export_loads_onto_a_fresh_backbone(tmp_path, arch):
    cfg, tok, tower, model = tiny(arch, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = image_batch(tok, tower)
    for _ in range(2):
        model(b).backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, cfg.to_dict(), tmp_path / "adapter", is_main=True)
    *_, fresh = tiny(arch, seed=5)  # same frozen backbone, freshly initialised adapters
    model.eval(), fresh.eval()
    assert not torch.equal(model(b), fresh(b))
    meta = load_adapter(fresh, tmp_path / "adapter")
    assert meta["method"] == "single_adapter"
    assert torch.equal(model(b), fresh(b))
    assert torch.equal(
        model.generate(b, num_beams=2, max_new_tokens=4),
        fresh.generate(b, num_beams=2, max_new_tokens=4),
    )


def test_adapter_export_of_another_shape_is_refused(tmp_path):
    cfg, tok, tower, model = tiny("t5")
    save_adapter(model, cfg.to_dict(), tmp_path / "a", is_main=True)
    *_, other = tiny("t5", **{"peft.reduction_factor": "4"})
    with pytest.raises(ValueError, match="shape"):
        load_adapter(other, tmp_path / "a")
    *_, full = tiny("t5", "full_finetune")
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        load_adapter(full, tmp_path / "a")


def test_unknown_method_is_a_config_error():
    *_, model = tiny("t5")
    with pytest.raises(ConfigError, match="valid methods: single_adapter"):
        apply_peft(model, PeftConfig(method="nope"), ["vqa"])


def _real_size_model(arch):
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    from vlds.model.vl import VLModel

    with torch.device("meta"):  # sizes only, no memory
        if arch == "bart":  # bart-base, vocabulary + the reference's 200 added tokens
            lm = BartForConditionalGeneration(
                BartConfig(
                    vocab_size=50265 + 200,
                    d_model=768,
                    encoder_layers=6,
                    decoder_layers=6,
                    encoder_attention_heads=12,
                    decoder_attention_heads=12,
                    encoder_ffn_dim=3072,
                    decoder_ffn_dim=3072,
                )
            )
        else:
            lm = T5ForConditionalGeneration(
                T5Config(
                    vocab_size=32128, d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64
                )
            )
        model = VLModel(lm, arch, 2048)  # CLIP RN101 grid features
    return model


def test_single_adapter_updates_the_papers_share_of_bart_base():
    model = _real_size_model("bart")
    assert len(sublayer_sites(model.lm, "bart")) == 30
    apply_peft(model, PeftConfig("single_adapter", 8), ["vqa", "gqa", "nlvr", "caption"])
    assert round(count_parameters(model)["percent"], 2) == 4.18  # paper, Table 1
    assert len(sublayer_sites(_real_size_model("t5").lm, "t5")) == 60
