import pytest
import torch

from tests.helpers import image_batch, tiny
from vlds.checkpoint import load_adapter, save_adapter
from vlds.config import ConfigError, PeftConfig
from vlds.peft import apply_peft
from vlds.peft.inject import sublayer_sites


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
    # Compared as inference (no_grad): with autograd on, the two models differ in which weights
    # require grad, and CPU BLAS may then pick kernels that round the last bit differently.
    with torch.no_grad():
        assert torch.equal(base(b), model(b))
        # ... and a non-zero adapter changes it: the hooks are live
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


def test_site_counts_of_the_real_backbones():
    from vlds.peft.report import build_lm

    for backbone, n in (("t5-base", 60), ("bart-base", 30)):
        arch, lm = build_lm(backbone)
        assert len(sublayer_sites(lm, arch)) == n  # 2 per encoder layer, 3 per decoder layer
