"""The shapes world's own sentencepiece tokenizer, trained on the text of every sample.

``train_tokenizer(root, spec)`` writes {root}/tokenizer/spiece.model, which
``T5Tokenizer.from_pretrained(dir, extra_ids=0)`` loads; the file is byte-reproducible.
"""

from __future__ import annotations

import io
import tempfile
from collections import Counter
from pathlib import Path

from vlds.data.synthetic.language import make_sample
from vlds.data.synthetic.world import SyntheticSpec, _split_sizes
from vlds.data.tasks import ALL_TASKS, TASKS


def _texts(rec: dict) -> list[str]:
    task = TASKS[rec["task"]]
    return [task.encoder_text(rec), *task.references(rec), *rec.get("choices", ())]


def _seed_pieces(texts: list[str]) -> list[tuple[str, int]]:
    """Every in-word substring (2-16 chars) seen at least twice, with its count. sentencepiece's
    own suffix-array seeding misses whole words that are always followed by a space, which in
    a templated language is most of them, leaving "which" as "wh" "ic" "h"."""
    words = Counter(w for text in texts for w in text.split())
    counts = Counter()
    for word, n in words.items():
        word = "\u2581" + word  # sentencepiece's word-start marker
        for a in range(len(word)):
            for b in range(a + 2, min(len(word), a + 16) + 1):
                counts[word[a:b]] += n
    return [(piece, n) for piece, n in counts.most_common() if n >= 2]


def train_tokenizer(root: Path, spec: SyntheticSpec) -> Path:
    """Train a sentencepiece unigram model on the text of every sample of all eight tasks (prompts,
    questions, subtitles, choices, answers, captions) and return {root}/tokenizer, which
    ``T5Tokenizer.from_pretrained(dir, extra_ids=0)`` loads. Texts are regenerated without
    rendering, so the vocabulary never depends on which shards were written."""
    import sentencepiece as spm

    texts = [
        text
        for task in ALL_TASKS
        for split, n in _split_sizes(task, spec).items()
        for i in range(n)
        for text in _texts(make_sample(task, split, i, spec, render=False)["json"])
    ]
    out = Path(root) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds.tsv"
        seeds.write_text("".join(f"{p}\t{n}\n" for p, n in _seed_pieces(texts)))
        # T5's special ids, no BOS. hard_vocab_limit=False: the world has only ~200 useful pieces.
        # split_digits: otherwise timestamps like "(12.5-" fill most of the vocabulary.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=spec.vocab_size,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            split_digits=True,
            seed_sentencepieces_file=str(seeds),
            num_threads=1,
            minloglevel=2,
        )
    (out / "spiece.model").write_bytes(_without_paths(model.getvalue()))
    return out


def _without_paths(model: bytes) -> bytes:
    """The model proto records the temp seed-file path; blank it so the file is reproducible."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: keep the model as is, only its bytes vary
        return model
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    # older sentencepiece has no such field (the H200 image's, 0.2.2 by its package list)
    if "seed_sentencepieces_file" in proto.trainer_spec.DESCRIPTOR.fields_by_name:
        proto.trainer_spec.seed_sentencepieces_file = ""
    return proto.SerializeToString(deterministic=True)
