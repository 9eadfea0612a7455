"""LLM.int8() (slimlm.quant.llm_int8): vector-wise int8 with the float path for outlier feature columns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.compress.presets import PRESETS
from slimlm.errors import SlimlmError
from slimlm.export.native import load, save
from slimlm.models.tiny import tiny_model
from slimlm.quant.llm_int8 import LLMInt8Linear
from slimlm.quant.w8a8 import Int8Linear

PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def inputs(tokens: int = 32, features: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed))


def layers(threshold: float = 6.0, bias: bool = True) -> tuple[torch.nn.Linear, Int8Linear, LLMInt8Linear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=bias)
    plain = Int8Linear.from_float(linear.weight, linear.bias)
    mixed = LLMInt8Linear.from_float(linear.weight, linear.bias, outlier_threshold=threshold)
    return linear, plain, mixed


@pytest.mark.parametrize("use_int8_kernel", [True, False])
def test_infinite_threshold_is_plain_per_token_w8a8(use_int8_kernel):
    _, plain, mixed = layers(math.inf)
    x = inputs()
    x[:, 7] = 50.0
    plain.use_int8_kernel = mixed.use_int8_kernel = use_int8_kernel
    with torch.no_grad():
        assert torch.equal(mixed(x), plain(x))
    assert mixed.last_outlier_columns.numel() == 0 and mixed.last_path == plain.last_path
    assert torch.equal(mixed.weight, plain.weight) and torch.equal(mixed.weight_scale, plain.weight_scale)


@pytest.mark.parametrize("use_int8_kernel", [True, False])
def test_planted_outlier_column_goes_through_float_and_fixes_the_error(use_int8_kernel):
    linear, plain, mixed = layers()
    x = inputs(tokens=3 * 11).reshape(3, 11, 96)
    x[..., 7] = 50.0 * torch.sign(torch.randn(3, 11))  # one outlier feature, |x| = 50 in every token
    plain.use_int8_kernel = mixed.use_int8_kernel = use_int8_kernel
    with torch.no_grad():
        exact, naive, decomposed = linear(x), plain(x), mixed(x)
    assert mixed.last_outlier_columns.tolist() == [7]
    assert mixed.last_path == ("int8" if use_int8_kernel else "reference")
    naive_error = float((naive - exact).norm() / exact.norm())
    mixed_error = float((decomposed - exact).norm() / exact.norm())
    assert mixed_error < naive_error / 5, (mixed_error, naive_error)
    # Exactly: float outlier column (fp16 weights) + the int8 layer on the other columns.
    rows = x.reshape(-1, 96)
    inliers = rows.clone()
    inliers[:, 7] = 0
    with torch.no_grad():
        expected = plain(inliers) + torch.outer(rows[:, 7], mixed.weight_fp16[:, 7].float())
    torch.testing.assert_close(decomposed.reshape(-1, 80), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_int8_and_reference_paths_agree_with_outliers():
    _, _, mixed = layers()
    x = inputs(seed=3)
    x[:2, [4, 60]] = -9.0
    with torch.no_grad():
        mixed.use_int8_kernel = True
        fast = mixed(x)
        assert sorted(mixed.last_outlier_columns.tolist()) == [4, 60] and mixed.last_path == "int8"
        mixed.use_int8_kernel = False
        reference = mixed(x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_storage_keeps_the_full_weight_in_float16():
    linear, _, mixed = layers()
    assert mixed.weight_fp16.dtype == torch.float16 and torch.equal(mixed.weight_fp16, linear.weight.half())
    stored = sum(t.numel() * t.element_size() for t in mixed.state_dict().values())
    assert stored == 96 * 80 * (1 + 2) + 80 * 4 + 80 * 4  # int8 codes, fp16 weight, fp32 scales, fp32 bias
    assert mixed.num_logical_params() == 96 * 80 + 80


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "6"])
def test_bad_threshold_is_a_clear_error(bad):
    with pytest.raises(SlimlmError, match="outlier_threshold must be a positive number"):
        LLMInt8Linear(8, 4, outlier_threshold=bad)
    weight = torch.randn(4, 8)
    with pytest.raises(SlimlmError, match="outlier_threshold must be a positive number"):
        LLMInt8Linear.from_float(weight, outlier_threshold=bad)


def test_bad_threshold_in_a_recipe_fails_before_any_work():
    model = tiny_model("llama")
    w8 = {"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True}
    for threshold in (0, -6.0):
        with pytest.raises(SlimlmError, match="outlier_threshold must be a positive number"):
            compress(model, {"stages": [{**w8, "activations": {"outlier_threshold": threshold}}]})
    with pytest.raises(SlimlmError, match="needs granularity: per_token"):
        compress(model, {"stages": [{**w8, "activations": {"granularity": "per_tensor", "outlier_threshold": 6.0}}]})
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_llm_int8_preset_save_load_bitwise(tmp_path):
    model, reference = tiny_model("llama"), tiny_model("llama")
    assert "llm-int8" in PRESETS and load_recipe("llm-int8").stages[0].activations.outlier_threshold == 6.0
    report = compress(model, "llm-int8")
    mixed = [m for m in model.modules() if isinstance(m, LLMInt8Linear)]
    assert len(mixed) == len(report.layers) == 14 and {e.method for e in report.layers} == {"llm-int8"}
    for layer in mixed:
        layer.outlier_threshold = 0.5  # a tiny random model has no |x| >= 6: force some float columns
    with torch.no_grad():
        logits, expected = model(PROBE).logits, reference(PROBE).logits
    assert any(m.last_outlier_columns.numel() for m in mixed)
    assert 0 < float((logits - expected).abs().mean()) < 0.1 * float(expected.abs().mean())
    save(model, tmp_path / "llm-int8")
    meta = json.loads((tmp_path / "llm-int8" / "slimlm.json").read_text())["compressed_modules"]
    assert meta["model.layers.0.mlp.down_proj"]["kind"] == "llm_int8"
    assert meta["model.layers.0.mlp.down_proj"]["outlier_threshold"] == 0.5
    reloaded, _ = load(tmp_path / "llm-int8")
    for name, module in model.named_modules():
        if isinstance(module, LLMInt8Linear):
            again = reloaded.get_submodule(name)
            assert isinstance(again, LLMInt8Linear) and again.outlier_threshold == module.outlier_threshold
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, again.state_dict()[key]) and tensor.dtype == again.state_dict()[key].dtype
    with torch.no_grad():
        assert torch.equal(reloaded(PROBE).logits, logits)
    with pytest.raises(SlimlmError, match="lacks 'outlier_threshold'"):
        LLMInt8Linear.empty({k: v for k, v in mixed[0].meta().items() if k != "outlier_threshold"})
