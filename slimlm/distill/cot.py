"""Chain-of-thought distillation (black-box): a teacher's written reasoning becomes the student's training data.

- **Fine-tune-CoT** (Ho, Schmid, Yun, "Large Language Models Are Reasoning Teachers", ACL 2023, Sec. 3):
  the teacher is prompted zero-shot with "Let's think step by step" (Kojima et al.'s two stages: the
  rationale, then "Therefore, the answer (arabic numerals) is" for the answer), `samples` rationales per
  question (diverse reasoning: temperature sampling), and only rationales whose answer is right are kept.
  The student learns "<question> ###" -> "<rationale> --> <answer> END".
- **Distilling step-by-step** (Hsieh, Li, Yeh, Nakhost, Fujii, Ratner, Krishna, Lee, Pfister, "Distilling
  Step-by-Step!", Findings of ACL 2023, Sec. 3.2, Eq. 3): multi-task training with task prefixes,
  "[label] <question>" -> "<answer>" and "[rationale] <question>" -> "<rationale>", L = L_label + lambda
  L_rationale with lambda = 1 (both kinds of example in one set, each weighing the same). The labels are the
  data's own (the paper's setting with human labels); at test time the student answers the label task only,
  so it writes no rationale.
- **Answer-only** (the baseline both are measured against): "[label] <question>" -> "<answer>" on the same
  questions.

GSM8K's answers end with "#### <number>"; a prediction is right when the last number it writes (after
"-->" for Fine-tune-CoT) equals that number.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from slimlm.data.corpora import required_data_dir
from slimlm.distill.data import jsonl_rows
from slimlm.errors import SlimlmError
from slimlm.progress import progress
from slimlm.results import atomic_write_text

STYLES = ("fine-tune-cot", "step-by-step", "answer-only")
ZERO_SHOT_COT = "Q: {question}\nA: Let's think step by step."
ANSWER_TRIGGER = "\nTherefore, the answer (arabic numerals) is"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the final number, as GSM8K writes it after "####"


def read_problems(source: str, data_dir: str | os.PathLike[str] | None = None, split: str = "train",
                  limit: int | None = None) -> list[Problem]:
    """GSM8K's `split` from the data directory (`source` = "gsm8k"), or a JSONL file of question/answer rows."""
    if source == "gsm8k":
        path = required_data_dir(data_dir, "GSM8K") / "gsm8k" / f"{split}.jsonl"
    else:
        path = Path(source)
    if not path.is_file():
        raise SlimlmError(f"{path} does not exist: pass --data gsm8k with --data-dir, or a JSONL file of "
                          '{"question": ..., "answer": "... #### 42"} rows')
    problems = []
    for number, row in jsonl_rows(path, "questions", '{"question": ..., "answer": "... #### 42"}'):
        if "question" not in row or "answer" not in row:
            raise SlimlmError(f"{path}:{number} needs \"question\" and \"answer\" fields")
        final = str(row["answer"]).rpartition("####")[2].strip().replace(",", "")
        problems.append(Problem(str(row["question"]), final))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def last_number(text: str) -> str | None:
    """The last number in `text` (commas dropped, a trailing ".0" too), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def teacher_rationales(teacher, problems: list[Problem], samples: int = 1, temperature: float = 0.0,
                       max_new_tokens: int = 128, seed: int = 0, cache: str | Path | None = None,
                       chunk: int = 16) -> list[list[dict]]:
    """For each problem, `samples` teacher rationales with the answer each leads to (Kojima's two stages);
    kept in `cache` (JSONL) as they come, and reused by a rerun."""
    path = Path(cache) if cache is not None else None
    done = {}
    if path is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[(row["question"], row["sample"])] = row
    jobs = [(p, s) for p in problems for s in range(samples) if (p.question, s) not in done]
    for start in progress(range(0, len(jobs), chunk), desc=f"rationales ({teacher.name})",
                          total=(len(jobs) + chunk - 1) // chunk):
        batch = jobs[start : start + chunk]
        prompts = [ZERO_SHOT_COT.format(question=p.question) for p, _ in batch]
        rationales = [" " + text.strip() for text in
                      teacher.complete(prompts, max_new_tokens, temperature, seed + start)]
        answers = teacher.complete([prompt + rationale + ANSWER_TRIGGER for prompt, rationale in
                                    zip(prompts, rationales)], 16, 0.0, seed)
        for (problem, sample), rationale, answer in zip(batch, rationales, answers):
            done[(problem.question, sample)] = {"question": problem.question, "sample": sample,
                                                "rationale": rationale.strip(), "predicted": last_number(answer)}
        if path is not None:
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in done.values()))
    return [[done[(p.question, s)] for s in range(samples)] for p in problems]


def training_pairs(style: str, problems: list[Problem],
                   rationales: list[list[dict]] | None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a style (module docstring)."""
    if style not in STYLES:
        raise SlimlmError(f"unknown chain-of-thought style {style!r}: choose {', '.join(STYLES)}")
    pairs = []
    for index, problem in enumerate(problems):
        if style == "fine-tune-cot":
            for row in rationales[index]:
                if row["predicted"] is not None and _same(row["predicted"], problem.answer):
                    pairs.append((f"{problem.question} ###", f" {row['rationale']} --> {problem.answer} END"))
            continue
        pairs.append((f"[label] {problem.question}", f" {problem.answer}"))
        if style == "step-by-step":
            pairs.append((f"[rationale] {problem.question}", f" {rationales[index][0]['rationale']}"))
    if not pairs:
        raise SlimlmError("no training example: none of the teacher's rationales reached the right answer (a weak "
                          "teacher for this task); use more --cot-samples, another teacher, or --cot-style "
                          "step-by-step")
    return pairs


def _same(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], style: str,
             max_new_tokens: int = 128) -> float:
    """Exact match of the final number, the student answering greedily in its training format."""
    from slimlm.distill.teachers import LocalTeacher

    student = LocalTeacher(model, tokenizer)
    if style == "fine-tune-cot":
        prompts = [f"{p.question} ###" for p in problems]
    else:
        prompts = [f"[label] {p.question}" for p in problems]
        max_new_tokens = min(max_new_tokens, 16)
    right = 0
    for problem, text in zip(problems, student.complete(prompts, max_new_tokens)):
        if style == "fine-tune-cot":
            text = text.partition("-->")[2].partition("END")[0] if "-->" in text else ""
        else:
            text = text.strip().split("\n")[0]
        predicted = last_number(text) if style == "fine-tune-cot" else (re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
                                                                        or [None])[0]
        right += predicted is not None and _same(predicted.replace(",", ""), problem.answer)
    return right / len(problems)
