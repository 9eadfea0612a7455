"""MiniLLM: sequence-level reverse KL by policy gradient (Gu, Dong, Wei, Huang, "MiniLLM: Knowledge
Distillation of Large Language Models", ICLR 2024, Sec. 2.1-2.2, Eq. 1-8).

The student q minimises the reverse KL of its responses y to the prompts x from the teacher p,
KL(q || p) = -E_{y~q} log p(y|x) / q(y|x). Its policy gradient with per-token rewards
r_t = log p(y_t | y_<t, x) / q(y_t | y_<t, x) is decomposed as the paper does:

- **single-step part** (Eq. 5): the reward of step t alone, whose expectation over y_t is exact over the
  vocabulary: the gradient of sum_t KL(q(.|y_<t, x) || p(.|y_<t, x)) (low variance, no sampling of y_t);
- **long-term part** (Eq. 5-6): -sum_t R_{t+1} grad log q(y_t | y_<t, x), with the **length-normalised**
  return of the steps after t (Eq. 7): R^Norm_{t+1} = 1 / (T - t - 1) * sum_{t' > t} r_t' (0 for the last step),
  so long responses are not favoured by a return that grows with length;
- **teacher-mixed sampling** (Eq. 8): responses are drawn from p~ = alpha p + (1 - alpha) q (alpha = 0.2 in the
  paper) to keep the student from reward hacking with degenerate samples, and each step is importance-weighted
  by w_t = q(y_t | .) / p~(y_t | .) (the paper's per-token approximation of the sequence weight).

The loss whose gradient this is, over the response tokens of a batch (rewards, returns and weights are
constants):  L = sum_t w_t [KL(q_t || p_t) - R^Norm_{t+1} log q(y_t)] / (response tokens) + pt_weight * L_PT,
where L_PT is the next-token loss on the batch's own text (the paper adds the language-modelling loss on a
pre-training corpus to keep the student's general ability). As in the authors' reference implementation, the
returns are whitened over the batch's response steps (zero mean, unit variance: a baseline; without it every
sampled token of a response whose later rewards are negative, as they are on average since E_q[r] = -KL, is
pushed down, and on tiny models the reverse KL did not fall at all). Deviation: the reference runs PPO-style
clipping over several updates per sample batch; here each sampled batch is used for one gradient step, where
the clipped ratio is 1 and clipping does nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimlm.core.stage import register
from slimlm.distill.data import Batch
from slimlm.distill.objective import TeacherObjective, cross_entropy, predictions
from slimlm.distill.sampling import sample_batch
from slimlm.distill.stage import DistillStage
from slimlm.distill.trainer import Objective
from slimlm.errors import SlimlmError


def sample_teacher_mixed(student: nn.Module, teacher: nn.Module, batch: Batch, max_new_tokens: int, alpha: float,
                         generator: torch.Generator, eos_id: int | None, pad_id: int) -> Batch:
    """Each prompt continued by sampling from alpha * p_teacher + (1 - alpha) * q_student."""
    def mixture(logits: list[torch.Tensor]) -> torch.Tensor:
        q, p = (torch.softmax(x, dim=-1) for x in logits)
        return alpha * p + (1 - alpha) * q

    return sample_batch([student, teacher], batch, max_new_tokens, mixture, generator, eos_id, pad_id)


def normalised_future_returns(rewards: torch.Tensor, mask: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """R^Norm_{t+1}: the mean reward of the response steps after t (0 where none follows), per row; the sum
    R_{t+1} without `normalise`."""
    rewards = rewards * mask
    after = rewards.flip(-1).cumsum(-1).flip(-1) - rewards  # sum over t' > t
    if not normalise:
        return after
    count = mask.flip(-1).cumsum(-1).flip(-1) - mask  # steps after t
    return torch.where(count > 0, after / count.clamp_min(1), torch.zeros_like(after))


def whitened(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the masked entries (the reference's advantage whitening)."""
    count = mask.sum().clamp_min(1.0)
    mean = (values * mask).sum() / count
    variance = ((values - mean) ** 2 * mask).sum() / count
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def minillm_surrogate(log_q: torch.Tensor, log_p: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                      alpha: float, length_normalise: bool = True, whiten: bool = True) -> torch.Tensor:
    """The loss whose gradient is MiniLLM's estimator (module docstring), from the student's and the teacher's
    log-probabilities (..., T, V) along sampled responses `tokens` (..., T) with `mask` on the response steps.
    With alpha = 0 and neither normalisation, its expectation over responses drawn from q has exactly the
    gradient of the sequence-level KL(q || p) (divided by the response length)."""
    log_q_y = log_q.gather(-1, tokens[..., None])[..., 0]
    with torch.no_grad():
        log_p_y = log_p.gather(-1, tokens[..., None])[..., 0]
        rewards = log_p_y - log_q_y
        mixed = torch.logaddexp(log_p_y + math.log(alpha) if alpha > 0 else torch.full_like(log_p_y, -math.inf),
                                log_q_y + math.log(1 - alpha) if alpha < 1 else torch.full_like(log_q_y, -math.inf))
        weights = torch.exp(log_q_y - mixed)  # q / p~ per step
        returns = normalised_future_returns(rewards, mask, length_normalise)
        if whiten:
            returns = whitened(returns, mask)
    single = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q_t || p_t), exact over the vocabulary
    per_step = weights * (single - returns * log_q_y)
    return (per_step * mask).sum() / mask.sum().clamp_min(1.0)


class MiniLLM(TeacherObjective):
    def __init__(self, teacher: nn.Module, alpha: float = 0.2, max_new_tokens: int = 64, pt_weight: float = 1.0,
                 eos_id: int | None = None, pad_id: int = 0, whiten: bool = True):
        if not 0 <= alpha <= 1:
            raise SlimlmError(f"minillm: the teacher mix alpha must be in [0, 1] (got {alpha})")
        if pt_weight < 0:
            raise SlimlmError(f"minillm: pt_weight must be >= 0 (got {pt_weight})")
        super().__init__(teacher)
        self.alpha, self.max_new_tokens, self.pt_weight = alpha, max_new_tokens, pt_weight
        self.eos_id, self.pad_id, self.whiten = eos_id, pad_id, whiten
        self.name = "minillm"

    def fingerprint(self) -> str:
        return f"minillm:{self.alpha}:{self.max_new_tokens}:{self.pt_weight}:{self.whiten}"

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        sampled = sample_teacher_mixed(student, self.teacher, batch, self.max_new_tokens, self.alpha, generator,
                                       self.eos_id, self.pad_id)
        log_q = F.log_softmax(predictions(student, sampled).float(), dim=-1)
        log_p = F.log_softmax(self.teacher_logits(sampled).float(), dim=-1)
        mask = sampled.targets.float()
        loss = minillm_surrogate(log_q, log_p, sampled.ids[:, 1:], mask, self.alpha, whiten=self.whiten)
        with torch.no_grad():
            reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
        shown = {"reverse_kl": float((reverse * mask).sum() / mask.sum().clamp_min(1.0))}
        if self.pt_weight > 0:
            language_modelling = cross_entropy(predictions(student, batch), batch)
            loss = loss + self.pt_weight * language_modelling
            shown["pt"] = float(language_modelling.detach())
        return loss, shown


@register
class MiniLLMStage(DistillStage):
    """MiniLLM: reverse KL by policy gradient with single-step decomposition, teacher-mixed sampling and
    length normalisation."""

    method: Literal["minillm"] = "minillm"
    alpha: float = Field(0.2, ge=0, le=1, description="teacher share of the sampling distribution")
    prompt_tokens: int = Field(64, ge=1, description="tokens of each calibration segment kept as the prompt")
    max_new_tokens: int = Field(64, ge=1)
    pt_weight: float = Field(1.0, ge=0, description="weight of the language-modelling loss on the data")
    whiten: bool = Field(True, description="whiten the returns over the batch (the reference code's baseline)")

    def objective(self, teacher, student, report) -> Objective:
        config = getattr(student, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        return MiniLLM(teacher, self.alpha, self.max_new_tokens, self.pt_weight,
                       eos[0] if isinstance(eos, list) else eos, pad_id=0, whiten=self.whiten)
