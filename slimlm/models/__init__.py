"""Model loading and architecture adapters."""

from slimlm.models.adapter import BlockAdapter, ModelAdapter
from slimlm.models.loading import DEFAULT_MODEL, EMBEDDED_MODELS, LoadedModel, load_model

__all__ = ["BlockAdapter", "DEFAULT_MODEL", "EMBEDDED_MODELS", "LoadedModel", "ModelAdapter", "load_model"]
