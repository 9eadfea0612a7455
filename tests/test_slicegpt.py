"""SliceGPT: the rotation is exact, slicing shrinks the hidden size, the result is a plain transformers model."""

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.prune.slicegpt import parameters_after, sliced_width
from slimlm.models.adapter import ModelAdapter
from tests.helpers import assert_plain_transformers_roundtrip, assert_slimlm_roundtrip

CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
RMS_FAMILIES = ("llama", "qwen2", "mistral")


def slice_model(model, **stage):
    recipe = load_recipe({"stages": [{"method": "slicegpt", **stage}], "calibration": {"batch_size": 2},
                         "float_storage": "float32"})  # exactness checks: no bfloat16 rounding
    return compress(model, recipe, calibration=CALIBRATION)


def _with_norm_scales(model):
    """Random norm scales (a fresh tiny model has ones, which would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_slicing_zero_reproduces_the_dense_model(family):
    model = _with_norm_scales(tiny_model(family))
    with torch.no_grad():
        dense = model(PROBE).logits
    slice_model(model, slicing=0.0)
    with torch.no_grad():
        rotated = model(PROBE).logits
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    torch.testing.assert_close(rotated, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_sliced_model_is_narrower_and_loads_with_plain_transformers(family, tmp_path):
    model = _with_norm_scales(tiny_model(family))
    hidden, before = model.config.hidden_size, sum(p.numel() for p in model.parameters())
    report = slice_model(model, slicing=0.25)
    width = sliced_width(model, hidden, 0.25, 8)
    assert model.config.hidden_size == width < hidden
    assert report.structure[0]["hidden_size"] == [hidden, width]
    assert report.structure[0]["parameters_after"] == sum(p.numel() for p in model.parameters()) < before
    assert 0 < report.structure[0]["kept_variance"] < 1
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)


def test_sliced_norm_equals_the_reference_rmsn_that_divides_by_the_original_width():
    """A width-d' norm with weight sqrt(d/d') and eps d/d' computes x' / sqrt(|x'|^2 / d + eps)."""
    model = tiny_model("llama")
    hidden = model.config.hidden_size
    eps = model.config.rms_norm_eps
    slice_model(model, slicing=0.5)
    norm = model.model.norm
    x = torch.randn(3, model.config.hidden_size)
    expected = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / hidden + eps)
    torch.testing.assert_close(norm(x), expected)


def test_principal_axes_lose_less_than_a_random_basis_of_the_same_width():
    """PCA is the point: slicing along the principal axes must cost less than along random ones."""
    from slimlm.prune.slicegpt import _untie, fold_norm_scales_, rotate_and_slice_, _update_config

    def error(model) -> float:
        with torch.no_grad():
            return float((model(CALIBRATION).logits - dense).pow(2).mean() / dense.pow(2).mean())

    pca = _with_norm_scales(tiny_model("llama"))
    with torch.no_grad():
        dense = pca(CALIBRATION).logits
    slice_model(pca, slicing=0.5)
    random = _with_norm_scales(tiny_model("llama"))
    adapter, hidden = ModelAdapter(random), random.config.hidden_size
    Q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    _untie(random, adapter)
    with torch.no_grad():
        fold_norm_scales_(adapter)
        rotate_and_slice_(random, adapter, Q[:, : hidden // 2])
    _update_config(random, hidden, hidden // 2)
    assert error(pca) < 0.8 * error(random)


def test_parameter_reduction_picks_the_width_closest_to_the_target():
    model = tiny_model("llama")
    before = sum(p.numel() for p in model.parameters())
    counts = {w: parameters_after(model, ModelAdapter(model), w) for w in range(8, 65, 8)}
    report = slice_model(model, parameter_reduction=0.2)
    after = sum(p.numel() for p in model.parameters())
    assert after == counts[model.config.hidden_size]
    assert all(abs(after - 0.8 * before) <= abs(n - 0.8 * before) for n in counts.values())
    assert report.structure[0]["parameter_reduction"] == pytest.approx(1 - after / before)


def test_width_is_a_multiple_of_the_head_count_where_the_config_demands_it(tmp_path):
    """LlamaConfig refuses a hidden size that is not a multiple of num_attention_heads (SmolLM2: 9 heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=144, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    slice_model(model, slicing=0.25)
    assert model.config.hidden_size == 72  # 136, 128, ... 80 are multiples of 8 but not of 9
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)
    with pytest.raises(SlimlmError, match="no hidden size of at most"):
        slice_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "llama", vocab_size=256, hidden_size=72, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=9, num_key_value_heads=3)), slicing=0.25)


def test_parameter_count_formula_matches_the_sliced_model():
    model = tiny_model("qwen2")
    expected = parameters_after(model, ModelAdapter(model), 48)
    slice_model(model, slicing=0.25)
    assert model.config.hidden_size == 48
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("family", ["opt", "gpt2", "gemma"])
def test_unsupported_families_are_refused_before_any_work(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match="slicegpt supports RMSNorm decoders"):
        slice_model(model, slicing=0.25)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("stage", "message"),
    [({}, "exactly one of `slicing`"), ({"slicing": 1.0}, "less than 1"),
     ({"slicing": 0.2, "parameter_reduction": 0.2}, "exactly one of `slicing`"), ({"slicing": -0.1}, "greater than or equal")],
)
def test_bad_slicegpt_recipes_fail_with_a_clear_message(stage, message):
    with pytest.raises(SlimlmError, match=message):
        load_recipe({"stages": [{"method": "slicegpt", **stage}]})


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_per_block_rotation_at_slicing_zero_reproduces_the_dense_model(family, tmp_path):
    """The paper's per-block rotations with shortcut matrices are exact before slicing, and a slimlm
    checkpoint of the sliced model reloads bitwise (the shortcuts are recorded in slimlm.json)."""
    model = _with_norm_scales(tiny_model(family))
    with torch.no_grad():
        dense = model(PROBE).logits
    slice_model(model, slicing=0.0, rotation="per_block")
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, dense, atol=1e-4, rtol=1e-4)
    model = _with_norm_scales(tiny_model(family))
    expected = parameters_after(model, ModelAdapter(model), 48, shortcuts=True)
    report = slice_model(model, slicing=0.25, rotation="per_block")
    assert model.config.hidden_size == 48
    assert model.model.layers[0].attn_shortcut.shape == (48, 48)
    assert report.structure[0]["parameters_after"] == sum(p.numel() for p in model.parameters()) == expected
    assert_slimlm_roundtrip(model, tmp_path / "m", PROBE)


def test_a_checkpoint_plain_transformers_would_misread_refuses_plain_loading(tmp_path):
    """slimlm.save names the weights file of a per-block SliceGPT model (shortcuts that a transformers
    config cannot describe) so that plain from_pretrained fails instead of dropping the shortcuts;
    a plainly loadable model (one rotation) keeps model.safetensors and plain loading still works."""
    from transformers import AutoModelForCausalLM

    from slimlm.export.native import save

    model = _with_norm_scales(tiny_model("llama"))
    slice_model(model, slicing=0.25, rotation="per_block")
    save(model, tmp_path / "per_block")
    assert not (tmp_path / "per_block" / "model.safetensors").exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "per_block")
    model = _with_norm_scales(tiny_model("llama"))
    slice_model(model, slicing=0.25, rotation="global")
    save(model, tmp_path / "global")
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "global").eval()
        assert torch.equal(reloaded(PROBE).logits, model(PROBE).logits)
