"""The compression engine and recipes."""

from __future__ import annotations

import os

import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimlm.compress.engine import CompressionReport
from slimlm.compress.engine import compress as run_recipe
from slimlm.compress.recipe import Recipe, load_recipe
from slimlm.data.calibration import calibration_samples
from slimlm.errors import SlimlmError


def with_calibration(recipe: Recipe, **overrides: object) -> Recipe:
    """A copy of `recipe` whose calibration settings (corpus, samples, seqlen, seed, batch_size) take the
    given values; None leaves a setting as it is."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if not given:
        return recipe
    try:
        calibration = recipe.calibration.model_validate({**recipe.calibration.model_dump(), **given})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})"
                             for e in error.errors())
        raise SlimlmError(f"invalid calibration setting: {problems}") from None
    return recipe.model_copy(update={"calibration": calibration})


def calibration_tokens(recipe: Recipe, tokenizer: PreTrainedTokenizerBase | None,
                       data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor | None:
    """The calibration segments the recipe asks for (token ids, (samples, seqlen)), or None if no stage calibrates."""
    if not recipe.needs_calibration:
        return None
    if tokenizer is None:
        raise SlimlmError("this recipe needs calibration: pass calibration=token ids or tokenizer=")
    c = recipe.calibration
    return calibration_samples(tokenizer, c.corpus, c.samples, c.seqlen, c.seed, data_dir)


def compress(
    model: PreTrainedModel,
    recipe: str | dict | Recipe,
    calibration: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool | None = None,
) -> CompressionReport:
    """Compress `model` in place with `recipe` (a preset name, a YAML path, a dict or a Recipe).

    Calibration segments come from `calibration` (token ids, shape (samples, seqlen)), or are drawn
    from the recipe's calibration corpus with `tokenizer`. With `checkpoint_dir`, a checkpoint is written
    there after every block and a checkpoint of the same run found there is continued
    (`slimlm.compress.resume`: the result is bitwise that of an uninterrupted run); `resume=True` requires
    such a checkpoint, `resume=False` discards it. Remove the folder once the compressed model is saved.
    """
    recipe = load_recipe(recipe)
    if calibration is None:
        calibration = calibration_tokens(recipe, tokenizer, data_dir)
    return run_recipe(model, recipe, calibration, device, checkpoint_dir, resume)


__all__ = ["CompressionReport", "Recipe", "calibration_tokens", "compress", "load_recipe", "with_calibration"]
