"""The compression engine and recipes."""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.compress.engine import CompressionReport
from slimlm.compress.recipe import Recipe, load_recipe
from slimlm.errors import SlimlmError


def compress(
    model: PreTrainedModel,
    recipe: str | dict | Recipe,
    calibration: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> CompressionReport:
    """Compress `model` in place with `recipe` (a preset name, a YAML path, a dict or a Recipe).

    Calibration segments come from `calibration` (token ids, shape (samples, seqlen)), or are drawn
    from the recipe's calibration corpus with `tokenizer`.
    """
    from slimlm.compress.engine import compress as run
    from slimlm.data.calibration import calibration_samples

    recipe = load_recipe(recipe)
    if recipe.needs_calibration and calibration is None:
        if tokenizer is None:
            raise SlimlmError("this recipe needs calibration: pass calibration=token ids or tokenizer=")
        c = recipe.calibration
        calibration = calibration_samples(tokenizer, c.corpus, c.samples, c.seqlen, c.seed, data_dir)
    return run(model, recipe, calibration, device)


__all__ = ["CompressionReport", "Recipe", "compress", "load_recipe"]
