"""lm-evaluation-harness integration: lm-eval's own task YAMLs on the local files send the same requests as
slimlm's built-in tasks, the `slimlm` model class scores them as slimlm does, and both command lines work."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm_eval is in slimlm's dev extras")

from slimlm.cli import main  # noqa: E402
from slimlm.data.tasks import load_task  # noqa: E402
from slimlm.eval.zeroshot import evaluate_task  # noqa: E402
from slimlm.harness import SlimlmLM, evaluate_harness, harness_rows  # noqa: E402
from slimlm.models.tiny import tiny_model  # noqa: E402

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "winogrande", "openbookqa", "lambada")


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(tokenizer)).eval()


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_sends_the_requests_slimlm_builds(task, tiny, tokenizer, data_dir):
    """lm-eval's prompts (its YAMLs and their functions: HellaSwag's process_docs, WinoGrande's partial contexts) on
    the rewritten local files equal slimlm's, pair for pair, and so do the scores and every metric lm-eval reports."""
    from slimlm.data.tasks import LM_EVAL_METRICS

    limit = 40
    results = evaluate_harness(tiny, tokenizer, [task], data_dir, limit, log_samples=True)
    samples = sorted(results["samples"]["slimlm_" + task], key=lambda s: s["doc_id"])
    ours = load_task(task, data_dir)[:limit]
    expected = [list(e.pairs()) if hasattr(e, "pairs") else [(e.context, e.target)] for e in ours]
    assert [list(map(tuple, s["arguments"])) for s in samples] == expected
    if task not in ("winogrande", "lambada"):  # their targets are continuations, not choice indices
        assert [int(s["target"]) for s in samples] == [example.gold for example in ours]
    mine = evaluate_task(tiny, tokenizer, task, data_dir, limit)
    theirs = {r["metric"]: r for r in harness_rows(results)}
    assert set(theirs) == set(LM_EVAL_METRICS[task])
    for metric in LM_EVAL_METRICS[task]:
        own = {"perplexity": "ppl"}.get(metric, metric)
        assert theirs[metric]["value"] == pytest.approx(mine[own], rel=1e-9)
        if metric != "perplexity":  # lm-eval bootstraps the perplexity's stderr; slimlm reports none
            assert theirs[metric]["stderr"] == pytest.approx(mine[own + "_stderr"], abs=1e-12)
        assert theirs[metric]["n"] == limit


def test_rolling_loglikelihood_scores_every_token(tiny, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    lm = SlimlmLM(model=tiny, tokenizer=tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        logits = tiny(torch.tensor([[prefix, *ids[:-1]]])).logits[0].float().log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(ids)[:, None]).sum().item()
    assert lm.loglikelihood_rolling([_Request(text)])[0] == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(tiny, tokenizer):
    lm = SlimlmLM(model=tiny, tokenizer=tokenizer)
    free = lm.generate_until([_Request("Once upon a time", {"max_gen_toks": 12})])[0]
    assert free and len(tokenizer(free, add_special_tokens=False).input_ids) <= 13
    stop = free[len(free) // 2: len(free) // 2 + 2]
    cut = lm.generate_until([_Request("Once upon a time", {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == free[: free.index(stop)]


def test_quantized_kv_cache_scores(tiny, tokenizer):
    """Through an 8-bit KV cache scores stay close to the exact ones; through a 2-bit cache they move."""
    pairs = [_Request("Question: what is the capital of France?\nAnswer:", " Paris"),
             _Request("The cat sat on the", " mat")]
    exact = SlimlmLM(model=tiny, tokenizer=tokenizer).loglikelihood(pairs)
    def through(cache: str):
        lm = SlimlmLM(model=tiny, tokenizer=tokenizer, kv_cache=cache, kv_chunk=4, kv_group_size=16)
        return lm.loglikelihood(pairs)

    fine, coarse = through("naive-8bit"), through("naive-2bit")
    for (e, _), (f, _), (c, _) in zip(exact, fine, coarse):
        assert math.isclose(e, f, rel_tol=2e-2)
        assert not math.isclose(e, c, rel_tol=1e-4)


def test_slimlm_eval_harness_command(tiny_dir, data_dir, capsys):
    assert main(["eval", "--model", tiny_dir, "--harness", "piqa,arc_easy", "--limit", "4",
                 "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "| piqa | acc_norm |" in out and "| arc_easy | acc |" in out and "lm-eval" in out
    assert main(["eval", "--model", tiny_dir, "--harness", "winogrande9"]) == 2
    assert "choose from piqa" in capsys.readouterr().err


def test_lm_eval_command_line_finds_the_slimlm_model(tiny_dir, data_dir):
    """lm-eval's own command line (through `python -m slimlm.harness`, which registers the model)."""
    done = subprocess.run([sys.executable, "-m", "slimlm.harness", "--model", "slimlm", "--model_args",
                           f"pretrained={tiny_dir},batch_size=8", "--tasks", "slimlm_piqa", "--limit", "3",
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "slimlm_piqa" in done.stdout and "acc_norm" in done.stdout


def test_kvquant_is_refused_with_the_alternatives(tiny, tokenizer):
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="kivi-<bits>bit or naive-<bits>bit"):
        SlimlmLM(model=tiny, tokenizer=tokenizer, kv_cache="kvquant-3bit")
    assert main(["eval", "--harness", "piqa", "--kv-cache", "kvquant-3bit"]) == 2


def test_unknown_model_args_are_refused(tiny_dir):
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="unknown slimlm model_args kv_cach"):
        SlimlmLM.create_from_arg_string(f"pretrained={tiny_dir},kv_cach=kivi-2bit")
    lm = SlimlmLM.create_from_arg_string(f"pretrained={tiny_dir}", {"batch_size": 4, "max_batch_size": 64})
    assert lm.batch_size == 4  # lm-eval's own options are taken where slimlm has them, the others left out
