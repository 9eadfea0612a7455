"""slimlm: make large language models smaller and faster, and measure what it cost.

    import slimlm
    lm = slimlm.load_model("smollm2-135m")
    rows = slimlm.evaluate(lm.model, lm.tokenizer, "pydoc,piqa", slimlm.EvalSettings(seqlen=512, limit=100))
    report = slimlm.compress(lm.model, "rtn-w4g64")
    slimlm.save(lm.model, "./w4g64", lm.tokenizer)
"""

from slimlm.compress import compress  # noqa: E402  (the function shadows the subpackage name on purpose)
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.eval import EvalSettings, evaluate, kl_divergence, perplexity  # noqa: E402
from slimlm.export.native import load, save  # noqa: E402
from slimlm.models import ModelAdapter, load_model  # noqa: E402
from slimlm.version import __version__  # noqa: F401

__all__ = ["EvalSettings", "ModelAdapter", "SlimlmError", "compress", "evaluate", "kl_divergence", "load",
           "load_model", "perplexity", "save"]
