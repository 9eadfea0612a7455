"""Zero-shot accuracy on the standard commonsense / QA tasks, as lm-evaluation-harness (v0.4) defines it.

Definitions implemented (those of lm-eval's `HFLM` model and `ConfigurableTask`, zero-shot):

* Request: a (context, continuation) string pair. Prompts come from `slimlm.data.tasks`, which
  builds them as the lm-eval task YAMLs do (continuations start with the " " target delimiter).
* Tokenization (`HFLM._encode_pair`): trailing whitespace of the context moves to the front of the
  continuation; `whole = encode(context + continuation)`, `ctx = encode(context)`, continuation
  tokens = `whole[len(ctx):]`; no special tokens (`add_special_tokens=False`). An empty context is
  replaced by the EOS token and the continuation is encoded alone.
* Input: `(ctx + cont)[-(max_length + 1):][:-1]` (left truncation, as lm-eval), right-padded in
  batches sorted by length. `max_length` is the model config's `n_positions`,
  `max_position_embeddings` or `n_ctx`, else the tokenizer's `model_max_length`, else 2048.
* Score: sum of the log-softmax of the logits at the continuation positions; `is_greedy` when every
  continuation token is the argmax there.
* Multiple choice: `acc` = [argmax of the choice log-likelihoods == gold] (first index on ties);
  `acc_norm` = the same on log-likelihood / number of characters of the choice text (without the
  leading target delimiter, as lm-eval's `len(choice)`); stderr = sample standard deviation / sqrt(n)
  (= sqrt(p(1 - p) / (n - 1)) for 0/1 scores), None below 2 examples (lm-eval prints "N/A").
* LAMBADA (`lambada_openai`): `acc` = mean of `is_greedy` on the last word; `ppl` = exp(-mean of the
  per-example last-word log-likelihood) (lm-eval's `perplexity` aggregation).

Deviations from lm-eval:

* Log-softmax is taken in float32 on only the continuation positions; lm-eval takes it over every
  position in the model's dtype. Identical for float32 models, slightly more precise for bf16/fp16.
* WinoGrande (one context per choice, one shared continuation): lm-eval reports only `acc`; the
  `acc_norm` returned here equals `acc`, since the continuation, hence its length, is the same for
  every choice. lm-eval's own acc_norm there would divide by the option-context lengths, which
  measures nothing meaningful.
* A context made only of whitespace is treated as empty (EOS context); lm-eval fails an assertion.
* lm-eval >= 0.4.3 uses the BOS token (when the tokenizer has one) for an empty context; we use EOS,
  as v0.4.0-0.4.2 did. None of the eight tasks here has an empty context.
* No bootstrap stderr for LAMBADA perplexity.

BOS: a tokenizer that puts a BOS token in front of every text (Llama 2/3, Gemma) gets it in front of every
context, as lm-eval encodes with `add_bos_token=True` (lm-eval's default for Gemma; for other models its
default is no BOS, which scores such models without the token they were trained to start with). A
tokenizer that adds none (SmolLM2, GPT-2, Qwen2) is scored exactly as above. Results record which (`bos`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.data.calibration import added_bos
from slimlm.data.tasks import (
    LM_EVAL_METRICS,
    LM_EVAL_TASKS,
    TASK_FILES,
    LambadaExample,
    MultipleChoiceExample,
    load_task,
)
from slimlm.errors import SlimlmError
from slimlm.progress import progress

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM._DEFAULT_MAX_LENGTH
PROTOCOL_DEFINITION = (
    "lm-evaluation-harness v0.4 {task}: zero-shot log-likelihood of each continuation "
    "(HFLM _encode_pair tokenization, no special tokens), acc / acc_norm / perplexity as lm-eval"
)


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of the continuation tokens' log-probabilities
    is_greedy: bool  # every continuation token is the model's argmax
    num_tokens: int  # continuation tokens scored


# -- tokenization ------------------------------------------------------------------------------


def _encode_all(tokenizer: Any, texts: Sequence[str]) -> dict[str, list[int]]:
    """Token ids of each distinct text, without special tokens (one batched tokenizer call)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return dict(zip(unique, ids))


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    # Tokenizers attach a space to the following word, so a context's trailing spaces belong to
    # the continuation: "Answer: " + "yes" is scored as "Answer:" + " yes".
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise SlimlmError("the tokenizer has no EOS token, needed to score a continuation with an empty context")
    return int(tokenizer.eos_token_id)


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) of each pair, as lm-eval's HFLM.loglikelihood encodes them."""
    split = [_split_trailing_space(context, continuation) for context, continuation in pairs]
    texts = [c for c, _ in split if c] + [c + k if c else k for c, k in split]
    ids = _encode_all(tokenizer, texts)
    bos = added_bos(tokenizer)
    start = [] if bos is None else [bos]  # lm-eval's add_bos_token (see the module docstring)
    encoded = []
    for context, continuation in split:
        if not context:
            # Nothing to condition on: lm-eval uses the end-of-text token as the context (BOS where one is added).
            encoded.append((start or [_eos_id(tokenizer)], ids[continuation]))
            continue
        whole, context_ids = ids[context + continuation], ids[context]
        encoded.append((start + context_ids, whole[len(context_ids) :]))
    for (context, continuation), (_, continuation_ids) in zip(pairs, encoded):
        if not continuation_ids:
            raise SlimlmError(f"continuation {continuation!r} of context {context[-40:]!r} encodes to no tokens")
    return encoded


# -- scoring -----------------------------------------------------------------------------------


def model_max_length(model: Any, tokenizer: Any = None) -> int:
    """The longest input lm-eval would feed this model (see the module docstring)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**12:  # HF uses ~1e30 for "unset"
        return value
    return DEFAULT_MAX_LENGTH


def _forward_kwargs(model: Any) -> set[str]:
    """Optional forward arguments this model takes by name (custom models may take neither)."""
    parameters = inspect.signature(model.forward).parameters
    return {name for name in ("logits_to_keep", "use_cache") if name in parameters}


def _batch_logprobs(
    model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int, max_length: int, optional: set[str]
) -> list[ContinuationScore]:
    """Score one batch of (context ids, continuation ids); right-padded, one forward pass."""
    device = next(model.parameters()).device
    inputs = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in batch]
    width = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(inputs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    # Position p predicts token p + 1: a row's continuation is predicted by its last len(cont) positions.
    starts = [len(ids) - len(cont) for ids, (_, cont) in zip(inputs, batch)]
    # Only the logits from the earliest needed position onward are computed (lm_head is the big matmul).
    keep = width - min(starts)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask.to(device)}
    if "use_cache" in optional:
        kwargs["use_cache"] = False
    if "logits_to_keep" in optional:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids.to(device), **kwargs).logits[:, -keep:, :]
    offset = width - keep

    rows = torch.cat([torch.full((len(cont),), r, dtype=torch.long) for r, (_, cont) in enumerate(batch)])
    cols = torch.cat([torch.arange(s, s + len(cont)) - offset for s, (_, cont) in zip(starts, batch)])
    targets = torch.tensor([t for _, cont in batch for t in cont], device=logits.device)
    # log_softmax only on the gathered continuation positions, in float32.
    logprobs = F.log_softmax(logits[rows.to(logits.device), cols.to(logits.device)].float(), dim=-1)
    token_logprobs = logprobs.gather(1, targets[:, None]).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == targets

    sizes = [len(cont) for _, cont in batch]
    return [
        ContinuationScore(float(logprob.sum()), bool(hits.all()), len(hits))
        for logprob, hits in zip(token_logprobs.split(sizes), greedy.split(sizes))
    ]


@torch.inference_mode()
def score_token_pairs(
    model: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    pad_token_id: int = 0,
    max_length: int | None = None,
    desc: str = "scoring",
) -> list[ContinuationScore]:
    """Score already-tokenized (context ids, continuation ids) pairs; results in input order."""
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}")
    max_length = max_length or model_max_length(model)
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        if len(cont) > max_length:
            raise SlimlmError(f"a continuation of {len(cont)} tokens exceeds the model's {max_length}-token window")
    # Longest first (as lm-eval): little padding per batch, and any out-of-memory error shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    optional = _forward_kwargs(model)
    results: list[ContinuationScore | None] = [None] * len(requests)
    was_training = model.training
    if was_training:
        model.eval()  # dropout would make scores random
    try:
        for indices in progress(batches, desc=desc, total=len(batches)):
            batch = [requests[i] for i in indices]
            for i, score in zip(indices, _batch_logprobs(model, batch, pad_token_id, max_length, optional)):
                results[i] = score
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]  # every slot was filled


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked and never scored, so any valid id will do.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[ContinuationScore]:
    """Log-likelihood of each continuation given its context, as lm-eval's HFLM.loglikelihood."""
    requests = encode_pairs(tokenizer, pairs)
    return score_token_pairs(
        model,
        requests,
        batch_size=batch_size,
        pad_token_id=_pad_id(tokenizer),
        max_length=max_length or model_max_length(model, tokenizer),
        desc=f"scoring {len(pairs)} continuations",
    )


# -- metrics -----------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation / sqrt(n); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice_metrics(
    examples: Sequence[MultipleChoiceExample], scores: Sequence[ContinuationScore]
) -> dict[str, Any]:
    """acc, acc_norm (+ stderr), n and chance from the flat scores of every example's choices."""
    if not examples:
        raise SlimlmError("no examples to evaluate")
    if len(scores) != sum(e.num_choices for e in examples):
        raise ValueError(f"{len(scores)} scores for {sum(e.num_choices for e in examples)} choices")
    correct, correct_norm = [], []
    position = 0
    for example in examples:
        lls = [s.logprob for s in scores[position : position + example.num_choices]]
        position += example.num_choices
        correct.append(float(_argmax(lls) == example.gold))
        if example.shares_context:
            lengths = example.choice_lengths()
            # max(..., 1): an empty choice would divide by zero; no task here has one.
            normalized = [ll / max(length, 1) for ll, length in zip(lls, lengths)]
            correct_norm.append(float(_argmax(normalized) == example.gold))
        else:
            correct_norm.append(correct[-1])  # one shared continuation: its length cancels out
    n = len(examples)
    return {
        "acc": sum(correct) / n,
        "acc_stderr": mean_stderr(correct),
        "acc_norm": sum(correct_norm) / n,
        "acc_norm_stderr": mean_stderr(correct_norm),
        "n": n,
        "chance": sum(1 / e.num_choices for e in examples) / n,
    }


def evaluate_multiple_choice(
    model: Any, tokenizer: Any, examples: Sequence[MultipleChoiceExample], batch_size: int = 16
) -> dict[str, Any]:
    """lm-eval multiple-choice metrics: acc, acc_norm, their stderr, n and the chance level.

    For WinoGrande-style examples (one context per choice, one continuation) acc_norm equals acc.
    """
    pairs = [pair for example in examples for pair in example.pairs()]
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size)
    return multiple_choice_metrics(examples, scores)


def lambada_metrics(scores: Sequence[ContinuationScore]) -> dict[str, Any]:
    if not scores:
        raise SlimlmError("no examples to evaluate")
    hits = [float(s.is_greedy) for s in scores]
    n = len(scores)
    return {
        "acc": sum(hits) / n,
        "acc_stderr": mean_stderr(hits),
        "ppl": math.exp(-sum(s.logprob for s in scores) / n),
        "n": n,
    }


def evaluate_lambada(
    model: Any, tokenizer: Any, examples: Sequence[LambadaExample], batch_size: int = 16
) -> dict[str, Any]:
    """LAMBADA (OpenAI): greedy last-word accuracy and the perplexity of the last word."""
    pairs = [(example.context, example.target) for example in examples]
    return lambada_metrics(score_continuations(model, tokenizer, pairs, batch_size=batch_size))


def evaluate_task(
    model: Any,
    tokenizer: Any,
    name: str,
    data_dir: str | os.PathLike[str] | None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Load a task, score it and record the metrics with the protocol that produced them."""
    examples = load_task(name, data_dir, limit=limit)
    if name == "lambada":
        metrics = evaluate_lambada(model, tokenizer, examples, batch_size=batch_size)  # type: ignore[arg-type]
    else:
        metrics = evaluate_multiple_choice(model, tokenizer, examples, batch_size=batch_size)  # type: ignore[arg-type]
    lm_eval_task = LM_EVAL_TASKS[name]
    return {
        "task": name,
        **metrics,
        # The metrics lm-eval's task YAML reports ("perplexity" is our "ppl").
        "lm_eval_metrics": list(LM_EVAL_METRICS[name]),
        "protocol": {
            "limit": limit,
            "num_fewshot": 0,
            "definition": PROTOCOL_DEFINITION.format(task=lm_eval_task),
            "lm_eval_task": lm_eval_task,
            "files": list(TASK_FILES[name]),
            "max_length": model_max_length(model, tokenizer),
            "bos": added_bos(tokenizer) is not None,
        },
    }
