"""Evaluate a model on a list of tasks and return one row per (task, metric).

Task names: the perplexity corpora (`wikitext2`, `ptb`, `c4`, `pydoc`, or a path to a .txt / .jsonl
file) and the zero-shot tasks (`lambada`, `piqa`, `hellaswag`, `arc_easy`, `arc_challenge`,
`boolq`, `winogrande`, `openbookqa`). All names are checked before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.data.corpora import CORPORA, is_user_corpus
from slimlm.data.tasks import LM_EVAL_METRICS, ZERO_SHOT_TASKS
from slimlm.errors import SlimlmError
from slimlm.eval.kl import kl_divergence
from slimlm.eval.perplexity import perplexity
from slimlm.eval.zeroshot import evaluate_task

TABLE_COLUMNS = ("task", "metric", "value", "stderr", "n", "protocol")


@dataclass(frozen=True)
class EvalSettings:
    seqlen: int = 2048
    max_windows: int | None = None
    limit: int | None = None
    batch_size: int = 16
    data_dir: str | os.PathLike[str] | None = None
    kv_cache: str | None = None  # perplexity through a quantized KV cache, e.g. "kivi-2bit"
    kv_chunk: int = 128  # tokens fed per step with kv_cache
    kv_group_size: int = 32
    kv_residual: int = 128
    kv_outliers: float = 0.01  # KVQuant: fraction of values kept sparse in float16
    kv_calibration: Any = field(default=None, compare=False, repr=False)  # KVQuant: KVQuantCalibration

    def kv_spec(self):
        """The checked quantized-KV spec (None without kv_cache)."""
        if self.kv_cache is None:
            return None
        from slimlm.infer.quantized_cache import check_chunk, parse_kv_cache

        check_chunk(self.kv_chunk)
        return parse_kv_cache(self.kv_cache, self.kv_group_size, self.kv_residual, self.kv_outliers,
                              self.kv_calibration)


def parse_tasks(spec: str | list[str]) -> list[str]:
    """Split a comma-separated task list and check every name before any work starts."""
    names = [name.strip() for name in (spec.split(",") if isinstance(spec, str) else spec) if name.strip()]
    if not names:
        raise SlimlmError("no task given: pass --tasks with a comma-separated list, e.g. --tasks wikitext2,piqa")
    unknown = [n for n in names if n not in CORPORA and n not in ZERO_SHOT_TASKS and not is_user_corpus(n)]
    if unknown:
        raise SlimlmError(
            f"unknown task(s) {', '.join(unknown)}: choose from perplexity corpora {', '.join(CORPORA)}, "
            f"zero-shot tasks {', '.join(ZERO_SHOT_TASKS)}, or a path to a .txt / .jsonl file"
        )
    return names


def is_perplexity_task(name: str) -> bool:
    return name in CORPORA or is_user_corpus(name)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | list[str],
    settings: EvalSettings = EvalSettings(),
    reference: PreTrainedModel | None = None,
) -> list[dict]:
    """Rows {task, metric, value, stderr, n, protocol, details} for every task in order.

    With a `reference` model, each perplexity corpus also gets the KL divergence of `model` from it.
    """
    rows: list[dict] = []
    spec = settings.kv_spec()  # bad KV cache settings fail before any task runs
    if settings.kv_cache is not None and reference is not None:
        raise SlimlmError("the KL divergence is computed without a KV cache: drop --kl-reference or --kv-cache")
    if spec is not None and spec.method == "kvquant" and spec.calibration is None:
        from dataclasses import replace

        from slimlm.infer.kvquant import calibrate_from_corpus

        # KVQuant's offline calibration with its defaults (slimlm.infer.kvquant) unless one was given
        calibration = calibrate_from_corpus(model, tokenizer, spec, data_dir=settings.data_dir).calibration
        settings = replace(settings, kv_calibration=calibration)
    for name in parse_tasks(tasks):
        if name in ZERO_SHOT_TASKS:
            rows += _zero_shot_rows(model, tokenizer, name, settings)
        else:
            rows += _perplexity_rows(model, tokenizer, name, settings, reference)
    return rows


def _perplexity_rows(model, tokenizer, name: str, settings: EvalSettings, reference) -> list[dict]:
    result = perplexity(model, tokenizer, name, settings.seqlen, settings.max_windows, settings.data_dir,
                        settings.kv_spec(), settings.kv_chunk)
    protocol = f"seqlen {result.seqlen}, {result.windows}/{result.total_windows} windows"
    if settings.kv_cache is not None:
        spec = settings.kv_spec()
        if spec.method == "kvquant":
            calibration = spec.calibration
            detail = f"outliers {spec.outliers:g}" + (
                f", calibrated on {calibration.segments} x {calibration.seqlen} tokens" if calibration else "")
        else:
            detail = f"group {spec.group_size}" + (f", residual {spec.residual}" if spec.method == "kivi" else "")
        protocol += f", KV cache {spec.name} ({detail}), chunks of {settings.kv_chunk}"
    rows = [_row(result.corpus, "ppl", result.ppl, None, result.tokens_scored, protocol, result.to_dict())]
    if reference is not None:
        kl = kl_divergence(model, reference, tokenizer, name, settings.seqlen, settings.max_windows, settings.data_dir)
        details = kl.to_dict()
        rows.append(_row(result.corpus, "kl_mean", kl.kl_mean, None, kl.tokens_scored, protocol, details))
        rows.append(_row(result.corpus, "top1_agreement", kl.top1_agreement, None, kl.tokens_scored, protocol, details))
    return rows


def _zero_shot_rows(model, tokenizer, name: str, settings: EvalSettings) -> list[dict]:
    result = evaluate_task(model, tokenizer, name, settings.data_dir, settings.limit, settings.batch_size)
    protocol = "0-shot, " + ("all examples" if settings.limit is None else f"first {result['n']} examples")
    # The metrics lm-eval reports for this task ("perplexity" is our "ppl").
    metrics = [{"perplexity": "ppl"}.get(m, m) for m in LM_EVAL_METRICS[name]]
    return [
        _row(name, metric, result[metric], result.get(f"{metric}_stderr"), result["n"], protocol, result)
        for metric in metrics
        if metric in result
    ]


def _row(task: str, metric: str, value: float, stderr, n: int, protocol: str, details: dict) -> dict:
    return {"task": task, "metric": metric, "value": value, "stderr": stderr, "n": n, "protocol": protocol,
            "details": details}
