"""Shared fixtures: a small shapes-world dataset written once per session, tiny configs."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*No pretrained weights loaded.*")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small embedded dataset (all eight tasks) + its tokenizer."""
    from vlds.data.synthetic import SyntheticSpec, ensure_synthetic

    spec = SyntheticSpec(
        seed=0,
        train_per_task=192,
        val_per_task=48,
        video_train_per_task=96,
        video_val_per_task=32,
        samples_per_shard=64,
    )
    return ensure_synthetic(tmp_path_factory.mktemp("shapes"), spec)


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(shapes_root / "tokenizer"), extra_ids=0)
