"""Sequence-level knowledge distillation: the teacher writes the answers, the student learns them (Kim & Rush,
"Sequence-Level Knowledge Distillation", EMNLP 2016, Sec. 3.2, with the teacher's greedy output standing in for
its beam search; the step that LaMini-LM and Alpaca-style instruction distillation build on).

Black-box: the teacher is seen only through its text, so it may be a local model or an OpenAI-compatible
server (`slimlm.distill.teachers`), and its tokenizer need not be the student's. For each prompt the teacher's
response is generated once and written to a JSONL file (`{"prompt", "response"}`, appended atomically every
`flush_every` prompts); a rerun reads the responses already there and asks only for the rest. The student is
then fine-tuned with the cross-entropy on the response tokens (`slimlm.distill.ce`).
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.progress import progress
from slimlm.results import atomic_write_text


def teacher_responses(teacher, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                      cache: str | Path | None = None, flush_every: int = 16) -> list[tuple[str, str]]:
    """(prompt, teacher's response) for every prompt, reusing the responses already in `cache`."""
    if not prompts:
        raise SlimlmError("sequence-level distillation needs at least one prompt")
    done: dict[str, str] = {}
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["prompt"]] = row["response"]
    missing = [p for p in dict.fromkeys(prompts) if p not in done]
    for start in progress(range(0, len(missing), flush_every), desc=f"teacher responses ({teacher.name})",
                          total=(len(missing) + flush_every - 1) // flush_every):
        chunk = missing[start : start + flush_every]
        for prompt, response in zip(chunk, teacher.complete(chunk, max_new_tokens, temperature, seed + start)):
            done[prompt] = response
        if path is not None:
            atomic_write_text(path, "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in done.items()))
    return [(prompt, done[prompt]) for prompt in prompts]
