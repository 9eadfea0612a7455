"""Sampling continuations of a batch's prompts, for the on-policy objectives (GKD, MiniLLM).

The whole batch is sampled together, one forward pass per new token with each model's KV cache. Prompts of
different lengths (instructions, questions) are left-padded, with an attention mask and position ids counted
from each prompt's first real token, where every model takes position ids; otherwise each prompt length is
its own group. Prompts of one length (text segments) need no padding at all. A row stops after its end-of-sequence
token; the group runs until every row has stopped or `max_new_tokens` are drawn. Draws come from one
`torch.Generator`, so a run with the same generator state samples the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from slimlm.distill.data import Batch
from slimlm.infer.sampling import SamplingSettings, next_token_probs


def returned_cache(output):
    """The KV cache a forward returned (transformers 5.x: `cache`; 4.x: `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _takes_positions(model: nn.Module) -> bool:
    """Whether the model's forward takes explicit position ids (needed to left-pad prompts of several lengths)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def _cache_argument(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_batch(models: list[nn.Module], batch: Batch, max_new_tokens: int,
                 next_token_probs: Callable[[list[torch.Tensor]], torch.Tensor], generator: torch.Generator,
                 eos_id: int | None, pad_id: int) -> Batch:
    """The batch's prompts continued by drawing from `next_token_probs(last logits of each model)` (G, V)."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    arguments = [_cache_argument(model) for model in models]
    lengths = batch.prompt_lengths.tolist()
    rows: list[tuple[list[int], list[int]]] = [([], [])] * len(lengths)
    groups = [[b for b, n in enumerate(lengths) if n == length] for length in sorted(set(lengths))]
    if len(groups) > 1 and all(_takes_positions(model) for model in models):
        groups = [list(range(len(lengths)))]  # one left-padded group
    try:
        for members in groups:
            width = max(lengths[b] for b in members)
            prompts = torch.full((len(members), width), pad_id, dtype=torch.long, device=batch.ids.device)
            mask = torch.zeros_like(prompts)
            for row, b in enumerate(members):  # left padding: every prompt ends at the last column
                prompts[row, width - lengths[b]:] = batch.ids[b, : lengths[b]]
                mask[row, width - lengths[b]:] = 1
            padded = bool((mask == 0).any())
            extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if padded else {}
            outputs = [model(input_ids=prompts, use_cache=True, **extra) for model in models]
            caches = [returned_cache(output) for output in outputs]
            drawn = []
            finished = torch.zeros(len(members), dtype=torch.bool, device=prompts.device)
            for _ in range(max_new_tokens):
                probs = next_token_probs([output.logits[:, -1].float() for output in outputs])
                token = torch.multinomial(probs, 1, generator=generator)
                drawn.append(token[:, 0])
                if eos_id is not None:
                    finished |= token[:, 0] == eos_id
                    if bool(finished.all()):
                        break
                if padded:
                    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                    extra = {"attention_mask": mask, "position_ids": mask.sum(-1, keepdim=True) - 1}
                outputs = [model(input_ids=token, use_cache=True, **{argument: cache}, **extra)
                           for model, argument, cache in zip(models, arguments, caches)]
                caches = [returned_cache(output) for output in outputs]
            tokens = torch.stack(drawn, dim=1).tolist()
            for row, b in enumerate(members):
                generated = tokens[row]
                if eos_id is not None and eos_id in generated:
                    generated = generated[: generated.index(eos_id) + 1]
                rows[b] = (batch.ids[b, : lengths[b]].tolist(), generated)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return padded_batch(rows, pad_id, batch)


def padded_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, like: Batch) -> Batch:
    """(prompt, sampled tokens) rows as a right-padded batch whose targets are the sampled tokens."""
    width = max(len(p) + len(g) for p, g in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for b, (prompt, generated) in enumerate(rows):
        n = len(prompt) + len(generated)
        ids[b, :n] = torch.tensor(prompt + generated)
        mask[b, :n] = 1
        targets[b, len(prompt) - 1 : n - 1] = True
    device = like.ids.device
    return Batch(ids.to(device), mask.to(device), targets.to(device), like.prompt_lengths)


def prompt_batch(prompts: list[list[int]], device: torch.device | str = "cpu") -> Batch:
    """Token-id prompts as a Batch to continue (right-padded; every prompt token kept as the prompt)."""
    width = max(len(ids) for ids in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(tokens) for tokens in prompts])
    return Batch(ids.to(device), torch.ones_like(ids).to(device),
                 torch.zeros(len(prompts), width - 1, dtype=torch.bool, device=device), lengths)


def sample_continuations(model: nn.Module, batch: Batch, max_new_tokens: int, temperature: float,
                         generator: torch.Generator, eos_id: int | None, pad_id: int) -> Batch:
    """The prompts continued by `model` at `temperature` (0: greedy; GKD's on-policy samples)."""
    settings = SamplingSettings(temperature=temperature)
    return sample_batch([model], batch, max_new_tokens, lambda logits: next_token_probs(logits[0], settings),
                        generator, eos_id, pad_id)
