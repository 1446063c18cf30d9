"""Shared fixtures: an isolated registry home per test and a tiny llama base model built in-test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_VOCAB = 320


@pytest.fixture(autouse=True)
def registry_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own registry home; no test touches the user's real registry."""
    home = tmp_path / "registry-home"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return home


def build_tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on a few strings, with a chat template like SmolLM2's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "What is 2 plus 3? The answer is 5.",
        "Reverse the word cat: tac. Sort these letters: a b c.",
        "user assistant system 0 1 2 3 4 5 6 7 8 9 yes no true false",
    ] * 4
    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, vocab_size=TINY_VOCAB, min_frequency=1, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_llama(directory: Path, seed: int = 0):
    """A 2-layer llama (hidden 32, GQA 4 heads / 2 KV heads) saved as a local HF model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    build_tiny_tokenizer(directory)
    return model


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """Path to a saved tiny llama + tokenizer, built once per test session."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    """The tiny llama loaded in float32 (fresh copy per session; tests must not mutate it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir)


def make_tiny_adapter_dir(base_dir: Path, out_dir: Path, *, rank: int = 4, seed: int = 0,
                          targets=("q_proj", "v_proj"), alpha: int | None = None) -> Path:
    """A PEFT LoRA directory for the tiny llama with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture
def tiny_adapter_factory(tiny_base_dir, tmp_path):
    """Call with (name, **kwargs) to get a fresh tiny PEFT adapter directory."""
    def factory(name: str = "adapter", **kwargs) -> Path:
        return make_tiny_adapter_dir(tiny_base_dir, tmp_path / "adapters" / name, **kwargs)
    return factory


def postgres_url() -> str | None:
    """The test PostgreSQL URL exported by the test command, if any."""
    return os.environ.get("REGISTRY_TEST_POSTGRES_URL")


def _reset_postgres(url: str) -> None:
    """Empty the test database so each test starts from nothing."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, registry_home, monkeypatch) -> str:
    """Run a storage test on SQLite and on PostgreSQL (the test command starts the server)."""
    if request.param == "sqlite":
        url = f"sqlite:///{registry_home / 'registry.db'}"
        registry_home.mkdir(parents=True, exist_ok=True)
    else:
        url = postgres_url()
        if not url:
            if os.environ.get("CI"):
                pytest.fail("REGISTRY_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh")
            pytest.skip("PostgreSQL not configured (scripts/test.sh sets REGISTRY_TEST_POSTGRES_URL)")
        _reset_postgres(url)
    monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
    return url


@pytest.fixture
def reg(database_url):
    """An empty registry on the parametrised database."""
    from registry.store import Registry

    registry = Registry.open()
    yield registry
    registry.close()


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the ``registry`` command in-process: returns (exit code, stdout, stderr)."""
    import sys

    def run(*args):
        from cli.main import main

        monkeypatch.setattr(sys, "argv", ["registry", *map(str, args)])
        capsys.readouterr()  # drop what the test printed before the command ran
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
