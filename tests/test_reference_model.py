"""The model as the paper's code builds it (VL-T5/src of ylsung/VL_adapter): the visual input,
the initialisation, the weight-decay groups, NLVR2's prediction and generation defaults, each
checked against the reference's formula or hand-computed values."""

import math

import pytest
import torch

from tests.helpers import byte_tokenizer, image_batch, tiny
from vlds.config import ConfigError, build_config, validate
from vlds.engine import param_groups
from vlds.eval.loop import predict
from vlds.model.build import build_lm, vocab_of
from vlds.model.vision import frame_tokens
from vlds.model.vl import VLModel, first_difference, object_order_ids

# ---- visual input ------------------------------------------------------------------------------


def test_object_order_ids_count_within_each_image():
    order = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert object_order_ids(order).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]


def _norm(x, norm):
    """LayerNorm / T5's RMSNorm written out."""
    if isinstance(norm, torch.nn.LayerNorm):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def _expected_visual(model, batch, obj_ids):
    """LN(Linear(f)) + LN(Linear(0-box incl. area)) + img_order + table[N - k - 1] per token."""
    ve, table = model.visual_embed, model.lm.get_input_embeddings().weight
    lin_f, norm_f = ve.feat
    lin_b, norm_b = ve.pos
    feat = _norm(batch["vis_feats"] @ lin_f.weight.T + lin_f.bias, norm_f)
    box = _norm(lin_b.bias.expand_as(feat), norm_b)  # Linear of a zero box = its bias
    img = ve.img_order.weight[batch["vis_order"]]
    obj = table[table.shape[0] - obj_ids - 1]
    return feat + box + img + obj


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_reference_visual_embedding_is_hand_computed(arch):
    cfg, tok, tower, model = tiny(arch)
    g2 = cfg.model.grid_pool**2
    nlvr = image_batch(tok, tower, b=2, n_img=2)  # NLVR2: 2 x g*g tokens, both 0..g*g-1
    obj = torch.arange(g2).repeat(2).expand(2, -1)
    got = model.visual_embed(
        nlvr["vis_feats"], nlvr["vis_boxes"], nlvr["vis_order"], model.lm.get_input_embeddings()
    )
    torch.testing.assert_close(got, _expected_visual(model, nlvr, obj))
    video = frame_tokens(torch.randn(2, 5, tower.pooled_dim), 8)  # frames 0..7 (3 padded)
    model = tiny(arch, **{"data.tasks": "tvqa"})[3]
    got = model.visual_embed(
        video["vis_feats"], video["vis_boxes"], video["vis_order"], model.lm.get_input_embeddings()
    )
    torch.testing.assert_close(got, _expected_visual(model, video, torch.arange(8).expand(2, -1)))


def test_grid_visual_input_keeps_the_boxes_and_has_no_object_order():
    cfg, tok, tower, model = tiny("t5", **{"model.visual_input": "grid"})
    b = image_batch(tok, tower, b=2)
    ve = model.visual_embed
    want = ve.feat(b["vis_feats"]) + ve.pos(b["vis_boxes"]) + ve.img_order(b["vis_order"])
    torch.testing.assert_close(ve(b["vis_feats"], b["vis_boxes"], b["vis_order"]), want)


def _layer0_input(model, batch):
    """The BART encoder's first layer input (after the embedding stage) for `batch`."""
    seen = {}
    enc = model.lm.get_encoder()
    h = enc.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    model._route(batch)
    embeds, mask = model.encoder_inputs(batch)
    enc(inputs_embeds=embeds, attention_mask=mask)
    h.remove()
    return seen["x"], embeds


@pytest.mark.parametrize("method", ["single_adapter", "single_prompt"])
def test_bart_positions_and_layernorm_act_on_the_text_only(method):
    cfg, tok, tower, model = tiny("bart", method)
    model.eval()
    b = image_batch(tok, tower, b=3)
    ids, n_vis = b["input_ids"], b["vis_feats"].shape[1]
    enc = model.lm.get_encoder()
    x, embeds = _layer0_input(model, b)
    n_prompt = embeds.shape[1] - n_vis - ids.shape[1]
    assert n_prompt == (cfg.peft.prompt_length if method == "single_prompt" else 0)
    # visual tokens: the visual embedding as it is, no position, no LayerNorm
    torch.testing.assert_close(x[:, :n_vis], embeds[:, :n_vis])
    # text tokens: exactly what HF BART's embedding stage gives the text alone (positions 0..)
    alone = enc(input_ids=ids, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(x[:, n_vis + n_prompt :], alone)
    ln = enc.layernorm_embedding
    pos = enc.embed_positions.weight[2 : 2 + ids.shape[1]]  # BART's position offset is 2
    by_hand = _norm(enc.embed_tokens(ids) + pos, ln)
    torch.testing.assert_close(x[:, n_vis + n_prompt :], by_hand)
    if n_prompt:  # a prompt: normalised with the text, no position (modeling_bart.py:625-661)
        prompt = embeds[:, n_vis : n_vis + n_prompt]
        torch.testing.assert_close(x[:, n_vis : n_vis + n_prompt], _norm(prompt, ln))
    # the hooks consumed their one-call setting: plain HF calls are untouched afterwards
    assert "vlds_skip" not in vars(enc.embed_positions)
    assert "vlds_skip" not in vars(ln)


def test_bart_grid_input_puts_visual_tokens_through_positions_and_layernorm():
    cfg, tok, tower, model = tiny("bart", **{"model.visual_input": "grid"})
    model.eval()
    b = image_batch(tok, tower, b=2)
    x, embeds = _layer0_input(model, b)
    enc = model.lm.get_encoder()
    pos = enc.embed_positions.weight[2 : 2 + embeds.shape[1]]
    torch.testing.assert_close(x, _norm(embeds + pos, enc.layernorm_embedding))


def test_object_order_rows_are_the_lm_table_frozen_in_peft_trained_in_full():
    for method, trains in (("single_adapter", False), ("full_finetune", True)):
        cfg, tok, tower, model = tiny("t5", method)
        table = model.lm.get_input_embeddings().weight
        assert table.requires_grad == trains
        b = image_batch(tok, tower, b=1)
        before = model.encoder_inputs(b)[0][0, 0]  # first visual token: object order 0
        with torch.no_grad():
            table[-1] += 1.0  # row N - 0 - 1
        torch.testing.assert_close(model.encoder_inputs(b)[0][0, 0], before + 1.0)
    n_vis = b["vis_feats"].shape[1]
    (grad,) = torch.autograd.grad(model.encoder_inputs(b)[0][:, :n_vis].sum(), table)
    used = grad.abs().sum(-1).nonzero().flatten().tolist()  # rows the visual tokens read
    assert used == list(range(table.shape[0] - n_vis, table.shape[0]))  # N-1-k, k < n_vis


def test_visual_input_is_checked():
    with pytest.raises(ConfigError, match="model.visual_input='boxes'; valid: reference"):
        validate(build_config("tiny", {"model.visual_input": "boxes"}))


# ---- initialisation ----------------------------------------------------------------------------

# d_model 768, r = 8 (bottleneck 96), the real prompt and Hyperformer sizes; 2 small layers
REAL = {
    "model.d_model": "768",
    "model.num_heads": "12",
    "model.d_ff": "256",
    "peft.reduction_factor": "8",
    "peft.prompt_length": "40",
    "peft.prompt_hidden": "800",
    "peft.hyper_task_dim": "512",
    "peft.hyper_layer_dim": "512",
    "peft.hyper_hidden": "128",
}


def _std(tensors) -> float:
    return torch.cat([t.detach().flatten() for t in tensors]).std().item()


def _params(model, suffix):
    return [p for n, p in model.named_parameters() if n.endswith(suffix)]


def _close(value, target, rel=0.05):
    assert abs(value - target) < rel * target, (value, target)


def test_adapter_init_follows_the_backbone():
    # BART: init_weights re-draws them, N(0, 0.02), zero biases
    model = tiny("bart", **REAL)[3]
    _close(_std(_params(model, "down.weight")), 0.02)
    _close(_std(_params(model, "up.weight")), 0.02)
    assert not any(p.any() for n, p in model.named_parameters() if n.endswith("down.bias"))
    assert not any(p.any() for n, p in model.named_parameters() if n.endswith("up.bias"))
    # T5: PyTorch's Linear default, U(+-1/sqrt(fan_in)): std 1/sqrt(3 fan_in), biases too
    model = tiny("t5", **REAL)[3]
    _close(_std(_params(model, "down.weight")), 1 / math.sqrt(3 * 768))
    _close(_std(_params(model, "up.weight")), 1 / math.sqrt(3 * 96))
    _close(_std(_params(model, "up.bias")), 1 / math.sqrt(3 * 96), rel=0.1)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_compacter_init_is_the_references_phm_init(arch):
    model = tiny(arch, "single_compacter", **REAL)[3]
    down = _params(model, "down.weight")  # B_i (2, 384, 48) per site
    # xavier-uniform with gain sqrt 2 per slice: std = sqrt(2) sqrt(2 / (fan_in + fan_out))
    _close(_std(down), math.sqrt(2) * math.sqrt(2 / (384 + 48)))
    _close(_std(_params(model, "up.weight")), math.sqrt(2) * math.sqrt(2 / (48 + 384)))
    assert max(p.abs().max().item() for p in down) <= math.sqrt(2) * math.sqrt(6 / 432) + 1e-6
    rules = _params(model, ".rule")  # 10 sites x 2 layers x 8 values
    _close(_std(rules), 0.01, rel=0.25)
    assert not any(p.any() for p in _params(model, "down.bias") + _params(model, "up.bias"))


def test_prompt_init_follows_the_backbone():
    model = tiny("bart", "single_prompt", **REAL)[3]
    _close(_std(_params(model, "embed.weight")), 0.02)
    _close(_std(_params(model, "mlp.0.weight") + _params(model, "mlp.2.weight")), 0.02)
    assert not any(p.any() for p in _params(model, "mlp.0.bias") + _params(model, "mlp.2.bias"))
    model = tiny("t5", "single_prompt", **REAL)[3]
    _close(_std(_params(model, "embed.weight")), 1.0)  # nn.Embedding's N(0, 1)
    _close(_std(_params(model, "mlp.0.weight")), 1 / math.sqrt(3 * 768))


def test_hyperformer_init_and_layernorm_eps():
    model = tiny("t5", "hyperformer", **REAL)[3]
    hyper = model.peft["hyper_enc"]
    assert hyper.net[3].eps == 1e-6
    _close(_std([hyper.net[0].weight]), 0.01)
    _close(_std(_params(model, "down_w.weight")), 0.01)
    _close(_std([hyper.layer_embed.weight]), 1.0, rel=0.1)
    _close(_std([model.peft["task_embed"].weight]), 1.0, rel=0.1)
    assert not hyper.net[0].bias.any() and not any(p.any() for p in _params(model, "down_w.bias"))
    model = tiny("bart", "hyperformer", **REAL)[3]
    hyper = model.peft["hyper_dec"]
    assert hyper.net[3].eps == 1e-6
    _close(_std([hyper.net[0].weight]), 0.02)
    _close(_std(_params(model, "up_w.weight")), 0.02)
    _close(_std([hyper.layer_embed.weight]), 0.02, rel=0.1)
    _close(_std([model.peft["task_embed"].weight]), 1.0, rel=0.1)  # randn in both


def test_visual_embedding_init_follows_the_backbone():
    ve = tiny("bart", **REAL)[3].visual_embed
    _close(_std([ve.feat[0].weight]), 0.02)
    _close(_std([ve.img_order.weight]), 0.02, rel=0.15)
    assert not ve.feat[0].bias.any() and not ve.pos[0].bias.any()
    ve = tiny("t5", **REAL)[3].visual_embed
    fan_in = ve.feat[0].in_features
    _close(_std([ve.feat[0].weight]), 1 / math.sqrt(3 * fan_in))
    _close(_std([ve.img_order.weight]), 1.0, rel=0.15)


def test_added_vocabulary_rows_are_drawn_as_the_reference(tmp_path):
    """A pretrained LM resized for extra tokens: the new rows N(0, 0.02) (BART), old rows kept."""
    cfg, tok, tower, small = tiny("bart")
    small.lm.save_pretrained(tmp_path / "lm")
    cfg = build_config(
        "tiny", {"model.arch": "bart", "model.lm": str(tmp_path / "lm"), "model.d_model": "64"}
    )
    vocab, pad, eos, bos = vocab_of(tok)
    lm = build_lm(cfg, vocab + 2000, pad, eos, bos)
    rows = lm.get_input_embeddings().weight
    assert torch.equal(rows[:vocab], small.lm.get_input_embeddings().weight)
    _close(rows[vocab:].std().item(), 0.02)
    assert abs(rows[vocab:].mean().item()) < 1e-3


# ---- weight decay ------------------------------------------------------------------------------


def _exempt(model, mode):
    groups = param_groups(model, 0.01, mode)
    ids = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.01
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_decay_groups_by_name_t5_full_finetune():
    model = tiny("t5", "full_finetune")[3]
    ref, norms = _exempt(model, "reference"), _exempt(model, "norms")
    rel_bias = "lm.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ln = "lm.encoder.block.0.layer.0.layer_norm.weight"
    assert rel_bias in ref and rel_bias not in norms  # "bias" in its name; a 2-D table
    assert ln not in ref and ln in norms  # T5LayerNorm gains: decayed by the reference
    assert "visual_embed.feat.0.bias" in ref and "visual_embed.feat.0.bias" in norms
    assert "visual_embed.feat.1.weight" not in ref and "visual_embed.feat.1.weight" in norms
    assert ref == {n for n, _ in model.named_parameters() if "bias" in n}


def test_decay_groups_by_name_bart_methods():
    model = tiny("bart", "single_compacter")[3]
    ref, norms = _exempt(model, "reference"), _exempt(model, "norms")
    phm_bias, lm_bias = "peft.enc-0-self.down.bias", "lm.model.encoder.layers.0.fc1.bias"
    ln = "lm.model.encoder.layers.0.self_attn_layer_norm.weight"
    assert phm_bias not in ref and phm_bias in norms  # the reference calls it `b`
    assert lm_bias not in ref | norms  # frozen: in no group
    assert ln not in ref and ln in norms
    assert "lm.model.encoder.layers.0.self_attn_layer_norm.bias" in ref
    model = tiny("bart", "hyperformer")[3]
    ref, norms = _exempt(model, "reference"), _exempt(model, "norms")
    gen = "peft.hyper_enc.generators.enc_self"
    assert {f"{gen}.down_b.weight", f"{gen}.up_b.weight", "peft.hyper_enc.net.3.weight"} <= ref
    assert f"{gen}.down_b.weight" not in norms and "peft.hyper_enc.net.3.weight" in norms
    assert f"{gen}.down_w.weight" not in ref and f"{gen}.down_w.bias" in ref


def test_decay_exempt_is_checked():
    with pytest.raises(ConfigError, match="train.decay_exempt='all'; valid: reference"):
        validate(build_config("tiny", {"train.decay_exempt": "all"}))


# ---- NLVR2 prediction --------------------------------------------------------------------------


def test_first_difference_is_the_answer_position():
    t5_true, t5_false = torch.tensor([10, 1]), torch.tensor([11, 1])
    bart_true, bart_false = torch.tensor([0, 10, 2]), torch.tensor([0, 11, 2])  # <s> first
    assert first_difference([t5_true, t5_false]) == 0
    assert first_difference([bart_true, bart_false]) == 1
    with pytest.raises(ValueError, match="do not differ"):
        first_difference([torch.tensor([5, 1]), torch.tensor([5, 1, 1])])


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_first_token_rule_is_the_references_logit_comparison(arch):
    cfg, tok, tower, model = tiny(arch)
    model.eval()
    b = image_batch(tok, tower, b=3)
    true, false = torch.tensor([7, 50, 1]), torch.tensor([7, 60, 1])  # answer at position 1
    got = model.score_choices(b, [true, false])
    # nlvr_model.py (BART): decoder input [start, <s>], logits at position 1, true/false ids
    start = model.lm.config.decoder_start_token_id
    dec = torch.tensor([[start, 7]]).expand(3, -1)
    embeds, mask = model.encoder_inputs(b)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, logits[:, 1][:, [50, 60]])


def test_nlvr_rules_disagree_on_a_constructed_case():
    """First position favours "true"; the rest of "true" is made improbable, so the summed
    log-probability favours "false": the reference's rule says true, the other false."""
    cfg, tok, tower, model = tiny("t5")
    model.eval()
    t = tok("true").input_ids
    bias = torch.zeros(model.lm.config.vocab_size)
    bias[t[0]], bias[t[1]] = 20.0, -100.0  # 't' likely first ('f' is not), then never 'r'
    model.lm.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    b = image_batch(tok, tower, b=2)
    batch = {**b, "ids": ["a", "b"], "refs": [["true"], ["false"]], "meta": None}
    preds = {}
    for rule in ("first_token", "sequence"):
        cfg.eval.nlvr_predict = rule
        preds[rule] = [r[1] for r in predict(model, tower, [batch], "nlvr", tok, cfg, "cpu", False)]
    assert preds == {"first_token": ["true", "true"], "sequence": ["false", "false"]}


# ---- generation ----------------------------------------------------------------------------


def _saved_bart(tmp_path, tok, no_repeat):
    cfg, _, tower, model = tiny("bart")
    model.lm.generation_config.no_repeat_ngram_size = no_repeat
    model.lm.save_pretrained(tmp_path / "bart")
    return tower


@pytest.mark.parametrize("flag, want", [(None, 3), (0, 0), (2, 2)])
def test_no_repeat_ngram_size_comes_from_the_backbone(tmp_path, flag, want):
    tok = byte_tokenizer()
    tower = _saved_bart(tmp_path, tok, no_repeat=3)
    over = {"model.arch": "bart", "model.lm": str(tmp_path / "bart"), "model.dropout": "0.0"}
    if flag is not None:
        over["eval.no_repeat_ngram_size"] = str(flag)
    cfg = build_config("tiny", over)
    lm = build_lm(cfg, *vocab_of(tok))
    assert lm.generation_config.no_repeat_ngram_size == want
    assert lm.generation_config.forced_bos_token_id is None
    # ... and it reaches generate: a model that always prefers one token
    lm.final_logits_bias[0, 100] = 50.0
    model = VLModel(lm, "bart", tower.grid_dim).eval()
    out = model.generate(image_batch(tok, tower, b=2), max_new_tokens=8)[:, 1:]  # drop start
    row = out[0].tolist()
    row = row[: min([row.index(t) for t in (0, 1) if t in row], default=len(row))]  # to eos/pad
    trigrams = [tuple(row[i : i + want]) for i in range(len(row) - want + 1)] if want else []
    assert len(trigrams) == len(set(trigrams))
    if want == 0:
        assert row == [100] * 8
    else:
        assert row.count(100) < 8


def test_no_repeat_ngram_size_is_checked():
    with pytest.raises(ConfigError, match="eval.no_repeat_ngram_size=-1 must be >= 0"):
        validate(build_config("tiny", {"eval.no_repeat_ngram_size": "-1"}))


def test_real_t5_preset_adds_the_reference_rows():
    cfg = build_config("t5-base")
    assert cfg.model.extra_tokens == 100 and cfg.model.visual_input == "reference"


def test_validation_loss_is_each_samples_mean_token_cross_entropy():
    """predict's loss column: each sample's mean cross-entropy over its own target tokens,
    computed here from the LM's logits by hand; the training loss (no weights, per-sample
    reduction) is their mean; an unlabelled sample (no references) has none."""
    cfg, tok, tower, model = tiny("t5", method="full_finetune")
    model.eval()
    b = image_batch(tok, tower, b=3)
    embeds, mask = model.encoder_inputs(b)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=b["labels"]).logits
    want = []
    for i in range(3):
        keep = b["labels"][i] != -100
        logp = torch.log_softmax(logits[i][keep].double(), dim=-1)
        want.append(-logp.gather(1, b["labels"][i][keep][:, None]).mean().item())
    assert len({len(x) for x in tok(["red", "square", "true"]).input_ids}) > 1  # lengths differ
    batch = {**b, "ids": ["a", "b", "c"], "refs": [["red"], ["square"], []], "meta": None}
    rows = predict(model, tower, [batch], "gqa", tok, cfg, "cpu", False)
    assert [r[4] for r in rows[:2]] == pytest.approx(want[:2], rel=1e-5) and rows[2][4] is None
    with torch.no_grad():
        assert model(b).item() == pytest.approx(sum(want) / 3, rel=1e-5)
    cfg.eval.loss = False
    assert [r[4] for r in predict(model, tower, [batch], "gqa", tok, cfg, "cpu", False)] == [
        None
    ] * 3
