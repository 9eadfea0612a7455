"""Settings that the unstructured and N:M pruning methods share."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from slimlm.core.sparsity import parse_n_m
from slimlm.errors import SlimlmError
from slimlm.prune.owl import OWLMixin


class PruneFields(OWLMixin):
    """Unstructured and N:M pruning settings (magnitude, Wanda, SparseGPT, DSnoT); OWL varies the sparsity
    per block (`slimlm.prune.owl`)."""

    sparsity: float = Field(0.5, description="fraction of each target's weights set to zero, in (0, 1)")
    pattern: str | None = Field(None, description='N:M semi-structured sparsity, e.g. "2:4" (keep 2 of every 4)')

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, sparsity: float) -> float:
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be between 0 and 1, exclusive (got {sparsity}); 0.5 prunes half the weights")
        return sparsity

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                parse_n_m(pattern)
            except SlimlmError as error:
                raise ValueError(str(error)) from None
        return pattern

    @model_validator(mode="after")
    def _pattern_fixes_sparsity(self):
        if self.pattern is not None:
            if self.owl is not None:
                raise ValueError("OWL varies the sparsity per block; an N:M pattern fixes it: use one or the other")
            n, m = self.n_m
            if "sparsity" in self.model_fields_set and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} means sparsity {1 - n / m:g}, not {self.sparsity:g}: drop `sparsity`")
            object.__setattr__(self, "sparsity", 1 - n / m)  # what the pattern means, for reports
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_n_m(self.pattern) if self.pattern else None

    def check_layer(self, name: str, in_features: int) -> None:
        if self.n_m and in_features % self.n_m[1]:
            raise SlimlmError(f"pattern {self.pattern}: {name}'s {in_features} input features are not a multiple of "
                              f"{self.n_m[1]}; exclude it with `ignore`")
