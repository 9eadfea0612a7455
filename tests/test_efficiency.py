import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.eval.efficiency import (
    compression_ratio,
    count_parameters,
    disk_bytes,
    flops_per_token,
    measure_latency,
    measure_peak_flops,
    memory_bytes,
    mfu,
)
from slimlm.models.tiny import tiny_model


def test_tied_weights_are_counted_once():
    model = tiny_model("gemma")  # ties the head to the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    assert memory_bytes(model) >= 4 * count_parameters(model)


def test_sizes_in_memory_and_on_disk():
    model = tiny_model("llama")
    in_memory = memory_bytes(model)
    assert in_memory == 4 * count_parameters(model) + sum(b.numel() * b.element_size() for b in model.buffers())
    on_disk = disk_bytes(model)
    assert on_disk > 4 * count_parameters(model)  # weights plus safetensors header and config
    half = tiny_model("llama").to(torch.bfloat16)
    assert compression_ratio(disk_bytes(model), disk_bytes(half)) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(SlimlmError):
        compression_ratio(10, 0)


def test_flops_per_token_by_hand_llama():
    model = tiny_model("llama")  # hidden 64, 4 heads x 16, 2 KV heads, intermediate 128, vocab 256
    per_block = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    flops = flops_per_token(model, context=100)
    assert flops.linear == 2 * per_block
    assert flops.lm_head == 2 * 64 * 256
    assert flops.attention_decode == 2 * 4 * 64 * 100
    assert flops.attention_prefill == 2 * (4 * 64 * 100 * 101 // 2 // 100)
    assert flops.decode == flops.linear + flops.lm_head + flops.attention_decode


def test_flops_gpt2_fused_qkv_and_sliding_window():
    gpt2 = flops_per_token(tiny_model("gpt2"), context=10)
    assert gpt2.linear == 2 * 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)
    model = tiny_model("mistral")
    model.config.sliding_window = 8
    windowed = flops_per_token(model, context=100)
    assert windowed.attention_decode == 2 * 4 * 64 * 8


def test_latency_and_mfu_are_measured():
    model = tiny_model("llama")
    result = measure_latency(model, prompt_tokens=16, new_tokens=4, batch=2, repeats=2)
    assert result.prefill_s > 0 and result.decode_s_per_token > 0
    assert result.decode_tokens_per_s == pytest.approx(2 / result.decode_s_per_token)
    peak = measure_peak_flops(size=256, repeats=3)
    assert 1e8 < peak < 1e14
    assert 0 < mfu(result.prefill_flops_per_s, peak) < 1.5
    with pytest.raises(SlimlmError):
        measure_latency(model, prompt_tokens=0)
