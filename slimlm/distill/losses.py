"""Token-level divergences between a teacher's and a student's next-token distributions.

The shared math of the white-box methods. Every function takes logits of shape (..., vocab) and
returns one value per position (float32, or float64 for float64 logits), so callers mask and average them their own way:

- `forward_kl`: KL(p_T || q_S) = sum_v p_T(v) (log p_T(v) - log q_S(v)), the mode-covering divergence of
  Hinton et al.'s knowledge distillation (with temperature tau both distributions are softened first);
- `reverse_kl`: KL(q_S || p_T), the mode-seeking divergence of MiniLLM and of GKD with beta = 1;
- `generalized_jsd`: GKD's JSD(beta) (Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes", ICLR 2024, Eq. 2/3):

      JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

  with P the teacher and Q the student. JSD(beta) / beta -> KL(P || Q) as beta -> 0 and
  JSD(beta) / (1 - beta) -> KL(Q || P) as beta -> 1, so the two ends are computed as those KLs
  (as the authors' reference trainer does), which keeps the gradient from vanishing there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities in float32 at least (bfloat16 logits of a mixed-precision forward are widened)."""
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(wide / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position, both softened by `temperature`."""
    log_q, log_p = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per position."""
    log_q, log_p = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's JSD(beta) per position (module docstring); beta 0 and 1 give forward and reverse KL."""
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_q, log_p = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    kl_p_m = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


def relative_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked positions divided by the target's mean square there (a layer's
    matching loss that does not grow with the residual stream's scale: `hidden` and `ted`)."""
    error = F.mse_loss(prediction, target, reduction="none").mean(-1)
    return masked_mean(error, mask) / masked_mean(target.pow(2).mean(-1), mask).clamp_min(1e-12)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true (all positions without a mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
