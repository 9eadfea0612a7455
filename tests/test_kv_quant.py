"""Quantized KV caches (naive per-token baseline, KIVI): accuracy, exactness, bytes, validation, CLI."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, generate_ids
from slimlm.infer.cache import CacheShape, ContiguousCache
from slimlm.infer.quantized_cache import NaiveQuantCache, chunked_perplexity, make_quantized_cache, parse_kv_cache
from slimlm.infer.runner import ModelRunner
from slimlm.models.tiny import tiny_model
from tests.helpers import fill_kv_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner():
    # head_dim 16, 2 KV heads, 2 blocks; the exact path, so that every cache kind runs the same arithmetic
    # (generation's fast path computes one-token steps of a contiguous cache with native kernels)
    return ModelRunner(tiny_model("qwen2"), fast_kernels=False)


@pytest.fixture(scope="module")
def outlier_runner():
    """Keys with planted outlier channels (the KIVI observation): channels 5 and 13 (a RoPE pair) of every KV
    head scaled by 20 and the matching query channels by 1/20, so the float model's scores are unchanged in
    kind but a per-token quantization group holding an outlier channel loses its other channels."""
    model = tiny_model("qwen2", seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight *= 4.0  # sharper attention so key errors show in the outputs
            for channel in (5, 13):
                for head in range(2):
                    attention.k_proj.weight[head * 16 + channel] *= 20.0
                    attention.k_proj.bias[head * 16 + channel] *= 20.0
                for head in range(4):
                    attention.q_proj.weight[head * 16 + channel] /= 20.0
    return ModelRunner(model)


IDS = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(0)).tolist()


def decode_logits(runner, cache, ids, prefill=16):
    """Prefill `prefill` tokens, then feed the rest one at a time: logits of every step, [steps + 1, vocab]."""
    out = [runner.forward(torch.tensor([ids[:prefill]]), [prefill], cache)[0]]
    for token in ids[prefill:]:
        out.append(runner.forward(torch.tensor([[token]]), [1], cache)[0])
    return torch.stack(out)


def float_logits(runner, ids=IDS):
    return decode_logits(runner, ContiguousCache(runner.cache_shape(), 1, len(ids)), ids)


def quant_logits(runner, name, group=8, residual=0, ids=IDS):
    cache = make_quantized_cache(runner.cache_shape(), 1, parse_kv_cache(name, group, residual))
    return decode_logits(runner, cache, ids), cache


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def test_8bit_caches_match_the_float_cache(runner):
    exact = float_logits(runner)
    for name in ("naive-8bit", "kivi-8bit"):
        logits, _ = quant_logits(runner, name)
        assert relative_error(logits, exact) < 2e-3, name
        torch.testing.assert_close(logits, exact, atol=5e-3, rtol=0)


def test_kivi_with_residual_covering_the_sequence_is_the_float_cache(runner):
    exact = float_logits(runner)
    logits, cache = quant_logits(runner, "kivi-2bit", group=8, residual=48)
    assert torch.equal(logits, exact)
    assert cache.full_precision_tokens() == (48, 48)


def test_kivi_schedule_keeps_between_r_and_r_plus_g_full_precision_keys(runner):
    _, cache = quant_logits(runner, "kivi-2bit", group=8, residual=16)
    keys, values = cache.full_precision_tokens()
    assert 16 <= keys < 24 and values == 16 and (48 - keys) % 8 == 0


def layer0_attention(runner, ids, keys, values):
    """Causal attention output of block 0 for `ids` against the given keys/values [1, kv_heads, n, D]
    (block 0's input is the embedding, so its queries do not depend on the cache)."""
    from slimlm.infer.runner import apply_rotary

    decoder, attention = runner.decoder, runner.layers[0].self_attn
    tokens = torch.tensor([ids])
    x = runner.layers[0].input_layernorm(decoder.embed_tokens(tokens))
    positions = torch.arange(len(ids))[None]
    query = attention.q_proj(x).view(1, len(ids), 4, 16).transpose(1, 2)
    query = apply_rotary(query, *decoder.rotary_emb(x, positions))
    return torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)


def test_kivi_2bit_beats_naive_2bit_with_key_outlier_channels(outlier_runner):
    """Keys read back from each cache after the whole sequence, against the float cache's keys, through
    block 0's real queries and the exact values: the attention error is the key quantization's alone."""
    float_cache = ContiguousCache(outlier_runner.cache_shape(), 1, len(IDS))
    decode_logits(outlier_runner, float_cache, IDS)
    keys, values = float_cache.read(0)
    exact = layer0_attention(outlier_runner, IDS, keys, values)
    errors = {}
    for name in ("naive-2bit", "kivi-2bit"):
        _, cache = quant_logits(outlier_runner, name, group=8, residual=0)
        cache.reserve([0])  # a step with no new token: read returns everything as stored (quantized)
        quantized_keys, _ = cache.read(0)
        errors[name] = relative_error(layer0_attention(outlier_runner, IDS, quantized_keys, values), exact)
    assert errors["kivi-2bit"] < 0.5 * errors["naive-2bit"], errors


def test_mixed_length_batch_matches_each_prompt_alone(runner):
    prompts = [IDS[:5], IDS[:19]]
    settings = CacheSettings(kv_quant="kivi-4bit", kv_group_size=8, kv_residual=8)
    batch = generate_ids(runner, prompts, 12, cache=settings)
    alone = [generate_ids(runner, [p], 12, cache=settings).tokens[0] for p in prompts]
    assert batch.tokens == alone
    assert batch.stats.cache == "kivi-4bit" and batch.stats.kv_bytes_held > 0


@pytest.mark.parametrize("name", ["naive-2bit", "kivi-2bit"])
def test_bytes_held_follow_the_layout(name):
    """head_dim 64, G = 32, float16 model: quantized tokens take 2/16 (codes) + 2/G (fp16 scale+zero) of a
    float16 cache; KIVI adds at most R + G - 1 full-precision tokens."""
    shape = CacheShape(2, (2, 2), 64, torch.float16)
    group, residual, tokens, bits = 32, 128, 2048, 2
    cache = make_quantized_cache(shape, 1, parse_kv_cache(name, group, residual))
    fill_kv_cache(cache, tokens)
    float16 = tokens * 2 * 2 * 2 * 64 * 2
    assert cache.float16_bytes() == float16
    quantized_ratio = bits / 16 + 2 / group  # 0.1875
    assert cache.token_bytes() == 2 * 2 * (2 * 64 * bits // 8 + 8 * 64 // group)
    if name.startswith("naive"):
        assert cache.bytes_held() == tokens * cache.token_bytes()
        assert cache.bytes_held() / float16 == pytest.approx(quantized_ratio)
    else:
        key_full, value_full = cache.full_precision_tokens()
        assert residual <= key_full < residual + group and value_full == residual
        per_layer = 2 * ((tokens - key_full) * (64 * bits // 8) + (tokens - key_full) // group * 64 * 4
                         + (tokens - value_full) * (64 * bits // 8 + 64 // group * 4)
                         + (key_full + value_full) * 64 * 2)
        assert cache.bytes_held() == 2 * per_layer
        ratio = cache.bytes_held() / float16
        assert quantized_ratio <= ratio <= quantized_ratio + (residual + group) / tokens
    assert cache.bytes_wasted() == 0


def test_bad_settings_fail_before_any_work(runner):
    with pytest.raises(SlimlmError, match="does not divide the head dimension 16"):
        generate_ids(runner, [[1, 2, 3]], 4, cache=CacheSettings(kv_quant="kivi-2bit", kv_group_size=12,
                                                                   kv_residual=24))
    with pytest.raises(SlimlmError, match="does not divide the head dimension"):
        NaiveQuantCache(runner.cache_shape(), 1, parse_kv_cache("naive-4bit", 6))
    with pytest.raises(SlimlmError, match="multiple of the group size"):
        CacheSettings(kv_quant="kivi-2bit", kv_group_size=8, kv_residual=12)
    with pytest.raises(SlimlmError, match="supports 2, 3, 4, 8 bits"):
        parse_kv_cache("kivi-5bit")
    with pytest.raises(SlimlmError, match="<method>-<bits>bit"):
        parse_kv_cache("kivi2")
    with pytest.raises(SlimlmError, match="unknown KV cache quantization"):
        parse_kv_cache("fancy-2bit")
    with pytest.raises(SlimlmError, match="cannot be combined"):
        CacheSettings("paged", kv_quant="kivi-2bit")


def test_chunked_perplexity_reads_quantized_earlier_chunks(runner):
    exact = chunked_perplexity(runner, IDS, 16)
    full = chunked_perplexity(runner, IDS, 48)
    assert exact == pytest.approx(full, rel=1e-5)
    spec8 = parse_kv_cache("kivi-8bit", 8, 0)
    assert chunked_perplexity(runner, IDS, 16, spec8) == pytest.approx(exact, rel=1e-3)
    spec2 = parse_kv_cache("naive-2bit", 8)
    assert chunked_perplexity(runner, IDS, 16, spec2) != pytest.approx(exact, rel=1e-6)
    # a single chunk never reads anything back quantized: the current step attends in full precision
    assert chunked_perplexity(runner, IDS, 48, spec2) == pytest.approx(exact, rel=1e-5)


def test_cli_generate_with_kivi_2bit(tiny_dir, capsys):
    from slimlm.cli import main

    assert main(["generate", "--model", tiny_dir, "--prompt", "The cat", "--prompt", "A longer prompt here",
                 "--max-new-tokens", "5", "--no-stop", "--kv-cache", "kivi-2bit", "--kv-group-size", "8",
                 "--kv-residual", "0"]) == 0
    printed = capsys.readouterr().out
    assert "kivi-2bit" in printed and "[1] A longer prompt here" in printed
    assert main(["generate", "--model", tiny_dir, "--prompt", "x", "--kv-cache", "kivi-2bit",
                 "--kv-group-size", "12", "--kv-residual", "24"]) != 0
    assert "does not divide the head dimension" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_dir, "--prompt", "x", "--kv-cache", "kivi-2bit", "--cache", "paged"]) != 0
    assert "cannot be combined" in capsys.readouterr().err


def test_cli_eval_perplexity_through_a_quantized_cache(tiny_dir, tmp_path, capsys):
    import json

    from slimlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and some more text {i}" for i in range(200)))
    ppl = {}
    for name in (None, "kivi-8bit", "kivi-2bit"):
        out = tmp_path / f"{name}.json"
        kv = [] if name is None else ["--kv-cache", name, "--kv-chunk", "8", "--kv-group-size", "8",
                                      "--kv-residual", "8"]
        assert main(["eval", "--model", tiny_dir, "--tasks", str(text), "--seqlen", "32", "--max-windows", "2",
                     "--json", str(out), *kv]) == 0
        row = json.loads(out.read_text())["metrics"]["rows"][0]
        ppl[name] = row["value"]
        assert name is None or f"KV cache {name}" in row["protocol"]
    capsys.readouterr()
    assert ppl["kivi-8bit"] == pytest.approx(ppl[None], rel=1e-3)
    assert ppl["kivi-2bit"] != pytest.approx(ppl[None], rel=1e-6)
    assert main(["eval", "--model", tiny_dir, "--tasks", str(text), "--kv-cache", "kivi-2bit",
                 "--kv-group-size", "8", "--kv-residual", "12"]) != 0
    assert "multiple of the group size" in capsys.readouterr().err
