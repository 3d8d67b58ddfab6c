"""CLIP-T5 / CLIP-BART: a T5 or BART encoder-decoder whose encoder reads [visual ; text].

The vision tower is not part of this module: it is frozen and runs outside the DeepSpeed engine
(see `visual_inputs`), so the engine holds the language model, the visual embedding and the PEFT
modules only.

Encoder input: `[VisualEmbedding(v) ; embed(text)]` along the sequence with one attention
mask. The reference concatenates `[text ; visual]`; with right-padded text that puts the visual
tokens after the padding, so their distance to the text (T5's relative position bias) and their
learned positions (BART) depend on the longest prompt of the micro-batch: a sample's output
would depend on its batch, evaluation scores on eval.batch_size, and N ranks x b would not equal
1 rank x N b. Visual tokens first (a fixed count per task) keep every real token in place.
We feed the unmodified transformers model through `inputs_embeds`, so T5's relative position
bias spans all pairs (the reference restricts it to text-text pairs); this keeps PEFT injection
and generation standard.

model.visual_input="reference" (the default) gives the visual tokens what the reference's
JointEncoder gives them (VL-T5/src/modeling_bart.py:610-668, modeling_t5.py:120-173): zero boxes,
an object-order term from the LM's token table, and, under BART, neither learned positions nor
`layernorm_embedding`: forward hooks on the BART encoder's embed_positions and
layernorm_embedding (`_no_position_for_leading`, `_no_norm_for_leading`, given the visual and
prompt token counts by `encoder_inputs` for one call) make them act on the text only: text
positions count from 0 (the reference adds them before prepending a prompt), the prompt gets no
position but is normalised with the text. The hooks change no parameter name, so checkpoints,
PEFT injection, generation and the adapter export are as before. "grid" is vlds' earlier input:
grid-cell boxes, no object-order term, BART's positions and LayerNorm over [visual ; text].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from vlds.config import ConfigError, config_check


def norm_layer(arch: str, d: int) -> nn.Module:
    """T5 uses RMSNorm (T5LayerNorm), BART nn.LayerNorm, in the visual embedding as in the LM."""
    if arch == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        return T5LayerNorm(d)
    return nn.LayerNorm(d)


VISUAL_INPUTS = ("reference", "grid")


def backbone_init(module: nn.Module, arch: str, std: float = 0.02) -> nn.Module:
    """The init the reference's backbone classes give the modules they hold besides the LM (the
    visual embedding, adapters, prompts, Hyperformer's hypernetwork). Under BART, `init_weights()`
    runs after those modules are built (modeling_bart.py:583, my_transformers/modeling_bart.py:925,
    1308) and re-draws every nn.Linear and nn.Embedding weight from N(0, config.init_std = 0.02),
    biases zero (my_transformers/modeling_bart.py:747-756). T5's `_init_weights`
    (my_transformers/modeling_t5.py:774-814) only touches T5's own module types, so under T5
    these modules keep the init they were built with (PyTorch's default for plain layers)."""
    if arch == "bart":
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def object_order_ids(order: torch.Tensor) -> torch.Tensor:
    """(B, Tv) image-order ids -> each token's index within its own image (its run of equal
    ids): 0..35 for each of NLVR2's two 6x6 grids (nlvr_model.py:43-44), 0..T-1 over video
    frames (one image: the reference's default arange(N), modeling_bart.py:173-175)."""
    idx = torch.arange(order.shape[1], device=order.device).expand_as(order)  # (B, Tv)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = order[:, 1:] != order[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


class VisualEmbedding(nn.Module):
    """Norm(Linear(feat)) + Norm(Linear(box)) + image-order embedding [+ object order]; always
    trainable (the object-order rows belong to the LM's token table: frozen in PEFT runs).

    mode "reference" (modeling_bart.py:142-191, modeling_t5.py:120-173): boxes are zeros (the
    CLIP data loaders' `torch.zeros(L, 4)`, so the area is 0 too and the box term is the learned
    constant Norm(bias)), and each token adds row N - k - 1 of the token table, k its index
    within its image (`object_order_ids`), N the table's row count. mode "grid": the boxes
    given (grid cells / time slices, vlds.model.vision), no object-order term.
    """

    def __init__(
        self, feat_dim: int, d_model: int, arch: str, n_images: int = 2, mode: str = "reference"
    ):
        super().__init__()
        if mode not in VISUAL_INPUTS:
            raise ValueError(f"visual input {mode!r}; valid: {', '.join(VISUAL_INPUTS)}")
        self.mode = mode
        self.feat = nn.Sequential(nn.Linear(feat_dim, d_model), norm_layer(arch, d_model))
        self.pos = nn.Sequential(nn.Linear(5, d_model), norm_layer(arch, d_model))
        self.img_order = nn.Embedding(n_images, d_model)

    def forward(
        self,
        feats: torch.Tensor,
        boxes: torch.Tensor,
        order: torch.Tensor,
        token_table: nn.Embedding | None = None,
    ) -> torch.Tensor:
        # feats (B, Tv, F), boxes (B, Tv, 5), order (B, Tv) -> (B, Tv, d_model)
        dtype = self.feat[0].weight.dtype
        feats = feats.to(dtype)
        if self.mode == "grid":
            return self.feat(feats) + self.pos(boxes.to(dtype)) + self.img_order(order)
        if token_table is None:
            raise ValueError("visual input 'reference' needs the LM's token table")
        zero_boxes = feats.new_zeros(*feats.shape[:2], 5)  # (x1, x2, y1, y2, area) all 0
        rows = token_table.num_embeddings - object_order_ids(order) - 1  # (B, Tv)
        # called as a module (ZeRO-3 gathers its weight), its BART scale undone: raw rows
        obj = token_table(rows) / getattr(token_table, "embed_scale", 1.0)
        return self.feat(feats) + self.pos(zero_boxes) + self.img_order(order) + obj.to(dtype)


def _no_position_for_leading(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of BART's encoder embed_positions: the first `vlds_skip` tokens (visual,
    prompt) get no position and the text the positions 0.. (out[:, j] is position j's)."""
    n = module.__dict__.pop("vlds_skip", 0)  # set by VLModel.encoder_inputs for one call
    if not n:
        return out
    kept = out.narrow(-2, 0, out.shape[-2] - n)
    return torch.cat([torch.zeros_like(out.narrow(-2, 0, n)), kept], dim=-2)


def _no_norm_for_leading(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of BART's encoder layernorm_embedding: the first `vlds_skip` tokens (visual)
    pass through unnormalised."""
    n = module.__dict__.pop("vlds_skip", 0)
    if not n:
        return out
    return torch.cat([args[0][:, :n].to(out.dtype), out[:, n:]], dim=1)


class VLModel(nn.Module):
    """Language model + visual embedding (+ PEFT modules, attached by vlds.peft.inject)."""

    def __init__(self, lm: nn.Module, arch: str, feat_dim: int, visual_input: str = "reference"):
        super().__init__()
        self.lm = lm
        self.arch = arch
        self.feat_dim = feat_dim
        self.visual_input = visual_input
        embed = VisualEmbedding(feat_dim, lm.config.d_model, arch, mode=visual_input)
        self.visual_embed = backbone_init(embed, arch, getattr(lm.config, "init_std", 0.02))
        # Reference input under BART: positions and layernorm_embedding for the text only
        self.text_only_embedding = visual_input == "reference" and arch == "bart"
        if self.text_only_embedding:
            enc = lm.get_encoder()
            enc.embed_positions.register_forward_hook(_no_position_for_leading)
            enc.layernorm_embedding.register_forward_hook(_no_norm_for_leading)
        self.peft = nn.ModuleDict()  # filled by vlds.peft.inject
        self.router = None  # per-sample task routing, set by vlds.peft.inject
        # (embeds, mask) -> (embeds, mask) applied to the text part, e.g. prompt tuning
        self.input_transforms: list[nn.Module] = []
        self.tower = None  # a VisionTower that trains (attach_tower), or None: frozen outside
        self.max_frames = 0

    def attach_tower(self, tower: nn.Module, max_frames: int) -> None:
        """Hold a tower part of which trains (vlds.model.vision.train_tower): its parameters
        become the model's (inside the DeepSpeed engine: optimised, partitioned, saved, and
        counted in the "% updated"), and encoder_inputs computes the visual tokens from the
        batch's pixels with the graph. Called after apply_peft, which freezes the model."""
        self.tower, self.max_frames = tower, max_frames
        tower.in_model = True

    @property
    def d_model(self) -> int:
        return self.lm.config.d_model

    def backbone_init(self, module: nn.Module) -> nn.Module:
        """`module` (built by a PEFT method) initialised as the reference's backbone class
        would: see the function `backbone_init`."""
        return backbone_init(module, self.arch, getattr(self.lm.config, "init_std", 0.02))

    def encoder_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "vis_feats" not in batch:
            if self.tower is None:
                raise ValueError("a batch of pixels for a model without a tower: run its "
                                 "VisionTower.visual_inputs first")  # fmt: skip
            batch = self.tower._visual_inputs(batch, self.max_frames)
        table = self.lm.get_input_embeddings()
        text = table(batch["input_ids"])  # (B, Tt, d), scaled for BART
        n_text = text.shape[1]
        text_mask = batch["attention_mask"]
        for transform in self.input_transforms:
            text, text_mask = transform(text, text_mask)  # e.g. (B, L + Tt, d) with prompts
        vis = self.visual_embed(
            batch["vis_feats"], batch["vis_boxes"], batch["vis_order"], token_table=table
        )  # (B, Tv, d)
        # Visual tokens first: their count is fixed per task, so every real token keeps its
        # position whatever the text padding of the micro-batch (see the module docstring).
        embeds = torch.cat([vis.to(text.dtype), text], dim=1)  # (B, Tv + L + Tt, d)
        mask = torch.cat([batch["vis_mask"], text_mask], dim=1)  # (B, Tv + L + Tt)
        if self.text_only_embedding:  # read (once) by the hooks of the next encoder call
            enc = self.lm.get_encoder()
            # no position for the visual tokens and the prompt (modeling_bart.py:625-631) ...
            enc.embed_positions.vlds_skip = vis.shape[1] + text.shape[1] - n_text
            # ... LayerNorm on [prompt ; text], not on the visual tokens (modeling_bart.py:661)
            enc.layernorm_embedding.vlds_skip = vis.shape[1]
        return embeds, mask

    def _route(self, batch: dict) -> None:
        if self.router is not None:
            self.router.set(batch["task_ids"], single=batch.get("task_id"))

    def forward(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of `labels` (-100 = ignored), reduced as the reference's task models:
        by default each sample's mean over its tokens, times the sample's `loss_weight` (a VQA
        answer's soft score, vqa_model.py; 1 when absent), then the mean over samples
        (vqa/gqa/nlvr_model.py, video_model.py). Unlike a mean over all tokens, this makes N
        ranks with micro-batch b equal one rank with micro-batch N x b. A batch whose
        `loss_reduction` is "token" (COCO captions, caption_model.py) takes the mean over every
        target token of the batch instead, which depends on the split over ranks."""
        tok, n = self._token_losses(batch)
        if batch.get("loss_reduction") == "token":
            return tok.sum() / n.sum().clamp(min=1)
        per_sample = tok.sum(dim=1) / n.clamp(min=1)  # (B,)
        if "loss_weight" in batch:
            per_sample = per_sample * batch["loss_weight"].to(per_sample)
        return per_sample.mean()

    def _token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy of `labels` (B, L), 0 where ignored, and each sample's count
        of target tokens (B,)."""
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        labels = batch["labels"]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
        tok = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        return tok, (labels != -100).sum(dim=1)

    @torch.no_grad()
    def sample_losses(self, batch: dict) -> torch.Tensor:
        """Each sample's mean cross-entropy over its target tokens (B,), unweighted: the
        validation loss (vlds.eval.loop), NaN for a sample without targets."""
        tok, n = self._token_losses(batch)
        return tok.sum(dim=1) / n.float()  # 0 / 0 = NaN

    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int = 1, max_new_tokens: int = 20, **kw):
        """Greedy (num_beams=1) or beam search from [visual ; text] -> (B, L) token ids."""
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        enc = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        return self.lm.generate(
            encoder_outputs=enc,
            attention_mask=mask,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kw,
        )

    @torch.no_grad()
    def score_choices(
        self, batch: dict, choices: list[torch.Tensor], rule: str = "first_token"
    ) -> torch.Tensor:
        """(B, n_choices) scores of candidate targets (NLVR2: "true" / "false"), higher = better.

        "first_token" (the reference, nlvr_model.py:111-127 and 240-255): each choice's logit
        at the first decoding position where the choices differ, teacher-forced through their
        common prefix (T5: position 0; BART, whose targets start with <s>: position 1).
        "sequence": each choice's summed log-probability over its tokens, EOS included."""
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        enc = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        if rule == "first_token":
            k = first_difference(choices)
            labels = choices[0][: k + 1].to(embeds.device).expand(embeds.shape[0], -1)
            out = self.lm(encoder_outputs=enc, attention_mask=mask, labels=labels.contiguous())
            ids = torch.stack([c[k] for c in choices]).to(embeds.device)
            return out.logits[:, k].float()[:, ids]  # (B, n_choices)
        if rule != "sequence":
            raise ValueError(f"choice rule {rule!r}; valid: {', '.join(NLVR_RULES)}")
        scores = []
        for ids in choices:  # ids: (L,) target tokens incl. eos
            labels = ids.to(embeds.device).expand(embeds.shape[0], -1).contiguous()
            logits = self.lm(encoder_outputs=enc, attention_mask=mask, labels=labels).logits
            logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores.append(logp.sum(-1))
        return torch.stack(scores, dim=1)

    @torch.no_grad()
    def score_targets(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """(B, n) summed log-probabilities, EOS included, of each sample's n candidate targets:
        `labels` (B, n, L) token ids, -100 after a candidate's end (eval.choice_predict=rank).
        The encoder runs once per sample; the decoder sees each sample's encoding n times (the
        router repeats task ids as for beam search)."""
        b, n, length = labels.shape
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        enc = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        hidden = BaseModelOutput(last_hidden_state=enc.last_hidden_state.repeat_interleave(n, 0))
        flat = labels.reshape(b * n, length).to(embeds.device)
        mask = mask.repeat_interleave(n, 0)
        logits = self.lm(encoder_outputs=hidden, attention_mask=mask, labels=flat).logits
        tok = F.cross_entropy(
            logits.float().transpose(1, 2), flat, ignore_index=-100, reduction="none"
        )
        return -tok.sum(dim=1).view(b, n)


def first_difference(choices: list[torch.Tensor]) -> int:
    """The first index at which the candidate token sequences differ; their tokens there must
    be distinct (else the choices cannot be told apart by one position)."""
    for k in range(min(len(c) for c in choices)):
        tokens = {int(c[k]) for c in choices}
        if len(tokens) > 1:
            if len(tokens) < len(choices):
                raise ValueError(f"choices {choices} share a token at their first difference")
            return k
    raise ValueError(f"choices {choices} do not differ before one of them ends")


NLVR_RULES = ("first_token", "sequence")
CHOICE_RULES = ("generate", "rank")


@config_check
def check_model_inputs(cfg) -> None:
    """model.visual_input, eval.nlvr_predict, eval.choice_predict and
    eval.no_repeat_ngram_size (read here and by vlds.model.build / vlds.eval.loop)."""
    if cfg.model.visual_input not in VISUAL_INPUTS:
        raise ConfigError(
            f"model.visual_input={cfg.model.visual_input!r}; valid: reference (zero boxes, "
            f"object-order rows, BART positions/LayerNorm on the text only: the paper's code) "
            f"or grid (grid-cell boxes over [visual ; text])"
        )
    if cfg.eval.nlvr_predict not in NLVR_RULES:
        raise ConfigError(
            f"eval.nlvr_predict={cfg.eval.nlvr_predict!r}; valid: first_token (the reference: "
            f"true vs false logit at the first decoding position) or sequence (summed log-probs)"
        )
    if cfg.eval.choice_predict not in CHOICE_RULES:
        raise ConfigError(
            f"eval.choice_predict={cfg.eval.choice_predict!r}; valid: generate (the reference: "
            f"greedy decoding) or rank (the choice with the largest summed log-probability)"
        )
    n = cfg.eval.no_repeat_ngram_size
    if n is not None and n < 0:
        raise ConfigError(
            f"eval.no_repeat_ngram_size={n} must be >= 0 (0 = off) or none (the backbone's "
            f"generation config, as the reference)"
        )


@config_check
def check_vision_train(cfg) -> None:
    """model.vision_train is known and has pixels to train on (vlds.model.vision)."""
    from vlds.model.vision import VISION_TRAIN

    mode = cfg.model.vision_train
    if mode not in VISION_TRAIN:
        raise ConfigError(
            f"model.vision_train={mode!r}; valid: {', '.join(VISION_TRAIN)} (frozen: the "
            f"paper's choice; full: all it computes the tokens with; ln: its normalisation "
            f"layers; adapter: adapters in its blocks)"
        )
    if mode == "frozen":
        return
    if cfg.data.features == "true":
        raise ConfigError(
            f"model.vision_train={mode} trains the CLIP tower, which needs pixels, but "
            f"data.features=true reads cached features (computed once by a frozen tower); "
            f"point data.root at pixel shards with --data.features=false, or keep "
            f"--model.vision_train=frozen"
        )
    if cfg.data.blind:
        raise ConfigError(
            f"data.blind feeds every sample one constant image (the text prior), from which "
            f"a training tower (model.vision_train={mode}) learns nothing; set "
            f"--model.vision_train=frozen"
        )
