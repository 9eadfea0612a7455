import time

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models.loading import load_model
from slimlm.models.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_local_directory_round_trip(tiny_dir, tokenizer):
    loaded = load_model(tiny_dir)
    assert loaded.source_kind == "directory"
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = tiny_model("llama", vocab_size=len(tokenizer))(ids).logits
    assert torch.equal(loaded.model(ids).logits, expected)
    assert not loaded.model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_option(tiny_dir, dtype):
    loaded = load_model(tiny_dir, dtype=str(dtype).removeprefix("torch."))
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}


def test_embedded_default_model(real_model):
    assert real_model.source_kind == "embedded"
    assert real_model.source.endswith(".gguf")
    assert real_model.model.dtype == torch.float32
    assert real_model.model.config.num_hidden_layers == 30
    # The cached conversion is a plain float checkpoint: no GGUF quantization config survives.
    assert getattr(real_model.model.config, "quantization_config", None) is None


def test_gguf_file_path_uses_the_same_cache(real_model):
    loaded = load_model(real_model.source)
    assert loaded.source_kind == "gguf"
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    assert torch.equal(loaded.model(ids).logits, real_model.model(ids).logits)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    start = time.monotonic()
    with pytest.raises(SlimlmError, match="cannot reach the Hugging Face hub") as error:
        load_model("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - start < 10
    assert "local path" in str(error.value)


def test_hub_id_without_network_fails_within_seconds():
    """The machine's real network state: offline here, so the same message must come quickly."""
    from slimlm.models.loading import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable from this machine")
    start = time.monotonic()
    with pytest.raises(SlimlmError, match="cannot reach the Hugging Face hub"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert time.monotonic() - start < 15


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(SlimlmError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")


def test_unknown_dtype_is_rejected_before_loading():
    with pytest.raises(SlimlmError, match="unknown dtype 'float8'"):
        load_model("smollm2-135m", dtype="float8")


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(SlimlmError, match="no config.json"):
        load_model(tmp_path)
