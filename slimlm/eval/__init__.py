"""Quality (perplexity, KL divergence, zero-shot accuracy) and efficiency metrics."""

from slimlm.eval.kl import kl_divergence
from slimlm.eval.perplexity import perplexity
from slimlm.eval.runner import EvalSettings, evaluate

__all__ = ["EvalSettings", "evaluate", "kl_divergence", "perplexity"]
