"""Zero-shot benchmark tasks, read from a local data directory, with lm-evaluation-harness prompts.

Every prompt is built exactly as the lm-evaluation-harness (v0.4) task YAML / utils.py builds it,
so scores are comparable with published lm-eval numbers for the lm-eval task of the same name
(`lambada` is lm-eval's `lambada_openai`):

| task            | file under the data directory           | context / choices                                       |
|-----------------|-----------------------------------------|---------------------------------------------------------|
| `lambada`       | `lambada/lambada_test.jsonl`            | `text.split(" ")[:-1]` / `" " + last`                   |
| `piqa`          | `piqa/valid.jsonl` + `valid-labels.lst` | `Question: {goal}\\nAnswer:` / sol1, sol2               |
| `hellaswag`     | `hellaswag/hellaswag_val_full.txt`      | `{label}: {ctx_a} {ctx_b.capitalize()}`                 |
| `arc_easy`      | `arc/ARC-Easy-Test.parsed.jsonl`        | `Question: {question}\\nAnswer:`                        |
| `arc_challenge` | `arc/ARC-Challenge-Test.parsed.jsonl`   | `Question: {question}\\nAnswer:`                        |
| `boolq`         | `boolq/val.jsonl`                       | `{passage}\\nQuestion: {question}?\\nAnswer:` / no, yes |
| `winogrande`    | `winogrande/dev.parsed.jsonl`           | sentence up to `_` + option / the rest                  |
| `openbookqa`    | `openbookqa/test.tsv`                   | question stem / the four choice texts                   |

Every continuation starts with lm-eval's target delimiter, a single space.

Two reconstructions, because the local files are not the Hugging Face datasets lm-eval reads:

* HellaSwag: the file holds `activity_label: ctx` where `ctx = ctx_a + " " + ctx_b` was not
  capitalised, while lm-eval capitalises `ctx_b` (the incomplete noun phrase that ends ActivityNet
  contexts). `ctx_b` is taken to be the text after the last sentence end when it starts with a
  lower-case letter and does not itself end a sentence; that capitalises all 3,236 ActivityNet
  items of the validation set that end in such a phrase and leaves the WikiHow items (empty `ctx_b`)
  alone. Three ActivityNet items with numbered steps ("... 5 the guy") may still differ.
* BoolQ: `label` is stored as the string "true"/"false"; lm-eval's SuperGLUE label is 1/0.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.data.corpora import data_file, read_utf8, required_data_dir
from slimlm.errors import SlimlmError

ZERO_SHOT_TASKS = ("lambada", "piqa", "hellaswag", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa")

# lm-eval's default `target_delimiter`: put between context and every continuation.
TARGET_DELIMITER = " "

# The lm-eval task each of ours reproduces, and the metrics its YAML reports.
LM_EVAL_TASKS: dict[str, str] = {name: name for name in ZERO_SHOT_TASKS} | {"lambada": "lambada_openai"}
LM_EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "lambada": ("perplexity", "acc"),
    "piqa": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "boolq": ("acc",),
    "winogrande": ("acc",),
    "openbookqa": ("acc", "acc_norm"),
}

TASK_FILES: dict[str, tuple[str, ...]] = {
    "lambada": ("lambada/lambada_test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "arc_easy": ("arc/ARC-Easy-Test.parsed.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.parsed.jsonl",),
    "boolq": ("boolq/val.jsonl",),
    "winogrande": ("winogrande/dev.parsed.jsonl",),
    "openbookqa": ("openbookqa/test.tsv",),
}


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One question scored by comparing the log-likelihood of each choice.

    Either one context shared by every continuation (the usual case), or, for WinoGrande's
    "partial evaluation", one context per choice and a single continuation shared by all.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if not (len(self.contexts) == 1 or len(self.continuations) == 1):
            raise ValueError("give one shared context or one shared continuation")
        if not 0 <= self.gold < self.num_choices:
            raise ValueError(f"gold {self.gold} is not one of the {self.num_choices} choices")

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    @property
    def shares_context(self) -> bool:
        """True when the choices are continuations of one context (not WinoGrande's partial scoring)."""
        return len(self.contexts) == 1

    def pairs(self) -> Iterator[tuple[str, str]]:
        """The (context, continuation) pair scored for each choice, in choice order."""
        for i in range(self.num_choices):
            context = self.contexts[0] if len(self.contexts) == 1 else self.contexts[i]
            continuation = self.continuations[0] if len(self.continuations) == 1 else self.continuations[i]
            yield context, continuation

    def choice_lengths(self) -> tuple[int, ...]:
        """Characters of each choice as lm-eval counts them for acc_norm: without the target delimiter."""
        return tuple(len(c.removeprefix(TARGET_DELIMITER)) for c in self.continuations)


@dataclass(frozen=True)
class LambadaExample:
    """A passage whose last word is predicted: `context + target` is the original text."""

    context: str
    target: str


Example = MultipleChoiceExample | LambadaExample


def load_task(
    name: str, data_dir: str | os.PathLike[str] | None, limit: int | None = None
) -> list[MultipleChoiceExample] | list[LambadaExample]:
    """The first `limit` examples (all when None) of a zero-shot task, in file order.

    `data_dir` falls back to the SLIMLM_DATA environment variable when None. Returns
    `LambadaExample`s for "lambada" and `MultipleChoiceExample`s for every other task.
    """
    if name not in ZERO_SHOT_TASKS:
        raise SlimlmError(f"unknown task {name!r}: choose one of {', '.join(ZERO_SHOT_TASKS)}")
    if limit is not None and limit < 1:
        raise SlimlmError(f"limit must be at least 1, got {limit} (leave it out to use every example)")
    examples = _LOADERS[name](*task_paths(name, data_dir))
    return examples if limit is None else examples[:limit]


def task_paths(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The local file(s) of a zero-shot task (`TASK_FILES`), each checked to exist."""
    directory = required_data_dir(data_dir, "zero-shot tasks")
    return [data_file(directory, relative) for relative in TASK_FILES[name]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); a broken line is a clear error."""
    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SlimlmError(f"{path}:{number}: not a JSON line ({error}); restore the file") from None
    return rows


def _field(path: Path, index: int, row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise SlimlmError(f"{path}: record {index + 1} has no {key!r} field; restore the file from the data set")
    return row[key]


def _choices(texts: list[str]) -> tuple[str, ...]:
    return tuple(TARGET_DELIMITER + text for text in texts)


def _checked(
    path: Path, index: int, contexts: tuple[str, ...], continuations: tuple[str, ...], gold: int
) -> MultipleChoiceExample:
    """Build an example, turning a bad label in the file into a user-facing error."""
    try:
        return MultipleChoiceExample(contexts=contexts, continuations=continuations, gold=gold)
    except ValueError as error:
        raise SlimlmError(f"{path}: record {index + 1}: {error}; restore the file from the data set") from None


def _lambada(path: Path) -> list[LambadaExample]:
    examples = []
    for i, row in enumerate(read_jsonl(path)):
        # lm-eval splits on single spaces, not on any whitespace: a last "word" may hold newlines.
        words = _field(path, i, row, "text").split(" ")
        examples.append(LambadaExample(context=" ".join(words[:-1]), target=" " + words[-1]))
    return examples


def piqa_rows(path: Path, labels_path: Path) -> list[tuple[dict[str, Any], str]]:
    """Each PIQA record with its label (the labels live in their own file, one a line)."""
    rows = read_jsonl(path)
    labels = [line.strip() for line in read_utf8(labels_path).splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise SlimlmError(
            f"{labels_path} has {len(labels)} labels for {len(rows)} questions in {path}; restore both files"
        )
    return list(zip(rows, labels))


def _piqa(path: Path, labels_path: Path) -> list[MultipleChoiceExample]:
    examples = []
    for i, (row, label) in enumerate(piqa_rows(path, labels_path)):
        context = f"Question: {_field(path, i, row, 'goal')}\nAnswer:"
        choices = _choices([_field(path, i, row, "sol1"), _field(path, i, row, "sol2")])
        examples.append(_checked(labels_path, i, (context,), choices, int(label)))
    return examples


# A sentence end followed by whitespace: HellaSwag's ctx_b starts after the last one.
_SENTENCE_END = re.compile(r"[.!?]\s+")


def hellaswag_query(line: str) -> str:
    """lm-eval's HellaSwag query from the file's `activity_label: ctx` line (capitalises ctx_b).

    lm-eval builds `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`; the file kept ctx_b
    as is. ctx_b is the trailing incomplete phrase: lower-case, after the last sentence end (or
    right after the label when ctx_a is empty), not itself ending a sentence.
    """
    ends = list(_SENTENCE_END.finditer(line))
    if ends:
        start = ends[-1].end()
    elif ": " in line:
        start = line.index(": ") + 2
    else:
        return line  # no label separator either: nothing identifiable as ctx_b
    tail = line[start:]
    if tail[:1].islower() and not tail.rstrip().endswith((".", "!", "?")):
        return line[:start] + tail.capitalize()
    return line


def hellaswag_items(path: Path) -> list[tuple[str, int, list[str]]]:
    """(the `activity_label: ctx` line as stored, gold label, endings) of each item: six lines an item."""
    lines = read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file
    if len(lines) % 6:
        raise SlimlmError(f"{path} has {len(lines)} lines, not 6 per item; restore the file from the data set")
    items = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i : i + 6]
        if not label.strip().isdigit():
            raise SlimlmError(f"{path}:{i + 2}: expected the gold label 0-3, got {label!r}; restore the file")
        items.append((query, int(label), endings))
    return items


def _hellaswag(path: Path) -> list[MultipleChoiceExample]:
    return [_checked(path, i, (hellaswag_query(query),), _choices(endings), label)
            for i, (query, label, endings) in enumerate(hellaswag_items(path))]


def _arc(path: Path) -> list[MultipleChoiceExample]:
    examples = []
    for i, row in enumerate(read_jsonl(path)):
        context = f"Question: {_field(path, i, row, 'question')}\nAnswer:"
        choices = _choices(list(_field(path, i, row, "choices")))
        examples.append(_checked(path, i, (context,), choices, int(_field(path, i, row, "label"))))
    return examples


def boolq_label(path: Path, index: int, value: Any) -> int:
    # lm-eval's SuperGLUE label: 1 = yes/true; the local file stores "true"/"false".
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return 1
    if text in ("false", "0"):
        return 0
    raise SlimlmError(f"{path}: record {index + 1}: label {value!r} is not true/false; restore the file")


def _boolq(path: Path) -> list[MultipleChoiceExample]:
    examples = []
    for i, row in enumerate(read_jsonl(path)):
        context = f"{_field(path, i, row, 'passage')}\nQuestion: {_field(path, i, row, 'question')}?\nAnswer:"
        gold = boolq_label(path, i, _field(path, i, row, "label"))
        examples.append(_checked(path, i, (context,), _choices(["no", "yes"]), gold))
    return examples


def _winogrande(path: Path) -> list[MultipleChoiceExample]:
    examples = []
    for i, row in enumerate(read_jsonl(path)):
        sentence = _field(path, i, row, "sentence")
        blank = sentence.find("_")
        if blank < 0:
            raise SlimlmError(f"{path}: record {i + 1} has no '_' blank; restore the file from the data set")
        # Partial evaluation: each option completes its own context; the rest of the sentence is scored.
        contexts = tuple(sentence[:blank] + _field(path, i, row, key) for key in ("option1", "option2"))
        continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
        answer = str(_field(path, i, row, "answer")).strip()
        if answer not in ("1", "2"):
            raise SlimlmError(f"{path}: record {i + 1}: answer {answer!r} is not 1 or 2; restore the file")
        examples.append(_checked(path, i, contexts, (continuation,), int(answer) - 1))
    return examples


# "(A) text (B) text ..." -> ["", "A", "text", "B", "text", ...], as the data README prescribes.
_OBQA_CHOICE = re.compile(r"\s*\(([A-D])\)\s*")


def openbookqa_rows(path: Path) -> list[tuple[str, list[str], list[str], str]]:
    """(question stem, choice letters, choice texts, answer key) of each row of the local OpenBookQA TSV."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = []
    for i, row in enumerate(rows):
        parts = _OBQA_CHOICE.split(_field(path, i, row, "Choices"))
        letters, texts = parts[1::2], parts[2::2]
        key = _field(path, i, row, "Answer Key").strip()
        if parts[0].strip() or not letters or key not in letters:
            raise SlimlmError(
                f"{path}: row {i + 2}: cannot read choices {row['Choices']!r} / key {key!r}; restore the file"
            )
        out.append((_field(path, i, row, "Question Stem"), letters, texts, key))
    return out


def _openbookqa(path: Path) -> list[MultipleChoiceExample]:
    return [_checked(path, i, (stem,), _choices(texts), letters.index(key))
            for i, (stem, letters, texts, key) in enumerate(openbookqa_rows(path))]


_LOADERS = {
    "lambada": _lambada,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "boolq": _boolq,
    "winogrande": _winogrande,
    "openbookqa": _openbookqa,
}
