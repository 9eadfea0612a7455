"""Fast decode paths: the run-time kernel choice, float32 generation through the packed kernels, the quantized head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import slimlm
from slimlm.errors import SlimlmError
from slimlm.eval.perplexity import perplexity_of_windows, token_windows
from slimlm.infer import generate_ids
from slimlm.infer.runner import ModelRunner
from slimlm.models.tiny import TINY_CONFIGS, tiny_model
from slimlm.quant import cpu_kernels, kernels
from slimlm.quant.qlinear import QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")
needs_int4 = pytest.mark.skipif(not kernels.HAS_INT4_KERNEL, reason="this PyTorch has no int4 packed CPU kernel")


@pytest.fixture
def kernel_mode(monkeypatch):
    """Set SLIMLM_KERNELS for one test (the process-wide choice is recomputed)."""
    def set_mode(mode: str) -> kernels.KernelChoice:
        monkeypatch.setenv(kernels.ENV, mode)
        kernels.kernel_choice.cache_clear()
        return kernels.kernel_choice()
    yield set_mode
    kernels.kernel_choice.cache_clear()


def quantized_paths(model) -> set[str]:
    return {m.last_path for m in model.modules() if isinstance(m, QuantizedLinear)}


def test_choice_is_measured_or_forced_and_reported(kernel_mode):
    forced = kernel_mode("reference")
    assert forced.path == "reference" and not forced.fp32_via_bf16 and forced.reason == "SLIMLM_KERNELS=reference"
    if kernels.HAS_INT4_KERNEL:
        assert kernel_mode("bf16").fp32_via_bf16
    measured = kernel_mode("auto")
    timed = {"native": "int4_native", "bf16": "int4_bf16"}
    available = [path for path, ok in (("native", bool(cpu_kernels.isa())), ("bf16", kernels.HAS_INT4_KERNEL)) if ok]
    expected = {"fp32_gemv"} | {timed[path] for path in available}
    if len(expected) > 1:
        assert set(measured.measured_ms) == expected and "measured" in measured.reason
        best = min(expected - {"fp32_gemv"}, key=measured.measured_ms.get)
        wins = measured.measured_ms["fp32_gemv"] >= 1.2 * measured.measured_ms[best]
        assert measured.path == ({v: k for k, v in timed.items()}[best] if wins else "reference")
    assert set(forced.to_dict()) >= {"path", "fp32_via_bf16", "reason", "cpu_flags", "torch_capability", "label"}
    with pytest.raises(SlimlmError, match="SLIMLM_KERNELS='fast' is not one of auto, native, bf16, reference"):
        kernel_mode("fast")


@needs_int4
def test_generation_uses_the_kernels_and_evaluation_stays_exact(kernel_mode):
    kernel_mode("bf16")
    model = tiny_model("llama")
    slimlm.compress(model, "rtn-w4g32")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    exact = model(ids).logits  # outside the runner: reference path
    assert quantized_paths(model) == {"reference"}
    generate_ids(model, [ids[0, :8].tolist()], 4)
    assert quantized_paths(model) == {"int4"}  # decode steps went through the int4 kernel
    with torch.no_grad():
        fast = ModelRunner(model).forward(ids, [40], _cache(model), all_logits=True)
        exact_runner = ModelRunner(model, fast_kernels=False).forward(ids, [40], _cache(model), all_logits=True)
    assert torch.allclose(exact_runner, exact, atol=1e-4)
    assert not torch.equal(fast, exact_runner) and torch.allclose(fast, exact_runner, atol=0.05, rtol=0.05)
    nll = perplexity_of_windows(model, token_windows(ids, 40))[0]
    assert quantized_paths(model) == {"reference"} and nll == perplexity_of_windows(model, token_windows(ids, 40))[0]


@needs_int4
def test_reference_mode_keeps_generation_exact(kernel_mode):
    kernel_mode("reference")
    model = tiny_model("llama")
    slimlm.compress(model, "rtn-w4g32")
    generate_ids(model, [[1, 2, 3, 4]], 3)
    assert quantized_paths(model) == {"reference"}


def _cache(model):
    from slimlm.infer.cache import ContiguousCache

    return ContiguousCache(ModelRunner(model).cache_shape(), batch=1, capacity=64)


def tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "tie_word_embeddings": True})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize(("stage", "kernel"), [({"bits": 8}, "int8"), ({"bits": 4, "group_size": 32}, "int4")])
def test_quantized_head_unties_saves_reloads_and_decodes_with_its_kernel(stage, kernel, tmp_path, kernel_mode):
    model = tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    reference = model(ids).logits
    stages = [{"method": "quantize_head", **stage}, {"method": "rtn", "bits": 4, "group_size": 32}]
    slimlm.compress(model, {"stages": stages, "float_storage": "float32"})
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == stage["bits"]
    assert torch.equal(model.model.embed_tokens.weight, embedding) and not model.config.tie_word_embeddings
    logits = model(ids).logits
    assert 0 < (logits - reference).abs().max() < 0.1 * reference.abs().max()
    slimlm.save(model, tmp_path / "head")
    reloaded, _ = slimlm.load(tmp_path / "head")
    assert isinstance(reloaded.lm_head, QuantizedLinear) and torch.equal(reloaded(ids).logits, logits)
    if kernels.HAS_INT4_KERNEL:
        kernel_mode("bf16")
        generate_ids(reloaded, [[5, 6, 7]], 2)
        assert reloaded.lm_head.last_path == kernel


def test_quantized_head_settings_are_checked_before_work():
    with pytest.raises(SlimlmError, match="bits"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "quantize_head", "bits": 3}]})
    with pytest.raises(SlimlmError, match="per channel or per group"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "quantize_head", "group_size": "tensor"}]})
    with pytest.raises(SlimlmError, match="larger than the head's 64 inputs"):
        slimlm.compress(tiny_model("llama"), {"stages": [{"method": "quantize_head", "bits": 4, "group_size": 128}]})
    model = tiny_model("llama")
    slimlm.compress(model, {"stages": [{"method": "quantize_head"}]})
    with pytest.raises(SlimlmError, match="already quantized"):
        slimlm.compress(model, {"stages": [{"method": "quantize_head"}]})
