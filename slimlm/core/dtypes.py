"""Dtype names read from checkpoints (slimlm.json, each compressed layer's metadata)."""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError


def torch_dtype(name: object, where: str) -> torch.dtype:
    """The torch dtype called `name` ("float32", "bfloat16", ...); a clear error naming `where` otherwise,
    instead of an AttributeError from getattr(torch, name)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise SlimlmError(f"{where}: {name!r} is not a torch dtype (float32, bfloat16, float16, ...); the checkpoint "
                          "is damaged or was not written by slimlm: save the model again")
    return dtype
