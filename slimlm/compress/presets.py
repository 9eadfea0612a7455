"""Named recipes for `slimlm compress --recipe NAME` (each also expressible as YAML: `Recipe.to_yaml`).

Weight-only presets quantize every linear of the decoder blocks (the LM head and embedding stay in
float) asymmetrically, the default of the GPTQ and AWQ papers' code. `g128` on a model whose width
is not a multiple of 128 (SmolLM2: 576) uses a shorter last group.
"""

from __future__ import annotations


def _weight_only(method: str, bits: int, group_size: int | str, **extra) -> dict:
    return {"stages": [{"method": method, "bits": bits, "group_size": group_size, **extra}]}


PRESETS: dict[str, dict] = {}
for _bits in (2, 3, 4, 8):
    for _group in (32, 64, 128, "channel"):
        _suffix = f"g{_group}" if isinstance(_group, int) else "ch"
        for _method in ("rtn", "gptq", "awq"):
            PRESETS[f"{_method}-w{_bits}{_suffix}"] = _weight_only(_method, _bits, _group)
        PRESETS[f"gptq-w{_bits}{_suffix}-actorder"] = _weight_only("gptq", _bits, _group, act_order=True)
