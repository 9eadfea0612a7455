"""Self-Instruct: a teacher writes new instructions from a few seed tasks (Wang, Kordi, Mishra, Liu, Smith,
Khashabi, Hajishirzi, "Self-Instruct: Aligning Language Models with Self-Generated Instructions", ACL 2023,
Sec. 2.2-2.3; LaMini-LM builds its instruction set this way before the teacher answers them).

Each round shows the teacher 8 instructions from the pool, 6 seed tasks and 2 it wrote before (fewer while it
has written fewer), as a numbered task list, and lets it continue with task 9. A new instruction is kept when

- its ROUGE-L F-measure with every instruction already in the pool is below 0.7 (near-duplicates go),
- it has 3 to 150 words, starts with neither punctuation nor a non-ASCII character,
- it names nothing a text model cannot act on (image, picture, graph, file, map, draw, plot, go to, video,
  audio, music, flowchart, diagram: the paper's filter words).

ROUGE-L here: the longest common subsequence of the lower-cased alphanumeric word tokens (rouge-score's default
tokenizer, without stemming), F = 2PR / (P + R). The instructions written so far are kept in a JSONL file when
one is given, and a rerun continues from them. Their answers come from `slimlm.distill.seqkd`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar
from slimlm.results import atomic_write_text

SIMILARITY_LIMIT = 0.7
BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
SEEDS_PER_PROMPT, GENERATED_PER_PROMPT = 6, 2


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts (longest common subsequence of their word tokens)."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def acceptable(instruction: str, pool: list[str]) -> bool:
    """The paper's filters (module docstring)."""
    count = len(instruction.split())
    if not 3 <= count <= 150 or not instruction[0].isascii() or not instruction[0].isalnum():
        return False
    lowered = f" {' '.join(words(instruction))} "
    if any(f" {word} " in lowered for word in BLOCKED_WORDS):
        return False
    return all(rouge_l(instruction, other) < SIMILARITY_LIMIT for other in pool)


def task_prompt(examples: list[str]) -> str:
    """The paper's instruction-generation prompt: a numbered list of tasks to continue."""
    lines = ["Come up with a series of tasks:", ""]
    lines += [f"Task {i}: {text}" for i, text in enumerate(examples, 1)]
    lines.append(f"Task {len(examples) + 1}:")
    return "\n".join(lines)


def first_task(completion: str) -> str:
    """The instruction the teacher wrote: its completion up to the next task or blank line."""
    text = re.split(r"\n\s*\n|\nTask \d+:", completion.strip(), maxsplit=1)[0]
    return " ".join(text.split())


def generate_instructions(teacher, seeds: list[str], count: int, max_new_tokens: int = 64, temperature: float = 0.7,
                          seed: int = 0, cache: str | Path | None = None, per_round: int = 8,
                          max_rounds: int | None = None) -> list[str]:
    """`count` new instructions written by `teacher` from `seeds` (module docstring); fewer if `max_rounds` (default
    20 x count / per_round) rounds of `per_round` prompts run out first."""
    if len(seeds) < 1:
        raise SlimlmError("Self-Instruct needs seed tasks: pass a JSONL file of instructions as --data")
    path = Path(cache) if cache is not None else None
    written = [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()] \
        if path is not None and path.is_file() else []
    rng = random.Random(seed)
    rounds = max_rounds if max_rounds is not None else max(1, 20 * count // per_round)
    bar = progress_bar(range(rounds), desc=f"Self-Instruct ({teacher.name})", total=rounds)
    for round_index in bar:
        if len(written) >= count:
            break
        prompts = []
        for _ in range(per_round):
            shown = rng.sample(seeds, min(SEEDS_PER_PROMPT, len(seeds)))
            shown += rng.sample(written, min(GENERATED_PER_PROMPT, len(written)))
            prompts.append(task_prompt(shown))
        for completion in teacher.complete(prompts, max_new_tokens, temperature, seed + round_index * per_round):
            instruction = first_task(completion)
            if instruction and len(written) < count and acceptable(instruction, seeds + written):
                written.append(instruction)
        bar.set_postfix(kept=len(written))
        if path is not None:
            atomic_write_text(path, "".join(json.dumps({"instruction": text}) + "\n" for text in written))
    bar.close()
    return written
