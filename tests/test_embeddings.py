"""The prompt encoder run natively (torch + tokenizers, no transformers) against sentence-transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from registry.embeddings import (PromptEncoder, default_encoder_dir, embed_texts, load_encoder,
                                 load_prompt_encoder)

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "What is 2 plus 3?",
    "   Reverse the word House.  ",          # stripped, as sentence-transformers does
    "count the letters " * 80,               # > 256 tokens: truncated at max_seq_length
    "日本語の文を並べ替えてください。",
    "a",
    "Sort these numbers in ascending order: 42, 17, 23",
]


def test_native_encoder_equals_sentence_transformers():
    from generator.condition import encode_prompt_tokens

    encoder = load_prompt_encoder()
    assert isinstance(encoder, PromptEncoder)  # the default folder runs natively
    condition, pooled = encoder.encode(TEXTS, tokens=64)
    reference = load_encoder()
    ref_pooled = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    ref_condition = encode_prompt_tokens(reference, TEXTS, max_tokens=64)  # what training conditions on
    assert condition.shape == (len(TEXTS), 64, 384) and pooled.shape == (len(TEXTS), 384)
    assert np.abs(pooled - ref_pooled).max() < 1e-5
    assert (condition - ref_condition).abs().max() < 1e-4
    n = len(encoder.tokenizer.encode(TEXTS[0]).ids)  # [CLS] what is 2 plus 3 ? [SEP]
    assert n == 8 and condition[0, n:].eq(0).all() and condition[0, :n].abs().sum(dim=-1).gt(0).all()
    assert condition[2].abs().sum(dim=-1).gt(0).all()  # the long prompt is cut at 64, not padded
    # batches are sorted by length and padded to their own longest: any batch size gives the same vectors
    small_condition, small_pooled = encoder.encode(TEXTS, tokens=64, batch_size=2)
    assert np.abs(small_pooled - pooled).max() < 1e-5 and (small_condition - condition).abs().max() < 1e-4
    np.testing.assert_allclose(embed_texts(TEXTS), pooled, atol=1e-6, rtol=0)


def test_bf16_encoder_is_close_to_fp32():
    encoder = load_prompt_encoder()
    condition, pooled = encoder.encode(TEXTS, tokens=64)
    condition16, pooled16 = encoder.encode(TEXTS, tokens=64, precision="bf16")
    assert condition16.dtype == torch.float32 and pooled16.dtype == np.float32
    cosine = (pooled16 * pooled).sum(axis=1)
    assert cosine.min() > 0.9999  # measured 0.99997 on these prompts
    relative = float((condition16 - condition).norm() / condition.norm())
    assert 0 < relative < 0.02    # measured 0.007
    assert condition16[0, 8:].eq(0).all() and condition16[0, :8].abs().sum(dim=-1).gt(0).all()  # padding stays zero


def test_native_encoder_imports_neither_transformers_nor_sentence_transformers():
    code = ("import sys; from registry.embeddings import embed_texts; v = embed_texts(['hi there']); "
            "assert v.shape == (1, 384); "
            "print(sorted(m for m in ('transformers', 'sentence_transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_other_folders_fall_back_to_sentence_transformers(tmp_path):
    """A folder the native path cannot run (here: weighted-mean pooling) is run by sentence-transformers
    behind the same interface."""
    source = default_encoder_dir()
    folder = tmp_path / "weighted-minilm"
    (folder / "1_Pooling").mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file():
            (folder / item.name).symlink_to(item)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_weightedmean_tokens=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))

    encoder = load_prompt_encoder(str(folder))
    assert not isinstance(encoder, PromptEncoder)
    condition, pooled = encoder.encode(TEXTS[:3], tokens=16)
    reference = load_encoder(str(folder)).encode(TEXTS[:3], normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(pooled - reference).max() < 1e-5
    native_condition, native_pooled = load_prompt_encoder().encode(TEXTS[:3], tokens=16)
    assert (condition - native_condition).abs().max() < 1e-4    # same transformer, same hidden states
    assert np.abs(pooled - native_pooled).max() > 1e-3         # a different pooling


@pytest.mark.parametrize("change, message", [
    (lambda weights: weights.pop("encoder.layer.3.output.dense.weight"), "lacks tensor"),
    (lambda weights: weights.update({"embeddings.word_embeddings.weight": torch.zeros(10, 7)}), "does not fit"),
])
def test_a_broken_folder_is_one_line_error(tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    from registry.embeddings import EncoderNotFound, _native_plan

    source = default_encoder_dir()
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (folder / item.name).symlink_to(item)
    (folder / "1_Pooling").symlink_to(source / "1_Pooling")
    weights = load_file(str(source / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(EncoderNotFound, match=message) as caught:
        PromptEncoder(folder, _native_plan(folder))
    assert "\n" not in str(caught.value)
