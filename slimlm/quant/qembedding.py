"""`QuantizedEmbedding`: a token embedding stored as the packed codes of `slimlm.quant.grid`.

An embedding is a (vocab, hidden) matrix read one row per token, so it costs file bytes and memory,
not decode time; in a small model it is a large share of the file (SmolLM2-135M: 28M of 135M
parameters). This layer keeps the same buffers as `QuantizedLinear` (a row of the table is a row
of codes, with that row's group scales and zero points) and dequantizes only the rows looked up.

Tied models (embedding = LM head): `QuantizedEmbedding.sharing(head)` holds the quantized head's
own tensors, so the file stores the matrix once and the embedding reads exactly the values the
head multiplies by, as in the float model. A checkpoint records the module it shares with
(`tied_to`), and loading re-binds the two (`bind_shared_tensors`).

Embeddings that scale their output inside the module (Gemma's `embed_scale`) keep that factor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.packing import unpack
from slimlm.core.registry import register_layer
from slimlm.errors import SlimlmError
from slimlm.quant.grid import QuantizedWeight, dequantize_codes
from slimlm.quant.qlinear import QuantizedLinear

_SHARED_BUFFERS = ("packed", "scale", "zero", "g_idx", "codebook")


@register_layer("quantized_embedding")
class QuantizedEmbedding(QuantizedLinear):
    """Token ids -> rows of a quantized (vocab, hidden) table; see the module docstring."""

    is_compressed_linear = False  # looked up, never multiplied: not a linear to the architecture adapter

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale: float | None = None
        self.tied_to: str | None = None  # the module whose tensors this one shares (a tied LM head)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def replacing_embedding(cls, embedding: nn.Module, qw: QuantizedWeight) -> QuantizedEmbedding:
        """The quantized stand-in for a float embedding whose weight `qw` quantizes."""
        _check_table(qw)
        layer = cls.from_quantized(qw).to(embedding.weight.dtype)
        layer.embed_scale = _embed_scale(embedding)
        return layer

    @classmethod
    def sharing(cls, head: QuantizedLinear, embedding: nn.Module, head_name: str) -> QuantizedEmbedding:
        """An embedding reading the quantized LM head's own tensors (a tied model keeps one matrix)."""
        if head.g_idx is not None or head.input_quantizer is not None or head.bias is not None:
            raise SlimlmError("the quantized LM head reorders, shifts or biases its inputs: an embedding cannot "
                              "share it; quantize the embedding on its own grid")
        layer = cls(head.in_features, head.out_features, head.bits, head.group_size, head.symmetric, head.fmt)
        layer.embed_scale = _embed_scale(embedding)
        layer.bind_to(head, head_name)
        return layer

    def bind_to(self, head: QuantizedLinear, head_name: str) -> None:
        for name in _SHARED_BUFFERS:
            setattr(self, name, getattr(head, name))
        self.tied_to = head_name

    def bind_shared_tensors(self, model: nn.Module) -> None:
        """After loading a checkpoint: share the tensors of the module this embedding was tied to."""
        if self.tied_to is not None:
            self.bind_to(model.get_submodule(self.tied_to), self.tied_to)

    @classmethod
    def from_meta(cls, meta: dict, dtype: torch.dtype) -> QuantizedEmbedding:
        layer = super().from_meta(meta, dtype)
        layer.embed_scale = meta.get("embed_scale")
        layer.tied_to = meta.get("tied_to")
        return layer

    def meta(self) -> dict:
        return {**super().meta(), "embed_scale": self.embed_scale, "tied_to": self.tied_to}

    def num_logical_params(self) -> int:
        return 0 if self.tied_to is not None else self.in_features * self.out_features  # a tied head counts it

    def forward(self, ids: Tensor) -> Tensor:
        rows = ids.reshape(-1)
        codes = unpack(self.packed[rows], self.bits, self.in_features)
        zero = self.zero[rows] if self.zero is not None else self._zero()
        table = dequantize_codes(codes, self.scale[rows], zero, self.bits, self.fmt, self.group_size)
        if self.embed_scale is not None:
            table = table * self.embed_scale
        self.last_path = "lookup"
        return table.to(self.scale.dtype).reshape(*ids.shape, self.in_features)


def _check_table(qw: QuantizedWeight) -> None:
    if qw.fmt != "int" or qw.g_idx is not None:
        raise SlimlmError("an embedding is quantized on an integer grid without act-order (got "
                          f"fmt={qw.fmt!r}{', act-order' if qw.g_idx is not None else ''})")


def _embed_scale(embedding: nn.Module) -> float | None:
    scale = getattr(embedding, "embed_scale", None)
    return None if scale is None else float(scale)
