"""Recipes: typed, validated descriptions of a compression run, in Python or YAML.

A recipe is a list of stages and a calibration set. Each stage names a method, its settings and
its targets (module-name patterns; `re:` prefix for a regular expression, else a glob) and an
ignore list. Every model rejects unknown keys, and the error lists the valid ones, so a typo in
a recipe fails before any work:

```yaml
calibration: {corpus: c4, samples: 128, seqlen: 512, seed: 0}
stages:
  - method: gptq
    bits: 4
    group_size: 64
    act_order: true
    ignore: [lm_head]
```

Stages run in order; methods that calibrate run inside the same sequential block-by-block pass
(see `slimlm.compress.engine`). A stage's `method` picks its class from the method registry
(`slimlm.core.registry`): slimlm's own methods and those a plug-in package registers.
"""

from __future__ import annotations

import fnmatch
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError, core_schema

from slimlm.compress.presets import PRESETS
from slimlm.core.registry import method_names, stage_class, stage_classes
from slimlm.core.stage import Stage, StrictModel
from slimlm.errors import SlimlmError


class CalibrationConfig(StrictModel):
    corpus: str = "c4"  # a corpus name (its calibration split) or a .txt/.jsonl path
    samples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="calibration segments per forward pass")


def validate_stage(item: Any) -> Stage:
    """A stage object from a stage mapping: its `method` picks the registered class, which validates the rest."""
    if isinstance(item, Stage):
        return item
    if not isinstance(item, dict):
        raise PydanticCustomError("stage_type", "a stage must be a mapping with a `method` (got {got})",
                                  {"got": type(item).__name__})
    method = item.get("method")
    if method is None:
        raise PydanticCustomError("missing_method", "a stage needs a `method` ({methods})",
                                  {"methods": ", ".join(method_names())})
    cls = stage_class(str(method))
    if cls is None:
        raise PydanticCustomError("unknown_method", "unknown method '{method}'; choose one of {methods}",
                                  {"method": method, "methods": ", ".join(method_names())})
    try:
        return cls.model_validate(item)
    except ValidationError as error:  # report each problem under stages.<i>.<method>.<field>, as before
        raise ValidationError.from_exception_data(
            error.title, [{"type": e["type"], "loc": (str(method), *e["loc"]), "input": e["input"],
                           **({"ctx": e["ctx"]} if "ctx" in e else {})} for e in error.errors()]) from None


class AnyStage:
    """Recipe field type: any registered stage, dispatched on `method` when the recipe is validated (so
    a method registered after this module was imported is found too)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            validate_stage, serialization=core_schema.plain_serializer_function_ser_schema(
                lambda stage: stage.model_dump(mode="json"), when_used="always"))


class Recipe(StrictModel):
    stages: list[AnyStage] = Field(min_length=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    # Precision of the parameters no stage compresses (embedding, norms, LM head): rounded in memory
    # after compression, so the saved checkpoint stores them in that dtype and is still exactly the
    # model that was evaluated. "auto": the checkpoint's own dtype when it is 16-bit (no rounding at
    # all), else bfloat16 (`slimlm.compress.engine.resolve_float_storage`).
    float_storage: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @property
    def needs_calibration(self) -> bool:
        return any(stage.needs_calibration for stage in self.stages)

    @model_validator(mode="after")
    def _structural_first(self):
        seen_block_stage = False
        for stage in self.stages:
            if stage.whole_model and seen_block_stage:
                raise ValueError(f"stage {stage.method!r} changes the architecture: put it before the "
                                 "pruning and quantization stages")
            seen_block_stage |= not stage.whole_model
        after = [stage.after_blocks for stage in self.stages]
        if any(after) and not all(after[after.index(True):]):
            raise ValueError("training stages (distillation, fine-tuning) run on the finished model: put them "
                             "after every pruning and quantization stage")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_recipe(data: dict) -> Recipe:
    """Validate a recipe dict; errors name each bad field and list the valid keys."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise SlimlmError("invalid recipe:\n" + _explain(error, data)) from None


def _explain(error: ValidationError, data: dict) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(item["loc"])
            message = f"unknown key {item['loc'][-1]!r}" + (f"; valid keys: {', '.join(valid)}" if valid else "")
            if item["loc"][-1] == "activations":
                owners = _methods_with_setting("activations")
                message += (f"; activation quantization (W8A8) is a setting of the {', '.join(owners)} stages "
                            "(smoothquant always quantizes activations)")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _methods_with_setting(field: str) -> list[str]:
    return [name for name, cls in stage_classes().items() if field in cls.model_fields]


def _valid_keys(loc: tuple) -> list[str]:
    """Field names of the settings model at `loc` (without its last element, the bad key)."""
    if loc[0] == "stages" and len(loc) >= 4:
        model = stage_class(str(loc[2]))
        for key in loc[3:-1]:  # nested settings (activations, owl, quantize, lkd, recovery)
            model = _settings_model(model, key) if model is not None else None
        return sorted(model.model_fields) if model else []
    if loc[0] == "calibration":
        return sorted(CalibrationConfig.model_fields)
    return sorted(Recipe.model_fields)


def _settings_model(model: type[BaseModel], key: object) -> type[BaseModel] | None:
    """The pydantic model type of field `key` (unwrapping `X | None`), or None."""
    field = model.model_fields.get(str(key))
    if field is None:
        return None
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def load_recipe(spec: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a preset name, a YAML file, a dict or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return parse_recipe(spec)
    text = str(spec)
    if text in PRESETS:
        return parse_recipe(PRESETS[text])
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SlimlmError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise SlimlmError(f"recipe file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise SlimlmError(f"recipe file {path} must hold a mapping with `stages`")
        return parse_recipe(data)
    raise SlimlmError(f"unknown recipe {text!r}: give a YAML file or a preset ({', '.join(PRESETS)})")


def matches(name: str, patterns: list[str]) -> bool:
    """True if a module name matches any pattern (`re:` regex with full match, else a glob)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern):
            return True
    return False


def select_targets(names: list[str], stage: Stage) -> list[str]:
    """The module names a stage applies to; an empty selection is an error."""
    chosen = [n for n in names if matches(n, stage.targets) and not matches(n, stage.ignore)]
    if not chosen:
        raise SlimlmError(
            f"stage {getattr(stage, 'method', '?')}: targets {stage.targets} minus ignore {stage.ignore} select no "
            f"linear layer; names look like {names[0]!r}"
        )
    return chosen
