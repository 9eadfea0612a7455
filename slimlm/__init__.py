"""slimlm: make large language models smaller and faster, and measure what it cost.

    import slimlm
    lm = slimlm.load_model("smollm2-135m")
    rows = slimlm.evaluate(lm.model, lm.tokenizer, "pydoc,piqa", slimlm.EvalSettings(seqlen=512, limit=100))
    report = slimlm.compress(lm.model, "rtn-w4g64")
    slimlm.save(lm.model, "./w4g64", lm.tokenizer)

The names above are imported on first use, so that `slimlm --help` does not wait for PyTorch.
"""

import importlib
import sys
import types

from slimlm.version import __version__  # noqa: F401

_EXPORTS = {
    "EvalSettings": "slimlm.eval", "evaluate": "slimlm.eval", "kl_divergence": "slimlm.eval",
    "perplexity": "slimlm.eval", "ModelAdapter": "slimlm.models", "load_model": "slimlm.models",
    "SlimlmError": "slimlm.errors", "load": "slimlm.export.native", "save": "slimlm.export.native",
}
__all__ = ["EvalSettings", "ModelAdapter", "SlimlmError", "compress", "evaluate", "kl_divergence", "load",
           "load_model", "perplexity", "save"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`slimlm.compress` is the function, as `slimlm.compress(model, recipe)` reads, although the import system
    records the subpackage of the same name on this module when it is imported (`sys.modules` keeps it)."""

    @property
    def compress(self):
        return importlib.import_module("slimlm.compress").compress

    @compress.setter
    def compress(self, _subpackage) -> None:
        pass


sys.modules[__name__].__class__ = _Package
