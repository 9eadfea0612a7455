"""KVQuant cache: weighted codebooks, sparse outliers, sink token, pre-RoPE keys, accuracy, bytes, validation, CLI."""

import dataclasses
import json

import pytest
import torch

from slimlm.core.packing import packed_bytes
from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, generate_ids
from slimlm.infer.cache import CacheShape, ContiguousCache
from slimlm.infer.kvquant import (
    KVQuantCalibration,
    LayerCalibration,
    calibrate_kvquant,
    check_calibration_options,
    fit_nuq_codebook,
)
from slimlm.infer.quantized_cache import chunked_kl, chunked_perplexity, make_quantized_cache, parse_kv_cache
from slimlm.infer.runner import ModelRunner, apply_rotary
from slimlm.models.tiny import tiny_model
from slimlm.quant.grid import fit_weighted_codebook
from tests.helpers import fill_kv_cache

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(0)).tolist()
SEGMENTS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")  # head_dim 16, 2 KV heads, 2 blocks


@pytest.fixture(scope="module")
def runner(model):
    return ModelRunner(model)


@pytest.fixture(scope="module")
def calibrations(model):
    return {bits: calibrate_kvquant(model, SEGMENTS, bits, 0.05) for bits in (2, 4, 8)}


def kvquant_spec(calibrations, bits, outliers=0.05):
    return parse_kv_cache(f"kvquant-{bits}bit", outliers=outliers, calibration=calibrations[bits])


def decode_logits(runner, cache, ids=IDS, prefill=16):
    out = [runner.forward(torch.tensor([ids[:prefill]]), [prefill], cache)[0]]
    for token in ids[prefill:]:
        out.append(runner.forward(torch.tensor([[token]]), [1], cache)[0])
    return torch.stack(out)


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def synthetic_calibration(shape: CacheShape, bits: int, outliers: float = 0.01) -> KVQuantCalibration:
    levels = torch.linspace(-1, 1, 2**bits).half()
    layers = [LayerCalibration(torch.zeros(h * shape.head_dim).half(), torch.full((h * shape.head_dim,), 2.5).half(),
                               levels, levels) for h in shape.kv_heads]
    return KVQuantCalibration(bits, outliers, layers)


def test_weighted_codebook_pulls_levels_toward_heavy_values():
    values = torch.linspace(-1, 1, 2001)
    weights = torch.where((values - 0.4).abs() < 0.05, 200.0, 1.0)
    plain = fit_weighted_codebook(values, torch.ones_like(values), 2)
    weighted = fit_weighted_codebook(values, weights, 2)
    assert plain.tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75], abs=0.02)
    assert (weighted - 0.4).abs().min() < 0.02 < 0.1 < (plain - 0.4).abs().min()

    def error(table):
        return ((values[:, None] - table[None]).abs().min(dim=1).values ** 2 * weights).sum()

    assert error(weighted) < 0.5 * error(plain)
    # the same through the calibration path (Fisher weights, histogram): levels follow the sensitive values
    nuq = fit_nuq_codebook(values, weights, 2).float()
    assert (nuq - 0.4).abs().min() < 0.02


def test_calibration_shapes_and_position_zero_left_out(calibrations, model):
    calibration = calibrations[2]
    assert len(calibration.layers) == 2 and calibration.segments == 4 and calibration.seqlen == 32
    layer = calibration.layers[0]
    assert layer.channels == 32 and layer.key_codebook.numel() == 4 and layer.value_codebook.numel() == 4
    assert torch.all(layer.key_codebook.diff() > 0) and torch.all(layer.key_codebook.abs() <= 1)
    assert torch.all(layer.key_range > 0)
    # roughly the outlier fraction of calibration keys lie outside the per-channel thresholds
    with torch.no_grad():
        block = model.model.layers[0]
        keys = block.self_attn.k_proj(block.input_layernorm(model.model.embed_tokens(SEGMENTS)))[:, 1:].reshape(-1, 32)
    outside = (((keys - layer.key_offset.float()) / layer.key_range.float()).abs() > 1).float().mean().item()
    assert 0.02 < outside < 0.08
    assert all(p.requires_grad for p in model.parameters())  # calibration restores the flags


def stored(cache, layer=0):
    """Everything the cache holds, read back quantized (a step with no new token)."""
    cache.reserve([0])
    return cache.read(layer)


def test_outliers_and_sink_token_are_stored_exactly():
    shape = CacheShape(1, (2,), 16, torch.float32)
    cache = make_quantized_cache(shape, 1, parse_kv_cache("kvquant-2bit", outliers=0.1,
                                                          calibration=synthetic_calibration(shape, 2, 0.1)))
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 12, 16, generator=generator), torch.randn(1, 2, 12, 16, generator=generator)
    keys[0, 1, 5, 3], keys[0, 0, 9, 15] = 37.5, -21.25  # beyond the key threshold 2.5: outliers
    values[0, 0, 7, 2], values[0, 1, 4, 11] = -12.25, 40.0  # a token's largest / smallest: outliers
    cache.reserve([12])
    cache.write(0, keys, values)
    read_keys, read_values = stored(cache)
    assert read_keys[0, 1, 5, 3] == 37.5 and read_keys[0, 0, 9, 15] == -21.25
    assert read_values[0, 0, 7, 2] == -12.25 and read_values[0, 1, 4, 11] == 40.0
    assert torch.equal(read_keys[0, :, 0], keys[0, :, 0]) and torch.equal(read_values[0, :, 0], values[0, :, 0])
    assert not torch.equal(read_keys[0, :, 1:], keys[0, :, 1:])  # the rest is quantized
    state = cache.layers[0][0]
    assert state.value_outliers.counts.tolist() == [4] * 11  # round(0.1 * 32 / 2) = 2 per side
    assert state.key_outliers.counts.sum() >= 2
    # 2 bits, keys within the threshold: error at most half the widest gap of the level table (x range 2.5)
    inside = (keys[0, :, 1:].abs() <= 2.5)
    assert (read_keys[0, :, 1:] - keys[0, :, 1:])[inside].abs().max() <= 2.5 * (2 / 3) / 2 + 1e-3


def test_keys_are_stored_before_rope_and_rotated_on_read(runner, calibrations):
    float_cache = ContiguousCache(runner.cache_shape(), 1, len(IDS))
    exact_logits = decode_logits(runner, float_cache)
    cache = make_quantized_cache(runner.cache_shape(), 1, kvquant_spec(calibrations, 8))
    assert cache.rotate_on_read
    logits = decode_logits(runner, cache)
    for layer in range(2):
        rotated_float, values = float_cache.read(layer)
        pre_rope, quantized_values = stored(cache, layer)
        positions = torch.arange(pre_rope.shape[2])[None]
        rotated = apply_rotary(pre_rope, *runner.decoder.rotary_emb(pre_rope, positions))
        assert relative_error(rotated, rotated_float[:, :, :len(IDS)]) < 0.02
        assert relative_error(quantized_values, values[:, :, :len(IDS)]) < 0.02
    assert relative_error(logits, exact_logits) < 2e-3


def test_generation_approximates_float_logits(runner, calibrations):
    exact = decode_logits(runner, ContiguousCache(runner.cache_shape(), 1, len(IDS)))
    errors = {bits: relative_error(decode_logits(runner, make_quantized_cache(
        runner.cache_shape(), 1, kvquant_spec(calibrations, bits))), exact) for bits in (8, 4, 2)}
    assert errors[8] < errors[4] < errors[2] < 0.2 and errors[4] < 0.05, errors


def test_mixed_length_batch_matches_each_prompt_alone(runner, calibrations):
    settings = CacheSettings(kv_quant="kvquant-2bit", kv_outliers=0.05, kv_calibration=calibrations[2])
    prompts = [IDS[:5], IDS[:19]]
    batch = generate_ids(runner, prompts, 10, cache=settings)
    assert batch.tokens == [generate_ids(runner, [p], 10, cache=settings).tokens[0] for p in prompts]
    assert batch.stats.cache == "kvquant-2bit" and batch.stats.kv_bytes_held > 0


def test_chunked_kl_orders_the_bits(runner, calibrations):
    ids = torch.tensor(IDS)
    high = chunked_kl(runner, ids, 16, kvquant_spec(calibrations, 8))
    low = chunked_kl(runner, ids, 16, kvquant_spec(calibrations, 2))
    assert high.tokens == low.tokens == 47
    assert 0 <= high.kl_mean < 1e-6 and high.top1_agreement == 1.0
    assert low.kl_mean > high.kl_mean and 0 <= low.top1_agreement <= 1
    naive = chunked_kl(runner, torch.stack([ids, ids.flip(0)]), 16, parse_kv_cache("naive-2bit", 8))
    assert naive.tokens == 94 and naive.kl_mean > 0
    # one chunk: every token attends in full precision, nothing is read back quantized
    assert chunked_kl(runner, ids, 48, kvquant_spec(calibrations, 2)).kl_mean == pytest.approx(0, abs=1e-9)
    exact = chunked_perplexity(runner, IDS, 16)
    assert chunked_perplexity(runner, IDS, 16, kvquant_spec(calibrations, 8)) == pytest.approx(exact, rel=1e-3)


def test_bytes_follow_the_layout():
    """head_dim 64, 2 KV heads (C = 128), float16 model, 2 bits: codes are 2/16 of float16, plus per token 4 bytes of
    value offset/range, 4 bytes of outlier counts and 4 bytes per outlier; constants and the sink once."""
    shape = CacheShape(2, (2, 2), 64, torch.float16)
    bits, tokens = 2, 2048
    calibration = synthetic_calibration(shape, bits)
    cache = make_quantized_cache(shape, 1, parse_kv_cache("kvquant-2bit", calibration=calibration))
    fill_kv_cache(cache, tokens)
    quantized = tokens - 1  # the sink token stays float16
    outliers = sum(s.key_outliers.values.numel() + s.value_outliers.values.numel()
                   for layer in cache.layers for s in layer)
    per_token = 2 * packed_bytes(128, bits) + 4 + 4
    expected = (2 * (quantized * per_token + 2 * 2 * 64 * 2) + 4 * outliers
                + 2 * (2 * 128 * 2 + 2 * 4 * 2))  # constants: key offsets/ranges, two 4-level codebooks
    assert cache.bytes_held() == expected == calibration.nbytes() + (expected - calibration.nbytes())
    key_fraction, value_fraction = cache.outlier_fraction()
    assert value_fraction == pytest.approx(2 / 128)  # round(0.01 * 128 / 2) = 1 per side
    assert 0.008 < key_fraction < 0.017  # N(0, 1) keys past the threshold 2.5: 1.24%
    float16 = cache.float16_bytes()
    assert float16 == tokens * 2 * 2 * 2 * 64 * 2
    ratio = cache.bytes_held() / float16
    assert bits / 16 < ratio < bits / 16 + 0.06  # ~0.16 against KIVI's 0.1875 at G = 32
    assert cache.bytes_per_token() == pytest.approx(cache.bytes_held() / tokens)
    assert cache.token_bytes() == 2 * (per_token + 4 * (1 + 2))
    assert cache.bytes_wasted() == 0


def test_bad_inputs_fail_before_any_work(runner, calibrations, model):
    with pytest.raises(SlimlmError, match="supports 2, 3, 4, 8 bits"):
        parse_kv_cache("kvquant-5bit")
    with pytest.raises(SlimlmError, match="outlier fraction must be a number in"):
        parse_kv_cache("kvquant-2bit", outliers=0.7)
    with pytest.raises(SlimlmError, match="outlier fraction must be a number in"):
        CacheSettings(kv_quant="kvquant-2bit", kv_outliers="1%")
    with pytest.raises(SlimlmError, match="needs an offline calibration"):
        generate_ids(runner, [[1, 2, 3]], 4, cache=CacheSettings(kv_quant="kvquant-2bit"))
    with pytest.raises(SlimlmError, match="calibration is for 4 bits"):
        make_quantized_cache(runner.cache_shape(), 1, parse_kv_cache("kvquant-2bit", outliers=0.05,
                                                                     calibration=calibrations[4]))
    other = dataclasses.replace(calibrations[2], layers=calibrations[2].layers[:1])
    with pytest.raises(SlimlmError, match="made for another model"):
        make_quantized_cache(runner.cache_shape(), 1, parse_kv_cache("kvquant-2bit", outliers=0.05,
                                                                     calibration=other))
    with pytest.raises(SlimlmError, match="segments"):
        calibrate_kvquant(model, SEGMENTS[0], 2)
    with pytest.raises(SlimlmError, match="supports 2, 3, 4, 8 bits"):
        calibrate_kvquant(model, SEGMENTS, 6)
    with pytest.raises(SlimlmError, match="calibration samples must be an integer >= 1"):
        check_calibration_options(0, 512)
    with pytest.raises(SlimlmError, match="calibration seqlen must be an integer >= 2"):
        check_calibration_options(4, 1)


def test_cli_eval_and_generate_with_kvquant(tiny_dir, tmp_path, capsys):
    from slimlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and some more text {i}" for i in range(200)))
    calibrate = ["--kv-calibration-corpus", str(text), "--kv-calibration-samples", "2",
                 "--kv-calibration-seqlen", "32", "--kv-outliers", "0.05"]
    ppl = {}
    for name in (None, "kvquant-8bit", "kvquant-3bit"):
        out = tmp_path / f"{name}.json"
        kv = [] if name is None else ["--kv-cache", name, "--kv-chunk", "8", *calibrate]
        assert main(["eval", "--model", tiny_dir, "--tasks", str(text), "--seqlen", "32", "--max-windows", "2",
                     "--json", str(out), *kv]) == 0
        record = json.loads(out.read_text())
        row = record["metrics"]["rows"][0]
        ppl[name] = row["value"]
        if name is not None:
            assert f"KV cache {name} (outliers 0.05, calibrated on 2 x 32 tokens)" in row["protocol"]
            assert record["protocol"]["kv_calibration"]["segments"] == 2
    assert "KVQuant: calibrating kvquant-3bit on 2 x 32 tokens" in capsys.readouterr().err
    assert ppl["kvquant-8bit"] == pytest.approx(ppl[None], rel=1e-3)
    assert ppl["kvquant-3bit"] != pytest.approx(ppl[None], rel=1e-6)

    assert main(["generate", "--model", tiny_dir, "--prompt", "The cat", "--prompt", "A longer prompt here",
                 "--max-new-tokens", "5", "--no-stop", "--kv-cache", "kvquant-2bit", *calibrate]) == 0
    printed = capsys.readouterr().out
    assert "kvquant-2bit" in printed and "[1] A longer prompt here" in printed

    missing = str(tmp_path / "no-such-model")  # options are checked before the model is loaded
    for bad, message in ((["--kv-calibration-samples", "0"], "calibration samples must be an integer >= 1"),
                         (["--kv-calibration-corpus", "nonsense"], "unknown KVQuant calibration corpus"),
                         (["--kv-outliers", "0.9"], "outlier fraction")):
        assert main(["eval", "--model", missing, "--tasks", str(text), "--kv-cache", "kvquant-2bit", *bad]) != 0
        assert message in capsys.readouterr().err
        assert main(["generate", "--model", missing, "--prompt", "x", "--kv-cache", "kvquant-2bit", *bad]) != 0
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("family", ["phi3", "qwen3"])
def test_calibration_refuses_fused_projections_and_normalized_keys(family):
    """Phi-3 fuses q, k and v; Qwen3 normalizes keys after k_proj: what k_proj outputs is not what is cached."""
    with pytest.raises(SlimlmError, match=f"{family} fuses those projections or normalizes its keys"):
        calibrate_kvquant(tiny_model(family), torch.randint(0, 256, (2, 16)), bits=3)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_calibration_runs_on_other_families_with_separate_projections(family):
    calibration = calibrate_kvquant(tiny_model(family), torch.randint(0, 256, (2, 16)), bits=3)
    assert len(calibration.layers) == 2
