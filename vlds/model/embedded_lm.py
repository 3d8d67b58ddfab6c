"""The embedded default's language model: a tiny T5 / BART pretrained on the shapes world.

The paper's adapters adapt a *pretrained* T5 / BART; the frozen random language model the
embedded default used to adapt could not be steered by adapters at all (measured: every
adapter run answered from the text alone, while full fine-tuning of the same model read the
images). This module is the stand-in for that pretraining, run once on first use: the tiny
encoder-decoder of the configured sizes learns the four image tasks of the shapes world
(VQA, GQA, NLVR2, captions in 4:3:6:1: NLVR2's true / false is the slowest to learn) from
*oracle* visual tokens: for each grid cell, the sum of the word embeddings of the object there
("large" + "red" + "circle"; zeros when the cell is empty; NLVR2's two images add "left" /
"right"), laid out first in the encoder input
exactly where the downstream model puts its visual tokens. The downstream run then has to
learn to see: its visual embedding and adapters must turn the frozen tower's tokens into what
this model reads. A model that ignores its images cannot beat the text prior (reported beside
every score: vlds.eval.grounding).

The result is cached in the data folder, because it depends on that folder's tokenizer:
``<data root>/lms/<arch>-d<d>-l<layers>-h<heads>-ff<d_ff>-v<N>/`` (``save_pretrained`` output
plus the tokenizer), loaded by the real loading code like any local model directory
(``--model.lm=DIR``). Written here because this pretraining is specific to the procedural
world (no library has it); it is a plain torch loop of 4,500 AdamW steps at a peak learning
rate set by width (pretrain_lr; ~4 min on 2 cores; with 3,000 steps its shape questions and
NLVR2 stayed far below what 4,500 reach, bench/RESULTS.md).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("vlds")

LM_VERSION = 3  # part of the cache name: bump when the same call would give another model
STEPS, BATCH = 4500, 64
TASK_WEIGHTS = {"vqa": 4, "gqa": 3, "nlvr": 6, "caption": 1}
SIDES = ("left", "right")  # NLVR2's images, in the order the downstream model sees them


def pretrain_lr(d_model: int) -> float:
    """Peak learning rate by width, both measured (bench/RESULTS.md): 3e-3 reads the oracle
    tokens at d 64 (held-out exact match 0.83) but not at the miniature's d 96 (0.55; its VQA
    100 % and NLVR2 93 % at 1e-3)."""
    return 3e-3 if d_model <= 64 else 1e-3


def lm_dir(cfg, data_root: Path) -> Path:
    m = cfg.model
    name = f"{m.arch}-d{m.d_model}-l{m.num_layers}-h{m.num_heads}-ff{m.d_ff}-v{LM_VERSION}"
    return Path(data_root) / "lms" / name


class OracleTokens:
    """Scene -> its oracle visual tokens, (9, d) per image: the summed embeddings of each
    cell's object words, zeros for an empty cell."""

    def __init__(self, tokenizer, embed: torch.nn.Module):
        self.tok, self.embed, self._ids = tokenizer, embed, {}

    def _words(self, text: str) -> torch.Tensor:
        if text not in self._ids:
            self._ids[text] = torch.tensor(self.tok(text, add_special_tokens=False).input_ids)
        return self.embed(self._ids[text]).sum(0)

    def __call__(self, scenes) -> torch.Tensor:
        d = self.embed.weight.shape[1]
        out = []
        for scene, side in zip(scenes, SIDES, strict=False):
            cells = [torch.zeros(d)] * 9
            for o in scene.objects:
                r, c = o.cell
                cells[r * 3 + c] = self._words(f"{o.size} {o.color} {o.kind}")
            if len(scenes) > 1:  # the downstream image-order embedding's role
                cells = [x + self._words(side) for x in cells]
            out += cells
        return torch.stack(out)


def oracle_batch(rng: random.Random, tokenizer, oracle: OracleTokens, embed, n: int):
    """(encoder embeddings, attention mask, labels, targets) of n samples of the four image
    tasks, visual tokens first as in VLModel.encoder_inputs."""
    from vlds.data.synthetic import GENERATORS, SyntheticSpec
    from vlds.data.tasks import get_task

    spec = SyntheticSpec()
    tasks, weights = zip(*TASK_WEIGHTS.items(), strict=True)
    vis, texts, targets = [], [], []
    for _ in range(n):
        task = rng.choices(tasks, weights)[0]
        # split "lm": its own seeds, so no pretraining sample is a training or val sample
        rec, scenes = GENERATORS[task](
            random.Random(rng.random()), task, "lm", rng.randrange(10**9), spec
        )
        rec["task"] = task
        t = get_task(task)
        vis.append(oracle(scenes))
        texts.append(t.encoder_text(rec))
        targets.append(t.target(rec, rng))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = tokenizer(targets, padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    nv = max(v.shape[0] for v in vis)
    vis_mask = torch.tensor([[1] * v.shape[0] + [0] * (nv - v.shape[0]) for v in vis])
    vis = torch.stack([F.pad(v, (0, 0, 0, nv - v.shape[0])) for v in vis])
    embeds = torch.cat([vis, embed(enc.input_ids)], dim=1)
    return embeds, torch.cat([vis_mask, enc.attention_mask], dim=1), labels, targets


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean token cross-entropy, then the mean over samples (as VLModel)."""
    tok = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return (tok.sum(1) / (labels != -100).sum(1).clamp(min=1)).mean()


def pretrain(cfg, tokenizer, steps: int | None = None, seed: int = 0):
    """The configured encoder-decoder (model.arch and sizes, dropout 0) pretrained on the
    shapes world from oracle visual tokens; returns (model, held-out exact-match accuracy)."""
    from dataclasses import replace

    from tqdm import tqdm

    from vlds.model.build import build_lm, vocab_of

    steps = steps or STEPS
    torch.manual_seed(seed)
    plain = replace(cfg, model=replace(cfg.model, lm="random", dropout=0.0))
    lm = build_lm(plain, *vocab_of(tokenizer))
    embed = lm.get_input_embeddings()
    oracle = OracleTokens(tokenizer, embed)
    lr = pretrain_lr(cfg.model.d_model)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)  # linear warm-up, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / (steps - warm)))
    )
    rng = random.Random(seed)
    lm.train()
    bar = tqdm(
        range(steps),
        desc="pretraining the embedded language model",
        dynamic_ncols=True,
        mininterval=2,
    )
    for _ in bar:
        embeds, mask, labels, _ = oracle_batch(rng, tokenizer, oracle, embed, BATCH)
        loss = sample_loss(
            lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits, labels
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 5.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    lm.eval()
    with torch.no_grad():
        embeds, mask, _, targets = oracle_batch(
            random.Random(seed + 1), tokenizer, oracle, embed, 256
        )
        enc = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        ids = lm.generate(encoder_outputs=enc, attention_mask=mask, max_new_tokens=20)
    preds = tokenizer.batch_decode(ids, skip_special_tokens=True)
    acc = sum(p.strip() == t for p, t in zip(preds, targets, strict=True)) / len(targets)
    return lm, acc


def save_lm_dir(lm, tokenizer, path: Path) -> None:
    """A language model folder that --model.lm=DIR and --model.tokenizer=DIR load:
    save_pretrained of both, and a sentencepiece tokenizer's model file (loaded by
    T5Tokenizer as "synthetic" loads it)."""
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    vocab = getattr(tokenizer, "vocab_file", None)
    if vocab and Path(vocab).is_file():
        shutil.copy(vocab, Path(path) / "spiece.model")


def ensure_lm(cfg, data_root: Path, tokenizer) -> Path:
    """The cached pretrained model directory (see the module docstring), pretrained first if
    missing: once per host (others wait on a lock), renamed into place whole."""
    from vlds.data.synthetic.package import build_once

    def build(tmp: Path) -> None:
        lm, acc = pretrain(cfg, tokenizer)
        log.info("pretrained the embedded language model: held-out exact match %.2f", acc)
        save_lm_dir(lm, tokenizer, tmp)
        (tmp / "pretraining.json").write_text(
            json.dumps(
                {
                    "steps": STEPS,
                    "lr": pretrain_lr(cfg.model.d_model),
                    "exact_match": round(acc, 4),
                    "version": LM_VERSION,
                }
            )
            + "\n"
        )

    return build_once(lm_dir(cfg, data_root), lambda p: (p / "config.json").is_file(), build)
