"""Build the tokenizer, the frozen vision tower and the VL model from a Config.

Real weights load by hub name ("t5-base", "facebook/bart-base", open_clip "RN101"/"openai") or
from a local directory (`save_pretrained` output / an open_clip checkpoint file); `lm="random"`
builds a randomly initialised model of the configured sizes without touching the network.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlds.config import Config, ConfigError
from vlds.data.tasks import VIDEO_TASKS
from vlds.model.vision import VisionTower, train_tower
from vlds.model.vl import VLModel

log = logging.getLogger("vlds")


def build_tokenizer(cfg: Config, data_root: Path | None = None):
    from transformers import AutoTokenizer, T5Tokenizer

    name = cfg.model.tokenizer
    if name == "synthetic":
        if data_root is None:
            raise ConfigError("model.tokenizer=synthetic needs the shapes-world data folder")
        tok = T5Tokenizer.from_pretrained(str(Path(data_root) / "tokenizer"), extra_ids=0)
    elif name == "" and cfg.model.lm == "random":
        raise ConfigError(
            "model.lm=random has no tokenizer of its own; set model.tokenizer to 'synthetic' or "
            "to a tokenizer directory"
        )
    elif name and (Path(name) / "spiece.model").is_file():
        tok = T5Tokenizer.from_pretrained(name, extra_ids=0)
    else:
        tok = AutoTokenizer.from_pretrained(name or cfg.model.lm)
    if cfg.model.extra_tokens:
        # The reference extends the vocabulary with <vis_extra_id_k> tokens (200 for bart-base).
        tok.add_tokens([f"<vis_extra_id_{i}>" for i in range(cfg.model.extra_tokens)])
    return tok


def build_lm(
    cfg: Config, vocab: int, pad: int, eos: int, bos: int | None = None, path: str | None = None
):
    """The encoder-decoder: random of the configured size, or pretrained by name/path (`path`
    overrides model.lm: the resolved embedded model, see `build_model`).

    vocab, pad, eos (and BART's bos, default pad) are what a tokenizer would give; benchmarks
    pass t5-base's (32100, 0, 1) without one."""
    m = cfg.model
    name = path or m.lm
    if name == "synthetic":
        raise ConfigError("model.lm=synthetic is resolved by build_model (it needs the data)")
    if name == "random":
        if m.d_model % m.num_heads:
            raise ConfigError(
                f"model.d_model={m.d_model} is not divisible by num_heads={m.num_heads}"
            )
        if m.arch == "t5":
            from transformers import T5Config, T5ForConditionalGeneration

            config = T5Config(
                vocab_size=vocab,
                d_model=m.d_model,
                d_ff=m.d_ff,
                d_kv=m.d_model // m.num_heads,
                num_layers=m.num_layers,
                num_decoder_layers=m.num_layers,
                num_heads=m.num_heads,
                dropout_rate=m.dropout,
                feed_forward_proj="relu",
                tie_word_embeddings=True,
                pad_token_id=pad,
                eos_token_id=eos,
                decoder_start_token_id=pad,
            )
            lm = T5ForConditionalGeneration(config)
            set_generation_defaults(lm, cfg.eval.no_repeat_ngram_size)
            return lm
        from transformers import BartConfig, BartForConditionalGeneration

        bos = bos if bos is not None else pad
        config = BartConfig(
            vocab_size=vocab,
            d_model=m.d_model,
            encoder_layers=m.num_layers,
            decoder_layers=m.num_layers,
            encoder_attention_heads=m.num_heads,
            decoder_attention_heads=m.num_heads,
            encoder_ffn_dim=m.d_ff,
            decoder_ffn_dim=m.d_ff,
            max_position_embeddings=1024,
            dropout=m.dropout,
            pad_token_id=pad,
            eos_token_id=eos,
            bos_token_id=bos,
            decoder_start_token_id=eos,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            tie_word_embeddings=True,
        )
        lm = BartForConditionalGeneration(config)
        set_generation_defaults(lm, cfg.eval.no_repeat_ngram_size)
        return lm

    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    hf_config = AutoConfig.from_pretrained(name)
    if hf_config.model_type != m.arch:
        raise ConfigError(
            f"model.lm={name!r} is a {hf_config.model_type} model but model.arch={m.arch!r}; "
            f"set --model.arch={hf_config.model_type}"
        )
    from vlds.peft.registry import method_class

    # the hub model's width, not model.d_model, sizes the PEFT modules
    method_class(cfg.peft.method)(cfg.peft, cfg.task_list).check(hf_config.d_model, m.arch)
    drop = {"dropout_rate": m.dropout} if m.arch == "t5" else {"dropout": m.dropout}
    lm = AutoModelForSeq2SeqLM.from_pretrained(name, **drop)
    old_rows = lm.get_input_embeddings().num_embeddings
    if vocab > old_rows:
        lm.resize_token_embeddings(vocab, mean_resizing=False)
        # The added rows (and the object-order rows among them, vlds.model.vl) drawn as the
        # reference's transformers 4.2 drew them: its resize ran the model's _init_weights on a
        # fresh nn.Embedding, N(0, init_std = 0.02) for BART; T5's leaves nn.Embedding at
        # PyTorch's N(0, 1).
        with torch.no_grad():
            std = lm.config.init_std if m.arch == "bart" else 1.0
            lm.get_input_embeddings().weight[old_rows:].normal_(0.0, std)
    set_generation_defaults(lm, cfg.eval.no_repeat_ngram_size)
    return lm


def set_generation_defaults(lm, no_repeat_ngram_size: int | None) -> None:
    """Decoding as the reference's `generate` (transformers 4.2.1, which reads the backbone's
    config): its no_repeat_ngram_size (bart-base: 3) unless eval.no_repeat_ngram_size sets one;
    no forced BOS / EOS token (4.2.1 had neither; bart-base's config now names both)."""
    g = lm.generation_config
    if no_repeat_ngram_size is not None:
        g.no_repeat_ngram_size = no_repeat_ngram_size
    g.forced_bos_token_id = None
    g.forced_eos_token_id = None


def vocab_of(tokenizer) -> tuple[int, int, int, int | None]:
    """(vocab, pad, eos, bos): what build_lm reads from a tokenizer."""
    t = tokenizer
    return len(t), t.pad_token_id, t.eos_token_id, t.bos_token_id


def tower_weights(cfg: Config) -> str:
    """model.vision_pretrained resolved: "synthetic" is the embedded tower pretrained on the
    shapes world, cached on first use (vlds.model.embedded_tower); anything else as given."""
    if cfg.model.vision_pretrained != "synthetic":
        return cfg.model.vision_pretrained
    from vlds.model.embedded_tower import ensure_tower

    return str(ensure_tower(cfg.model.vision))


def build_tower(cfg: Config) -> VisionTower:
    """The frozen tower, after seeding torch with train.seed: a random tower (and the language
    model built after it) is a function of the seed, in training, evaluation and extraction.
    The embedded pretrained tower is made (once) before the seed is set: it has its own."""
    weights = tower_weights(cfg)
    torch.manual_seed(cfg.train.seed)
    return VisionTower(cfg.model.vision, weights, cfg.model.grid_pool)


def feat_dim_for(cfg: Config, tower: VisionTower) -> int:
    """Grid-token width for image tasks, pooled frame-embedding width for video tasks."""
    return tower.pooled_dim if cfg.task_list[0] in VIDEO_TASKS else tower.grid_dim


def lm_weights(cfg: Config, tokenizer, data_root: Path | None = None) -> str:
    """model.lm resolved: "synthetic" is the embedded model pretrained on the shapes world and
    cached in the data folder (vlds.model.embedded_lm); anything else as given."""
    if cfg.model.lm != "synthetic":
        return cfg.model.lm
    if data_root is None:
        raise ConfigError("model.lm=synthetic needs the shapes-world data folder")
    from vlds.model.embedded_lm import ensure_lm

    return str(ensure_lm(cfg, data_root, tokenizer))


def load_visual_embed(model: VLModel, lm_path: str) -> None:
    """The visual embedding a pretraining run wrote beside its language model (vlds.pretrain:
    <dir>/visual_embed.safetensors), when model.lm is such a folder; it must fit this model."""
    from vlds.pretrain import VISUAL_EMBED

    f = Path(lm_path) / VISUAL_EMBED
    if not f.is_file():
        return
    from safetensors.torch import load_file

    try:
        model.visual_embed.load_state_dict(load_file(f))
    except RuntimeError as e:
        raise ConfigError(
            f"{f} does not fit this model's visual embedding (another tower or width?): "
            f"{' '.join(str(e).split())[:300]}; pretrain with the same --model.vision, or "
            f"delete the file to start it fresh"
        ) from None
    log.info("loaded the pretrained visual embedding from %s", f)


def build_model(
    cfg: Config, tokenizer, tower: VisionTower, data_root: Path | None = None
) -> VLModel:
    """VL model with the configured PEFT method injected and everything else frozen. Seeds
    torch again after resolving model.lm=synthetic (which may pretrain it first), so the
    trainable modules start the same whether or not the model came from the cache."""
    from vlds.peft import apply_peft

    path = lm_weights(cfg, tokenizer, data_root)
    if path != cfg.model.lm:
        torch.manual_seed(cfg.train.seed + 1)
    lm = build_lm(cfg, *vocab_of(tokenizer), path=path)
    model = VLModel(lm, cfg.model.arch, feat_dim_for(cfg, tower), cfg.model.visual_input)
    load_visual_embed(model, path)
    apply_peft(model, cfg.peft, cfg.task_list)
    if cfg.model.vision_train != "frozen":  # the tower goes inside the model (and the engine)
        video = cfg.task_list[0] in VIDEO_TASKS
        p = cfg.peft
        train_tower(tower, cfg.model.vision_train, p.reduction_factor, video, p.fused_kernel)
        model.attach_tower(tower, cfg.model.max_frames)
    return model
