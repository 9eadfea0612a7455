"""Training examples for distillation and fine-tuning, and the order the trainer reads them in.

Two sources:

- **token segments**: a corpus (WikiText-2, the C4 sample, any text file) cut into consecutive
  segments of `seqlen` tokens; every next-token prediction counts;
- **instruction/answer JSONL**: one object per line with a prompt and a response (keys
  `prompt`/`response`, `instruction`/`output` or `question`/`answer`, plus an optional `input`
  that is appended to the instruction); only the response's tokens count in the loss, and the
  prompt is what on-policy methods (GKD) let the student continue.

Batches are a pure function of the step: step s reads examples `order[s * B ... s * B + B - 1]` of
a permutation drawn from the seed (a new permutation each epoch), so a resumed run reads exactly
the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from slimlm.errors import SlimlmError

PROMPT_KEYS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"))


@dataclass
class Batch:
    """Token ids padded on the right; `targets[b, t]` says whether the prediction of token t + 1 from
    tokens 0..t counts in the loss; `prompt_lengths[b]`: the tokens an on-policy method keeps as the
    prompt before letting the student continue."""

    ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    targets: torch.Tensor  # (B, L - 1) bool
    prompt_lengths: torch.Tensor  # (B,) long

    @property
    def tokens(self) -> int:
        """Predicted tokens that count in the loss."""
        return int(self.targets.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                     self.prompt_lengths)


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    prompt_length: int  # 0 for a plain text segment (every token is a target)


class TrainingData:
    """A fixed list of examples and a seeded order over them (module docstring)."""

    def __init__(self, examples: list[Example], pad_id: int, description: str, seed: int = 0,
                 default_prompt: int = 0):
        if not examples:
            raise SlimlmError(f"{description} holds no training example")
        self.examples, self.pad_id, self.description, self.seed = examples, pad_id, description, seed
        self.default_prompt = default_prompt  # prompt length for on-policy sampling from plain text segments

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """Changes with any example (resume refuses a checkpoint made on other data)."""
        return f"{self.description}:{len(self.examples)}:{hash(tuple(e.ids for e in self.examples)) & 0xffffffff:08x}"

    def batch(self, step: int, batch_size: int) -> Batch:
        rows = [self._example(step * batch_size + i) for i in range(batch_size)]
        length = max(len(example.ids) for example in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        targets = torch.zeros((len(rows), length - 1), dtype=torch.bool)
        prompts = torch.zeros(len(rows), dtype=torch.long)
        for b, example in enumerate(rows):
            n = len(example.ids)
            ids[b, :n] = torch.tensor(example.ids)
            mask[b, :n] = 1
            first = max(example.prompt_length - 1, 0)  # the prediction of the response's first token
            targets[b, first : n - 1] = True
            prompts[b] = example.prompt_length or min(self.default_prompt, n - 1)
        return Batch(ids, mask, targets, prompts)

    def _example(self, index: int) -> Example:
        epoch, position = divmod(index, len(self.examples))
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch))
        return self.examples[int(order[position])]


def token_segments(ids: torch.Tensor, seqlen: int, description: str, pad_id: int, seed: int = 0,
                   prompt_tokens: int = 0) -> TrainingData:
    """Consecutive `seqlen`-token segments of a 1-D token stream (or the rows of a 2-D tensor of segments)."""
    if seqlen < 2:
        raise SlimlmError(f"training segments need at least 2 tokens (got seqlen={seqlen})")
    rows = ids if ids.dim() == 2 else ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    if ids.dim() == 2 and rows.shape[1] > seqlen:  # calibration segments longer than the training length
        rows = rows[:, : rows.shape[1] // seqlen * seqlen].reshape(-1, seqlen)
    if len(rows) == 0:
        raise SlimlmError(f"{description} has {ids.numel()} tokens, fewer than one segment of {seqlen}: "
                          "lower the sequence length or use a larger corpus")
    examples = [Example(tuple(row.tolist()), 0) for row in rows]
    return TrainingData(examples, pad_id, description, seed, default_prompt=prompt_tokens)


def jsonl_rows(path: str | os.PathLike[str], what: str, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file; `what`/`expected` word the errors."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".jsonl":
        raise SlimlmError(f"{what}: {path} is not a JSONL file; pass one with {expected} on each line")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SlimlmError(f"{path}:{number} is not a JSON object ({error.msg})") from error
        if not isinstance(row, dict):
            raise SlimlmError(f"{path}:{number} is not a JSON object")
        rows.append((number, row))
    return rows


def _with_input(row: dict, key: str) -> str:
    return str(row[key]) + (f"\n{row['input']}" if row.get("input") else "")


def read_instruction_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(prompt, response) pairs of an instruction/answer JSONL file (module docstring)."""
    pairs = []
    for number, row in jsonl_rows(path, "instruction data", '{"prompt": ..., "response": ...}'):
        keys = next((pair for pair in PROMPT_KEYS if pair[0] in row and pair[1] in row), None)
        if keys is None:
            raise SlimlmError(f"{path}:{number} needs one of the key pairs "
                              f"{', '.join('/'.join(pair) for pair in PROMPT_KEYS)}")
        pairs.append((_with_input(row, keys[0]), str(row[keys[1]])))
    return pairs


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a JSONL file: each line's `prompt`, `instruction` (+ `input`) or `question`."""
    prompts = []
    for number, row in jsonl_rows(path, "prompts", 'a "prompt" (or "instruction", "question")'):
        key = next((k for k, _ in PROMPT_KEYS if k in row), None)
        if key is None:
            raise SlimlmError(f"{path}:{number} has no prompt: give it a \"prompt\", \"instruction\" or \"question\"")
        prompts.append(_with_input(row, key))
    return prompts


def instruction_examples(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int,
                         description: str, seed: int = 0) -> TrainingData:
    """Prompt + response token sequences, the response's tokens as targets, cut to `max_length` tokens."""
    examples = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:max_length]
        if len(prompt_ids) < len(ids):  # at least one response token survives the cut
            examples.append(Example(tuple(ids), len(prompt_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TrainingData(examples, pad, description, seed)
