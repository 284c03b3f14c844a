"""What the tests of scripts/base_train.py share: the script loaded as a module, a tiny CPU run's
flags, and two fixtures (import them into a test module to use them there)."""

import functools
import importlib.util

import pytest
import torch

from nanochat.common import REPO_ROOT

BASE_TRAIN = REPO_ROOT / "scripts" / "base_train.py"
TINY_SETTINGS = dict(depth=2, n_embd=64, max_seq_len=32, device_batch_size=2, total_batch_size=128,
                     data="tinyshakespeare", tokenizer="char", eval_tokens=256, eval_every=2, sample_every=-1,
                     device="cpu", log_every=1)


def tiny_flags(**overrides) -> list[str]:
    """base_train flags of a 2-layer, 64-wide char model on Tiny Shakespeare, a few CPU steps."""
    return [item for key, value in {**TINY_SETTINGS, **overrides}.items() for item in (f"--{key}", str(value))]


@functools.cache
def load_base_train():
    """scripts/base_train.py as a module (one instance for the whole session)."""
    spec = importlib.util.spec_from_file_location("base_train_under_test", BASE_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box run several times faster on one thread (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """One tokenized copy of the corpus for the whole session, outside the repository."""
    cache = tmp_path_factory.getbasetemp() / "token_cache"
    monkeypatch.setenv("NANOCHAT_CACHE_DIR", str(cache))
    return cache
