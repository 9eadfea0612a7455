"""Quantized token embeddings (`quantize_head` with `embedding: true`): lookups, sharing with a tied head,
checkpoints, sizes, and the exporters."""

from __future__ import annotations

import pytest
import torch

from slimlm.compress import compress
from slimlm.errors import SlimlmError
from slimlm.eval.efficiency import count_parameters, disk_bytes
from slimlm.export.native import load, save
from slimlm.models.tiny import tiny_model
from slimlm.quant.grid import quantize_weight
from slimlm.quant.qembedding import QuantizedEmbedding
from slimlm.quant.qlinear import QuantizedLinear

CALIBRATION = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def head_and_embedding(family: str, bits: int = 8, group_size="channel", blocks_bits: int | None = 4):
    model = tiny_model(family)
    stages = [{"method": "quantize_head", "bits": bits, "group_size": group_size, "embedding": True}]
    if blocks_bits is not None:
        stages.append({"method": "rtn", "bits": blocks_bits, "group_size": 32})
    compress(model, {"stages": stages, "float_storage": "float32"}, calibration=CALIBRATION)
    return model


@pytest.mark.parametrize("family", ["gpt2", "opt"])  # tied families
@pytest.mark.parametrize("bits, group_size", [(8, "channel"), (4, 32)])
def test_a_tied_embedding_shares_the_quantized_heads_codes(family, bits, group_size):
    reference = tiny_model(family)
    model = head_and_embedding(family, bits, group_size)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and embedding.packed is head.packed
    assert torch.equal(embedding(IDS), head.dequantize_weight()[IDS])  # the rows the head multiplies by
    assert count_parameters(model) == count_parameters(reference)  # the shared matrix counted once
    error = (embedding(IDS) - reference.get_input_embeddings()(IDS)).abs().max()
    assert 0 < error < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied families
def test_an_untied_embedding_gets_its_own_codes_on_the_heads_grid(family):
    reference = tiny_model(family)
    model = head_and_embedding(family)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.packed is not head.packed and embedding.bits == head.bits == 8
    rounded = quantize_weight(reference.get_input_embeddings().weight.detach(), 8, None, True)
    stored = QuantizedLinear.from_quantized(rounded).dequantize_weight()  # float16 scales, as stored
    assert torch.equal(embedding(IDS), stored[IDS])  # round to nearest on the head's grid
    assert count_parameters(model) == count_parameters(reference)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_checkpoints_reload_bitwise_and_a_tied_matrix_is_stored_once(family, tmp_path):
    model = head_and_embedding(family)
    save(model, tmp_path / "q")
    reloaded, _ = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reloaded(IDS).logits)
    if family == "gpt2":
        assert reloaded.get_input_embeddings().packed is reloaded.get_output_embeddings().packed
        head_only = tiny_model(family)
        compress(head_only, {"stages": [{"method": "quantize_head", "bits": 8}, {"method": "rtn", "bits": 4,
                             "group_size": 32}], "float_storage": "float32"}, calibration=CALIBRATION)
        vocab, hidden = model.config.vocab_size, model.config.hidden_size
        # the float32 embedding (4 bytes a value) is gone and nothing replaces it: the head's codes serve both
        assert disk_bytes(head_only) - disk_bytes(model) >= 4 * vocab * hidden - 1024


def test_an_embedding_scale_inside_the_module_is_kept():
    reference = tiny_model("gemma3_text")
    assert getattr(reference.get_input_embeddings(), "embed_scale", None) is not None
    model = head_and_embedding("gemma3_text", blocks_bits=None)
    with torch.no_grad():
        expected = reference.get_input_embeddings()(IDS)
        got = model.get_input_embeddings()(IDS)
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02 * expected.abs().max())


def test_compressed_tensors_export_refuses_a_quantized_embedding(tmp_path):
    from slimlm.export.compressed_tensors import export_compressed_tensors

    with pytest.raises(SlimlmError, match="embedding"):
        export_compressed_tensors(head_and_embedding("llama"), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_gguf_writes_a_tied_quantized_embedding_once_and_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimlm.export.gguf import export_gguf
    from tests.helpers import small_bpe_tokenizer
    from tests.test_export_gguf import read_back

    tokenizer = small_bpe_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.lm_head.weight = model.model.embed_tokens.weight  # a tied llama
    model.config.tie_word_embeddings = True
    compress(model, {"stages": [{"method": "quantize_head", "bits": 8, "embedding": True},
                                {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}],
                     "float_storage": "float32"}, calibration=CALIBRATION % len(tokenizer))
    export_gguf(model, tokenizer, tmp_path / "m.gguf", pre_tokenizer="gpt-2")
    written = read_back(tmp_path / "m.gguf")
    assert "output.weight" not in written  # llama.cpp reads the head from token_embd
    kind, values = written["token_embd.weight"]
    assert kind == "Q8_0"
    assert torch.equal(torch.from_numpy(values.copy()), model.get_output_embeddings().dequantize_weight())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    probe = IDS % len(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_refused():
    with pytest.raises(SlimlmError, match="already quantized"):
        model = head_and_embedding("gpt2", blocks_bits=None)
        compress(model, {"stages": [{"method": "quantize_head", "embedding": True}]}, calibration=CALIBRATION)
