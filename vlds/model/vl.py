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
bias spans all pairs and BART adds its learned positions to visual tokens too (the reference
restricts T5's bias to text-text pairs); this keeps PEFT injection and generation standard.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm_layer(arch: str, d: int) -> nn.Module:
    """T5 uses RMSNorm (T5LayerNorm), BART nn.LayerNorm, in the visual embedding as in the LM."""
    if arch == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        return T5LayerNorm(d)
    return nn.LayerNorm(d)


class VisualEmbedding(nn.Module):
    """Norm(Linear(feat)) + Norm(Linear(box)) + image-order embedding; always trainable."""

    def __init__(self, feat_dim: int, d_model: int, arch: str, n_images: int = 2):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(feat_dim, d_model), norm_layer(arch, d_model))
        self.pos = nn.Sequential(nn.Linear(5, d_model), norm_layer(arch, d_model))
        self.img_order = nn.Embedding(n_images, d_model)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, order: torch.Tensor):
        # feats (B, Tv, F), boxes (B, Tv, 5), order (B, Tv) -> (B, Tv, d_model)
        feats = feats.to(self.feat[0].weight.dtype)
        boxes = boxes.to(self.feat[0].weight.dtype)
        return self.feat(feats) + self.pos(boxes) + self.img_order(order)


class VLModel(nn.Module):
    """Language model + visual embedding (+ PEFT modules, attached by vlds.peft.inject)."""

    def __init__(self, lm: nn.Module, arch: str, feat_dim: int):
        super().__init__()
        self.lm = lm
        self.arch = arch
        self.feat_dim = feat_dim
        self.visual_embed = VisualEmbedding(feat_dim, lm.config.d_model, arch)
        self.peft = nn.ModuleDict()  # filled by vlds.peft.inject
        self.router = None  # per-sample task routing, set by vlds.peft.inject
        # (embeds, mask) -> (embeds, mask) applied to the text part, e.g. prompt tuning
        self.input_transforms: list[nn.Module] = []

    @property
    def d_model(self) -> int:
        return self.lm.config.d_model

    def encoder_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.lm.get_input_embeddings()(batch["input_ids"])  # (B, Tt, d), scaled for BART
        text_mask = batch["attention_mask"]
        for transform in self.input_transforms:
            text, text_mask = transform(text, text_mask)  # e.g. (B, L + Tt, d) with prompts
        vis = self.visual_embed(batch["vis_feats"], batch["vis_boxes"], batch["vis_order"])
        # Visual tokens first: their count is fixed per task, so every real token keeps its
        # position whatever the text padding of the micro-batch (see the module docstring).
        embeds = torch.cat([vis.to(text.dtype), text], dim=1)  # (B, Tv + Tt, d)
        mask = torch.cat([batch["vis_mask"], text_mask], dim=1)  # (B, Tv + Tt)
        return embeds, mask

    def _route(self, batch: dict) -> None:
        if self.router is not None:
            self.router.set(batch["task_ids"])

    def forward(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of `labels` (-100 = ignored): each sample's mean over its tokens, then
        the mean over samples, as the reference (VL-T5) does. Unlike a mean over all tokens,
        this makes N ranks with micro-batch b equal one rank with micro-batch N x b."""
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        labels = batch["labels"]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
        tok = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )  # (B, L)
        n = (labels != -100).sum(dim=1).clamp(min=1)
        return (tok.sum(dim=1) / n).mean()

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
    def score_choices(self, batch: dict, choices: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_choices) summed log-probabilities of each candidate target (NLVR2: true/false)."""
        self._route(batch)
        embeds, mask = self.encoder_inputs(batch)
        enc = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        scores = []
        for ids in choices:  # ids: (L,) target tokens incl. eos
            labels = ids.to(embeds.device).expand(embeds.shape[0], -1).contiguous()
            logits = self.lm(encoder_outputs=enc, attention_mask=mask, labels=labels).logits
            logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores.append(logp.sum(-1))
        return torch.stack(scores, dim=1)
