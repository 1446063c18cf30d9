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


def empty_postgres() -> str:
    """The test PostgreSQL, emptied; fails under CI when it is not configured, else skips."""
    url = postgres_url()
    if not url:
        if os.environ.get("CI"):
            pytest.fail("REGISTRY_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh")
        pytest.skip("PostgreSQL not configured (scripts/test.sh sets REGISTRY_TEST_POSTGRES_URL)")
    _reset_postgres(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, registry_home, monkeypatch) -> str:
    """Run a storage test on SQLite and on PostgreSQL (the test command starts the server)."""
    if request.param == "sqlite":
        url = f"sqlite:///{registry_home / 'registry.db'}"
        registry_home.mkdir(parents=True, exist_ok=True)
    else:
        url = empty_postgres()
    monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
    return url


# -- blob stores: the local folder, or S3 (moto's S3 API server, a real process) ------------------


@pytest.fixture(scope="session")
def s3_endpoint():
    """The S3 API the test command started (``$REGISTRY_TEST_S3_ENDPOINT``), else one started here."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    url = os.environ.get("REGISTRY_TEST_S3_ENDPOINT")
    process = None
    if not url:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    process.kill()
                    pytest.fail("could not start moto's S3 server (pip install 'moto[server]')")
                time.sleep(0.1)
    yield url
    if process is not None:
        process.kill()
        process.wait()


def make_bucket(endpoint: str, monkeypatch) -> str:
    """A fresh bucket on ``endpoint``, with the AWS variables pointing the registry at it; its name."""
    import uuid

    import boto3

    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    bucket = f"registry-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def blob_backend(request) -> str:
    """Where ``reg`` keeps blobs: "local" here; modules with storage tests override it with
    ``params=["local", "s3"]`` so the same tests run on both."""
    return getattr(request, "param", "local")


@pytest.fixture
def blob_url(blob_backend, request, monkeypatch) -> str | None:
    """``$REGISTRY_BLOB_URL`` for the backend (a fresh bucket for S3; deletions not delayed)."""
    if blob_backend == "local":
        monkeypatch.delenv("REGISTRY_BLOB_URL", raising=False)
        return None
    bucket = make_bucket(request.getfixturevalue("s3_endpoint"), monkeypatch)
    url = f"s3://{bucket}/blobs"
    monkeypatch.setenv("REGISTRY_BLOB_URL", url)
    monkeypatch.setenv("REGISTRY_BLOB_GRACE_S", "0")
    return url


def damage_blob(reg, digest: str, how: str) -> None:
    """Corrupt (``how="corrupt"``) or delete (``"delete"``) a stored blob behind the registry's back,
    on either backend, and drop the S3 store's cached copy."""
    from registry.blobs import S3BlobStore

    store = reg.blobs
    if isinstance(store, S3BlobStore):
        if how == "delete":
            store.client.delete_object(Bucket=store.bucket, Key=store.key(digest))
        else:
            data = store.client.get_object(Bucket=store.bucket, Key=store.key(digest))["Body"].read()
            store.client.put_object(Bucket=store.bucket, Key=store.key(digest), Body=data[:-8] + b"\0" * 8)
        (store.cache_root / "sha256" / digest[:2] / digest).unlink(missing_ok=True)
        return
    path = store.path(digest)
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)


@pytest.fixture
def reg(database_url, blob_url):
    """An empty registry on the parametrised database (and blob store)."""
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
