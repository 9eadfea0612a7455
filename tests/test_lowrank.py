"""Low-rank factorization (SVD, ASVD, whitened ASVD, LPLR, LASER) and error compensation (LoRC, EoRA):
the math, the layer (save, reload, size, FLOPs, generation), the stages on tiny models, and bad input."""

import math

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.core.hessian import HessianAccumulator
from slimlm.errors import SlimlmError
from slimlm.eval.efficiency import count_parameters, flops_per_token
from slimlm.export.native import load, save
from slimlm.lowrank.asvd import allocate
from slimlm.lowrank.common import TailPerplexity
from slimlm.lowrank.factorize import (
    break_even_rank,
    output_error,
    rank_for_kept_fraction,
    scaled_svd,
    truncated_svd,
    whitened_svd,
    whitening,
)
from slimlm.lowrank.layer import LowRankLinear
from slimlm.models.loss import calibration_perplexity
from slimlm.models.tiny import tiny_model
from slimlm.quant.qlinear import QuantizedLinear

CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def run(model, *stages, **recipe):
    recipe = {"stages": list(stages), "calibration": {"batch_size": 4}, "float_storage": "float32", **recipe}
    return compress(model, load_recipe(recipe), calibration=CALIBRATION)


def logits(model, tokens=PROBE):
    with torch.no_grad():
        return model(tokens).logits


def kl_from(reference, model) -> float:
    p, q = logits(reference).log_softmax(-1), logits(model).log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ---------------------------------------------------------------------------------------------- the math

def test_truncated_svd_is_exact_on_a_matrix_of_that_rank_and_eckart_young_otherwise():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 4, generator=g) @ torch.randn(4, 30, generator=g)
    up, down = truncated_svd(low, 4)
    torch.testing.assert_close(up @ down, low, atol=1e-4, rtol=1e-4)
    weight = torch.randn(40, 30, generator=g)
    sigma = torch.linalg.svdvals(weight.double())
    up, down = truncated_svd(weight, 10)
    assert math.isclose(output_error(weight - up @ down, None), float(sigma[10:].square().sum()), rel_tol=1e-4)
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)  # singular values split evenly


def test_scaled_svd_minimises_the_scaled_error_and_whitened_svd_the_output_error():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 32, generator=g)
    x = torch.randn(500, 32, generator=g) * torch.linspace(0.05, 3, 32)  # input channels of unequal size
    H = x.T @ x
    scale = x.abs().mean(0)
    plain = torch.sub(weight, torch.matmul(*truncated_svd(weight, 8)))
    scaled = torch.sub(weight, torch.matmul(*scaled_svd(weight, scale, 8)))
    assert output_error(scaled * scale, None) < output_error(plain * scale, None)
    whitened = torch.sub(weight, torch.matmul(*whitened_svd(weight, H, 8)))
    # the truncation loss is exactly the dropped singular values of W S (SVD-LLM's Theorem)
    S, _ = whitening(H, "cholesky")
    dropped = torch.linalg.svdvals(weight.double() @ S)[8:].square().sum()
    assert math.isclose(output_error(whitened, H), float(dropped), rel_tol=1e-4)
    assert output_error(whitened, H) < output_error(scaled, H) < output_error(plain, H)
    eigen = torch.sub(weight, torch.matmul(*whitened_svd(weight, H, 8, basis="eigen")))
    assert math.isclose(output_error(eigen, H), output_error(whitened, H), rel_tol=1e-4)


def test_whitening_survives_a_singular_second_moment_and_refuses_nan():
    x = torch.randn(100, 16)
    x[:, 3] = 0  # a dead input channel: X X^T is singular
    for basis in ("cholesky", "eigen"):
        S, S_inv = whitening(x.T @ x, basis)
        assert torch.isfinite(S_inv).all()
    bad = torch.eye(4)
    bad[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match="NaN"):
        whitening(bad, "cholesky")


def test_rank_rules():
    assert break_even_rank(576, 1536) == pytest.approx(576 * 1536 / 2112)
    assert rank_for_kept_fraction(0.5, 64, 64) == 16  # 0.5 * 4096 / 128
    assert rank_for_kept_fraction(0.001, 64, 64) == 1


def test_strs_allocation_meets_the_target_with_the_least_harmful_reductions():
    shapes = {"a": (100, 100), "b": (100, 100)}
    sensitivity = {"a": {0.2: 10.0, 0.5: 5.0}, "b": {0.2: 50.0, 0.5: 20.0}}  # a is the less sensitive layer
    kept = allocate(sensitivity, shapes, 0.75)
    assert kept == {"a": 0.5, "b": 1.0}  # one layer at half its parameters reaches 75%
    assert allocate(sensitivity, shapes, 0.35) == {"a": 0.2, "b": 0.5}  # 2000 + 5000 of 20000
    assert allocate(sensitivity, shapes, 0.3) == {"a": 0.2, "b": 0.2}
    with pytest.raises(SlimlmError, match="smallest candidate"):
        allocate(sensitivity, shapes, 0.1)


# ---------------------------------------------------------------------------------------------- the layer

def test_low_rank_linear_computes_the_factors_and_reports_size_and_flops():
    up, down, bias = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    layer = LowRankLinear.from_factors(up, down, bias)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), x @ (up @ down).T + bias)
    assert layer.matmul_flops_per_token() == 2 * 3 * (5 + 6)
    assert layer.meta()["base"] is None and layer.bias is layer.up.bias
    with pytest.raises(SlimlmError, match="do not chain"):
        LowRankLinear.from_factors(up, torch.randn(4, 5))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_svd_model_saves_reloads_bitwise_and_is_smaller(family, tmp_path):
    model = tiny_model(family)
    dense_parameters, dense_flops = count_parameters(model), flops_per_token(model, 32).linear
    report = run(model, {"method": "svd", "parameter_reduction": 0.5})
    summary = report.structure[0]
    assert summary["factorized"] > 0 and summary["linear_parameters_after"] < summary["linear_parameters_before"]
    removed = summary["linear_parameters_before"] - summary["linear_parameters_after"]
    assert count_parameters(model) == dense_parameters - removed
    assert flops_per_token(model, 32).linear < dense_flops
    save(model, tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(reloaded), logits(model))
    assert any(isinstance(m, LowRankLinear) for m in reloaded.modules())


def test_a_rank_that_saves_nothing_leaves_the_layer_dense_and_says_so(capsys):
    model = tiny_model("llama")  # q_proj 64 x 64: break-even rank 32
    report = run(model, {"method": "svd", "rank": 40, "targets": ["*q_proj"]})
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert "no parameters saved" in report.structure[0]["kept_dense"]["model.layers.0.self_attn.q_proj"]
    assert "kept dense" in capsys.readouterr().err


@pytest.mark.parametrize("stage, message", [
    ({"method": "svd", "rank": 0}, "rank"),
    ({"method": "svd", "rank": 65}, "above min"),
    ({"method": "svd", "parameter_reduction": 1.5}, "parameter_reduction"),
    ({"method": "svd", "parameter_reduction": 0}, "parameter_reduction"),
    ({"method": "svd"}, "exactly one"),
    ({"method": "svd", "rank": 4, "parameter_reduction": 0.2}, "exactly one"),
    ({"method": "asvd", "parameter_reduction": 1.0}, "parameter_reduction"),
    ({"method": "lplr", "rank": 0}, "rank"),
    ({"method": "lplr", "rank": 200}, "above min"),
    ({"method": "eora", "rank": 100}, "above min"),
    ({"method": "lorc", "rank": 0}, "rank"),
    ({"method": "laser", "keep_fractions": [1.5]}, "strictly between"),
])
def test_bad_sizes_fail_before_any_work(stage, message):
    model = tiny_model("llama")
    before = logits(model)
    with pytest.raises((SlimlmError, ValueError), match=message):
        run(model, stage)
    assert torch.equal(logits(model), before)


def test_low_rank_model_generates_from_the_cli(tmp_path, tokenizer, capsys):
    from slimlm.cli import main
    from slimlm.infer import generate

    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    run(model, {"method": "svd", "parameter_reduction": 0.4})
    save(model, tmp_path / "m", tokenizer)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "The cat", "--max-new-tokens", "5",
                 "--no-stop"]) == 0
    expected = generate(model, tokenizer, "The cat", 5, stop_at_eos=False).texts[0]
    assert capsys.readouterr().out.startswith("The cat" + expected + "\n")


# ---------------------------------------------------------------------------------------------- ASVD

@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_asvd_variants_reach_their_parameter_target(family):
    for stage in ({"method": "asvd", "parameter_reduction": 0.4, "sensitivity_samples": 2},
                  {"method": "asvd", "parameter_reduction": 0.4, "ranks": "uniform", "scaling": "whitening"}):
        model = tiny_model(family)
        summary = run(model, stage).structure[0]
        assert summary["linear_parameters_after"] <= 0.6 * summary["linear_parameters_before"] + 1
        assert torch.isfinite(logits(model)).all()


def test_whitened_asvd_beats_plain_svd_on_the_calibration_outputs():
    reference = tiny_model("llama")
    errors = {}
    for name, stage in {"svd": {"method": "svd", "parameter_reduction": 0.5},
                        "whitened": {"method": "asvd", "parameter_reduction": 0.5, "scaling": "whitening",
                                     "ranks": "uniform"}}.items():
        model = tiny_model("llama")
        run(model, stage)
        errors[name] = kl_from(reference, model)
    assert errors["whitened"] < errors["svd"]


def test_sensitivity_sweep_is_cached_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "sweep.json"
    stage = {"method": "asvd", "parameter_reduction": 0.3, "sensitivity_samples": 2, "alpha": 0.5,
             "ratio_candidates": [0.3, 0.6], "sensitivity_cache": str(cache)}
    first = tiny_model("llama")
    run(first, stage)
    assert cache.is_file()
    import slimlm.lowrank.asvd as asvd

    def no_sweep(*_args, **_kwargs):
        raise AssertionError("the cached sweep should have been used")

    monkeypatch.setattr(asvd, "TailPerplexity", no_sweep)
    second = tiny_model("llama")
    run(second, stage)
    assert torch.equal(logits(first), logits(second))


def test_tail_perplexity_equals_the_full_forward_pass():
    model = tiny_model("llama")
    tail = TailPerplexity(model, CALIBRATION[:4], 2)
    assert tail.exact
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # a change in block 1 only
    assert math.isclose(tail(1), calibration_perplexity(model, CALIBRATION[:4], 2), rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------- LPLR

def test_lplr_stores_quantized_factors_reloads_bitwise_and_is_seeded(tmp_path):
    model = tiny_model("llama")
    run(model, {"method": "lplr", "bytes_reduction": 0.5, "bits": 8})
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear) and isinstance(layer.down, QuantizedLinear)
    assert isinstance(layer.up, QuantizedLinear) and layer.up.bits == 8
    # (1 - 0.5) * 16 bits * 64 * 128 / (8 bits * (64 + 128)) = 42
    assert layer.rank == 42
    save(model, tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(reloaded), logits(model))
    again = tiny_model("llama")
    run(again, {"method": "lplr", "bytes_reduction": 0.5, "bits": 8})
    assert torch.equal(logits(again), logits(model))


def test_lplr_at_8_bits_beats_svd_at_equal_bytes():
    reference = tiny_model("llama")
    svd, lplr = tiny_model("llama"), tiny_model("llama")
    run(svd, {"method": "svd", "parameter_reduction": 0.6})
    run(lplr, {"method": "lplr", "bytes_reduction": 0.6, "bits": 8})
    assert kl_from(reference, lplr) < kl_from(reference, svd)


# ---------------------------------------------------------------------------------------------- LASER

def test_laser_keeps_only_reductions_that_do_not_hurt():
    model = tiny_model("llama")
    report = run(model, {"method": "laser", "samples": 4, "keep_fractions": [0.5, 0.1], "matrices": ["up", "down"]})
    summary = report.structure[0]
    assert summary["searched"] == 2 * 2 * 2
    assert summary["final_ppl"] <= summary["baseline_ppl"]
    assert math.isclose(calibration_perplexity(model, CALIBRATION[:4], 4), summary["final_ppl"], rel_tol=1e-5)
    for entry in summary["kept"]:
        assert entry["composed_ppl"] <= summary["baseline_ppl"]
    with pytest.raises(SlimlmError, match="outside"):
        run(tiny_model("llama"), {"method": "laser", "blocks": [5]})


# ---------------------------------------------------------------------------------------------- LoRC / EoRA

def test_eora_and_lorc_reduce_the_quantization_error_eora_most():
    reference = tiny_model("llama")
    results = {}
    for name, extra in {"base": [], "lorc": [{"method": "lorc", "rank": 8}],
                        "eora": [{"method": "eora", "rank": 8}]}.items():
        model = tiny_model("llama")
        run(model, {"method": "rtn", "bits": 3, "group_size": "channel"}, *extra)
        results[name] = kl_from(reference, model)
    assert results["eora"] < results["lorc"] < results["base"]


@pytest.mark.parametrize("base", [{"method": "gptq", "bits": 3, "group_size": 32},
                                  {"method": "sparsegpt", "pattern": "2:4"}])
def test_compensated_layers_keep_their_base_and_reload_bitwise(base, tmp_path):
    model = tiny_model("qwen2")
    run(model, base, {"method": "eora", "rank": 4})
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LowRankLinear) and layer.base is not None and layer.rank == 4
    save(model, tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    assert type(reloaded.model.layers[1].mlp.down_proj.base) is type(layer.base)
    assert torch.equal(logits(reloaded), logits(model))


def test_quantized_correction_has_one_scale_per_rank_component_and_reloads(tmp_path):
    reference = tiny_model("llama")
    base = {"method": "rtn", "bits": 3, "group_size": "channel"}
    plain = tiny_model("llama")
    run(plain, base)
    model = tiny_model("llama")
    run(model, base, {"method": "eora", "rank": 8, "factor_bits": 4})
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.up_transposed and isinstance(layer.up, QuantizedLinear) and layer.up.bits == 4
    assert layer.up.scale.shape == (8, 1) and layer.down.scale.shape == (8, 1)  # per rank component
    assert layer.up_factor().shape == (128, 8)
    assert kl_from(reference, model) < kl_from(reference, plain)
    save(model, tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(reloaded), logits(model))


def test_compensation_needs_an_earlier_stage():
    with pytest.raises(SlimlmError, match="no error to compensate"):
        run(tiny_model("llama"), {"method": "lorc", "rank": 4})


def test_presets_build(tmp_path):
    for name in ("svd-20", "asvd-10", "asvd-whiten-30", "lplr-8bit-20", "laser-late-mlp",
                 "gptq-w3g64+eora-r32", "sparsegpt-2of4+lorc-r16", "rtn-w4ch+eora-r64"):
        assert load_recipe(name).stages


def test_eora_second_moment_matches_the_hessian_accumulator():
    """EoRA's X X^T is the engine's Hessian (a constant factor apart, which no truncation sees)."""
    x = torch.randn(3, 10, 8)
    accumulator = HessianAccumulator(8)
    accumulator.add_batch(x)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(accumulator.result(), 2 * flat.T @ flat / 30)
