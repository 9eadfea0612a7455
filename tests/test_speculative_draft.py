"""Speculative decoding with drafts built from the target (slimlm.infer.draft), the exact-row verification,
the automatic choice of gamma, and the errors of bad input."""


import pytest
import torch

from slimlm.cli import main
from slimlm.compress import compress
from slimlm.core.registry import layer_kind
from slimlm.errors import SlimlmError
from slimlm.infer import CacheSettings, ContiguousCache, ModelRunner, generate_ids, speculative
from slimlm.infer.draft import LeanRunner, build_draft, parse_draft_spec
from slimlm.infer.speculative import (
    SpeculativeCosts,
    choose_gamma,
    expected_speedup,
    forget_costs,
    pair_costs,
    speculative_decode,
)
from slimlm.models.tiny import tiny_model
from slimlm.quant.kernels import HAS_INT4_KERNEL, HAS_INT8_KERNEL

PROMPT = [5, 17, 3, 99, 42, 7, 11, 60]

pytestmark = pytest.mark.usefixtures("one_thread")


def _w4_head8(family: str = "llama"):
    """A tiny model quantized like the deploy preset, its quantized layers on the packed kernels whatever this
    CPU's measured choice (so the target's arithmetic is the same in every run of the tests)."""
    model = tiny_model(family)
    compress(model, "rtn-w4g64-head8")
    for module in model.modules():
        if layer_kind(module) == "quantized":
            module.fast_path_casts_fp32_to_bf16 = True
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_runner_computes_what_the_runner_computes(family):
    model = tiny_model(family)
    runner, lean = ModelRunner(model), LeanRunner(model)
    tokens = torch.tensor([PROMPT])
    reference = runner.forward(tokens, [len(PROMPT)], ContiguousCache(runner.cache_shape(), 1, 16), all_logits=True)
    got = lean.forward(tokens, [len(PROMPT)], lean.new_cache(16), all_logits=True)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    assert lean.blocks[0].interleaved  # q/k rows fused and reordered for the complex RoPE
    # The packed kernels run in bfloat16: the same function to bfloat16 precision.
    quantized = _w4_head8(family)
    runner, lean = ModelRunner(quantized), LeanRunner(quantized)
    reference = runner.forward(tokens, [len(PROMPT)], ContiguousCache(runner.cache_shape(), 1, 16), all_logits=True)
    got = lean.forward(tokens, [len(PROMPT)], lean.new_cache(16), all_logits=True)
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_draft_decodes_in_the_target_cache():
    """The target's keys and values are what the lean draft reads for the committed tokens (standard layout)."""
    model = tiny_model("llama")
    runner, lean = ModelRunner(model), build_draft(model, "self")
    assert lean.can_share_cache(runner)
    cache = ContiguousCache(runner.cache_shape(), 1, 16)
    runner.forward(torch.tensor([PROMPT[:-1]]), [len(PROMPT) - 1], cache)
    got = lean.forward(torch.tensor([PROMPT[-1:]]), [1], cache)
    expected = runner.forward(torch.tensor([PROMPT]), [len(PROMPT)], ContiguousCache(runner.cache_shape(), 1, 16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["self", "self:rtn-w4g64-head8", "self:rtn-w8-head8", "self:fp16", "self:bf16",
                                  "lookup"])
def test_greedy_output_is_the_target_greedy_output_with_built_drafts(spec):
    target = tiny_model("llama", seed=3)
    expected = generate_ids(target, [PROMPT], 40).tokens[0]
    draft = build_draft(target, spec)
    for gamma in (None, 3):
        tokens, stats = speculative_decode(target, draft, PROMPT, 40, gamma=gamma)
        assert tokens == expected and stats.shared_cache == (spec != "lookup")
        assert stats.drafted > 0 and stats.iterations < 40
    # Its own cache (no sharing), and a paged target cache.
    tokens, stats = speculative_decode(target, draft, PROMPT, 40, gamma=2, share_cache=False)
    assert tokens == expected and not stats.shared_cache
    tokens, stats = speculative_decode(target, draft, PROMPT, 40, gamma=2, cache=CacheSettings("paged", block_size=4))
    assert tokens == expected and not stats.shared_cache


@pytest.mark.skipif(not (HAS_INT4_KERNEL and HAS_INT8_KERNEL), reason="no packed int4/int8 CPU kernels")
def test_verification_rows_are_bitwise_single_steps_on_the_packed_kernels():
    """W4 + 8-bit head target: every linear is a packed kernel that computes a row the same way whatever the
    number of rows, and `exact_rows` attends query by query, so verifying k tokens gives bitwise the logits of
    k single-token steps, and greedy speculative output is plain greedy output even in bfloat16 activations."""
    target = ModelRunner(_w4_head8())
    batch_cache, step_cache = (ContiguousCache(target.cache_shape(), 1, 32) for _ in range(2))
    for cache in (batch_cache, step_cache):
        target.forward(torch.tensor([PROMPT]), [len(PROMPT)], cache)
    block = [9, 8, 7, 6, 5]
    verified = target.forward(torch.tensor([block]), [len(block)], batch_cache, all_logits=True, exact_rows=True)[0]
    steps = torch.stack([target.forward(torch.tensor([[t]]), [1], step_cache)[0] for t in block])
    assert torch.equal(verified, steps)
    expected = generate_ids(target, [PROMPT], 48).tokens[0]
    for draft in (build_draft(target.model, "self"), ModelRunner(tiny_model("llama", seed=5))):
        tokens, _ = speculative_decode(target, draft, PROMPT, 48, gamma=4)
        assert tokens == expected


def test_lookup_draft_copies_the_continuation_of_the_longest_recent_match():
    draft = build_draft(tiny_model("llama"), "lookup")
    assert draft.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the most recent earlier match
    assert draft.propose([5, 6, 7, 1, 2, 6, 7], 2) == [1, 2]  # two-token suffix
    assert draft.propose([5, 6, 7, 1, 2, 4, 7], 2) == []  # one-token matches are not enough (min_match 2)
    assert draft.propose([4, 4, 4, 4], 3) == [4]  # the overlap ends at the last committed token


def test_expected_speedup_and_the_choice_of_gamma():
    # Leviathan et al. Theorem 3.8 with a verification costing one step (v = 1).
    assert expected_speedup(0.8, 3, 0.1) == pytest.approx((1 - 0.8 ** 4) / (0.2 * 1.3))
    assert expected_speedup(1.0, 4, 0.25, 1.5) == pytest.approx(5 / 2.5)
    flat = SpeculativeCosts({k: 1.0 for k in range(1, 8)}, draft_s=0.05, context=8)
    assert flat.cost_ratio == 0.05 and flat.verify_ratio(6) == 1.0
    assert choose_gamma(0.99, flat)[0] == 6  # cheap draft, high acceptance, free verification: as far as allowed
    assert choose_gamma(0.99, flat, max_gamma=3)[0] == 3
    assert choose_gamma(0.0, flat)[0] == 1  # nothing is ever accepted: the least waste
    # A verification that costs 1 + 0.1 per extra token and a draft at c = 0.1: the formula's argmax.
    costs = SpeculativeCosts({k: 1 + 0.1 * (k - 1) for k in range(1, 8)}, draft_s=0.1, context=8)
    best = max(range(1, 7), key=lambda g: expected_speedup(0.8, g, 0.1, 1 + 0.1 * g))
    gamma, speedup = choose_gamma(0.8, costs)
    assert 1 < gamma == best and speedup == pytest.approx(expected_speedup(0.8, best, 0.1, 1 + 0.1 * best))
    assert choose_gamma(0.5, costs)[0] < gamma  # lower acceptance, shorter drafts
    slow = SpeculativeCosts({k: 1 + 0.5 * (k - 1) for k in range(1, 8)}, draft_s=0.9, context=8)
    assert choose_gamma(0.9, slow) == (1, pytest.approx(expected_speedup(0.9, 1, 0.9, 1.5)))
    assert choose_gamma(0.9, slow)[1] < 1  # speculative_decode then takes a plain step


def test_automatic_gamma_measures_once_per_pair_and_follows_acceptance():
    target = tiny_model("llama", seed=3)
    forget_costs()
    expected = generate_ids(target, [PROMPT], 30).tokens[0]
    good = build_draft(target, "self")
    tokens, first = speculative_decode(target, good, PROMPT, 30)
    assert tokens == expected and first.calibration_s > 0 and first.costs is not None
    assert pair_costs(target, good) is not None
    tokens, second = speculative_decode(target, good, PROMPT, 30)
    assert tokens == expected and second.calibration_s == 0  # measured once for the pair
    # 0 = a plain step, where drafting is expected to lose (on a tiny model the lean draft may cost as much
    # as the target: overhead, not arithmetic, dominates).
    assert all(0 <= g <= speculative.AUTO_MAX_GAMMA for g in first.gammas + second.gammas)
    assert second.alpha == 1.0 or second.plain_steps == second.iterations
    # A draft that never agrees (fixed costs, so that the test does not depend on this machine's timings):
    # the estimated acceptance falls, drafting stops but for the probes (gamma 1).
    costs = SpeculativeCosts({k: 1 + 0.3 * (k - 1) for k in range(1, 8)}, draft_s=0.2, context=8)
    bad = ModelRunner(tiny_model("llama", seed=1))
    tokens, stats = speculative_decode(target, bad, PROMPT, 40, costs=costs)
    assert tokens == generate_ids(target, [PROMPT], 40).tokens[0]
    assert stats.alpha < 0.5 and stats.plain_steps > stats.iterations // 2 and stats.calibration_s == 0
    assert set(stats.gammas[stats.gammas.index(0):]) <= {0, 1} and 1 in stats.gammas[stats.gammas.index(0):]
    tokens, stats = speculative_decode(target, good, PROMPT, 30, costs=costs)  # drafting pays: gamma grows
    assert tokens == expected and max(stats.gammas) > 2
    forget_costs(target, good)
    assert pair_costs(target, good) is None


def test_bad_input_is_refused_clearly():
    target = tiny_model("llama")
    with pytest.raises(SlimlmError, match="gamma .* must be an integer >= 1"):
        speculative_decode(target, target, PROMPT, 4, gamma=0)
    with pytest.raises(SlimlmError, match="max_gamma must be an integer >= 1"):
        speculative_decode(target, target, PROMPT, 4, max_gamma=0)
    with pytest.raises(SlimlmError, match="vocabulary .* differs"):
        speculative_decode(target, build_draft(tiny_model("llama", vocab_size=128), "self"), PROMPT, 4)
    with pytest.raises(SlimlmError, match="cannot decode in the target's KV cache"):
        speculative_decode(target, ModelRunner(target), PROMPT, 4, share_cache=True)
    with pytest.raises(SlimlmError, match="unknown draft preset 'nope'"):
        build_draft(target, "self:nope")
    with pytest.raises(SlimlmError, match="needs calibration data"):
        parse_draft_spec("self:gptq-w4g64")
    with pytest.raises(SlimlmError, match="unknown draft"):
        build_draft(target, "./a-directory")
    assert parse_draft_spec("./a-directory") is None and parse_draft_spec("self").preset is None
    lean = LeanRunner(target)
    with pytest.raises(SlimlmError, match="one sequence at a time"):
        lean.forward(torch.tensor([[1, 2], [3, 4]]), [2, 2], lean.new_cache(8))


@pytest.mark.parametrize("extra, message", [
    (["--draft", "self:nope"], "unknown draft preset 'nope'"),
    (["--draft", "self:gptq-w4g64"], "needs calibration data"),
    (["--draft", "self", "--gamma", "0"], "gamma (draft tokens per step) must be an integer >= 1"),
])
def test_cli_refuses_bad_drafts_before_loading(extra, message, capsys):
    assert main(["generate", "--model", "never-loaded", "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm: error:") and message in err and "Traceback" not in err


def test_cli_builds_the_draft_from_the_target(tiny_dir, capsys):
    assert main(["generate", "--model", tiny_dir, "--draft", "self:rtn-w8-head8", "--prompt", "Once",
                 "--max-new-tokens", "8", "--no-stop"]) == 0
    printed = capsys.readouterr().out
    assert "| alpha |" in printed and "| mean_gamma |" in printed and "| cost_ratio_c |" in printed
    assert main(["generate", "--model", tiny_dir, "--prompt", "Once", "--max-new-tokens", "8", "--no-stop"]) == 0
    plain = capsys.readouterr().out.splitlines()[0]
    assert main(["generate", "--model", tiny_dir, "--draft", "self", "--gamma", "3", "--prompt", "Once",
                 "--max-new-tokens", "8", "--no-stop"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "[0] " + plain  # same text as plain greedy decoding


def test_python_api_builds_the_draft_from_a_spec(tokenizer):
    from slimlm.infer import generate, speculative_generate

    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    result, stats = speculative_generate(model, "self:rtn-w4g64-head8", tokenizer, ["Once upon", "def f(x):"], 10,
                                         stop_at_eos=False)
    assert result.texts == generate(model, tokenizer, ["Once upon", "def f(x):"], 10, stop_at_eos=False).texts
    assert len(stats) == 2 and all(s.new_tokens == 10 and s.shared_cache for s in stats)


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_a_draft_built_from_the_target_follows_the_decode_path_and_keeps_greedy_output(mode, monkeypatch):
    """On the native path the draft is slimlm's runner in the target's cache; elsewhere a LeanRunner."""
    from slimlm.infer.draft import CacheSharingRunner
    from slimlm.quant import cpu_kernels, kernels

    if mode == "native" and cpu_kernels.load() is None:
        pytest.skip("slimlm's CPU kernels did not build here")
    monkeypatch.setenv(kernels.ENV, mode)
    kernels.kernel_choice.cache_clear()
    try:
        target = tiny_model("llama")
        draft = build_draft(target, "self:rtn-w4g32")
        assert isinstance(draft, CacheSharingRunner if mode == "native" else LeanRunner)
        prompt = [5, 6, 7, 8, 9, 10]
        plain = generate_ids(target, [prompt], 12).tokens[0]
        tokens, stats = speculative.speculative_decode(target, draft, prompt, 12, gamma=3)
        assert tokens == plain and stats.shared_cache
    finally:
        kernels.kernel_choice.cache_clear()
