"""Shared tiny fixtures: a small corpus, a token store, tiny teachers. Everything is built here, nothing downloaded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: with 2 cores shared by test subprocesses (torchrun pairs), OpenMP spin-waiting makes
# tiny ops 50x slower; tiny tensors gain nothing from a second thread anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "babylm_like"

WORDS = ("the a dog cat bird sat ran jumped on under mat tree big small red blue happy sad and then "
         "mummy daddy look at this that is was very nice ball car house").split()


def write_corpus(path: Path, num_docs: int = 200, seed: int = 0, sentences: int = 5) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_docs):
            for _ in range(sentences):
                f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + " .\n")
            f.write("\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "corpus.txt")


@pytest.fixture(scope="session")
def store_path(tmp_path_factory, corpus) -> Path:
    from cachekd.tokens import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("stores") / "store"
    prepare(PrepareConfig(inputs=[str(corpus)], output=str(out), seq_len=16, vocab_size=300, dev_fraction=0.1),
            progress=False)
    return out


def make_teacher(store_path: Path, out: Path, seed: int = 0, arch: str = "llama", hidden: int = 32,
                 extra_vocab: int = 0) -> Path:
    import torch

    from cachekd.models import ModelConfig, build_model
    from cachekd.tokens import TokenStore

    st = TokenStore.open(store_path)
    torch.manual_seed(seed)
    m = build_model(ModelConfig(arch=arch, hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=64),
                    st.vocab_size + extra_vocab, st.seq_len)
    m.save_pretrained(out)
    st.load_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory, store_path) -> Path:
    return make_teacher(store_path, tmp_path_factory.mktemp("teachers") / "teacher_a", seed=1)


@pytest.fixture(scope="session")
def teacher_b_path(tmp_path_factory, store_path) -> Path:
    return make_teacher(store_path, tmp_path_factory.mktemp("teachers") / "teacher_b", seed=2, arch="gpt2")


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


def invoke(runner, args):
    from cachekd_cli.main import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_clean_error(result, *fragments):
    """Non-zero exit, one 'Error: ...' sentence, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.output.strip()
    assert out.splitlines()[-1].startswith("Error:") or "Error:" in out, out
    for frag in fragments:
        assert frag.lower() in out.lower(), (frag, out)
